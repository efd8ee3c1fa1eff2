"""Sample text from a trained run; tokens stream to stdout as they are generated.

    python sample.py runs/default --prompt "def " --num_samples 3 --max_new_tokens 200
    python sample.py gpt2 --prompt "def "      a transformers checkpoint folder or hub id (hf/)
    python sample.py smollm2-135m-instruct-q4   a .gguf file or a packaged model (hf/gguf.py)
"""
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from config import ArgumentParser, UserError, run_main
from data.tokenizer import end_of_document
from hf.sources import load_source
from training.checkpoint import read_meta


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("run", help="a run dir (its latest checkpoint is used), a checkpoint folder, a transformers "
                                "checkpoint folder or hub id, a .gguf file or a packaged model (smollm2-135m-instruct-q4, "
                                "gemma3-270m-q4)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--prompt_file", help="read the prompt from this file")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same text")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_cache", action="store_true", help="recompute every step without the KV cache")
    p.add_argument("--tokenizer", help="a tokenizer.json to use instead of the checkpoint's own (must be the same)")
    args = p.parse_args(argv)
    checks = [(args.num_samples >= 1, "--num_samples must be >= 1"),
              (args.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
              (args.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"),
              (args.top_k >= 0, f"--top_k must be >= 0 (0 = off), got {args.top_k}"),
              (0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_device(args.device)
    return args


def check_device(name):
    """A UserError unless torch knows the device and this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name!r}: no CUDA GPU is available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported here; use cpu or cuda")


def read_prompt(args):
    if args.prompt_file is None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {args.prompt_file!r} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"prompt file {args.prompt_file!r} is a folder; give a text file") from None
    except PermissionError:
        raise UserError(f"prompt file {args.prompt_file!r} cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise UserError(f"prompt file {args.prompt_file!r} is not UTF-8 text") from None


class StreamingDecoder:
    """Prints each token's text as it arrives. Byte-level BPE can split a UTF-8 character across
    tokens, so text is held back while it ends in an incomplete character."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

    def __call__(self, token):
        self.ids.append(int(token[0, 0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def generate_samples(args, out=None):
    out = out or sys.stdout
    prompt = read_prompt(args)  # a bad prompt file fails before the model loads
    source = load_source(args.run, args.device, tokenizer=args.tokenizer)
    model, config = source.model, source.config
    if source.origin == "run":  # one line on stderr: stdout is the text
        print(f"loaded checkpoint {source.folder} (step {read_meta(source.folder).get('step')})", file=sys.stderr)
    else:
        print(f"loaded {source.label}", file=sys.stderr)
    tokenizer = Tokenizer.from_file(str(source.tokenizer))
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    # samples start as a fresh document: after an end-of-document token, or (doc_windows: Gemma) with <bos>
    ids = [end_of_document(tokenizer, config.eod_token)[1]] + ids
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    samples = []
    for i in range(args.num_samples):
        out.write(f"--- sample {i + 1} ---\n{prompt}")
        stream = StreamingDecoder(tokenizer, out)
        idx = torch.tensor([ids], dtype=torch.long, device=args.device)
        result = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                use_cache=not args.no_cache, generator=generator, on_token=stream)
        out.write("\n")
        samples.append(prompt + tokenizer.decode(result[0, len(ids):].tolist(), skip_special_tokens=False))
    return samples


if __name__ == "__main__":
    run_main(lambda: generate_samples(parse_args()))
