"""Built-in pruning plugins."""
