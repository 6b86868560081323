"""The plugin contract: hookspecs, one Protocol per plugin kind, the conformance check, the plugin manager."""
