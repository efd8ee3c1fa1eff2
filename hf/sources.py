"""Every model a script starts from, loaded by one function, load_source:

    a run dir (its newest intact checkpoint), a checkpoint folder    our own run (training/checkpoint.py)
    a transformers folder, a hub id                                   pretrained (hf/load.py)
    a .gguf file, a packaged model's short name                       pretrained, dequantized (hf/gguf.py)

A Source says where the model came from, so that every report can say it: origin "run" or
"pretrained", and quantization ("" or the GGUF file's weight types: its weights are dequantized 4-bit
ones, not the released bf16 ones; `label` says so). A local path that does not exist, or a hub id on a
machine that cannot reach the hub, is one line at once (hf.load.locate), never a retried download.
"""
from pathlib import Path
from typing import NamedTuple

from config import UserError, apply_overrides
from data.prepare import file_sha256
from hf.gguf import SOURCE as SOURCE_FILE, gguf_origin, is_gguf
from hf.load import is_transformers_source, load_pretrained, read_json
from training.checkpoint import TOKENIZER, load_model, read_meta, warn

RUN_KEYS = ("eval_windows", "batch_size")  # what --key=value may set for a run: how it is evaluated, not the model


class Source(NamedTuple):
    model: object       # our GPT, in eval mode
    config: object      # its resolved Config
    tokenizer: Path     # its tokenizer.json
    name: str           # as the user gave it
    origin: str         # "run" or "pretrained"
    folder: Path        # the checkpoint folder read (a run's step_*, or a pretrained model's local folder)
    quantization: str = ""  # "" or the GGUF file's weight types, e.g. "Q4_1"

    @property
    def label(self):
        """The name as reports print it, saying when the weights came from a quantized file."""
        if not self.quantization:
            return self.name
        return f"{self.name} (weights dequantized from a {self.quantization} GGUF file, not the released ones)"


def is_pretrained(source):
    """Whether load_source reads `source` as a pretrained model (else as a run or checkpoint)."""
    return is_transformers_source(source)


def load_source(source, device="cpu", overrides=None, tokenizer=None, log=warn):
    """The Source of a run dir, checkpoint folder, transformers folder, hub id, .gguf file or packaged
    model. overrides: config keys (--key=value) for a pretrained model (hf.load.load_pretrained says
    which); for a run only RUN_KEYS. tokenizer: a tokenizer.json to use instead of a run's own (checked
    to be the one it was trained with)."""
    overrides = dict(overrides or {})
    if is_pretrained(source):
        if tokenizer:
            raise UserError(f"--tokenizer: a pretrained model ({source}) uses its own tokenizer; leave it out")
        model, config, tokenizer_file = load_pretrained(source, device, overrides)
        origin = gguf_origin(Path(tokenizer_file).parent) if is_gguf(source) else None
        return Source(model, config, Path(tokenizer_file), model_name(source), "pretrained", Path(tokenizer_file).parent,
                      origin["quantization"] if origin else "")
    other = sorted(set(overrides) - set(RUN_KEYS))
    if other:
        raise UserError(f"--{other[0]}: a run keeps its own config; only {', '.join(RUN_KEYS)} may be set for it "
                        f"(the other keys apply to a pretrained source)")
    model, config, folder = load_model(source, device, log)
    config = apply_overrides(config, overrides).validate()
    tokenizer_file = Path(tokenizer or folder / TOKENIZER)
    if not tokenizer_file.is_file():
        raise UserError(f"tokenizer {str(tokenizer_file)!r} {'is a folder' if tokenizer_file.is_dir() else 'does not exist'}; "
                        f"give a tokenizer.json file")
    if file_sha256(tokenizer_file) != read_meta(folder).get("tokenizer_hash"):
        raise UserError(f"tokenizer {str(tokenizer_file)!r} is not the one checkpoint {str(folder)!r} was trained with")
    return Source(model, config, tokenizer_file, str(source), "run", Path(folder))


def model_name(source):
    """What a pretrained model's reports call it: a hub id or packaged model's name as given, else the name
    of its file or folder, never a path; a folder dequantized from a GGUF file is named by that file."""
    path = Path(source)
    if not path.exists():
        return str(source)
    if path.is_dir():
        origin = read_json(path / SOURCE_FILE).get("file")
        if origin:
            return Path(origin).stem
    return path.stem if path.is_file() else path.resolve().name


def output_name(source):
    """A folder name for a pretrained source's outputs (runs/pretrained/<name>)."""
    return Path(source).name if Path(source).exists() else str(source).replace("/", "--")
