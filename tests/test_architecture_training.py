"""The modern-decoder keys inside real training: untied heads through checkpoints and FSDP, RoPE +
SwiGLU + soft-cap under compile and bf16, and a resume that would change the architecture."""
import dataclasses
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from config import UserError
from repo import ROOT
from train import train
from training.checkpoint import list_checkpoints, load_model
from training.runlog import read_metrics

pytestmark = pytest.mark.slow

MODERN = dict(pos_emb="rope", mlp="swiglu", tie_embeddings=False, logit_softcap=15.0, qk_norm="rmsnorm",
              norm="rmsnorm", embed_norm="rmsnorm")


def strip_times(rows):
    return [{k: v for k, v in m.items() if k not in ("elapsed_s", "tokens_per_s")} for m in rows]




def resume_from_step_10(run_dir, copy):
    """A copy of a finished 20-step run with its step-20 checkpoint removed: resuming it retrains
    steps 11-20 from checkpoint 10, which must give the same metrics."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(list_checkpoints(copy)[-1])
    assert list_checkpoints(copy)[-1].name == "step_0000010"
    return copy


def test_untied_modern_run_saves_loads_and_resumes_exactly(tiny_config, tmp_path):
    config = tiny_config(max_steps=20, eval_interval=10, **MODERN)
    reference = train(config, log=lambda *_: None)
    weights = load_file(list_checkpoints(config.out_dir)[-1] / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    model, saved, _ = load_model(config.out_dir)
    assert saved.pos_emb == "rope" and model.lm_head.weight is not model.transformer.wte.weight
    assert reference["final_val_bpb"] > 0

    copy = resume_from_step_10(config.out_dir, tmp_path / "resumed")
    train(dataclasses.replace(config, out_dir=str(copy)), resume=True, log=lambda *_: None)
    assert strip_times(read_metrics(copy)) == strip_times(read_metrics(config.out_dir))
    with pytest.raises(UserError, match=r"pos_emb 'rope' -> 'learned'"):
        train(dataclasses.replace(config, out_dir=str(copy), max_steps=30, pos_emb="learned"), resume=True,
              log=lambda *_: None)


def test_modern_keys_train_compiled_in_bf16(tiny_config):
    result = train(tiny_config(max_steps=4, eval_interval=4, log_interval=2, compile=True, mixed_precision="bf16",
                               **MODERN), log=lambda *_: None)
    metrics = read_metrics(result["run_dir"])
    assert result["steps"] == 4 and all(torch.isfinite(torch.tensor(m["train_loss"])) for m in metrics[1:])
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]


def test_untied_rope_run_under_two_fsdp_processes_resumes_exactly(tmp_path, shared_cache):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines=1", "--mixed_precision=no",
              "--dynamo_backend=no", "--num_processes=2", "--use_fsdp", "--fsdp_version=2",
              "--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap=Block",
              "--fsdp_state_dict_type=SHARDED_STATE_DICT", "train.py", str(ROOT / "configs" / "tiny.toml"),
              f"--cache_dir={shared_cache}", "--batch_size=4", "--eval_windows=8", "--eval_interval=10",
              *[f"--{k}={v}" for k, v in MODERN.items()]]

    def run(out, steps, *extra):
        proc = subprocess.run(launch + [f"--out_dir={out}", f"--max_steps={steps}", *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "sharding: FSDP2" in run(tmp_path / "whole", 20)
    copy = resume_from_step_10(tmp_path / "whole", tmp_path / "resumed")
    run(copy, 20, "--resume")
    assert strip_times(read_metrics(copy)) == strip_times(read_metrics(tmp_path / "whole"))
    weights = load_file(list_checkpoints(tmp_path / "whole")[-1] / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
