"""ml_collections config files, one per experiment (each exposes ``get_config(arg)``)."""
