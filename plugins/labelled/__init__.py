"""Built-in labelled text sets (registry section ``labelled_sets``)."""
