"""Checkpoints: written atomically into <run dir>/checkpoints/step_XXXXXXX, the last K kept.

A checkpoint folder holds
    model.safetensors   weights, keys without "_orig_mod." / "module." (loads into any plain GPT)
    train_state.pt      optimizer, step, data-generator position, counters, hashes (main process)
    rng_rank<R>.pt      every RNG state of process R (python, numpy, torch, CUDA)
    config.json         the resolved config the weights belong to
It is built in a temporary folder and renamed into place only when complete, so a kill during a
save leaves the previous checkpoint intact and never a half-written one under a real name.
"""
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from config import UserError, config_from_json, save_config

WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DDP


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


def save_checkpoint(accelerator, run_dir, step, model, train_state, config, keep):
    """Every process calls this (each saves its RNG states); the main process writes the rest."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    state_dict = accelerator.get_state_dict(model)  # gathers shards under FSDP; collective call
    if accelerator.is_main_process:
        save_file(clean_state_dict(state_dict), tmp / "model.safetensors")
        torch.save(train_state, tmp / "train_state.pt")
        save_config(config, tmp / "config.json")
        for f in tmp.iterdir():  # flush file contents before the rename makes them "the" checkpoint
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
