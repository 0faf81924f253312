"""The peak-memory plan of each stage, before anything heavy loads (torch-free)."""
