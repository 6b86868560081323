"""Where saex keeps what it computed: the content-addressed cache, the results store, content fingerprints."""
