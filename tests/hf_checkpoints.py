"""Small random transformers checkpoints, built here with transformers' own classes and save_pretrained
(no download), with a BPE tokenizer trained on a few of this repository's files."""
from pathlib import Path

import torch

from data.tokenizer import END_OF_DOCUMENT, train_tokenizer
from repo import ROOT

TEXT = "def forward(self, x):\n    return self.norm(x + 1)  # a sample, with unicode: café ≠ cafe\n"


def documents():
    return [p.read_text() for p in sorted((ROOT / "model").glob("*.py")) + [ROOT / "config.py"]]


def tokenizer_file(folder, vocab_size=320):
    """tokenizer.json trained on a few files, with <|endoftext|> its only special token."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        Path(folder).mkdir(parents=True, exist_ok=True)
        train_tokenizer(documents(), vocab_size).save(str(path))
    return path


def save_tokenizer(folder, tokenizer_path, eos=END_OF_DOCUMENT):
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), eos_token=eos, bos_token=eos).save_pretrained(folder)


def build(family, folder, tokenizer_path, seed=0, **values):
    """A random `family` ("gpt2", "llama", "qwen3", "gemma3") checkpoint in folder; values go to its config class.
    Weights are drawn with a larger std than the classes' 0.02, so greedy choices are far apart."""
    import transformers
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    eod = Tokenizer.from_file(str(tokenizer_path)).token_to_id(END_OF_DOCUMENT)
    common = dict(vocab_size=vocab, bos_token_id=eod, eos_token_id=eod, initializer_range=0.1)
    if family == "gpt2":
        config = transformers.GPT2Config(**{**common, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
                                            **values})
    else:
        shape = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6)
        if family == "qwen3":
            shape["head_dim"] = 8
        if family == "gemma3":  # heads of 12 on a 32-wide stream, local blocks of 8 tokens with a base of their own
            shape = dict(shape, num_hidden_layers=3, head_dim=12, query_pre_attn_scalar=10, sliding_window=8,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})
            del shape["rope_theta"]
        cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config,
               "olmo2": transformers.Olmo2Config, "mistral": transformers.MistralConfig,
               "gemma3": transformers.Gemma3TextConfig}[family]
        config = cls(**{**common, **shape, **values})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from their init too, so a wrong mapping of them shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    save_tokenizer(folder, tokenizer_path)
    return Path(folder)

