"""A model's configuration (`config.toml`): tensors, batching, scheduling policy, stream contract."""
