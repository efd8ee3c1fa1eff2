"""Train a GPT whose norms come from the config.

    python train.py configs/default.toml [--key=value ...]
    python train.py --resume runs/default [--max_steps=...]    (python train.py --help lists every key)
    accelerate launch --multi_gpu --num_processes 2 train.py configs/default.toml

`train(config)` is the whole training loop as a function; compare.py calls it for every variant.
"""
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import hf
from config import UserError, check_folder, config_help, load_config, run_main
from data.batches import TrainBatches, diagnostics_batch
from data.prepare import check_data_size, prepare_data
from data.tokenizer import token_byte_lengths, window_start_token
from model import check_model_config, make_model
from model.diagnostics import Diagnostics
from model.gpt import z_loss
from training.checkpoint import (Counters, check_resumable, list_checkpoints, load_checkpoint, resume_config,
                                 newest_intact_checkpoint, save_checkpoint, track_training_state)
from training.distributed import (check_shared_run_folder, decided_on_main, held_by_main_process, make_accelerator,
                                  release_accelerator)
from training import metrics
from training.evaluation import evaluate_loss_and_bpb
from training.host_memory import keep_freed_memory
from training.optimizer import build_optimizer, learning_rate
from training.runlog import RunLog, SavedLog, append_log, run_folder_lock


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


def train(config, resume=False, log=None):
    """Train (or resume) the run in config.out_dir; returns a summary dict of the run."""
    config = hf.resolve_init_from(config)  # init_from: architecture and tokenizer of a transformers checkpoint
    check_model_config(config)  # a bad norm stack fails here, before any data is prepared
    check_folder(config.out_dir, "out_dir")
    check_folder(config.cache_dir, "cache_dir")
    if resume and not Path(config.out_dir).is_dir():
        raise UserError(f"--resume: {config.out_dir!r} does not exist; give the out_dir of the run to continue")
    accelerator = make_accelerator(config)
    try:
        # the run folder belongs to this launch until it ends: the main process holds its lock
        lock = run_folder_lock(config.out_dir, check=partial(check_run_folder, config.out_dir, resume))
        with held_by_main_process(accelerator, lock):
            check_shared_run_folder(accelerator, config.out_dir)
            result = _train(config, resume, log or accelerator.print, accelerator)
            # every process is past its last collective before any tears the process group down: a
            # process that leaves early can abort one that is still inside a collective
            accelerator.wait_for_everyone()
            return result
    finally:
        release_accelerator(accelerator)


def check_run_folder(run_dir, resume):
    """A new run needs a folder without checkpoints; a resume needs one with checkpoints."""
    checkpoints = list_checkpoints(run_dir)
    if resume and not checkpoints:
        raise UserError(f"--resume: {str(run_dir)!r} has no checkpoint to resume from")
    if not resume and checkpoints:
        raise UserError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it or choose another out_dir")


def _train(config, resume, log, accelerator):
    run_dir = Path(config.out_dir)
    if accelerator.is_main_process:  # what is printed is kept in the run folder too
        log = SavedLog(run_dir, log)
    if accelerator.device.type == "cpu" and keep_freed_memory():
        log("cpu memory: freed tensors stay in the heap for the next step (training/host_memory.py)")
    if config.max_steps < config.warmup_steps:
        log(f"warning: max_steps ({config.max_steps}) < warmup_steps ({config.warmup_steps}): the run ends inside "
            f"its warmup, at a rate of {learning_rate(config.max_steps - 1, config):.3g} (learning_rate is "
            f"{config.learning_rate:.3g})")

    # --- data: one process per machine builds a missing cache; the others poll its folder rather
    # than wait inside a collective, which would time out on a large corpus
    data = prepare_data(config, log=log, build=accelerator.is_local_main_process)
    check_data_size(data, config.block_size)
    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    sharding = "FSDP2" if accelerator.distributed_type == DistributedType.FSDP else "none"
    if resume:  # the newest checkpoint that passes its manifest's checks; newer damaged ones are named
        start = Path(decided_on_main(accelerator, lambda: str(newest_intact_checkpoint(run_dir, True, log))))
        saved = check_resumable(start, config, data.tokenizer_hash, accelerator.num_processes, sharding)

    # --- model, optimizer, and the state a checkpoint restores
    model, optimizer, schedule = build_model(config, accelerator, log, sharding, resume)
    core = accelerator.unwrap_model(model)
    core = getattr(core, "_orig_mod", core)  # the module itself, not a torch.compile wrapper
    batches = TrainBatches(train_tokens, config.block_size, config.batch_size, config.seed,
                           accelerator.process_index, accelerator.num_processes)
    counters = Counters()
    track_training_state(accelerator, batches, counters)
    if resume:
        load_checkpoint(start, accelerator)
        log(f"resumed from {start} at step {counters.step}")
        if counters.step >= config.max_steps:
            log(f"the run has already reached max_steps = {config.max_steps}: nothing to train, only its final "
                f"evaluation (continue it with --max_steps=N)")
        before, after = learning_rate(counters.step, saved), learning_rate(counters.step, config)
        if before != after:  # max_steps, learning_rate, min_lr or warmup_steps changed: a new schedule from here
            log(f"the learning-rate schedule changed: at step {counters.step} the rate was {before:.3g}, it is now "
                f"{after:.3g}")
    meta = {"tokenizer_hash": data.tokenizer_hash, "corpus_hash": data.corpus_hash, "sharding": sharding}

    # --- where each log step goes
    runlog = RunLog(run_dir) if accelerator.is_main_process else None
    if runlog is not None:
        runlog.start(config, data.tokenizer_path, counters.step)
        log.keep()  # this start is accepted: train.log gets what was printed so far, and the rest as it comes
    diagnostics = None
    if config.diagnostics:
        x = diagnostics_batch(val_tokens, config.block_size, config.batch_size, accelerator.device,
                              window_start_token(config))
        diagnostics = Diagnostics(accelerator.unwrap_model(model), x)
    if config.tracker_names():
        start_trackers(accelerator, config, counters.step)
    record = Recorder(runlog, diagnostics, accelerator, config.tracker_names())
    non_finite = NonFiniteSteps(accelerator.device, counters.bad_steps_in_row, config.max_bad_steps,
                                on_device=schedule.skips_on_device)

    # --- the loop
    token_bytes = torch.from_numpy(token_byte_lengths(data.load_tokenizer()))  # val_bpb's byte counts
    val_loss = val_bpb = None
    if counters.step == 0:
        val_loss, val_bpb = evaluate_loss_and_bpb(model, val_tokens, config, accelerator, token_bytes)
        record(step=0, train_loss=None, val_loss=val_loss, val_bpb=val_bpb, lr=learning_rate(0, config), tokens_seen=0,
               elapsed_s=0.0, tokens_per_s=None, skipped_steps=0)
    tokens_per_step = config.batch_size * config.block_size * config.grad_accum * accelerator.num_processes
    progress = tqdm(total=config.max_steps, initial=counters.step, disable=not accelerator.is_local_main_process,
                    desc="train", dynamic_ncols=True)
    # training time runs from one log step's host sync to the next: steps are queued without waiting
    # for the device, so only a sync says they are done; evaluation and saving are left out
    interval_tokens, interval_start, interval_first, train_loss = 0, time.perf_counter(), counters.step + 1, None
    while counters.step < config.max_steps:
        lr = schedule.set_step(counters.step, config, optimizer)
        step_loss, step_z_loss = forward_backward(model, batches, config, accelerator)
        # once per optimizer step, on synced gradients; with grad_clip = 0 this only measures the norm
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        finite, applied = step_is_finite(step_loss, grad_norm, config, accelerator)
        if diagnostics is not None:  # the gradients as the optimizer sees them, before they are zeroed
            diagnostics.read_gradients(applied)
        non_finite.step(optimizer, finite, counters.step + 1)
        core.after_optimizer_step()  # nGPT: its matrices back on the unit sphere, before any checkpoint
        optimizer.zero_grad(set_to_none=True)
        counters.step += 1
        counters.tokens_seen += tokens_per_step
        interval_tokens += tokens_per_step
        progress.update(1)

        step = counters.step
        is_eval = step % config.eval_interval == 0 or step == config.max_steps
        if step % config.log_interval == 0 or is_eval:
            skipped, counters.bad_steps_in_row, stopped_at = non_finite.read()  # syncs; before any checkpoint
            interval_time = time.perf_counter() - interval_start
            counters.elapsed_s += interval_time
            if skipped and accelerator.is_main_process:
                message = f"steps {interval_first}-{step}: {skipped} skipped (non-finite loss or gradient)"
                progress.write(message)  # printed above the progress bar
                append_log(run_dir, message)
            counters.skipped_steps += skipped
            if stopped_at:
                last = list_checkpoints(run_dir)
                raise TrainingDiverged(
                    f"training stopped at step {stopped_at}: {config.max_bad_steps} non-finite steps in a row; "
                    f"last good checkpoint: {last[-1] if last else 'none (no checkpoint was saved yet)'}")
            train_loss = accelerator.reduce(step_loss, reduction="mean").item()
            aux_log = {"train_z_loss": accelerator.reduce(step_z_loss, reduction="mean").item()} if config.z_loss else {}
            val_loss, val_bpb = evaluate_loss_and_bpb(model, val_tokens, config, accelerator, token_bytes) \
                if is_eval else (None, None)
            if val_loss is not None:
                counters.best_val_loss = min(counters.best_val_loss, val_loss)
            tokens_per_s = interval_tokens / interval_time
            record(step=step, train_loss=train_loss, **aux_log, val_loss=val_loss, val_bpb=val_bpb, lr=lr, tokens_seen=counters.tokens_seen,
                   elapsed_s=round(counters.elapsed_s, 4), tokens_per_s=round(tokens_per_s, 1),
                   skipped_steps=counters.skipped_steps)
            postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if val_loss is not None:
                postfix["val"] = f"{val_loss:.3f}"
            progress.set_postfix(postfix, refresh=False)
            if is_eval:
                save_checkpoint(accelerator, run_dir, step, model, config, meta, data.tokenizer_path,
                                config.keep_checkpoints)
            interval_tokens, interval_start, interval_first = 0, time.perf_counter(), step + 1
    progress.close()

    # --- the summary
    if val_loss is None:  # resumed a run that had already finished
        val_loss, val_bpb = evaluate_loss_and_bpb(model, val_tokens, config, accelerator, token_bytes)
    result = {
        "run_dir": str(run_dir), "steps": counters.step, "final_val_loss": val_loss, "final_val_bpb": val_bpb,
        "best_val_loss": min(counters.best_val_loss, val_loss), "final_train_loss": train_loss,
        "tokens_per_s": counters.tokens_seen / max(counters.elapsed_s, 1e-9),
        "wall_seconds": counters.elapsed_s, "n_params": accelerator.unwrap_model(model).num_params(),
        "corpus_hash": data.corpus_hash, "tokenizer_hash": data.tokenizer_hash, "unigram_entropy": data.unigram_entropy,
        "skipped_steps": counters.skipped_steps,
    }
    bpb = f", {val_bpb:.4f} bits/byte" if val_bpb is not None else ""
    log(f"done: step {result['steps']}, val loss {val_loss:.4f} nats/token "
        f"(unigram entropy of the corpus: {data.unigram_entropy:.4f}){bpb}, "
        f"{result['tokens_per_s']:,.0f} tokens/s, {result['wall_seconds']:.0f}s of training -> {run_dir}")
    return result


def build_model(config, accelerator, log, sharding, resume=False):
    """(model, optimizer, training.optimizer.Optimizer) prepared by accelerate: the second is the wrapper
    accelerate returns, the third knows the groups' rates and whether a step can be skipped on the device. Every process builds the same initial weights
    (FSDP shards each process's own copy; nothing broadcasts them), then draws from a random stream of
    its own: distinct dropout masks."""
    seed_everything(config.seed)
    model = make_model(config)
    if config.init_from and not resume:  # a fine-tune starts from the checkpoint's weights (a resume from its own)
        hf.load_init_weights(model, config, log)
    seed_everything(config.seed + accelerator.process_index)
    log(model.describe_norms())
    log(f"parameters: {model.num_params():,}  |  processes: {accelerator.num_processes}  |  "
        f"device: {accelerator.device}  |  precision: {config.mixed_precision}  |  sharding: {sharding}")
    schedule = build_optimizer(model, config, accelerator.device.type)
    if config.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, schedule.optimizer)
    return model, optimizer, schedule


def forward_backward(model, batches, config, accelerator):
    """The forward and backward passes of one optimizer step over grad_accum micro-batches; returns
    (mean loss, mean z-loss term) as tensors on the device: nothing here waits for the device."""
    step_loss = torch.zeros((), device=accelerator.device)
    step_z_loss = torch.zeros((), device=accelerator.device)  # the auxiliary term, logged apart from the CE
    for _ in range(config.grad_accum):
        x, y = batches.next(accelerator.device)
        with accelerator.accumulate(model):  # all-reduces gradients on the last micro-step only
            logits, loss = model(x, y)
            batches.prefetch(accelerator.device)  # gathered and copied while the device computes
            aux = config.z_loss * z_loss(logits) if config.z_loss else None
            accelerator.backward(loss if aux is None else loss + aux)  # divides by grad_accum itself
        step_loss += loss.detach().float() / config.grad_accum
        if config.z_loss:
            step_z_loss += aux.detach().float() / config.grad_accum
    return step_loss, step_z_loss


def step_is_finite(step_loss, grad_norm, config, accelerator):
    """(finite, applied) for this optimizer step, as bool tensors on the device, alike on every
    process: whether the step counts as good (NonFiniteSteps), and whether the optimizer applies it.

    Both mean a finite loss and gradient norm, except under fp16: there overflowing gradients with a
    finite loss are normal (the grad scaler skips that step and lowers its scale), so only a
    non-finite loss counts as bad, while the step is applied only when its gradients are finite too."""
    if isinstance(grad_norm, DTensor):  # under FSDP2 the norm of sharded gradients; its value, on the device
        grad_norm = grad_norm.full_tensor()
    finite = torch.isfinite(step_loss)
    finite_grads = torch.isfinite(grad_norm.to(finite.device))  # alike on every process: synced gradients
    if config.mixed_precision != "fp16":
        finite = finite & finite_grads
    if accelerator.num_processes > 1:  # 1.0 only if finite everywhere
        finite = accelerator.reduce(finite.float(), reduction="mean") == 1.0
    return finite, finite & finite_grads


class NonFiniteSteps:
    """Skips optimizer steps whose loss or gradient is not finite, without a host sync per step.

    The finite flag stays on the device, where the optimizer can read it (training.optimizer.Optimizer's
    skips_on_device: set as `found_inf` for the one call). The counts stay on the device too; the host reads them at log
    steps, where it waits for the device anyway, so a run that went max_bad_steps in a row is stopped
    at the next log step, before any checkpoint. Without on-device skipping the host decides every step."""

    def __init__(self, device, in_row, max_in_row, on_device):
        self.on_device, self.max_in_row = on_device, max_in_row
        self.since_read = torch.zeros((), device=device)
        self.in_row = torch.full((), float(in_row), device=device)
        self.stopped_at = torch.zeros((), device=device)  # the step that made max_in_row in a row, or 0

    def step(self, optimizer, finite, step):
        bad = (~finite).float()
        if self.on_device:
            inner = optimizer.optimizer  # accelerate's wrapper steps this torch optimizer
            inner.found_inf = bad
            try:
                optimizer.step()
            finally:
                del inner.found_inf
        elif finite.item():
            optimizer.step()  # under fp16 the grad scaler also skips steps whose gradients overflowed
        self.since_read += bad
        self.in_row = (self.in_row + 1) * bad
        reached = (self.in_row >= self.max_in_row) & (self.stopped_at == 0)
        self.stopped_at = torch.where(reached, float(step), self.stopped_at)

    def read(self):
        """(steps skipped since the last read, non-finite steps in a row now, stopped_at): one host sync."""
        since_read, in_row, stopped_at = (int(v) for v in torch.stack([self.since_read, self.in_row, self.stopped_at]).tolist())
        self.since_read.zero_()
        return since_read, in_row, stopped_at


class Recorder:
    """`record(**entry)` at every log step: the entry goes to metrics.jsonl and the trackers; at evals
    the diagnostics are measured too (on every process: under FSDP their forward is a collective) and
    written beside it. Only the main process writes (runlog is None on the others)."""

    def __init__(self, runlog, diagnostics, accelerator, trackers):
        self.runlog, self.diagnostics, self.accelerator, self.trackers = runlog, diagnostics, accelerator, trackers

    def __call__(self, **entry):
        metrics.check_entry(entry)  # a metric the schema lacks stops the run here, trackers or not
        measured = None
        if self.diagnostics is not None and entry["val_loss"] is not None:
            measured = self.diagnostics.measure(entry["step"])
        if self.runlog is not None:
            self.runlog.metrics(entry)
            if measured is not None:
                self.runlog.diagnostics(measured)
            if self.trackers:
                self.accelerator.log(tracker_scalars(entry, measured), step=entry["step"])


def start_trackers(accelerator, config, step):
    """Trackers named as the config says; a resume drops what a tracker logged after its checkpoint."""
    name = config.tracker_run_name or Path(config.out_dir).name
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
    accelerator.init_trackers(config.tracker_project or Path(config.out_dir).name, config=hparams, init_kwargs={
        "tensorboard": {"purge_step": step} if step else {}, "wandb": {"name": name}, "trackio": {"name": name},
        "mlflow": {"run_name": name}})


def tracker_scalars(entry, diagnostics=None):
    """A metrics.jsonl line (named as training/metrics.py says) and a diagnostics line as flat tracker
    scalars, e.g. val/loss and diagnostics/input_rms/block0.attn."""
    scalars = metrics.tracker_scalars(entry)
    for key, values in (diagnostics or {}).items():
        if isinstance(values, list) and key != "sites":
            labels = diagnostics["sites"] if len(values) == len(diagnostics["sites"]) else [f"block{i}" for i in range(len(values))]
            scalars.update({f"diagnostics/{key}/{label}": v for label, v in zip(labels, values) if v is not None})
    return scalars


USAGE = """usage: python train.py <config.toml> [--key=value ...]      start a run in out_dir
       python train.py --resume <run folder> [--key=value ...]  continue a run from its saved config
       python train.py <config.toml> [--key=value ...] --resume  continue out_dir's run (same config)
       accelerate launch [...] train.py <config.toml> [--key=value ...]"""


def main():
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(f"{USAGE}\n\nConfig keys (in a TOML file as key = value, or on the command line as --key=value;\n"
              f"tags say what a key changes; a resume may change only schedule, housekeeping and\n"
              f"implementation keys):\n{config_help()}")
        return
    resume = any(a == "--resume" or a.startswith("--resume=") for a in args)
    folder = next((a.split("=", 1)[1] for a in args if a.startswith("--resume=")), None)
    if "--resume" in args:
        i = args.index("--resume")
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            folder = args.pop(i + 1)
    args = [a for a in args if not (a == "--resume" or a.startswith("--resume="))]
    if folder is not None:
        if args and not args[0].startswith("--"):
            raise UserError(f"--resume {folder!r} takes no config file ({args[0]!r}): the run folder holds its config")
        config = resume_config(folder, args)
    elif not args or args[0].startswith("--"):
        raise UserError("no config file; usage: python train.py <config.toml> [--key=value ...], or "
                        "python train.py --resume <run folder>; python train.py --help lists every key")
    else:
        config = load_config(args[0], args[1:])
    train(config, resume=resume)


if __name__ == "__main__":
    run_main(main)
