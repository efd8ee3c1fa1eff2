"""Text in, token memmaps out: corpora, tokenizers, encoding, and the batches training reads. Knows no model."""
