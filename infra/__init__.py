"""Deployment presets shipped as package data: DeepSpeed JSON, accelerate configs, prefect.yaml."""
