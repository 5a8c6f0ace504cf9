"""specbeam: lossless speculative decoding for Hugging Face causal language models."""
