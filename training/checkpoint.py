"""Checkpoints: written atomically into <run dir>/checkpoints/step_XXXXXXX, the last K kept. This module
owns their format: train.py calls save_checkpoint / load_checkpoint and names no file in them.

A checkpoint folder holds
    model.safetensors   full weights, keys without "_orig_mod." / "module." (loads into any plain GPT,
                        whatever the number of processes or the sharding that trained it)
    state/              accelerate's save_state: optimizer, fp16 grad scaler, every process's RNG
                        states (random_states_<R>.pkl), the data generator's position and the step
                        counters (custom_checkpoint_0/1.pkl; the learning rate is a function of the
                        step). Under FSDP also the sharded weights and optimizer, each process writing
                        its own shards (torch.distributed.checkpoint); otherwise the weights are the
                        model.safetensors above, not saved twice.
    config.json         the resolved config the weights belong to
    tokenizer.json      the tokenizer, so the folder alone is enough to sample
    meta.json           step, number of processes, tokenizer and corpus hashes
    manifest.json       size and sha256 of every other file (paths relative to the folder), written last
It is built in a temporary folder and renamed into place only when complete, so a kill during a
save leaves the previous checkpoint intact and never a half-written one under a real name. Every
process writes into it, so with several nodes the run folder must be on a filesystem they share.

Checkpoints of the older format (train_state.pt and rng_rank<R>.pt instead of state/, no manifest)
sample and analyze; a resume from one is refused in one line.

A checkpoint is checked against its manifest before use (a disk that filled up, a copy that was cut
short, a file deleted by hand): --resume and sample.py take the newest intact one and say in one line
which newer ones they skipped and why. Nothing is deleted for it; a resumed run that reaches the step
of a skipped checkpoint moves that folder aside to corrupt_step_XXXXXXX.N before saving its own.
"""
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from safetensors.torch import load_file, save_file

from config import (RESUMABLE_KEYS, UserError, apply_overrides, config_from_json, parse_cli_overrides, resume_refusal,
                    save_config)
from data.prepare import file_sha256

WEIGHTS, STATE, CONFIG, TOKENIZER, META = "model.safetensors", "state", "config.json", "tokenizer.json", "meta.json"
MANIFEST = "manifest.json"
OLD_TRAIN_STATE = "train_state.pt"  # the older format's training state: such checkpoints sample, never resume
SAMPLE_FILES = (WEIGHTS, CONFIG, TOKENIZER, META)  # what sampling needs; a resume needs every file
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DDP


def clean_state_dict(state_dict, tied=True):
    """Strip wrapper prefixes; a tied lm_head.weight is transformer.wte.weight, saved once."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key != "lm_head.weight" or not tied:
            clean[key] = value.detach().contiguous().cpu()
    return clean


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first (temporary folders are not listed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_"))


@dataclass
class Counters:
    """What the training loop counts, saved in every checkpoint (state/custom_checkpoint_1.pkl, as a
    dict of these names: accelerate's save_state calls state_dict, load_state calls load_state_dict)."""
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training seconds, evaluation and saving left out
    best_val_loss: float = math.inf
    skipped_steps: int = 0
    bad_steps_in_row: int = 0  # non-finite steps in a row up to the last log step

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, saved):
        for f in fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


def track_training_state(accelerator, batches, counters):
    """Register what save_state / load_state keep beside model, optimizer, scaler and RNGs. Outside
    FSDP the weights live once, in model.safetensors: accelerate's own copy is left out of state/
    (under FSDP it saves nothing through these hooks; its shards are the resume's weights)."""
    accelerator.register_for_checkpointing(batches, counters)
    accelerator.register_save_state_pre_hook(lambda models, weights, state_dir: weights.clear())

    def load_exported_weights(models, state_dir):
        for model in models:
            load_weights(accelerator.unwrap_model(model), Path(state_dir).parent / WEIGHTS)
        models.clear()
    accelerator.register_load_state_pre_hook(load_exported_weights)


def save_checkpoint(accelerator, run_dir, step, model, config, meta, tokenizer_path, keep):
    """Every process calls this (save_state writes each one's RNG states, and under FSDP its shards);
    the main process writes the rest, the manifest last, and renames the folder into place."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        for stale in folder.glob(".tmp_step_*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE))  # a collective under FSDP
    state_dict = accelerator.get_state_dict(model)  # full weights on the main process; a collective under FSDP
    accelerator.wait_for_everyone()  # every process's files are written before the manifest lists them
    if accelerator.is_main_process:
        save_file(clean_state_dict(state_dict, config.tie_embeddings), tmp / WEIGHTS)
        save_config(config, tmp / CONFIG)
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        (tmp / META).write_text(json.dumps({"step": step, "num_processes": accelerator.num_processes, **meta}))
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        manifest = {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for f in files + [tmp / MANIFEST]:  # flush file contents before the rename makes them "the" checkpoint
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a checkpoint that a resume skipped as damaged: kept, under another name
            os.replace(final, unused_name(folder / f"corrupt_{final.name}"))
        os.replace(tmp, final)
        fsync_dir(folder)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def unused_name(path):
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{n}")


def checkpoint_problem(folder, for_resume):
    """Why a checkpoint folder cannot be used (for a resume, or only for sampling), or None if it can.
    Files are checked against the sizes and hashes in its manifest; a checkpoint without one (the
    older format) gets a lighter check (every file present and non-empty, its JSON readable)."""
    folder = Path(folder)
    documents = {}
    for name in (MANIFEST, META, CONFIG):
        path = folder / name
        if name == MANIFEST and not path.exists():
            continue  # the older format has none
        try:
            documents[name] = json.loads(path.read_text())
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError):
            return f"{name} is not readable JSON"
    manifest, meta = documents.get(MANIFEST), documents[META]
    if not isinstance(meta, dict) or not isinstance(meta.get("num_processes"), int):
        return f"{META} does not say how many processes saved it"
    ranks = range(meta["num_processes"])
    if manifest is not None and not (isinstance(manifest, dict) and all(
            isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in manifest.values())):
        return f"{MANIFEST} is malformed"
    if for_resume and ((folder / OLD_TRAIN_STATE).exists() or manifest is None):
        return (f"it is in the older format ({OLD_TRAIN_STATE} instead of {STATE}/); it can be sampled but not "
                f"resumed here (the normgpt version that wrote it resumes it)")
    needed = list(SAMPLE_FILES)
    if for_resume:  # every file the manifest lists, and each process's RNG states even if it does not
        from accelerate.utils import RNG_STATE_NAME  # here: sampling need not import accelerate
        needed = list(dict.fromkeys([*needed, *manifest, *(f"{STATE}/{RNG_STATE_NAME}_{r}.pkl" for r in ranks)]))
    for name in needed:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if manifest is None:
            if size == 0:
                return f"{name} is empty"
        elif name not in manifest:
            return f"{name} is not in its manifest"
        elif size != manifest[name]["size"]:
            return f"{name} has {size} bytes, {manifest[name]['size']} were saved"
        elif file_sha256(path) != manifest[name]["sha256"]:
            return f"{name} has changed since it was saved (sha256 differs)"
    return None


def newest_intact_checkpoint(run_dir, for_resume, log):
    """The newest checkpoint of a run that passes checkpoint_problem; each newer one that does not is
    reported through log in one line. None when the run has no checkpoint; a UserError (one line
    naming every problem) when it has checkpoints but none is intact."""
    checkpoints = list_checkpoints(run_dir)
    problems = []
    for folder in reversed(checkpoints):
        problem = checkpoint_problem(folder, for_resume)
        if problem is None:
            for skipped, why in problems:
                log(f"skipping checkpoint {skipped}: {why}")
            return folder
        problems.append((folder, problem))
    if checkpoints:
        listed = "; ".join(f"{folder.name}: {why}" for folder, why in problems)
        raise UserError(f"no intact checkpoint in {str(run_dir)!r} ({listed}); nothing was deleted")
    return None


def load_checkpoint(folder, accelerator):
    """Restore weights, optimizer, grad scaler, RNG states and the registered batch generator and
    counters (track_training_state) from a checkpoint folder, on every process."""
    accelerator.load_state(str(Path(folder) / STATE))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def read_meta(folder):
    return json.loads((Path(folder) / META).read_text())


def check_resumable(folder, config, tokenizer_hash, num_processes, sharding="none"):
    """Refuse a resume that would change the run (config.resume_refusal says which keys may change),
    its tokenizer, the process count or the sharding (the training state of an FSDP run is saved in
    shards, of any other run whole). Returns the checkpoint's own config."""
    saved = config_from_json(folder / CONFIG)
    refusal = resume_refusal(saved, config)
    if refusal:
        raise UserError(f"cannot resume {str(folder)!r}: {refusal}")
    meta = read_meta(folder)
    if meta["tokenizer_hash"] != tokenizer_hash:
        raise UserError(f"cannot resume {str(folder)!r}: this config's data gives a different tokenizer "
                        f"(the data or the tokenizer file changed since the run started)")
    if meta["num_processes"] != num_processes:
        raise UserError(f"cannot resume {str(folder)!r} with {num_processes} processes: it was saved by "
                        f"{meta['num_processes']} (data order and RNG streams are per process)")
    if meta.get("sharding", "none") != sharding:
        raise UserError(f"cannot resume {str(folder)!r} with sharding {sharding}: it was saved with sharding "
                        f"{meta.get('sharding', 'none')}; launch it with the same accelerate settings (FSDP or not)")
    return saved


def resume_config(run_dir, overrides):
    """The saved config of the run in run_dir (its latest launch's config.json, else its newest
    checkpoint's) with overrides, which may change only keys a resume may change."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--resume: {str(run_dir)!r} is not a folder; give the run folder to continue (its out_dir)")
    saved = run_dir / CONFIG if (run_dir / CONFIG).is_file() else None
    if saved is None:
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise UserError(f"--resume: {str(run_dir)!r} holds no run (no config.json, no checkpoints/)")
        saved = checkpoints[-1] / CONFIG
    values = parse_cli_overrides(overrides)
    refused = [k for k in values if k not in RESUMABLE_KEYS or k == "out_dir"]
    if refused:
        raise UserError(f"--resume {str(run_dir)!r}: {', '.join('--' + k for k in refused)} cannot change on a "
                        f"resume; a resume may change only {', '.join(k for k in RESUMABLE_KEYS if k != 'out_dir')}")
    config = config_from_json(saved)
    return apply_overrides(config, {**values, "out_dir": str(run_dir)}).validate()


def warn(message):
    print(message, file=sys.stderr)


def find_checkpoint(path, log=warn):
    """A checkpoint folder (checked), or the newest intact checkpoint of a run dir."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; give a run dir (out_dir of a training run) or a checkpoint folder")
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is a file; give a run dir (out_dir of a training run) or a checkpoint folder")
    if not (path / "checkpoints").is_dir() and any((path / name).exists() for name in (*SAMPLE_FILES, MANIFEST)):
        problem = checkpoint_problem(path, for_resume=False)
        if problem:
            raise UserError(f"checkpoint {str(path)!r} cannot be used: {problem}")
        return path
    folder = newest_intact_checkpoint(path, for_resume=False, log=log)
    if folder is None:
        raise UserError(f"{str(path)!r} is not a checkpoint and holds no checkpoints/step_* folders")
    return folder


def load_model(path, device="cpu", log=warn):
    """(model, config, checkpoint folder) from a run dir or checkpoint folder, in eval mode."""
    from model import make_model
    folder = find_checkpoint(path, log)
    config = config_from_json(folder / CONFIG)
    model = make_model(config)
    load_weights(model, folder / WEIGHTS)
    return model.to(device).eval(), config, folder


def load_weights(model, file):
    from model.gpt import load_exactly
    try:
        state_dict = load_file(file)
    except Exception as e:
        raise UserError(f"cannot read weights {str(file)!r}: {e}") from None
    load_exactly(model, state_dict, f"weights in {str(file)!r}", tied=("lm_head.weight",) if model.config.tie_embeddings else ())
