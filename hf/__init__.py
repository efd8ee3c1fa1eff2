"""Hugging Face interop: start from transformers checkpoints, study them, export runs to them (docs/hf_interop.md)."""
from hf.export import export_checkpoint, export_model, to_transformers
from hf.load import is_transformers_source, load_init_weights, load_pretrained, resolve_init_from
