"""Stages of the chain (one module each) and the shared pieces they are built from."""
