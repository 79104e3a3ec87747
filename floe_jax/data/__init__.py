"""Data: the embedded multi-task benchmark, its tokenizer and the example encoder, Hugging Face
instruction datasets."""
