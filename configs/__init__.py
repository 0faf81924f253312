"""YAML configs shipped with the package (`default.yaml` is the embedded default)."""
