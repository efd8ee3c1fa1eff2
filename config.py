"""One typed config for a run: model shape, norm placement, data and training.

Configs are flat TOML files in configs/ (stdlib tomllib); any field can be overridden on the command
line as `--key=value`. Unknown keys, wrong types and invalid values are a `UserError`: one line that
names the problem and what would be valid. The resolved config is saved into the run directory.
"""
import argparse
import dataclasses
import difflib
import json
import os
import sys
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # accelerate's trackers that train.py knows how to name


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback."""


def key(default, *tags, help=""):
    """A Config field with its tags (what the key changes) and one line of help (what --help prints)."""
    return dataclasses.field(default=default, metadata={"tags": frozenset(tags), "help": help})


# What a key changes. A key may carry several tags (vocab_size is model and tokenizer).
#   model: the function the model computes (its parameters, wiring or numerics)
#   norm: names a norm from model/norms.py's registry at some site (also model)
#   loss: the training objective          training: how the model trains (optimizer, batches, precision)
#   data / tokenizer: the token stream     evaluation: what a val loss is measured on
#   schedule: how long and at what rate     housekeeping: logging, saving, where things go
#   implementation: how the same math runs (kernels, compile, device)
TAGS = ("model", "norm", "loss", "training", "data", "tokenizer", "evaluation", "schedule", "housekeeping",
        "implementation")
# A resume may change only keys whose every tag is one of these; every other key is the run's identity.
RESUMABLE_TAGS = frozenset({"schedule", "housekeeping", "implementation"})


@dataclass
class Config:
    # --- model ---
    block_type: str = key("standard", "model", help="'standard' (the norm-per-site block below) or 'normalized' "
                          "(nGPT: hidden states and weight vectors on the unit sphere, no norm layers; model/normalized.py)")
    init_from: str = key("", "model", "tokenizer", help="start from a pretrained checkpoint (transformers folder, "
                         "hub id, .gguf file or packaged model): its architecture, tokenizer and weights; a config "
                         "may change only the context and the norms (hf/load.py)")
    vocab_size: int = key(4096, "model", "tokenizer", help="BPE vocabulary trained on the training split (incl. "
                          "end-of-document)")
    block_size: int = key(128, "model", "evaluation", help="context length in tokens")
    n_layer: int = key(4, "model", help="transformer blocks")
    n_head: int = key(4, "model", help="attention (query) heads")
    n_embd: int = key(128, "model", help="width of the residual stream")
    dropout: float = key(0.0, "model", "training", help="dropout probability in training")
    bias: bool = key(False, "model", help="biases in Linear layers and LayerNorm")
    n_kv_head: int = key(0, "model", help="key/value heads (grouped-query attention, Llama 3, SmolLM2); 0 = n_head")
    pos_emb: str = key("learned", "model", help='"learned" (GPT-2), "rope" (rotary on q and k, after QK-norm) or '
                       '"none" (NoPE)')
    rope_theta: float = key(10000.0, "model", help="RoPE base")
    mlp: str = key("gelu", "model", help='"gelu" (exact erf), "gelu_tanh" (GPT-2\'s), "swiglu" (Llama), "geglu_tanh" '
                   '(Gemma\'s gated tanh-GELU), "relu2" (ReLU squared)')
    mlp_hidden: int = key(0, "model", help="MLP hidden width; 0 = 4 * n_embd, gated (swiglu, geglu_tanh): 8/3 * n_embd "
                          "rounded up to 64")
    tie_embeddings: bool = key(True, "model", help="the output head shares the token embedding matrix")
    logit_softcap: float = key(0.0, "model", help="c > 0: logits become c * tanh(logits / c) (Gemma 2; nanochat "
                               "uses 15)")
    head_dim: int = key(0, "model", help="the size of each attention head; 0 = n_embd // n_head (Gemma 3 270M: "
                        "4 heads of 256 on a 640-wide stream)")
    query_pre_attn_scalar: int = key(0, "model", help="the attention softmax scale is 1/sqrt(this); 0 = the head "
                                     "size (Gemma 3's query_pre_attn_scalar)")
    scale_embedding: bool = key(False, "model", help="the token embedding times the constant sqrt(n_embd), rounded "
                                "to fp32 and then to the embedding's dtype as Gemma does")
    sliding_window: int = key(0, "model", help="a local block's query sees itself and the sliding_window - 1 tokens "
                              "before it; 0 = no local attention")
    block_attention: str | list = key("", "model", help="per block, as block_positions: 'local' (sliding window) or "
                                      "'global', e.g. 'local*5,global' (Gemma 3); '' = every block local when "
                                      "sliding_window > 0, else global")
    rope_local_theta: float = key(0.0, "model", help="RoPE base of the local blocks; 0 = rope_theta (Gemma 3: 10000 "
                                  "local, 1000000 global)")
    # --- normalization (model/norms.py has the registry of names) ---
    norm: str = key("layernorm", "model", "norm", help="the norm at every site unless a key below overrides it")
    attn_norm: str = key("", "model", "norm", help='the attention-sublayer norm of every block ("" = norm)')
    mlp_norm: str = key("", "model", "norm", help='the MLP-sublayer norm of every block ("" = norm)')
    final_norm: str = key("", "model", "norm", help='the norm before the output head ("" = norm)')
    block_norms: str | list = key("", "model", help='per block: "layernorm*2,rmsnorm*2"; "layernorm/rmsnorm" = '
                                  'attn/mlp pair')
    site_norms: str | list = key("", "model", help='per site, over every key above: "block3.q=layernorm,final=layernorm" '
                                 '(sites as the diagnostics name them: blockN.attn/.mlp/.q/.k/.attn_out/.mlp_out, final, embed)')
    norm_position: str = key("pre", "model", help='"pre" (GPT-2), "post" (original Transformer), "peri" (norm on the '
                             'input and the output of each sublayer: Peri-LN, Gemma\'s sandwich) or "output" (only '
                             'on the sublayer output: OLMo 2); see model/gpt.py')
    block_positions: str | list = key("", "model", help='per block, as block_norms: "post*2,pre*2" (Mix-LN); "" = '
                                      'norm_position')
    output_norm: str = key("", "model", "norm", help='the norm on sublayer outputs ("peri"/"output" blocks); "" = '
                           'the sublayer\'s norm')
    qk_norm: str = key("", "model", "norm", help='a norm on queries and keys per head, gains of size head_dim '
                       '("" = none)')
    dyt_alpha: float = key(0.5, "model", help='initial alpha of the "dyt" norm, gamma * tanh(alpha * x) + beta')
    dyt_alpha_attn: float = key(0.0, "model", help='initial alpha of "dyt" at the attention norms (ln_1); 0 = '
                                'dyt_alpha (the DyT paper\'s LLaMA recipe gives attention a larger one)')
    derf_alpha: float = key(0.5, "model", help='initial alpha of the "derf" norm, gamma * erf(alpha * x + s) + beta')
    norm_eps: float = key(1e-5, "model", help="epsilon inside every norm (explicit, never a library default)")
    norm_gain: bool = key(True, "model", help="a learnable gain in every norm")
    prms_fraction: float = key(0.0625, "model", help="pRMSNorm: share of features the RMS is estimated from")
    embed_norm: str = key("", "model", "norm", help='a norm on the token (+ position) embedding before the first '
                          'block ("" = none)')
    embed_scale: float = key(0.0, "model", help="> 0: the embedding times a learned scalar initialised to this (50 "
                             "gives our N(0, 0.02) embedding unit RMS, as DyT's LLaMA recipe does)")
    norm_scaling: str = key("none", "model", help='"layer": block i\'s input norms times 1/sqrt(i + 1) (LayerNorm '
                            'Scaling, Sun et al. 2025); "none"')
    fused_add_norm: bool = key(False, "implementation", help="pre-norm + RMS norms only: each residual add and the "
                               "norm after it run as one Triton kernel; same math as unfused")
    # --- data ---
    data: str = key("stdlib", "data", "tokenizer", help='"stdlib" (embedded), a path or glob of text files, or '
                    '"hf:<dataset>"')
    hf_config: str = key("", "data", "tokenizer", help="Hugging Face dataset config name")
    hf_split: str = key("train", "data", "tokenizer", help="Hugging Face dataset split")
    hf_text_column: str = key("text", "data", "tokenizer", help="the dataset column that holds the text")
    hf_streaming: bool = key(False, "data", "tokenizer", help="stream the dataset instead of downloading it whole")
    hf_max_documents: int = key(0, "data", "tokenizer", help="0 = all documents (set it when streaming a large "
                                "dataset)")
    hf_revision: str = key("", "data", "tokenizer", help='a hub dataset\'s git revision (part of the cache key; "" = '
                           'latest)')
    tokenizer: str = key("", "tokenizer", help='path to an existing tokenizer.json ("" = train byte-level BPE)')
    eod_token: str = key("", "tokenizer", help='the given tokenizer\'s end-of-document token ("" = find it among '
                         'its special tokens)')
    doc_windows: bool = key(False, "data", "evaluation", help="validation windows start where documents start, "
                            "each with the end-of-document token first, not at evenly spaced offsets; set from a "
                            "pretrained checkpoint whose tokenizer starts every text with <bos> (Gemma), whose "
                            "eod_token is then <bos>")
    tokenizer_train_bytes: int = key(200_000_000, "tokenizer", help="BPE is trained on the first this-many bytes "
                                     "of the training split")
    prepare_workers: int = key(0, "housekeeping", help="tokenizer processes when preparing data (0 = one per CPU)")
    val_fraction: float = key(0.05, "data", "evaluation", help="share of documents held out for validation")
    cache_dir: str = key("cache", "housekeeping", help="tokenizers and token memmaps, keyed by corpus hash and "
                         "vocab size")
    # --- training ---
    out_dir: str = key("runs/default", "housekeeping", help="the run folder: config, metrics, checkpoints")
    seed: int = key(1337, "training", help="initial weights and data order")
    batch_size: int = key(16, "training", help="sequences per process per micro-step")
    grad_accum: int = key(1, "training", help="micro-steps per optimizer step")
    max_steps: int = key(400, "schedule", help="optimizer steps; the cosine schedule ends here")
    learning_rate: float = key(3e-3, "schedule", help="peak learning rate, after warmup")
    min_lr: float = key(3e-4, "schedule", help="cosine decay floor")
    warmup_steps: int = key(40, "schedule", help="linear warmup steps")
    weight_decay: float = key(0.1, "training", help="AdamW weight decay on matrices (not on norms, biases)")
    beta1: float = key(0.9, "training", help="AdamW beta1")
    beta2: float = key(0.95, "training", help="AdamW beta2")
    grad_clip: float = key(1.0, "training", help="clip the gradient's global norm to this; 0 = off")
    mixed_precision: str = key("no", "training", help='"no", "bf16" or "fp16"')
    compile: bool = key(False, "implementation", help="torch.compile the model")
    device: str = key("auto", "implementation", help='"auto" (accelerate picks) or "cpu"')
    eval_interval: int = key(100, "housekeeping", help="evaluate and save a checkpoint every this many steps")
    eval_windows: int = key(320, "evaluation", help="the fixed validation set: this many context windows, whatever "
                            "the batch size")
    log_interval: int = key(10, "housekeeping", help="log the train loss every this many steps")
    keep_checkpoints: int = key(2, "housekeeping", help="how many of the newest checkpoints to keep")
    z_loss: float = key(0.0, "loss", help="coefficient of the auxiliary loss mean(log(Z)^2) on the output softmax "
                        "(Wortsman et al. 2023; OLMo 2: 1e-5); logged as train_z_loss")
    max_bad_steps: int = key(5, "housekeeping", help="stop after this many non-finite (skipped) steps in a row")
    diagnostics: bool = key(False, "housekeeping", help="per-layer norm statistics at eval steps -> "
                            "diagnostics.jsonl (model/diagnostics.py)")
    # --- experiment trackers (through accelerate; each is an optional package) ---
    trackers: str | list = key("", "housekeeping", help='e.g. ["tensorboard"] or "tensorboard,wandb"; "" = none')
    tracker_project: str = key("", "housekeeping", help='the trackers\' project; "" = the run folder\'s name')
    tracker_run_name: str = key("", "housekeeping", help='the run\'s name in it; "" = the run folder\'s name')

    def validate(self):
        """Checks that need no other module; the norm names and stack are checked by
        model.stack.check_model_config (config.py imports no project module)."""
        positive = ["vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size",
                    "grad_accum", "max_steps", "eval_interval", "eval_windows", "log_interval",
                    "keep_checkpoints", "max_bad_steps"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head and not self.head_dim:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                            f"or give head_dim")
        if not 257 <= self.vocab_size <= 2 ** 32:  # tokens are stored as uint16 or uint32
            raise UserError(f"vocab_size = {self.vocab_size} is out of range; valid: [257, 2**32] "
                            f"(256 bytes + end-of-document at least; tokens are stored as uint32 at most)")
        if not 0 <= self.seed < 2 ** 31:  # numpy takes seeds in [0, 2**32); each process adds its rank
            raise UserError(f"seed = {self.seed} is out of range; valid: [0, 2**31)")
        for name in ("out_dir", "cache_dir"):
            if not getattr(self, name).strip():
                raise UserError(f"{name} is empty; give a folder path, e.g. runs/my_run or cache")
        checks = {
            "dropout": 0.0 <= self.dropout < 1.0, "val_fraction": 0.0 < self.val_fraction < 1.0,
            "prms_fraction": 0.0 < self.prms_fraction <= 1.0, "norm_eps": self.norm_eps > 0,
            "learning_rate": self.learning_rate > 0, "min_lr": 0 <= self.min_lr <= self.learning_rate,
            "warmup_steps": self.warmup_steps >= 0, "weight_decay": self.weight_decay >= 0,
            "beta1": 0 <= self.beta1 < 1, "beta2": 0 <= self.beta2 < 1, "grad_clip": self.grad_clip >= 0,
            "hf_max_documents": self.hf_max_documents >= 0, "prepare_workers": self.prepare_workers >= 0,
            "tokenizer_train_bytes": self.tokenizer_train_bytes > 0, "dyt_alpha": self.dyt_alpha > 0,
            "dyt_alpha_attn": self.dyt_alpha_attn >= 0, "embed_scale": self.embed_scale >= 0, "derf_alpha": self.derf_alpha > 0,
            "z_loss": self.z_loss >= 0, "n_kv_head": self.n_kv_head >= 0, "mlp_hidden": self.mlp_hidden >= 0,
            "rope_theta": self.rope_theta > 0, "logit_softcap": self.logit_softcap >= 0,
            "head_dim": self.head_dim >= 0, "query_pre_attn_scalar": self.query_pre_attn_scalar >= 0,
            "sliding_window": self.sliding_window >= 0, "rope_local_theta": self.rope_local_theta >= 0,
        }
        ranges = {"dropout": "[0, 1)", "val_fraction": "(0, 1)", "prms_fraction": "(0, 1]", "norm_eps": "> 0",
                  "learning_rate": "> 0", "min_lr": "[0, learning_rate]", "beta1": "[0, 1)", "beta2": "[0, 1)",
                  "tokenizer_train_bytes": "> 0", "dyt_alpha": "> 0", "derf_alpha": "> 0", "rope_theta": "> 0"}
        for name, ok in checks.items():
            if not ok:
                raise UserError(f"{name} = {getattr(self, name)} is out of range; valid: {ranges.get(name, '>= 0')}")
        kv_heads = self.n_kv_head or self.n_head
        if self.n_head % kv_heads:
            raise UserError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({kv_heads})")
        head_size = self.head_dim or self.n_embd // self.n_head
        if self.pos_emb == "rope" and head_size % 2:
            raise UserError(f"pos_emb = 'rope' needs an even head size; the head size is {head_size}")
        if self.doc_windows and not self.tokenizer:
            raise UserError("doc_windows = true needs a given tokenizer (tokenizer = a tokenizer.json) whose "
                            "eod_token starts each document; a pretrained source sets both")
        for name in self.tracker_names():
            if name not in TRACKERS:
                raise UserError(f"trackers: {name!r} is not a tracker; choose from {', '.join(TRACKERS)}")
        choices = {"norm_position": ("pre", "post", "peri", "output"), "mixed_precision": ("no", "bf16", "fp16"),
                   "device": ("auto", "cpu"), "pos_emb": ("learned", "rope", "none"),
                   "mlp": ("gelu", "gelu_tanh", "swiglu", "geglu_tanh", "relu2"), "norm_scaling": ("none", "layer"),
                   "block_type": ("standard", "normalized")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise UserError(f"{name} = {getattr(self, name)!r} is not valid; choose one of {', '.join(valid)}")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    def tracker_names(self):
        names = self.trackers.split(",") if isinstance(self.trackers, str) else self.trackers
        return [str(n).strip() for n in names if str(n).strip()]


def _coerce(name, value, expected):
    """Check a TOML value's type against the field's type (ints are accepted for floats)."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected == (str | list):
        if isinstance(value, (str, list)):
            return value
        expected_name = "a string or a list"
    elif isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    else:
        expected_name = expected.__name__
    raise UserError(f"config key {name!r} expects {expected_name}, got {type(value).__name__} {value!r}")


def _parse_cli_value(name, text, expected):
    """Turn a command-line string into the field's type."""
    if expected is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    if expected in (int, float):
        try:
            return expected(text)
        except ValueError:
            raise UserError(f"--{name} expects {expected.__name__}, got {text!r}") from None
    return text


FIELD_TYPES = {f.name: f.type for f in fields(Config)}
KEY_TAGS = {f.name: f.metadata["tags"] for f in fields(Config)}
assert all(tags and tags <= set(TAGS) for tags in KEY_TAGS.values()), "every Config key needs known tags"


def keys_tagged(*tags):
    """The keys that carry any of these tags, in Config's order."""
    return tuple(name for name, key_tags in KEY_TAGS.items() if key_tags & set(tags))


RESUMABLE_KEYS = tuple(name for name, tags in KEY_TAGS.items() if tags <= RESUMABLE_TAGS)
MEANING = {"model": "the model", "norm": "the model", "loss": "the loss", "training": "how it trains",
           "data": "the data", "tokenizer": "the tokenizer", "evaluation": "what is measured"}


def resume_refusal(saved: Config, config: Config):
    """One line naming each key that differs between a run's saved config and this one but may not
    change on a resume (what it would change, and which keys may), or None."""
    changed = [name for name in KEY_TAGS if name not in RESUMABLE_KEYS and getattr(saved, name) != getattr(config, name)]
    if not changed:
        return None
    what = sorted({MEANING[t] for name in changed for t in KEY_TAGS[name] if t in MEANING})
    diffs = ", ".join(f"{k} {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in changed)
    return (f"{diffs} would change {' and '.join(what)}; a resume may change only "
            f"{', '.join(RESUMABLE_KEYS)} (docs/reliability.md)")


def config_help():
    """Every key with its type, default, tags and help line: what `train.py --help` prints."""
    lines = []
    for f in fields(Config):
        kind = "str or list" if f.type == (str | list) else f.type.__name__
        lines.append(f"  --{f.name}={kind.upper().replace(' ', '_')}  (default {f.default!r}; "
                     f"{', '.join(t for t in TAGS if t in f.metadata['tags'])})")
        lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def _check_key(name):
    if name not in FIELD_TYPES:
        close = difflib.get_close_matches(name, FIELD_TYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(FIELD_TYPES)}"
        raise UserError(f"unknown config key {name!r}{hint}")


def apply_overrides(config: Config, values: dict) -> Config:
    """Return a copy of config with `values` (already typed, e.g. from TOML) applied and checked."""
    updates = {}
    for name, value in values.items():
        _check_key(name)
        updates[name] = _coerce(name, value, FIELD_TYPES[name])
    return dataclasses.replace(config, **updates)


def parse_cli_overrides(args: list[str]) -> dict:
    """['--norm=rmsnorm', '--max_steps=10'] -> {'norm': 'rmsnorm', 'max_steps': 10}."""
    values = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"cannot read argument {arg!r}; overrides look like --key=value")
        name, text = arg[2:].split("=", 1)
        _check_key(name)
        values[name] = _parse_cli_value(name, text, FIELD_TYPES[name])
    return values


def read_toml(path, what="config file", examples="configs/"):
    """A TOML file as a dict; a missing or unreadable file is a one-line UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a folder; give a .toml file in it (see {examples} for examples)")
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist; see {examples} for examples")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {str(path)!r} is not valid TOML: {e}") from None


def check_folder(path, what):
    """A UserError unless `path` is a folder or can be made one: neither it nor any folder above it
    may be an existing regular file."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            where = "is a file" if part == path else f"is under {str(part)!r}, which is a file"
            raise UserError(f"{what} {str(path)!r} {where}; give a folder path")
    return path


def check_not_a_comparison(values, path):
    """A comparison file (compare.py's: base_config, [variants]) given where a training config belongs."""
    if "variants" in values or "base_config" in values:
        raise UserError(f"{str(path)!r} is a comparison file (it has {'[variants]' if 'variants' in values else 'base_config'}), "
                        f"not a training config; compare.py takes it: python compare.py {path}")


def load_config(path: str | Path | None, overrides: list[str] | dict = ()) -> Config:
    """Read a TOML config (or start from defaults when path is None), apply overrides, validate."""
    config = Config()
    if path is not None:
        values = read_toml(path)
        check_not_a_comparison(values, path)
        config = apply_overrides(config, values)
    if not isinstance(overrides, dict):
        overrides = parse_cli_overrides(list(overrides))
    return apply_overrides(config, overrides).validate()


def save_config(config: Config, path: Path):
    """Written to a temporary file and renamed over `path`: a kill never leaves half a config."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def config_from_json(path: Path) -> Config:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read config {str(path)!r}: {type(e).__name__}: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"config {str(path)!r} is not a JSON object of config keys")
    return apply_overrides(Config(), values).validate()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors (printed by run_main) instead of a usage dump;
    `hint` is appended to each, e.g. a short usage line."""

    def __init__(self, *args, hint="", **kwargs):
        super().__init__(*args, **kwargs)
        self.hint = hint

    def error(self, message):
        raise UserError(message + self.hint)


def run_main(main):
    """Run a command-line entry point; a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
