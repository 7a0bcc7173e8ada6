"""Training data: the batches the trainer draws, the embedded digits set, pre-encoded shards and the encoder that writes them, sample files."""
