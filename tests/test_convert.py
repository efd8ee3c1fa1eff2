"""The exact LayerNorm -> RMSNorm conversion (study/convert.py, `analyze.py convert`): the same logits
for every stack it accepts, one-line refusals for those it does not, and a run folder that resumes,
samples and probes."""
import copy
import json
from pathlib import Path

import pytest
import torch

from config import UserError, load_config
from model import GPT
from model.diagnostics import norm_sites
from model.norms import BiasRMSNorm, LayerNorm, RMSNorm
from repo import run_cli, tiny_run_config
from study import convert


def perturbed(config, seed=0, dtype=torch.float64):
    """A GPT whose weights are far from their init: non-unit gains, non-zero biases and, above all,
    embeddings and projections with a mean over features, so that a conversion that forgot a writer
    (or a LayerNorm swapped without centering) moves the logits by O(1)."""
    torch.manual_seed(seed)
    model = GPT(config).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3 + 0.1)
    return model


CONVERTIBLE = {
    "pre LN": dict(),
    "pre LN, biases": dict(bias=True),
    "pre LN, biases, QK LN": dict(bias=True, qk_norm="layernorm"),
    "RMS stream, QK LN only": dict(norm="rmsnorm", qk_norm="layernorm"),
    "peri, LN output norms only": dict(norm="rmsnorm", norm_position="peri", output_norm="layernorm", bias=True),
    "output position, LN output norms": dict(norm="rmsnorm", norm_position="output", output_norm="layernorm"),
    "RMS stream, LN embedding norm": dict(norm="rmsnorm", embed_norm="layernorm", bias=True),
    "swiglu, rope, GQA, QK LN": dict(mlp="swiglu", pos_emb="rope", n_head=4, n_kv_head=2, qk_norm="layernorm"),
    "relu2, untied, softcap, LN scaling": dict(mlp="relu2", tie_embeddings=False, logit_softcap=15.0, norm_scaling="layer"),
    "GPT-2 wiring (tanh GELU, biases), no positions": dict(mlp="gelu_tanh", bias=True, pos_emb="none"),
}


@pytest.mark.parametrize("overrides", CONVERTIBLE.values(), ids=CONVERTIBLE.keys())
def test_conversion_is_exact_and_leaves_no_layernorm(overrides, small_model_config):
    model = perturbed(small_model_config(**overrides))
    converted, config, plan = convert.convert_model(model)
    x = torch.randint(0, model.config.vocab_size, (3, model.config.block_size))
    # in fp64 the conversion is exact up to fp64 rounding; fp32 storage adds only fp32 rounding
    assert convert.max_logit_diff(model, converted, [x]) < 1e-10
    assert convert.exactness(model.float(), converted.float(), [x])["fp32"] < 1e-4
    sites = dict(norm_sites(converted))
    assert not any(isinstance(m, LayerNorm) for m in sites.values())
    before = dict(norm_sites(model))
    for site, module in before.items():
        if isinstance(module, LayerNorm):
            assert type(sites[site]) is (BiasRMSNorm if model.config.bias else RMSNorm)
    # swapping the norms without centering is NOT the same function: the test can tell them apart
    naive = GPT(config).to(torch.float32).eval()
    naive.load_state_dict({**model.state_dict(), "lm_head.weight": model.lm_head.weight}, strict=False)
    assert convert.max_logit_diff(model, naive, [x]) > 1e-2
    untied = (plan["stream"] or plan["embed"]) and model.config.tie_embeddings
    assert plan["untied_head"] == untied and config.tie_embeddings == (model.config.tie_embeddings and not untied)



def test_exactness_runs_each_model_once_per_precision(small_model_config):
    """Four forwards per batch (source and converted, fp32 and fp64), and the same four figures as
    measuring each pair apart."""
    model = perturbed(small_model_config(bias=True)).float()
    converted = convert.convert_model(model.double())[0].float()
    model.float()
    batches = [torch.randint(0, 300, (2, 16)) for _ in range(3)]
    calls = []
    for m in (model, converted):  # deep copies (the fp64 models) keep the hook
        m.register_forward_hook(lambda *_: calls.append(1))
    checks = convert.exactness(model, converted, batches)
    assert len(calls) == 4 * len(batches)
    source64, converted64 = copy.deepcopy(model).double(), copy.deepcopy(converted).double()
    assert checks == {"fp32": convert.max_logit_diff(model, converted, batches),
                      "fp64": convert.max_logit_diff(source64, converted64, batches),
                      "source_fp32_rounding": convert.max_logit_diff(model, source64, batches),
                      "max_abs_logit": max(model(x)[0].abs().max().item() for x in batches)}
    assert 0 < checks["fp32"] < 1e-4

def test_rmsnorm_bias_is_rmsnorm_without_bias_and_layernorm_on_centered_input(small_model_config):
    x = torch.randn(5, 16, dtype=torch.float64) * 3 + 1
    plain = RMSNorm(16, small_model_config())
    assert torch.equal(BiasRMSNorm(16, small_model_config())(x), plain(x))
    biased, layernorm = BiasRMSNorm(16, small_model_config(bias=True)), LayerNorm(16, small_model_config(bias=True))
    with torch.no_grad():
        for p, q in zip(biased.parameters(), layernorm.parameters()):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    centered = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(biased(centered), layernorm(x), rtol=0, atol=1e-12)


REFUSED = {
    "post-norm": (dict(norm_position="post"), "block0-1.attn, block0-1.mlp are post-norm"),
    "peri, LN everywhere": (dict(norm_position="peri"), "block0-1.attn_out, block0-1.mlp_out write to it with a norm's output"),
    "mixed stack": (dict(block_norms="layernorm,rmsnorm"), "block1.attn, block1.mlp (RMSNorm) read the residual stream"),
    "DyT final norm": (dict(final_norm="dyt"), "final (DyT) read the residual stream without mean subtraction"),
    "no final norm": (dict(final_norm="none"), "final (Identity) read the residual stream"),
    "LN embedding norm on an LN stream": (dict(embed_norm="layernorm"), "embed write to it with a norm's output"),
    "no LayerNorm": (dict(norm="rmsnorm", qk_norm="scalenorm"), "nothing to convert: the model has no LayerNorm site"),
}


@pytest.mark.parametrize("overrides, message", REFUSED.values(), ids=REFUSED.keys())
def test_inexact_conversions_are_refused_in_one_line(overrides, message, small_model_config):
    with pytest.raises(UserError) as refused:
        convert.convert_model(GPT(small_model_config(**overrides)))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_conversion_is_written_only_at_fp32_precision():
    from study.convert_run import inexact
    ok = {"random tokens": {"fp32": 9e-6, "source_fp32_rounding": 1e-5}}
    assert inexact(ok) is None
    # a GPT-2-sized model rounds more: 10x its own rounding is allowed above the 1e-4 floor
    assert inexact({"validation windows": {"fp32": 4e-4, "source_fp32_rounding": 6e-5}}) is None
    for fp32 in (2e-4, float("nan")):
        problem = inexact({**ok, "validation windows": {"fp32": fp32, "source_fp32_rounding": 1e-5}})
        assert "on validation windows (allowed 0.0001)" in problem and "\n" not in problem


def test_out_folder_holding_a_run_or_the_source_is_refused(tmp_path):
    from study.convert_run import check_out
    source = tmp_path / "run" / "checkpoints" / "step_0000010"
    source.mkdir(parents=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run"):
        check_out(tmp_path / "taken", source)
    with pytest.raises(UserError, match="holds the source checkpoint"):
        check_out(tmp_path, source)  # a folder above the source
    assert check_out(tmp_path / "new", source) == tmp_path / "new"


def trained_run(folder, cache, **overrides):
    from train import train
    config = tiny_run_config(folder, cache, max_steps=12, eval_interval=6, diagnostics=True, **overrides)
    train(config, log=lambda *_: None)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(), dict(bias=True, qk_norm="layernorm")], ids=["no biases", "biases, QK LN"])
def test_converted_run_has_the_same_logits_and_resumes_samples_and_probes(overrides, shared_cache, tmp_path):
    from sample import generate_samples, parse_args
    from hf.sources import load_source
    from study.convert_run import run_convert
    from study.probe import run_probe
    from train import train
    source = trained_run(tmp_path / "source", shared_cache, **overrides)
    out = tmp_path / "converted"
    record = run_convert(load_source(source.out_dir), "rmsnorm", str(out), log=lambda *_: None)
    for where in ("random tokens", "validation windows"):
        assert record["max_abs_logit_change"][where]["fp32"] <= 1e-4
    saved = json.loads((out / "config.json").read_text())
    assert saved["tie_embeddings"] is False and saved["norm"] == ("rmsnorm_bias" if overrides else "rmsnorm")
    assert saved["qk_norm"] == ("rmsnorm_bias" if overrides else "")
    # its log carries the source's history, its checkpoint the source's step, counters and data position
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()][-1] == 12
    state = [folder / "checkpoints" / "step_0000012" / "state" for folder in (Path(source.out_dir), out)]
    for index in (0, 1):
        saved = [torch.load(s / f"custom_checkpoint_{index}.pkl", weights_only=False) for s in state]
        assert saved[0] == saved[1]
    # every converted norm now reads zero-mean vectors: adding mean subtraction anywhere changes nothing
    rows = run_probe(out, log=lambda *_: None)
    flips = [r for r in rows if r["recenters"] is not None]
    assert {r["norm"] for r in flips} <= {"RMSNorm", "BiasRMSNorm"} and len(flips) == 2 * (4 if overrides else 2) + 1
    assert max(abs(r["delta"]) for r in flips) < 1e-5
    resumed = load_config(out / "config.toml", {"max_steps": 18})
    assert resumed.out_dir == str(out)
    result = train(resumed, resume=True, log=lambda *_: None)
    assert result["steps"] == 18 and result["final_val_loss"] < 6.3  # log(512) = 6.24 at chance
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 18 and 12 in steps
    samples = generate_samples(parse_args([str(out), "--num_samples", "1", "--max_new_tokens", "8", "--device", "cpu"]),
                               out=open(tmp_path / "samples.txt", "w"))
    assert len(samples) == 1


@pytest.mark.slow
def test_cli_refuses_post_norm_in_one_line_and_writes_nothing(shared_cache, tmp_path):
    source = trained_run(tmp_path / "post", shared_cache, norm_position="post", warmup_steps=2)
    result = run_cli("analyze.py", "convert", source.out_dir, "--to", "rmsnorm", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "post-norm" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--to", "scalenorm", "--out", "x"], "--to 'scalenorm': the exact conversion goes to rmsnorm"),
    (["--out", "x"], "required: --to"),
])
def test_cli_bad_arguments_are_one_line(args, message, tmp_path):
    result = run_cli("analyze.py", "convert", str(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_a_transformers_gpt2_checkpoint_converts_exactly_and_trains_on(shared_cache, tmp_path):
    """GPT-2's own LayerNorms to RMSNorm (Jiang et al.'s headline): the converted run's logits equal
    transformers' GPT2LMHeadModel on the same tokens, and the run trains on from its step-0 checkpoint."""
    import transformers
    from hf.sources import load_source
    from hf_checkpoints import build, tokenizer_file
    from study.convert_run import run_convert
    from train import train
    from training.checkpoint import load_model
    folder = build("gpt2", tmp_path / "gpt2", tokenizer_file(tmp_path / "tok"))
    pretrained = load_source(str(folder), overrides={"cache_dir": shared_cache, "eval_windows": 4, "batch_size": 2})
    out = tmp_path / "gpt2_rmsnorm"
    record = run_convert(pretrained, "rmsnorm", str(out), log=lambda *_: None)
    assert all(record["max_abs_logit_change"][w]["fp32"] <= 1e-4 for w in ("random tokens", "validation windows"))
    converted, config, _ = load_model(out)
    assert config.norm == "rmsnorm_bias" and not config.tie_embeddings and config.init_from == ""
    reference = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    idx = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(idx)[0], reference(idx).logits, rtol=0, atol=1e-4)
    resumed = load_config(out / "config.toml", {"max_steps": 3, "eval_interval": 3, "cache_dir": shared_cache})
    assert train(resumed, resume=True, log=lambda *_: None)["steps"] == 3
