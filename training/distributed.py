"""The Accelerator a run trains under, and what its processes must agree on.

One process, DDP over several (`accelerate launch --multi_gpu`, GPUs or CPU with gloo), or FSDP2
(`--use_fsdp`, configs/accelerate/fsdp.yaml) through accelerate's own FSDP plugin, on CPU too.
"""
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import (DistributedType, broadcast_object_list, gather_object, is_mlflow_available,
                              is_tensorboard_available, is_trackio_available, is_wandb_available)

from config import UserError

TRACKER_PACKAGES = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                    "trackio": is_trackio_available, "mlflow": is_mlflow_available}


def make_accelerator(config):
    for name in config.tracker_names():  # accelerate would drop a missing tracker with a warning only
        if not TRACKER_PACKAGES[name]():
            raise UserError(f"tracker {name!r} is not installed here; pip install {name}, or leave it out of trackers")
    # accelerate sets up multi-process CPU training (gloo) only when told cpu=True
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cpu = config.device == "cpu" or (several_processes and not torch.cuda.is_available())
    # `accelerate launch --use_fsdp` (configs/accelerate/fsdp.yaml) sets this; the plugin reads its FSDP_* settings
    fsdp_on_cpu = use_cpu and several_processes and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    plugin = FullyShardedDataParallelPlugin() if fsdp_on_cpu else None
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=use_cpu, fsdp_plugin=plugin,
                              gradient_accumulation_steps=config.grad_accum,
                              log_with=config.tracker_names() or None,
                              project_dir=config.out_dir if config.tracker_names() else None)
    if fsdp_on_cpu:
        # accelerate takes FSDP only on accelerators and would quietly train DDP here; its FSDP2 code
        # runs on CPU with gloo as it is (how the tests run FSDP), once the process-wide state says FSDP
        # (PartialState's copy too: each new AcceleratorState() reads it back)
        accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        if config.mixed_precision != "no":
            plugin.set_mixed_precision(config.mixed_precision)
    return accelerator


def release_accelerator(accelerator):
    accelerator.end_training()  # finishes the trackers and the process group: every process exits cleanly
    # accelerate's settings are process-wide singletons: clear them so that the next train() in
    # this process (compare.py's next variant) may use another mixed_precision or device
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def decided_on_main(accelerator, decide):
    """decide() run by the main process only; its result, or its UserError, reaches every process."""
    outcome = (None, None)
    if accelerator.is_main_process:
        try:
            outcome = (decide(), None)
        except UserError as e:
            outcome = (None, e)
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list([outcome])[0]
    value, error = outcome
    if error is not None:
        raise error
    return value


@contextmanager
def held_by_main_process(accelerator, context):
    """Enter `context` (a run folder's lock) on the main process only and hold it while the block
    runs; a UserError raised on entering it (the folder is busy, say) stops every process."""
    with ExitStack() as held:
        refusal = None
        if accelerator.is_main_process:
            try:
                held.enter_context(context)
            except UserError as e:
                refusal = e
        if accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise refusal
        yield


def check_shared_run_folder(accelerator, run_dir):
    """Every process writes into the checkpoint folders: a node that cannot see the run folder would
    write its part elsewhere and the checkpoint would never be complete. One line instead."""
    if accelerator.num_processes == 1:
        return
    mark = Path(run_dir) / ".visible_to_every_process"

    def write_mark():
        token = str(os.getpid())
        mark.write_text(token)
        return token
    token = decided_on_main(accelerator, write_mark)  # every process gets it after the file is written
    # a collective: it returns on the main process only after every process has looked
    seen = gather_object([mark.exists() and mark.read_text() == token])
    if accelerator.is_main_process:
        mark.unlink()
    blind = [rank for rank, saw in enumerate(seen) if not saw]
    if blind:
        raise UserError(f"processes {blind} cannot see the run folder {str(run_dir)!r}: with several nodes, "
                        f"out_dir must be on a filesystem every node shares (e.g. NFS or Lustre), at the same path")
