"""Each norm against its formula in fp64, its invariances, and the norm-stack configuration."""
import math

import pytest
import torch

from config import UserError
from model import GPT
from model.norms import NORMS, make_norm
from model.stack import check_model_config, parse_block_norms, resolve_norm_stack
from norm_checks import rms_norm_fp64


def reference(name, x, weight, bias, eps, prms_fraction):
    """The formulas of the docstrings, written out in fp64."""
    x = x.double()
    d = x.shape[-1]
    if name == "layernorm":
        c = x - x.mean(-1, keepdim=True)
        y = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    elif name in ("rmsnorm", "prmsnorm"):
        k = math.ceil(prms_fraction * d) if name == "prmsnorm" else d
        return rms_norm_fp64(x, weight, k, eps)
    elif name == "scalenorm":
        return math.sqrt(d) * x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    else:
        return x
    y = y * weight.double()
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "prmsnorm", "scalenorm", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_matches_formula(name, bias, small_model_config):
    config = small_model_config(n_embd=48, bias=bias, norm_eps=1e-5, prms_fraction=0.2)
    norm = make_norm(name, 48, config)
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial gains so a missing multiply fails
        for p in norm.parameters():
            p.copy_(torch.randn_like(p) if p.dim() else p)
    x = torch.randn(3, 5, 48) * 3 + 0.7
    weight = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    expected = reference(name, x, weight, b, 1e-5, 0.2)
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_prmsnorm_uses_only_the_first_features(small_model_config):
    config = small_model_config(n_embd=32, prms_fraction=0.25)  # k = 8
    norm = make_norm("prmsnorm", 32, config)
    x = torch.randn(4, 32)
    y1 = norm(x)
    x2 = x.clone()
    x2[:, 8:] *= 10  # features the statistic ignores
    y2 = norm(x2)
    torch.testing.assert_close(y2[:, :8], y1[:, :8])
    torch.testing.assert_close(y2[:, 8:], y1[:, 8:] * 10)


def test_scalenorm_has_one_scalar_gain_initialised_to_sqrt_d(small_model_config):
    norm = make_norm("scalenorm", 64, small_model_config(n_embd=64))
    params = list(norm.parameters())
    assert len(params) == 1 and params[0].dim() == 0
    assert params[0].item() == pytest.approx(8.0)


@pytest.mark.parametrize("name", ["rmsnorm", "scalenorm", "layernorm"])
def test_scale_invariance(name, small_model_config):
    norm = make_norm(name, 32, small_model_config(n_embd=32, norm_eps=1e-12))
    x = torch.randn(6, 32, dtype=torch.float64)
    torch.testing.assert_close(norm(x * 7.5), norm(x))


def test_only_layernorm_is_shift_invariant(small_model_config):
    config = small_model_config(n_embd=32, norm_eps=1e-12)
    x = torch.randn(6, 32, dtype=torch.float64)
    torch.testing.assert_close(make_norm("layernorm", 32, config)(x + 3.0), make_norm("layernorm", 32, config)(x))
    rms = make_norm("rmsnorm", 32, config)
    assert not torch.allclose(rms(x + 3.0), rms(x))


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "prmsnorm", "scalenorm"])
def test_statistics_in_fp32_for_low_precision_input(name, small_model_config):
    norm = make_norm(name, 64, small_model_config(n_embd=64))
    x = torch.randn(8, 64) * 300  # squares overflow fp16's range: fp16 statistics would give inf
    y = norm(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), norm(x.half().float()), rtol=1e-2, atol=1e-2)


def test_norm_without_gain_has_no_parameters(small_model_config):
    config = small_model_config(norm_gain=False)
    for name in NORMS:
        assert list(make_norm(name, 16, config).parameters()) == []


def test_block_norms_compact_form_and_pairs():
    assert parse_block_norms("layernorm*2,rmsnorm*2", 4) == [("layernorm", "layernorm")] * 2 + [("rmsnorm", "rmsnorm")] * 2
    assert parse_block_norms("layernorm/rmsnorm*2, none", 3) == [("layernorm", "rmsnorm")] * 2 + [("none", "none")]
    assert parse_block_norms(["scalenorm", ["layernorm", "rmsnorm"]], 2) == [("scalenorm",) * 2, ("layernorm", "rmsnorm")]


@pytest.mark.parametrize("spec, n_layer, message", [
    ("layernorm*2", 3, "describes 2 blocks but n_layer is 3"),
    ("layernorm,bogus", 2, "unknown norm 'bogus'"),
    ("layernorm*x", 1, "repeat count"),
    ("layernorm/rmsnorm/none", 1, "attn/mlp pair"),
    ([3], 1, "must be a norm name"),
])
def test_block_norms_errors(spec, n_layer, message):
    with pytest.raises(UserError, match=message):
        parse_block_norms(spec, n_layer)


def test_unknown_norm_lists_the_valid_ones(small_model_config):
    with pytest.raises(UserError, match="valid norms: layernorm, rmsnorm"):
        check_model_config(small_model_config(norm="batchnorm"))


def test_norm_precedence(small_model_config):
    config = small_model_config(n_layer=3, norm="rmsnorm", attn_norm="layernorm", final_norm="none")
    assert resolve_norm_stack(config) == ([("layernorm", "rmsnorm")] * 3, "none")
    config = small_model_config(n_layer=2, norm="rmsnorm", attn_norm="layernorm", block_norms="scalenorm*2")
    assert resolve_norm_stack(config) == ([("scalenorm", "scalenorm")] * 2, "rmsnorm")


def test_fused_add_norm_config_is_checked_where_the_registry_lives(small_model_config):
    with pytest.raises(UserError, match="fused_add_norm needs pre-norm blocks whose norms are all rmsnorm"):
        check_model_config(small_model_config(norm="layernorm", fused_add_norm=True))
    with pytest.raises(UserError, match="norm_position is 'post'"):
        check_model_config(small_model_config(norm="rmsnorm", norm_position="post", fused_add_norm=True))
    # the final norm may differ; the stack's log says its add runs unfused
    mixed = small_model_config(norm="rmsnorm", final_norm="layernorm", fused_add_norm=True)
    assert "except before the final norm (layernorm: no fused kernel)" in GPT(check_model_config(mixed)).describe_norms()
    assert "except" not in GPT(small_model_config(norm="rmsnorm", fused_add_norm=True)).describe_norms()
