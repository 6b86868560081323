"""Built-in saex plugins. Each module registers its components through the hooks of ``saex.plugin.hookspecs``,
exactly as a third-party plugin would."""
