"""Config loading: TOML, overrides, and one-line errors for bad input."""
import tomllib

import pytest
import torch

from config import Config, UserError, load_config, parse_cli_overrides
from model import GPT, check_model_config, make_model
from repo import ROOT


# comparison files (compare_*.toml, study_*.toml: they have [variants]) are compare.py's own format
TRAIN_CONFIGS = [p.name for p in (ROOT / "configs").glob("*.toml") if "variants" not in tomllib.loads(p.read_text())]


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_shipped_config_builds_its_model(name):
    config = check_model_config(load_config(ROOT / "configs" / name))
    with torch.device("meta"):  # shapes only: no memory, no time
        assert make_model(config).num_params() > 0


def test_the_gpt2_config_builds_gpt2_small():
    """configs/gpt2_124m.toml is the 124M-parameter GPT-2 (the output head tied to wte, counted once)."""
    with torch.device("meta"):
        model = GPT(load_config(ROOT / "configs" / "gpt2_124m.toml"))
    assert round(model.num_params() / 1e6) == 124


def test_cli_overrides_are_typed():
    c = load_config(ROOT / "configs" / "tiny.toml", ["--norm=rmsnorm", "--max_steps=7", "--bias=true", "--dropout=0.1"])
    assert (c.norm, c.max_steps, c.bias, c.dropout) == ("rmsnorm", 7, True, 0.1)


def toml(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ('n_layers = 4', "unknown config key 'n_layers'; did you mean 'n_layer'?"),
    ('n_layer = "four"', "config key 'n_layer' expects int, got str 'four'"),
    ('bias = 1', "config key 'bias' expects bool"),
    ('n_layer = 2.5', "expects int"),
    ('norm = "batchnorm"', "unknown norm 'batchnorm' in norm; valid norms:"),
    ('n_embd = 100\nn_head = 3', r"n_embd \(100\) must be divisible by n_head \(3\)"),
    ('max_steps = 0', "max_steps must be a positive integer"),
    ('n_layer = -1', "n_layer must be a positive integer"),
    ('block_norms = "layernorm*3"', "describes 3 blocks but n_layer is 4"),
    ('norm_position = "middle"', "norm_position = 'middle' is not valid; choose one of pre, post"),
    ('mixed_precision = "fp8"', "choose one of no, bf16, fp16"),
    ('dropout = 1.5', r"dropout = 1.5 is out of range; valid: \[0, 1\)"),
    ('n_layer = [', "is not valid TOML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    """load_config's own checks, then the registry's (model.check_model_config), as train() runs them."""
    with pytest.raises(UserError, match=message):
        check_model_config(load_config(toml(tmp_path, text)))


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        load_config("configs/nope.toml")


@pytest.mark.parametrize("args, message", [
    (["--learning_rat=1"], "did you mean 'learning_rate'"),
    (["--max_steps=ten"], "--max_steps expects int"),
    (["--compile=maybe"], "expects true or false"),
    (["max_steps=10"], "overrides look like --key=value"),
])
def test_bad_cli_override(args, message):
    with pytest.raises(UserError, match=message):
        parse_cli_overrides(args)


def test_ints_are_accepted_for_floats(tmp_path):
    assert load_config(toml(tmp_path, "learning_rate = 1\nmin_lr = 0")).learning_rate == 1.0


def test_defaults_validate():
    Config().validate()
