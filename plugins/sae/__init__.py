"""Built-in sae plugins."""
