"""Model pieces on the one shared backbone: loading it, adapters, heads, sequences, generation."""
