"""Data: the embedded multi-task benchmark, Hugging Face datasets, padded batches, non-IID splits."""
