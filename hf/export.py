"""A GPT as a transformers checkpoint: save_pretrained's layout (model.safetensors, config.json,
generation_config.json) plus tokenizer.json and tokenizer_config.json with our end-of-document token as
EOS (and BOS: samples start as a fresh document), loadable by AutoModelForCausalLM and AutoTokenizer
with no code of ours. hf/families.py decides which class represents the stack, or refuses it.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer

from config import UserError, check_folder
from model.stack import refuse_normalized
from data.tokenizer import end_of_document
from hf.families import CLASSES, export_family, export_state, hf_config_values
from hf.load import require_transformers
from model.gpt import load_exactly
from training.checkpoint import TOKENIZER, load_model

CONFIG_CLASSES = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "qwen3": "Qwen3Config", "gemma3_text": "Gemma3TextConfig"}


def is_identity(key, config):
    """Whether a tensor the class has and our stack lacks is written as the identity: a bias under
    bias = false (zeros), a norm gain under norm_gain = false (ones; zeros for Gemma's 1 + w)."""
    if key.endswith(".bias"):
        return not config.bias
    return key.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")) and not config.norm_gain


@torch.no_grad()
def to_transformers(model, config, eod_id, where="the model"):
    """(family, the transformers model holding model's weights, in fp32)."""
    refuse_normalized(config, f"exporting {where} to transformers")
    transformers = require_transformers("exporting")
    kind = export_family(config, where)
    hf_config = getattr(transformers, CONFIG_CLASSES[kind])(**hf_config_values(kind, config, eod_id))
    hf_model = getattr(transformers, CLASSES[kind])(hf_config).float().eval()
    expected = hf_model.state_dict()
    state = export_state(kind, model.state_dict(), config)
    for key, value in expected.items():
        if key not in state and is_identity(key, config):
            zero = key.endswith(".bias") or kind == "gemma3_text"
            state[key] = torch.zeros_like(value) if zero else torch.ones_like(value)
    load_exactly(hf_model, state, f"cannot export {where} as {CLASSES[kind]}",
                 tied=("lm_head.weight",) if config.tie_embeddings else ())
    hf_model.generation_config = transformers.GenerationConfig(bos_token_id=eod_id, eos_token_id=eod_id,
                                                               pad_token_id=eod_id)
    return kind, hf_model


def export_model(model, config, tokenizer_path, out, where="the model"):
    """Write model (a GPT) and its tokenizer into the new folder `out`; returns the family. The files
    are written into a temporary folder renamed into place when complete: a kill leaves no half export."""
    out = check_folder(out, "out folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"out folder {str(out)!r} is not empty; give a new folder (nothing is overwritten)")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eod_name, eod_id = end_of_document(tokenizer, config.eod_token)
    kind, hf_model = to_transformers(model, config, eod_id, where)
    transformers = require_transformers("exporting")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model.save_pretrained(tmp)
        hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), eos_token=eod_name,
                                                            bos_token=eod_name, model_max_length=config.block_size)
        hf_tokenizer.save_pretrained(tmp)
        # transformers 5 writes its own class name; PreTrainedTokenizerFast is what 4.x (and 5) load
        values = json.loads((tmp / "tokenizer_config.json").read_text())
        (tmp / "tokenizer_config.json").write_text(json.dumps({**values, "tokenizer_class": "PreTrainedTokenizerFast"},
                                                              indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kind


def export_checkpoint(path, out, log=print):
    """export.py: the newest intact checkpoint of a run dir (or a checkpoint folder) into `out`."""
    require_transformers("export.py")
    model, config, folder = load_model(path)
    kind = export_model(model, config, Path(folder) / TOKENIZER, out, where=repr(str(path)))
    log(f"exported {folder} as {CLASSES[kind]} -> {out}")
    return kind
