"""Data: the embedded multi-task benchmark, Hugging Face datasets, batches, non-IID splits."""
