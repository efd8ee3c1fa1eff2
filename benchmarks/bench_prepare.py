"""Time the data prepare step on generated corpora of a given size; print a markdown table.

    python benchmarks/bench_prepare.py --sizes 12,100,400 [--workers 2] [--vocab 50304] [--baseline]

Each corpus (half Python source from the stdlib, half prose-like text made of the words of the
stdlib's comments and docstrings, one document per file) is written under --dir (not committed)
and prepared in a fresh subprocess: `python -m data.prepare`-equivalent, reporting wall time, CPU
time (its worker processes included), the encode phase's MB/s and CPU-s/MB, and peak RSS of the
main process and of the largest worker. Then a warm start (a second prepare of the same corpus) is
timed. --baseline also runs the pipeline as it was before streaming (git 219f105) on each corpus.
"""
import argparse
import itertools
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BASELINE_COMMIT = "219f105"


def prose_words():
    """English words and their cumulative frequencies, from the stdlib's comments and docstrings."""
    from data.corpus import stdlib_documents
    words = {}
    for doc in stdlib_documents()[:400]:
        for comment in re.findall(r'#([^\n]*)|"""(.*?)"""', doc, flags=re.S):
            for w in re.findall(r"[A-Za-z]+", " ".join(comment)):
                words[w] = words.get(w, 0) + 1
    return list(words), list(itertools.accumulate(words.values()))


def write_corpus(folder, megabytes, seed=0):
    """About `megabytes` MB of text files: stdlib sources (copied round-robin, each copy marked) and
    prose documents of 2-20 KB, alternating so both halves are spread through the corpus."""
    from data.corpus import stdlib_files
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    sources = []
    for p in stdlib_files():
        try:
            sources.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            pass
    words, cum_weights = prose_words()  # cumulative: choices() would re-add the weights per call
    target, written, i = megabytes * 1_000_000, [0, 0], 0
    while sum(written) < target:
        kind = 0 if written[0] <= written[1] else 1
        if kind == 0:
            text = f"# copy {i // len(sources)} of a stdlib module\n" + sources[i % len(sources)]
        else:
            sentences = []
            for _ in range(rng.randint(20, 200)):
                s = " ".join(rng.choices(words, cum_weights=cum_weights, k=rng.randint(5, 25)))
                sentences.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ";"]))
            text = "\n\n".join(" ".join(sentences[j:j + 5]) for j in range(0, len(sentences), 5)) + "\n"
        (folder / f"doc{i:07d}.txt").write_text(text, encoding="utf-8")
        written[kind] += len(text.encode("utf-8"))
        i += 1
    (folder / "done").write_text(f"{i} documents, {sum(written)} bytes\n")
    return folder


DRIVER = """
import json, resource, sys, time
start = time.time()
sys.path.insert(0, {root!r})
from config import load_config
from data.prepare import prepare_data
config = load_config(None, {overrides!r})
t = time.time()
prepared = prepare_data(config, log=lambda m: print(m, file=sys.stderr))
print(json.dumps({{"prepare_s": time.time() - t, "process_s": time.time() - start,
                  "stats": prepared.stats, "directory": prepared.directory,
                  "datasets_imported": "datasets" in sys.modules,
                  "main_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "worker_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
"""

BASELINE_DRIVER = """
import json, resource, sys, time
sys.path.insert(0, {old!r})
sys.path.insert(1, {root!r})
from config import load_config
from data.corpus import load_documents, split_documents
from data.prepare import encode_documents, train_tokenizer
config = load_config(None, {overrides!r})
phases = {{}}
def timed(name, f):
    t, c = time.time(), time.process_time()
    out = f()
    phases[name] = (time.time() - t, time.process_time() - c)
    return out
docs = timed("load", lambda: load_documents(config))
train, val = split_documents(docs, config.val_fraction)
tok = timed("bpe", lambda: train_tokenizer(train, config.vocab_size))
timed("encode", lambda: (encode_documents(tok, train, "uint16"), encode_documents(tok, val, "uint16")))
print(json.dumps({{"phases": phases, "bytes": sum(len(d.encode()) for d in docs),
                  "main_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def run(code):
    """Run code in a fresh interpreter; return its JSON line, wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(proc.stderr)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, cpu


def baseline_checkout():
    folder = Path(tempfile.mkdtemp(prefix="normgpt_baseline_"))
    for path in ("config.py", "data/__init__.py", "data/corpus.py", "data/prepare.py"):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        shown = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:{path}"], cwd=ROOT, capture_output=True, text=True)
        (folder / path).write_text(shown.stdout if shown.returncode == 0 else "")
    return str(folder)


def load():
    return os.getloadavg()[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="12,100", help="corpus sizes in MB, comma-separated")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = one per CPU)")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--dir", default="/tmp/normgpt_bench_prepare", help="where corpora and caches go")
    p.add_argument("--train-bytes", type=int, default=0, help="tokenizer_train_bytes (0 = the config default)")
    p.add_argument("--baseline", action="store_true", help="also run the pre-streaming pipeline")
    args = p.parse_args()
    cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {cpu_model}, {os.cpu_count()} CPUs; vocab {args.vocab:,}; workers {args.workers or os.cpu_count()}; "
          f"tokenizer_train_bytes {args.train_bytes or 'default'}\n")
    print("| corpus | pipeline | load avg before | wall s | CPU s | tokenizer s | encode s | encode MB/s | "
          "encode CPU-s/MB | encode CPU/wall | peak RSS main / worker | warm start |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    old = baseline_checkout() if args.baseline else None
    for mb in (int(s) for s in args.sizes.split(",")):
        corpus = write_corpus(Path(args.dir) / f"corpus_{mb}MB", mb)
        cache = Path(args.dir) / f"cache_{mb}MB_{args.train_bytes}"
        shutil.rmtree(cache, ignore_errors=True)
        overrides = {"data": str(corpus / "*.txt"), "cache_dir": str(cache), "vocab_size": args.vocab,
                     "prepare_workers": args.workers}
        if args.train_bytes:
            overrides["tokenizer_train_bytes"] = args.train_bytes
        load_before = load()
        out, wall, cpu = run(DRIVER.format(root=str(ROOT), overrides=overrides))
        s = out["stats"]
        warm, warm_wall, _ = run(DRIVER.format(root=str(ROOT), overrides=overrides))
        rss = f"{out['main_rss_kb'] / 2**20:.2f} / {out['worker_rss_kb'] / 2**20:.2f} GB"
        print(f"| {s['bytes'] / 1e6:.0f} MB | streaming | {load_before:.2f} | {wall:.0f} | {cpu:.0f} | "
              f"{s['tokenizer_seconds']:.0f} | {s['encode_seconds']:.0f} | {s['bytes'] / 1e6 / s['encode_seconds']:.2f} | "
              f"{s['encode_cpu_seconds'] / (s['bytes'] / 1e6):.3f} | {s['encode_cpu_seconds'] / s['encode_seconds']:.2f} | "
              f"{rss} | {warm['prepare_s'] * 1000:.0f} ms in prepare_data, {warm_wall:.1f} s process; "
              f"datasets imported: {warm['datasets_imported']} |", flush=True)
        if old:
            load_before = load()
            old_overrides = {k: v for k, v in overrides.items() if k != "prepare_workers"}
            out, wall, cpu = run(BASELINE_DRIVER.format(old=old, root=str(ROOT), overrides=old_overrides))
            ph, mbytes = out["phases"], out["bytes"] / 1e6
            print(f"| {mbytes:.0f} MB | before (load {ph['load'][0]:.0f} s) | {load_before:.2f} | {wall:.0f} | {cpu:.0f} | "
                  f"{ph['bpe'][0]:.0f} | {ph['encode'][0]:.0f} | {mbytes / ph['encode'][0]:.2f} | "
                  f"{ph['encode'][1] / mbytes:.3f} | {ph['encode'][1] / ph['encode'][0]:.2f} | "
                  f"{out['main_rss_kb'] / 2**20:.2f} GB | – |", flush=True)


if __name__ == "__main__":
    main()
