"""Which keys a resume may change (config.py's tags decide it, in one place), resuming from a run
folder alone, and `train.py --help` listing every key from Config itself."""
import json
import sys
from dataclasses import fields

import pytest

import train
from config import KEY_TAGS, RESUMABLE_KEYS, Config, UserError, keys_tagged, save_config
from training.checkpoint import check_resumable, resume_config
from training.runlog import read_metrics

REFUSED = {"norm_eps": 1e-3, "z_loss": 1e-4, "dropout": 0.1, "mixed_precision": "bf16", "eval_windows": 4,
           "val_fraction": 0.1, "block_size": 8, "seed": 2, "batch_size": 4, "data": "other/*.txt",
           "tokenizer": "tok.json", "qk_norm": "rmsnorm", "weight_decay": 0.0}
ALLOWED = {"max_steps": 9, "learning_rate": 1e-3, "eval_interval": 3, "log_interval": 1, "compile": True,
           "device": "cpu", "trackers": "tensorboard", "fused_add_norm": True, "keep_checkpoints": 5}


def saved_run(folder, config):
    save_config(config, folder / "config.json")
    (folder / "meta.json").write_text(json.dumps({"tokenizer_hash": "h", "num_processes": 1}))
    return folder


@pytest.mark.parametrize("name,value", REFUSED.items())
def test_a_resume_that_changes_the_run_is_refused_naming_the_key(name, value, small_model_config, tmp_path):
    folder = saved_run(tmp_path, small_model_config())
    with pytest.raises(UserError) as refused:
        check_resumable(folder, small_model_config(**{name: value}), "h", 1)
    message = str(refused.value)
    assert f"{name} " in message and "would change" in message and "\n" not in message


@pytest.mark.parametrize("name,value", ALLOWED.items())
def test_schedule_housekeeping_and_implementation_keys_may_change(name, value, small_model_config, tmp_path):
    folder = saved_run(tmp_path, small_model_config())
    assert check_resumable(folder, small_model_config(**{name: value}), "h", 1) == small_model_config()


def test_every_key_has_tags_and_help_and_the_derived_lists_agree():
    assert all(f.metadata["help"] for f in fields(Config))
    assert set(RESUMABLE_KEYS) == {k for k, t in KEY_TAGS.items() if t <= {"schedule", "housekeeping", "implementation"}}
    assert "norm_eps" not in RESUMABLE_KEYS and "max_steps" in RESUMABLE_KEYS
    assert {"norm", "attn_norm", "qk_norm", "output_norm", "embed_norm"} <= set(keys_tagged("norm"))
    assert "block_norms" not in keys_tagged("norm")  # a stack, not a norm's name


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_with_its_default_and_exits_0(flag, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", flag])
    train.main()  # returns: exit status 0
    out = capsys.readouterr().out
    assert "--norm_eps=FLOAT  (default 1e-05; model)" in out
    assert all(f"--{f.name}=" in out for f in fields(Config))


def test_resume_by_folder_refuses_a_changed_model_key_at_once(tmp_path, small_model_config):
    save_config(small_model_config(out_dir=str(tmp_path / "elsewhere")), tmp_path / "config.json")
    with pytest.raises(UserError, match="--norm_eps cannot change on a resume"):
        resume_config(tmp_path, ["--norm_eps=1e-3"])
    config = resume_config(tmp_path, ["--max_steps=77"])
    assert (config.max_steps, config.out_dir, config.n_embd) == (77, str(tmp_path), 16)  # the folder, wherever it was
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no run"):
        resume_config(tmp_path / "empty", [])
    with pytest.raises(UserError, match="is not a folder"):
        resume_config(tmp_path / "run/rms", [])


@pytest.mark.slow
def test_resume_by_run_folder_continues_the_run_and_says_the_schedule_changed(tiny_config, tmp_path, monkeypatch,
                                                                              capsys):
    """The README's resume: a run trained with an override continues from its folder alone; a longer
    max_steps stretches the schedule and says so; eval_windows stays the run's own."""
    config = tiny_config(norm="rmsnorm", max_steps=20, eval_interval=10, eval_windows=4)
    train.train(config)
    monkeypatch.setattr(sys, "argv", ["train.py", "--resume", config.out_dir, "--max_steps=30"])
    train.main()
    out = capsys.readouterr().out
    assert "the learning-rate schedule changed: at step 20" in out
    rows = read_metrics(config.out_dir)
    assert rows[-1]["step"] == 30 and json.loads((tmp_path / "run" / "config.json").read_text())["norm"] == "rmsnorm"
    monkeypatch.setattr(sys, "argv", ["train.py", "--resume", config.out_dir, "--eval_windows=32"])
    with pytest.raises(UserError, match="--eval_windows cannot change on a resume"):
        train.main()
