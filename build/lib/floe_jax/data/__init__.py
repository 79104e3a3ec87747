"""Data: the embedded multi-task benchmark, its tokenizer and the example encoder, Hugging Face
instruction datasets, non-IID client splits (`splits`) and answer metrics (`metrics`: ROUGE-L,
exact match)."""
