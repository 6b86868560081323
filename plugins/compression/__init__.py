"""Built-in compression plugins."""
