"""What the tests share, defined once: the repository root and how they run its command lines (and
accelerate's multi-process launches), the small configs they train or prepare data with, comparison files, comparing two runs' logs, and
checking a plot.
(The norm tests' fp64 references and tolerances are in norm_checks.py.)"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIME_FIELDS = ("elapsed_s", "tokens_per_s")  # wall-clock: the only metrics allowed to differ between runs


def run_cli(*args, timeout=300, env_overrides=None):
    """`python *args` in the repository root, output captured as text; env_overrides on top of os.environ."""
    env = {**os.environ, **env_overrides} if env_overrides else None
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


ACCELERATE_MODES = {  # how accelerate spreads processes over this CPU (gloo): replicas, or FSDP2 shards per Block
    "ddp": ["--multi_gpu"],
    "fsdp": ["--use_fsdp", "--fsdp_version=2", "--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP",
             "--fsdp_transformer_layer_cls_to_wrap=Block", "--fsdp_state_dict_type=SHARDED_STATE_DICT"],
}


def accelerate_command(script, *args, processes=2, mode="ddp"):
    """argv of `accelerate launch` running `script args` in `processes` local processes (ddp or fsdp)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines=1", "--mixed_precision=no",
               "--dynamo_backend=no", f"--num_processes={processes}"]
    return command + (ACCELERATE_MODES[mode] if processes > 1 else []) + [str(script), *map(str, args)]


def accelerate_launch(script, *args, processes=2, mode="ddp", env_overrides=None, timeout=300):
    """accelerate_command run to its end in the repository root, output captured as text."""
    env = {**os.environ, **env_overrides} if env_overrides else None
    return subprocess.run(accelerate_command(script, *args, processes=processes, mode=mode), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def tiny_run_config(out_dir, cache_dir, **overrides):
    """configs/tiny.toml with its run folder and data cache where the test says; overrides on top."""
    from config import load_config
    return load_config(ROOT / "configs" / "tiny.toml", {"out_dir": str(out_dir), "cache_dir": str(cache_dir), **overrides})


def config_for(tmp_path, data, **extra):
    """A one-layer config for preparing `data` into a cache under tmp_path."""
    from config import load_config
    return load_config(None, {"data": data, "cache_dir": str(tmp_path / "cache"), "vocab_size": 300,
                              "block_size": 16, "n_layer": 1, "n_head": 1, "n_embd": 8, **extra})


def write_comparison(folder, cache, variants, seeds=(1, 2), extra_base=""):
    """A comparison TOML based on configs/tiny.toml, with its outputs and data cache in tmp folders."""
    text = [f'base_config = "{ROOT / "configs" / "tiny.toml"}"', f'out_dir = "{folder / "out"}"',
            f"seeds = {list(seeds)}", 'baseline = "layernorm"', "target_val_loss = 5.6", "",
            "[base]", f'cache_dir = "{cache}"', "diagnostics = true", extra_base]
    for name, overrides in variants.items():
        text += [f"[variants.{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in overrides.items()]
    path = folder / "comparison.toml"
    path.write_text("\n".join(text) + "\n")
    return path


def assert_same_metrics(a, b, tol=1e-6):
    """Two metrics.jsonl logs hold the same steps and values (to tol; time fields aside)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if key in TIME_FIELDS:
                continue
            if isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], rel=tol, abs=tol), (ra["step"], key)
            else:
                assert rb[key] == ra[key], (ra["step"], key)


def assert_plotted(path, size=None):
    """`path` is a PNG with data drawn on it: (width, height) in pixels as given, and coloured pixels
    (lines, bars, heatmap cells); axes and text alone are black and grey."""
    from matplotlib.image import imread
    image = imread(path)[..., :3]
    if size is not None:
        assert (image.shape[1], image.shape[0]) == size, (path, image.shape)
    saturation = image.max(-1) - image.min(-1)
    assert (saturation > 0.3).mean() > 1e-4, f"{path}: nothing coloured is drawn"


def wait_for(condition, proc, timeout=120):
    """Poll condition() while the process runs; fail the test if it ends first or time runs out."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out waiting to kill the run")
        time.sleep(0.05)


def process_state(pid):
    """(state letter, parent pid) from /proc/<pid>/stat; None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
        return fields[0], int(fields[1])
    except (OSError, IndexError):  # it ended while being read
        return None


def process_tree(pid):
    """pid and every process descended from it (read from /proc), parents before children."""
    children = {}
    for entry in Path("/proc").iterdir():
        state = process_state(entry.name) if entry.name.isdigit() else None
        if state is not None:
            children.setdefault(state[1], []).append(int(entry.name))
    tree = [pid]
    for parent in tree:  # grows while it is walked: breadth first
        tree.extend(children.get(parent, []))
    return tree


def is_gone(pid):
    """True once pid has exited (a zombie waiting for its parent counts as exited)."""
    state = process_state(pid)
    return state is None or state[0] == "Z"


def kill_launch(proc, timeout=60):
    """SIGKILL an `accelerate launch` and its workers, as a crash of the node would, and wait until all
    are gone. torchrun starts each worker in a session of its own, so killing the launcher's process
    group would leave the workers training on: they would finish the run while its resume starts."""
    tree = process_tree(proc.pid)
    for pid in tree:  # the launcher first, so that it cannot react to its workers' deaths
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + timeout
    while not all(is_gone(pid) for pid in tree):
        assert time.time() < deadline, f"processes {[p for p in tree if not is_gone(p)]} outlived SIGKILL"
        time.sleep(0.05)


def one_line_error(call):
    """The message of the UserError that call() raises, checked to be one line."""
    from config import UserError
    with pytest.raises(UserError) as refused:
        call()
    message = str(refused.value)
    assert "\n" not in message, message
    return message
