"""The modern-decoder keys inside real training: untied heads through checkpoints and FSDP, RoPE +
SwiGLU + soft-cap under compile and bf16, and a resume that would change the architecture."""
import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file

from config import UserError
from repo import ROOT, accelerate_launch, assert_same_metrics
from train import train
from training.checkpoint import list_checkpoints, load_model
from training.runlog import read_metrics

pytestmark = pytest.mark.slow

MODERN = dict(pos_emb="rope", mlp="swiglu", tie_embeddings=False, logit_softcap=15.0, qk_norm="rmsnorm",
              norm="rmsnorm", embed_norm="rmsnorm")


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
    assert_same_metrics(read_metrics(config.out_dir), read_metrics(copy), tol=0)
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
    common = [ROOT / "configs" / "tiny.toml", f"--cache_dir={shared_cache}", "--batch_size=4", "--eval_windows=8",
              "--eval_interval=10", *[f"--{k}={v}" for k, v in MODERN.items()]]

    def run(out, steps, *extra):
        proc = accelerate_launch("train.py", *common, f"--out_dir={out}", f"--max_steps={steps}", *extra, mode="fsdp",
                                 timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "sharding: FSDP2" in run(tmp_path / "whole", 20)
    copy = resume_from_step_10(tmp_path / "whole", tmp_path / "resumed")
    run(copy, 20, "--resume")
    assert_same_metrics(read_metrics(tmp_path / "whole"), read_metrics(copy), tol=0)
    weights = load_file(list_checkpoints(tmp_path / "whole")[-1] / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
