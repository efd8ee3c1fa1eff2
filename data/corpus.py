"""Where documents come from: the embedded stdlib corpus, local text files, or a Hugging Face dataset.

A document is one string (one file of source code, one dataset row). The train/val split is by whole
documents and deterministic: a document goes to validation when the hash of its text falls in the
first val_fraction of the hash range, so the split does not depend on the order documents arrive in.
"""
import glob
import hashlib
import os
import sysconfig
from pathlib import Path

from config import UserError

STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_files():
    """Every *.py under the standard library, excluding test folders and site-packages, in a
    fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        paths.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py"))
    return paths


def stdlib_documents():
    """The stdlib's own source: ~12 MB of real Python that exists wherever Python does, so the
    default run needs no download."""
    docs = []
    for path in stdlib_files():
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # a few files are deliberately not UTF-8; they are not needed
    return [d for d in docs if d.strip()]


def _expand_files(pattern):
    paths = []
    for part in (p.strip() for p in pattern.split(",")):
        matches = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        if not matches:
            raise UserError(f"data file {part!r} does not exist (no file matches); data is 'stdlib', "
                            f"a path or glob of text files, or 'hf:<dataset>'")
        paths.extend(m for m in matches if os.path.isfile(m))
    if not paths:
        raise UserError(f"data {pattern!r} matches only folders; give text files or a glob such as dir/*.txt")
    return paths


def file_documents(pattern):
    """Local UTF-8 text files, one document per file, loaded through datasets' "text" builder with
    sample_by="document" (the default, "line", would drop the newlines that code depends on)."""
    paths = _expand_files(pattern)
    if all(os.path.getsize(p) == 0 for p in paths):
        raise UserError(f"data file(s) {pattern!r} are empty")
    for p in paths:  # check up front so the error names the file, not a datasets internal
        try:
            Path(p).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data file {p!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    import datasets  # imported only when a dataset is actually loaded
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("text", data_files=paths, sample_by="document", split="train")
    return [d for d in ds["text"] if d.strip()]


def hf_documents(name, config):
    """A Hugging Face dataset by name (or a local dataset folder): one document per row of
    hf_text_column. Needs internet for hub names; a local folder works offline."""
    import datasets
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, config.hf_config or None, split=config.hf_split,
                                   streaming=config.hf_streaming)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load dataset {name!r} (split {config.hf_split!r}): {first_line}") from None
    docs = []
    for row in ds:
        if config.hf_text_column not in row:
            raise UserError(f"dataset {name!r} has no column {config.hf_text_column!r}; "
                            f"its columns are {', '.join(row)} (set hf_text_column)")
        text = row[config.hf_text_column]
        if isinstance(text, str) and text.strip():
            docs.append(text)
        if config.hf_max_documents and len(docs) >= config.hf_max_documents:
            break
    return docs


def load_documents(config):
    if config.data == "stdlib":
        docs = stdlib_documents()
    elif config.data.startswith("hf:"):
        docs = hf_documents(config.data[3:], config)
    else:
        docs = file_documents(config.data)
    if not docs:
        raise UserError(f"data {config.data!r} holds no non-empty documents")
    return docs


def corpus_hash(docs):
    """sha256 over every document, order included: names the exact corpus a result came from
    (the stdlib corpus differs between Python versions)."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def split_documents(docs, val_fraction):
    """(train, val) by whole documents. With too few documents for both sides to get one (e.g. a
    single text file), each document is cut at a line boundary instead: the last val_fraction of
    its lines goes to validation."""
    def goes_to_val(doc):
        digest = hashlib.sha1(doc.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction

    train = [d for d in docs if not goes_to_val(d)]
    val = [d for d in docs if goes_to_val(d)]
    if train and val:
        return train, val
    train, val = [], []
    for d in docs:
        lines = d.splitlines(keepends=True)
        cut = max(1, min(len(lines) - 1, round(len(lines) * (1 - val_fraction))))
        if len(lines) < 2:  # a one-line document: cut by characters instead
            chars = max(1, round(len(d) * (1 - val_fraction)))
            train.append(d[:chars]), val.append(d[chars:])
        else:
            train.append("".join(lines[:cut])), val.append("".join(lines[cut:]))
    return [d for d in train if d], [d for d in val if d]
