"""Torch-free I/O: the config, datasets, artifacts and their provenance, DeepSpeed config files."""
