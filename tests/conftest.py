import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit: kernels run on CPU tensors (gpu_check.sh sets 0)
import sys

import pytest

from repo import ROOT

sys.path.insert(0, str(ROOT))

from config import Config, load_config  # noqa: E402


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One data cache for the whole session, so the stdlib corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_config(tmp_path, shared_cache):
    """configs/tiny.toml with its run dir in tmp_path; keyword overrides on top."""
    def make(**overrides):
        values = {"out_dir": str(tmp_path / "run"), "cache_dir": shared_cache, **overrides}
        return load_config(ROOT / "configs" / "tiny.toml", values)
    return make


@pytest.fixture
def small_model_config():
    def make(**overrides):
        values = dict(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=16)
        values.update(overrides)
        from config import apply_overrides
        return apply_overrides(Config(), values).validate()
    return make
