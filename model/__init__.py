"""The GPT model and its pluggable norms."""
from model.gpt import GPT
from model.normalized import NormalizedGPT
from model.norms import NORMS, make_norm
from model.stack import check_model_config, resolve_norm_stack


def make_model(config):
    """The model config.block_type names: the standard GPT, or nGPT (model/normalized.py)."""
    return NormalizedGPT(config) if config.block_type == "normalized" else GPT(config)
