"""Checkpoints: written atomically into <run dir>/checkpoints/step_XXXXXXX, the last K kept. This module
owns their format: train.py calls save_checkpoint / load_checkpoint and names no file in them.

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

WEIGHTS, TRAIN_STATE, CONFIG, TOKENIZER, META = "model.safetensors", "train_state.pt", "config.json", "tokenizer.json", "meta.json"
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DDP
# Keys that change the model's parameters or wiring: a resume may not change them.
ARCHITECTURE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "norm", "attn_norm",
                     "mlp_norm", "final_norm", "block_norms", "norm_position", "norm_gain", "prms_fraction",
                     "qk_norm", "block_positions", "output_norm", "dyt_alpha")


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
                  and (p / WEIGHTS).is_file())


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


def rng_file(rank):
    return f"rng_rank{rank}.pt"


def save_checkpoint(accelerator, run_dir, step, model, optimizer, batches, counters, config, meta, tokenizer_path, keep):
    """Every process calls this (each saves its RNG states); the main process writes the rest."""
    train_state = {"optimizer": optimizer.state_dict(), "batches": batches.state_dict(), "counters": dict(counters),
                   "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        for stale in folder.glob(".tmp_step_*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / rng_file(accelerator.process_index))
    state_dict = accelerator.get_state_dict(model)  # gathers shards under FSDP; collective call
    if accelerator.is_main_process:
        save_file(clean_state_dict(state_dict), tmp / WEIGHTS)
        torch.save(train_state, tmp / TRAIN_STATE)
        save_config(config, tmp / CONFIG)
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        (tmp / META).write_text(json.dumps({"step": step, "num_processes": accelerator.num_processes, **meta}))
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


def load_checkpoint(folder, accelerator, model, optimizer, batches):
    """Restore weights, optimizer, grad scaler, batch position and this process's RNG states from a
    checkpoint folder; returns the saved counters (step, tokens seen, ...)."""
    folder = Path(folder)
    saved = torch.load(folder / TRAIN_STATE, weights_only=False)
    load_weights(accelerator.unwrap_model(model), folder / WEIGHTS)
    optimizer.load_state_dict(saved["optimizer"])
    if accelerator.scaler is not None and saved["scaler"] is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    batches.load_state_dict(saved["batches"])
    set_rng_state(torch.load(folder / rng_file(accelerator.process_index), weights_only=False))
    return saved["counters"]


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def read_meta(folder):
    return json.loads((Path(folder) / META).read_text())


def check_resumable(folder, config, tokenizer_hash, num_processes):
    """Refuse a resume that would change the model's shape, its tokenizer or the process count."""
    saved = config_from_json(folder / CONFIG)
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


def find_checkpoint(path):
    """A checkpoint folder, or the latest complete checkpoint of a run dir."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; give a run dir (out_dir of a training run) or a checkpoint folder")
    if (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise UserError(f"{str(path)!r} is not a checkpoint and holds no checkpoints/step_* folders")
    return checkpoints[-1]


def load_model(path, device="cpu"):
    """(model, config, checkpoint folder) from a run dir or checkpoint folder, in eval mode."""
    from model import GPT
    folder = find_checkpoint(path)
    config = config_from_json(folder / CONFIG)
    model = GPT(config)
    load_weights(model, folder / WEIGHTS)
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
