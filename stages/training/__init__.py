"""Training plumbing: the stage runner, the resumable loop, optimizer updates, checkpoints, ranks, tracking."""
