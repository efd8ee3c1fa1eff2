"""The GPT model and its pluggable norms."""
from model.gpt import GPT
from model.normalized import NormalizedGPT
from model.norms import NORMS, check_model_config, make_norm, resolve_norm_stack


def make_model(config):
    """The model config.block_type names: the standard GPT, or nGPT (model/normalized.py)."""
    return NormalizedGPT(config) if config.block_type == "normalized" else GPT(config)
