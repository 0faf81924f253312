"""Prefect flows, per-stage tasks, the content-addressed cache and the `rlhf` CLI."""
