import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit: kernels run on CPU tensors (gpu_check.sh sets 0)
import multiprocessing.process
import subprocess
import sys
from contextlib import contextmanager, nullcontext

import pytest

from repo import ROOT, tiny_run_config

sys.path.insert(0, str(ROOT))

from config import Config, apply_overrides  # noqa: E402


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One data cache for the whole session, so the stdlib corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_config(tmp_path, shared_cache):
    """configs/tiny.toml with its run dir in tmp_path; keyword overrides on top."""
    def make(out_dir=None, cache_dir=None, **overrides):
        return tiny_run_config(out_dir or tmp_path / "run", cache_dir or shared_cache, **overrides)
    return make


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A small tokenizer.json for a test module's random transformers checkpoints (tests/hf_checkpoints.py)."""
    from hf_checkpoints import tokenizer_file
    return tokenizer_file(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def small_model_config():
    """A 2-layer, 16-wide model config (no data, no run folder); keyword overrides on top."""
    def make(**overrides):
        values = dict(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=16)
        values.update(overrides)
        return apply_overrides(Config(), values).validate()
    return make


# --- the fast loop: `pytest -m "not slow"` starts no program and trains no run ---------------------

def refuse(what):
    pytest.fail(f"this test {what}: mark it @pytest.mark.slow (`pytest -m \"not slow\"` is the fast loop)",
                pytrace=False)


@contextmanager
def fast_loop_only():
    """While it is active, starting a Python program (a script, `python -c`, a spawned worker) or
    training a run fails the test. Forked workers (data/encode.py's tokenizer pool) start in
    milliseconds and are allowed; so are other programs (a C++ build runs g++ and ninja)."""
    import train
    popen, start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def checked_popen(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        if argv and os.fspath(argv[0]) == sys.executable:
            refuse(f"starts a Python program ({' '.join(map(str, argv[1:3]))} ...)")
        popen(self, args, *rest, **kwargs)

    def checked_start(self):
        if self._start_method in ("spawn", "forkserver"):
            refuse(f"starts a {self._start_method}ed worker process")
        start(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", checked_popen)
        patch.setattr(multiprocessing.process.BaseProcess, "start", checked_start)
        patch.setattr(train, "build_model", lambda *args, **kwargs: refuse("trains a run"))
        yield


def guarded(item):
    return nullcontext() if item.get_closest_marker("slow") else fast_loop_only()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):  # setup too: a module fixture that trains runs in the first test's setup
    with guarded(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with guarded(item):
        return (yield)
