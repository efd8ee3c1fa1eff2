"""The GPT model and its pluggable norms."""
from model.gpt import GPT
from model.norms import NORMS, check_model_config, make_norm, resolve_norm_stack
