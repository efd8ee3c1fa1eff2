"""Start from a transformers checkpoint (a local folder or a hub id): its architecture and tokenizer
become our config (init_from), its weights our GPT's, and a norm changed at a site starts from the old
norm's gains.

A config key counts as set by the user when it differs from Config's default: such a key must agree
with the checkpoint, with two exceptions. block_size may be smaller (a shorter context: learned
positions keep their first rows), and the norm of a site may change (norm, attn_norm, mlp_norm,
final_norm, block_norms, and qk_norm's type where the checkpoint has one) to any norm with a
per-feature gain, which starts from the old gains. A LayerNorm bias the new norm lacks is folded into
the bias of the Linear that reads the norm's output (exact: W(g*x + b) + c = W(g*x) + (Wb + c)); where
no such Linear follows (the final norm: lm_head has no bias) the change is refused.
"""
import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from config import KEY_TAGS, Config, UserError, apply_overrides
from hf.families import config_from_hf, import_state
from model.norms import check_model_config, make_norm, resolve_block_positions, resolve_norm_stack

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
READERS = {"ln_1": ["attn.c_attn"], "ln_2": ["mlp.c_fc", "mlp.c_up"]}  # the Linears that read a block norm's output


def require_transformers(what):
    """The transformers module, quiet; a one-line UserError where it is not installed."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"{what} needs transformers: pip install normgpt[hf]") from None
    transformers.utils.logging.set_verbosity_error()  # we check loading ourselves and say it in one line
    transformers.utils.logging.disable_progress_bar()
    return transformers


def read_json(path):
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def is_transformers_source(path):
    """Whether `path` names a transformers checkpoint: a folder whose config.json has a model_type, or,
    where nothing local has that name, a hub id (unless a folder above it exists: a mistyped path)."""
    p = Path(path)
    if p.exists():
        return p.is_dir() and "model_type" in read_json(p / "config.json")
    return bool(HUB_ID.fullmatch(str(path))) and (p.parent == Path(".") or not p.parent.exists())


def check_source(source):
    p = Path(source)
    if p.exists() and not p.is_dir():
        raise UserError(f"init_from {source!r} is a file; give a transformers checkpoint folder or a hub id")
    if p.is_dir() and "model_type" not in read_json(p / "config.json"):
        ours = (p / "checkpoints").is_dir() or "norm" in read_json(p / "config.json")
        raise UserError(f"init_from {source!r} is " + ("a normgpt run or checkpoint: resume it with --resume, or "
                        "export it with export.py first" if ours else "not a transformers checkpoint (no config.json "
                        "with a model_type)"))
    if not p.exists() and not is_transformers_source(source):
        raise UserError(f"init_from {source!r} does not exist; give a transformers checkpoint folder or a hub id")


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def checkpoint_config(source):
    """(family, {our config key: value}) of a transformers checkpoint's config.json."""
    check_source(source)
    transformers = require_transformers(f"{source!r} is a transformers checkpoint: reading it")
    try:
        hf = transformers.AutoConfig.from_pretrained(source)
    except Exception as e:  # OSError for a missing hub id or no network, ValueError for an unknown model_type
        where = "" if Path(source).exists() else " (no local folder has that name; as a hub id)"
        raise UserError(f"cannot read the config of {source!r}{where}: {first_line(e)}") from None
    return config_from_hf(hf, repr(source))


def checkpoint_file(source, name):
    """A local path to the checkpoint's file `name` (downloaded into the hub cache for a hub id), or None."""
    from transformers.utils import cached_file
    try:
        return cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    except Exception as e:
        raise UserError(f"cannot read {name} of {source!r}: {first_line(e)}") from None


def checkpoint_tokenizer(source):
    """(path of its tokenizer.json, its EOS token or "" where it names none): the EOS of
    tokenizer_config.json / special_tokens_map.json, else of generation_config.json / config.json."""
    from tokenizers import Tokenizer
    path = checkpoint_file(source, "tokenizer.json")
    if path is None:
        raise UserError(f"{source!r} has no tokenizer.json; data is encoded with it (save one with "
                        f"AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    tokenizer = Tokenizer.from_file(path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        eos = read_json(checkpoint_file(source, name)).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return path, eos
    for name in ("generation_config.json", "config.json"):
        eos_id = read_json(checkpoint_file(source, name)).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int) and tokenizer.id_to_token(eos_id) is not None:
            return path, tokenizer.id_to_token(eos_id)
    return path, ""  # data/tokenizer.py's end_of_document looks among its special tokens


def agrees(key, mine, theirs, config):
    if key == "n_kv_head":
        return (mine or config.n_head) == (theirs or config.n_head)
    if key == "tokenizer":
        return Path(mine).resolve() == Path(theirs).resolve()
    return mine == theirs


def resolve_init_from(config):
    """config with the architecture and tokenizer of the checkpoint config.init_from (the module
    docstring says what a config may change); unchanged when init_from is empty. Idempotent."""
    if not config.init_from:
        return config
    source = config.init_from
    kind, keys = checkpoint_config(source)
    keys["tokenizer"], eos = checkpoint_tokenizer(source)
    defaults, resolved, conflicts = Config(), {}, []
    for key, theirs in keys.items():
        mine = getattr(config, key)
        if mine == getattr(defaults, key) or agrees(key, mine, theirs, config):
            resolved[key] = theirs
        elif (key == "block_size" and mine < theirs) or ("norm" in KEY_TAGS[key] and theirs and mine):
            resolved[key] = mine  # a shorter context, or a norm change (checked by norm_changes)
        else:
            conflicts.append(f"{key} = {mine!r} (the checkpoint's: {theirs!r})")
    if conflicts:
        raise UserError(f"init_from {source!r}: the config contradicts the checkpoint: {', '.join(conflicts)}; "
                        f"leave these keys out, they come from the checkpoint")
    if not config.eod_token:
        resolved["eod_token"] = eos
    config = check_model_config(apply_overrides(config, resolved).validate())
    norm_changes(source_config(config, keys), config)  # an unsupported change fails now, before data is prepared
    return config


def source_config(config, keys):
    """config with the checkpoint's own norms at every site."""
    return replace(config, norm=keys["norm"], qk_norm=keys["qk_norm"], attn_norm="", mlp_norm="", final_norm="",
                   block_norms="")


def site_prefixes(config):
    """[(parameter prefix, site name, norm name, the Linears reading its output)] of every norm site."""
    blocks, final = resolve_norm_stack(config)
    sites = []
    for i, ((attn, mlp), position) in enumerate(zip(blocks, resolve_block_positions(config))):
        h = f"transformer.h.{i}."
        sites += [(f"{h}ln_1", f"block{i}.attn", attn, [h + r for r in READERS["ln_1"]]),
                  (f"{h}ln_2", f"block{i}.mlp", mlp, [h + r for r in READERS["ln_2"]])]
        if position == "peri":  # Gemma's output norms: the residual stream reads them, no Linear
            sites += [(f"{h}ln_1_out", f"block{i}.attn_out", config.output_norm or attn, []),
                      (f"{h}ln_2_out", f"block{i}.mlp_out", config.output_norm or mlp, [])]
        if config.qk_norm:
            sites += [(f"{h}attn.q_norm", f"block{i}.q", config.qk_norm, []),
                      (f"{h}attn.k_norm", f"block{i}.k", config.qk_norm, [])]
    return sites + [("transformer.ln_f", "final", final, [])]


def parameters_of(name, config):
    return {key for key, _ in make_norm(name, 8, config).named_parameters()}


def norm_changes(source, target):
    """[(prefix, readers, fold the bias?)] of the sites whose norm target changes from source's; a
    UserError for a change that cannot start from the old norm's parameters (module docstring)."""
    changes = []
    for (prefix, site, old, readers), (_, _, new, _) in zip(site_prefixes(source), site_prefixes(target)):
        if old == new:
            continue
        before, after = parameters_of(old, source), parameters_of(new, target)
        if "weight" not in after:
            raise UserError(f"init_from: {site}: {new} has no per-feature gain to start from the {old}'s gains; "
                            f"choose a norm with one (layernorm, rmsnorm, prmsnorm, seednorm, dyt, derf)")
        fold = "bias" in before and "bias" not in after
        if fold and not (target.bias and readers):
            raise UserError(f"init_from: {site}: {new} has no bias, and no Linear with a bias reads this site to take "
                            f"the {old}'s bias (lm_head has none); keep {old} here (e.g. final_norm = {old!r})")
        changes.append((prefix, readers, fold))
    return changes


def load_transformers_model(source):
    """The checkpoint's transformers model in fp32, every weight read from its files."""
    transformers = require_transformers(f"{source!r} is a transformers checkpoint: reading it")
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(source, output_loading_info=True)
    except Exception as e:
        raise UserError(f"cannot load the weights of {source!r}: {first_line(e)}") from None
    missing = sorted(info.get("missing_keys", [])) + sorted(str(k) for k in info.get("mismatched_keys", []))
    if missing:
        raise UserError(f"the weights of {source!r} are incomplete: {', '.join(missing[:3])} missing or misshapen")
    return model.float()  # bf16 and fp16 checkpoints widen exactly


@torch.no_grad()
def load_init_weights(model, config, log=print):
    """Copy the weights of the checkpoint config.init_from into `model` (a GPT(config), config resolved)."""
    kind, keys = checkpoint_config(config.init_from)
    source = source_config(config, keys)
    theirs = {k: v.detach() for k, v in load_transformers_model(config.init_from).named_parameters(remove_duplicate=False)}
    state = import_state(kind, theirs, source)
    changes = norm_changes(source, config)
    for prefix, readers, fold in changes:
        if fold:  # the Linears that read this site add W @ b to their bias instead
            bias = state.pop(f"{prefix}.bias")
            for reader in (r for r in readers if f"{r}.weight" in state):
                state[f"{reader}.bias"] = state[f"{reader}.bias"] + state[f"{reader}.weight"] @ bias
    ours = model.state_dict()
    new_parameters = [k for k in ours if k not in state and any(k.startswith(p + ".") for p, _, _ in changes)]
    for key in new_parameters:  # those the new norm has and the old had not (SeeDNorm's alpha, DyT's beta...)
        state[key] = ours[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a mapping that left something out: never train from half the weights
        raise UserError(f"init_from {config.init_from!r}: weights do not fit: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    changed = f"; {len(changes)} norm sites start from the old norm's parameters" if changes else ""
    log(f"init_from {config.init_from}: {kind} weights loaded{changed}")


def load_pretrained(source, device="cpu", overrides=None):
    """(model, config, tokenizer path): our GPT with the weights of a transformers checkpoint folder or
    hub id, in eval mode on `device`. overrides: config keys on top (a shorter block_size, data,
    eval_windows, a norm change...), as a training run's config would give them."""
    config = apply_overrides(Config(), {**(overrides or {}), "init_from": str(source)}).validate()
    config = resolve_init_from(config)
    from model import GPT
    model = GPT(config)
    load_init_weights(model, config, log=lambda *_: None)
    return model.to(device).eval(), config, config.tokenizer
