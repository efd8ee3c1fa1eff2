"""Hugging Face interop: start from transformers checkpoints, study them, export runs to them."""
from hf.export import export_checkpoint, export_model, to_transformers
from hf.load import is_transformers_source, load_init_weights, load_pretrained, resolve_init_from
from hf.sources import Source, load_source
