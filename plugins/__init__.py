"""Built-in saex plugins. Each module registers its components through the hooks of ``saex.spec``,
exactly as a third-party plugin would."""
