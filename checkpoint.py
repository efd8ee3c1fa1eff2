"""Checkpoints: written atomically into <run dir>/checkpoints/step_XXXXXXX, the last K kept.

A checkpoint folder holds
    model.safetensors   weights, keys without "_orig_mod." / "module." (loads into any plain GPT)
    train_state.pt      optimizer, fp16 grad scaler, data-generator position, step and counters (the
                        learning rate is a function of the step, so the step is the schedule's state)
    rng_rank<R>.pt      every RNG state of process R (python, numpy, torch, CUDA)
    config.json         the resolved config the weights belong to
    tokenizer.json      the tokenizer, so the folder alone is enough to sample
    meta.json           step, number of processes, tokenizer and corpus hashes
It is built in a temporary folder and renamed into place only when complete, so a kill during a
save leaves the previous checkpoint intact and never a half-written one under a real name.
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from config import UserError, config_from_json, save_config

WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DDP
# Keys that change the model's parameters or wiring: a resume may not change them.
ARCHITECTURE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "norm", "attn_norm",
                     "mlp_norm", "final_norm", "block_norms", "norm_position", "norm_gain", "prms_fraction")


def clean_state_dict(state_dict):
    """Strip wrapper prefixes and drop lm_head.weight (tied to wte, saved once)."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key != "lm_head.weight":
            clean[key] = value.detach().contiguous().cpu()
    return clean


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first (temporary folders are not listed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / "model.safetensors").is_file())


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, run_dir, step, model, train_state, config, meta, tokenizer_path, keep):
    """Every process calls this (each saves its RNG states); the main process writes the rest."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        for stale in folder.glob(".tmp_step_*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    state_dict = accelerator.get_state_dict(model)  # gathers shards under FSDP; collective call
    if accelerator.is_main_process:
        save_file(clean_state_dict(state_dict), tmp / "model.safetensors")
        torch.save(train_state, tmp / "train_state.pt")
        save_config(config, tmp / "config.json")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "num_processes": accelerator.num_processes, **meta}))
        for f in tmp.iterdir():  # flush file contents before the rename makes them "the" checkpoint
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(folder)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def read_meta(folder):
    return json.loads((Path(folder) / "meta.json").read_text())


def check_resumable(folder, config, tokenizer_hash, num_processes):
    """Refuse a resume that would change the model's shape, its tokenizer or the process count."""
    saved = config_from_json(folder / "config.json")
    changed = [k for k in ARCHITECTURE_KEYS if getattr(saved, k) != getattr(config, k)]
    if changed:
        diffs = ", ".join(f"{k} {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise UserError(f"cannot resume {str(folder)!r} with a different model ({diffs}); "
                        f"only training settings such as max_steps or eval_interval may change")
    meta = read_meta(folder)
    if meta["tokenizer_hash"] != tokenizer_hash:
        raise UserError(f"cannot resume {str(folder)!r}: this config's data gives a different tokenizer "
                        f"(check data, vocab_size and val_fraction)")
    if meta["num_processes"] != num_processes:
        raise UserError(f"cannot resume {str(folder)!r} with {num_processes} processes: it was saved by "
                        f"{meta['num_processes']} (data order and RNG streams are per process)")


def jsonl_lines_up_to(path, step):
    """The lines of a run's log (metrics.jsonl, diagnostics.jsonl) for steps <= step, for a resume from
    that step. Later lines were written by the killed process after its last checkpoint and will be
    written again; a line torn by the kill does not parse and is dropped."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return kept


def find_checkpoint(path):
    """A checkpoint folder, or the latest complete checkpoint of a run dir."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; give a run dir (out_dir of a training run) or a checkpoint folder")
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise UserError(f"{str(path)!r} is not a checkpoint and holds no checkpoints/step_* folders")
    return checkpoints[-1]


def load_model(path, device="cpu"):
    """(model, config, checkpoint folder) from a run dir or checkpoint folder, in eval mode."""
    from model import GPT
    folder = find_checkpoint(path)
    config = config_from_json(folder / "config.json")
    model = GPT(config)
    load_weights(model, folder / "model.safetensors")
    return model.to(device).eval(), config, folder


def load_weights(model, file):
    try:
        state_dict = load_file(file)
    except Exception as e:
        raise UserError(f"cannot read weights {str(file)!r}: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"weights in {str(file)!r} do not fit the model: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte.weight
    if missing or unexpected:
        raise UserError(f"weights in {str(file)!r} do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
