"""Start from a transformers checkpoint (a local folder or a hub id): its architecture and tokenizer
become our config (init_from), its weights our GPT's, and a norm changed at a site starts from the old
norm's gains.

A config key counts as set by the user when it differs from Config's default: such a key must agree
with the checkpoint, with two exceptions. block_size may be smaller (a shorter context: learned
positions keep their first rows), and the norm of a site may change (norm, attn_norm, mlp_norm,
final_norm, block_norms, site_norms, and qk_norm's type where the checkpoint has one) to any norm with a
per-feature gain, which starts from the old gains. A LayerNorm bias the new norm lacks is folded into
the bias of the Linear that reads the norm's output (exact: W(g*x + b) + c = W(g*x) + (Wb + c)); where
no such Linear follows (the final norm: lm_head has no bias) the change is refused.
"""
import difflib
import json
import os
import re
import socket
from dataclasses import replace
from urllib.parse import urlparse
from pathlib import Path

import torch

from config import KEY_TAGS, Config, UserError, apply_overrides
from hf.families import config_from_hf, import_state
from hf.gguf import PACKAGED, dequantized_folder, gguf_origin, is_gguf
from model.gpt import load_exactly
from model.norms import make_norm
from model.stack import block_norm_names, check_model_config, resolve_block_positions, resolve_norm_stack, site_name

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
LOCAL_SUFFIXES = (".gguf", ".json", ".safetensors", ".bin", ".toml", ".pt")  # a name ending so is a file, not a hub id
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
    """Whether `path` names a pretrained checkpoint: a folder whose config.json has a model_type, a GGUF
    file or packaged model (hf/gguf.py), or, where nothing local has that name, a hub id (unless it
    looks like a local path: a mistyped path)."""
    p = Path(path)
    if is_gguf(path):
        return True
    if p.exists():
        return p.is_dir() and "model_type" in read_json(p / "config.json")
    return not looks_local(path)


def looks_local(source):
    """Whether a name that exists nowhere here can only be meant as a local path, never a hub id
    ("user/model"): it starts like a path, has more than one "/", ends like a file, or a folder above it exists."""
    s, parent = str(source), Path(source).parent
    return (not HUB_ID.fullmatch(s) or s.startswith((".", "~")) or s.count("/") > 1 or s.endswith(LOCAL_SUFFIXES)
            or (parent != Path(".") and parent.exists()))


def hub_reachable():
    """Whether the Hugging Face hub answers at all (one connection, a few seconds at most; at once
    where the name does not resolve), so that an offline machine is told so instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def cached_snapshot(hub_id):
    """The local folder of a hub id already downloaded into the hub cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # no huggingface_hub, or a name it rejects
        return None
    return str(Path(path).parent) if isinstance(path, str) else None


def locate(source, log=print):
    """Where the pretrained checkpoint `source` is read from: a local folder (for a GGUF file or packaged
    model its dequantized folder in the cache; for a hub id already downloaded its snapshot) or, where the
    hub answers, the hub id. Otherwise a one-line UserError at once, the hub never asked."""
    if is_gguf(source):
        return str(dequantized_folder(source, log))
    check_source(source)
    if Path(source).exists():
        return str(source)
    snapshot = cached_snapshot(str(source))
    if snapshot:
        return snapshot
    if not hub_reachable():
        close = difflib.get_close_matches(str(source), PACKAGED, n=1)
        if close:
            raise UserError(f"no folder {str(source)!r} here, and no hub to ask; did you mean the packaged model "
                            f"{close[0]!r}?")
        raise UserError(f"no folder {str(source)!r} here, and no hub to ask: as a hub id it needs the Hugging Face "
                        f"hub, which this machine cannot reach; where it can, save the model and its tokenizer "
                        f"(AutoModelForCausalLM / AutoTokenizer .from_pretrained({str(source)!r}).save_pretrained"
                        f"(folder)) and give that folder, or give a .gguf file or a packaged model "
                        f"({', '.join(PACKAGED)})")
    return str(source)


def check_source(source):
    p = Path(source)
    if p.exists() and not p.is_dir():
        raise UserError(f"{str(source)!r} is a file; give a transformers checkpoint folder, a hub id or a .gguf file")
    if p.is_dir() and "model_type" not in read_json(p / "config.json"):
        ours = (p / "checkpoints").is_dir() or "norm" in read_json(p / "config.json")
        raise UserError(f"{str(source)!r} is " + ("a normgpt run or checkpoint: resume it with --resume, or "
                        "export it with export.py first" if ours else "not a transformers checkpoint (no config.json "
                        "with a model_type)"))
    if not p.exists() and looks_local(source):
        raise UserError(f"{str(source)!r} does not exist; give a run dir, a checkpoint folder, a transformers "
                        f"folder, a hub id, a .gguf file or a packaged model ({', '.join(PACKAGED)})")


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def checkpoint_config(source):
    """(family, {our config key: value}) of a transformers checkpoint's config.json (source: as locate gives it)."""
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


def bos_first(source, tokenizer_path):
    """The <bos> token a checkpoint's tokenizer puts before every text (tokenizer_config.json's
    add_bos_token: Gemma), or "" for one that adds none. Such a model was trained on documents that
    start with it, and without it continues text badly."""
    values = read_json(checkpoint_file(source, "tokenizer_config.json"))
    bos = values.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    from tokenizers import Tokenizer
    if values.get("add_bos_token") is True and isinstance(bos, str) and Tokenizer.from_file(tokenizer_path).token_to_id(bos) is not None:
        return bos
    return ""


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
    where = locate(source)
    kind, keys = checkpoint_config(where)
    keys["tokenizer"], eos = checkpoint_tokenizer(where)
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
    bos = bos_first(where, keys["tokenizer"])
    if not config.eod_token and bos:  # documents separated by <bos> start with it; windows and prompts start there
        resolved.update(eod_token=bos, doc_windows=True)
    elif not config.eod_token:
        resolved["eod_token"] = eos
    config = check_model_config(apply_overrides(config, resolved).validate())
    norm_changes(source_config(config, keys), config)  # an unsupported change fails now, before data is prepared
    return config


def source_config(config, keys):
    """config with the checkpoint's own norms at every site."""
    return replace(config, norm=keys["norm"], qk_norm=keys["qk_norm"], attn_norm="", mlp_norm="", final_norm="",
                   block_norms="", site_norms="")


def site_prefixes(config):
    """[(parameter prefix, site name, norm name, the Linears reading its output)] of every norm site."""
    blocks, final = resolve_norm_stack(config)
    sites = []
    for i, ((attn, mlp), position) in enumerate(zip(blocks, resolve_block_positions(config))):
        h = f"transformer.h.{i}."
        sites += [(f"{h}ln_1", site_name(i, "attn"), attn, [h + r for r in READERS["ln_1"]]),
                  (f"{h}ln_2", site_name(i, "mlp"), mlp, [h + r for r in READERS["ln_2"]])]
        names = block_norm_names(config, i)
        if position == "peri":  # Gemma's output norms: the residual stream reads them, no Linear
            sites += [(f"{h}ln_1_out", site_name(i, "attn_out"), names["attn_out"], []),
                      (f"{h}ln_2_out", site_name(i, "mlp_out"), names["mlp_out"], [])]
        if config.qk_norm:
            sites += [(f"{h}attn.q_norm", site_name(i, "q"), names["q"], []),
                      (f"{h}attn.k_norm", site_name(i, "k"), names["k"], [])]
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
    where = locate(config.init_from, log)
    kind, keys = checkpoint_config(where)
    source = source_config(config, keys)
    theirs = {k: v.detach() for k, v in load_transformers_model(where).named_parameters(remove_duplicate=False)}
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
    load_exactly(model, state, f"init_from {config.init_from!r}", tied=("lm_head.weight",) if config.tie_embeddings else ())
    changed = f"; {len(changes)} norm sites start from the old norm's parameters" if changes else ""
    origin = gguf_origin(where)
    quantized = f" (dequantized from a {origin['quantization']} GGUF file)" if origin and origin["quantization"] else ""
    log(f"init_from {config.init_from}: {kind} weights{quantized} loaded{changed}")


PRETRAINED_CONTEXT = 512  # where block_size is not given: Gemma 3's 32k context would need 34 GB per window's logits


def load_pretrained(source, device="cpu", overrides=None):
    """(model, config, tokenizer path): our GPT with the weights of a transformers checkpoint folder,
    hub id or GGUF file, in eval mode on `device`. overrides: config keys on top (a shorter block_size,
    data, eval_windows, a norm change...), as a training run's config would give them; the context is
    at most PRETRAINED_CONTEXT unless block_size says otherwise."""
    overrides = dict(overrides or {})
    config = apply_overrides(Config(), {**overrides, "init_from": str(source)}).validate()
    config = resolve_init_from(config)
    if "block_size" not in overrides and config.block_size > PRETRAINED_CONTEXT:
        config = replace(config, block_size=PRETRAINED_CONTEXT).validate()
    from model import GPT
    model = GPT(config)
    load_init_weights(model, config, log=lambda *_: None)
    return model.to(device).eval(), config, config.tokenizer
