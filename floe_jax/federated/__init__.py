"""Federated LoRA: one client's local update lifted over the client axis, aggregation rules,
task clustering and the round loop with checkpoints."""
