"""Where documents come from: the embedded stdlib corpus, local text files, or a Hugging Face dataset.

A document is one string (one file of source code, one dataset row). Documents are streamed, never
all held at once. The train/val split is by whole documents and deterministic: a document goes to
validation when the hash of its text falls in the first val_fraction of the hash range, so the split
does not depend on the order documents arrive in.

The cache key comes from a manifest of the source (path, size, mtime of every file; a hub dataset's
name, config, split and revision), so finding a ready cache never reads the corpus.
"""
import glob
import hashlib
import json
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


def iter_stdlib_documents():
    """The stdlib's own source: ~12 MB of real Python that exists wherever Python does, so the
    default run needs no download."""
    for path in stdlib_files():
        try:
            doc = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few files are deliberately not UTF-8; they are not needed
        if doc.strip():
            yield doc


def stdlib_documents():
    return list(iter_stdlib_documents())


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


def iter_file_documents(paths):
    """Local UTF-8 text files, one document per file. Read in text mode (universal newlines become
    "\\n"), as datasets' "text" builder with sample_by="document" reads them: the tokens are those of
    a corpus loaded through datasets (tests/test_prepare.py)."""
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                doc = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"data file {p!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if doc.strip():
            yield doc


def _first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def iter_hf_documents(name, config):
    """A Hugging Face dataset by name (or a local dataset folder): one document per row of
    hf_text_column. With hf_streaming rows are fetched as they are read and reading stops at
    hf_max_documents; without it datasets first builds its on-disk Arrow cache, read row by row."""
    import datasets  # imported only when a dataset is actually read, never for a warm cache
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, config.hf_config or None, split=config.hf_split,
                                   streaming=config.hf_streaming, revision=config.hf_revision or None)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise UserError(f"could not load dataset {name!r} (split {config.hf_split!r}): {_first_line(e)}") from None
    column, n = config.hf_text_column, 0
    if ds.column_names is not None and column not in ds.column_names:
        raise UserError(f"dataset {name!r} has no column {column!r}; "
                        f"its columns are {', '.join(ds.column_names)} (set hf_text_column)")
    for row in ds:
        if column not in row:
            raise UserError(f"dataset {name!r} has no column {column!r}; "
                            f"its columns are {', '.join(row)} (set hf_text_column)")
        text = row[column]
        if isinstance(text, str) and text.strip():
            yield text
            n += 1
            if config.hf_max_documents and n >= config.hf_max_documents:
                return


def iter_documents(config):
    """Every non-empty document of config's data, in a fixed order, one at a time."""
    if config.data == "stdlib":
        return iter_stdlib_documents()
    if config.data.startswith("hf:"):
        return iter_hf_documents(config.data[3:], config)
    return iter_file_documents(_expand_files(config.data))


def _file_entries(paths):
    entries = []
    for p in paths:
        st = os.stat(p)
        entries.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return entries


def source_manifest(config):
    """What the documents are made of, cheaply: (path, size, mtime) of every file, or a hub
    dataset's coordinates. A changed file changes its size or mtime, hence the cache key."""
    if config.data == "stdlib":
        return {"stdlib": _file_entries(stdlib_files())}
    if config.data.startswith("hf:"):
        name = config.data[3:]
        manifest = {"hf": name, "config": config.hf_config, "split": config.hf_split,
                    "revision": config.hf_revision, "column": config.hf_text_column,
                    "max_documents": config.hf_max_documents}
        if os.path.exists(name):  # a local dataset folder (or file): its files say when it changed
            files = [name] if os.path.isfile(name) else sorted(
                str(p) for p in Path(name).rglob("*") if p.is_file() and ".cache" not in p.parts)
            manifest["files"] = _file_entries(files)
        return manifest
    paths = _expand_files(config.data)
    entries = _file_entries(paths)
    if all(size == 0 for _, size, _ in entries):
        raise UserError(f"data file(s) {config.data!r} are empty")
    return {"files": entries}


def manifest_digest(manifest):
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def manifest_bytes(manifest):
    """Total size of the source files, for progress bars (None for a hub dataset)."""
    entries = manifest.get("stdlib") or manifest.get("files")
    return sum(size for _, size, _ in entries) if entries and "hf" not in manifest else None


class CorpusHash:
    """sha256 over every document, order included: names the exact corpus a result came from
    (the stdlib corpus differs between Python versions). Fed as documents stream past."""
    def __init__(self):
        self.h = hashlib.sha256()

    def update(self, doc_bytes):
        self.h.update(len(doc_bytes).to_bytes(8, "little"))
        self.h.update(doc_bytes)

    def hexdigest(self):
        return self.h.hexdigest()


def corpus_hash(docs):
    h = CorpusHash()
    for d in docs:
        h.update(d.encode("utf-8"))
    return h.hexdigest()


def goes_to_val(doc_bytes, val_fraction):
    digest = hashlib.sha1(doc_bytes).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_mode(documents, val_fraction):
    """"documents" when both sides get at least one whole document, else "lines". Stops reading as
    soon as it has seen one of each, so on a large corpus it reads a few documents; on a corpus
    whose documents all land on one side (e.g. a single text file) it reads all of them."""
    seen = set()
    for doc in documents:
        seen.add(goes_to_val(doc.encode("utf-8"), val_fraction))
        if len(seen) == 2:
            return "documents"
    if not seen:
        return None  # no documents at all
    return "lines"


def cut_by_lines(doc, val_fraction):
    """(train part, val part) of one document: the last val_fraction of its lines go to validation."""
    lines = doc.splitlines(keepends=True)
    if len(lines) < 2:  # a one-line document: cut by characters instead
        chars = max(1, round(len(doc) * (1 - val_fraction)))
        return doc[:chars], doc[chars:]
    cut = max(1, min(len(lines) - 1, round(len(lines) * (1 - val_fraction))))
    return "".join(lines[:cut]), "".join(lines[cut:])


def split_documents(docs, val_fraction):
    """(train, val) by whole documents. With too few documents for both sides to get one (e.g. a
    single text file), each document is cut at a line boundary instead (cut_by_lines)."""
    if split_mode(docs, val_fraction) == "documents":
        val = [goes_to_val(d.encode("utf-8"), val_fraction) for d in docs]
        return [d for d, v in zip(docs, val) if not v], [d for d, v in zip(docs, val) if v]
    parts = [cut_by_lines(d, val_fraction) for d in docs]
    return [t for t, _ in parts if t], [v for _, v in parts if v]
