"""The fast loop, `pytest -m "not slow" tests`, starts no Python program and trains no run:
conftest.py makes a test that is not marked slow fail when it tries (this test is not marked)."""
import multiprocessing
import subprocess
import sys

import pytest

import train


def test_a_test_not_marked_slow_cannot_start_a_program_or_train():
    refused = pytest.fail.Exception
    with pytest.raises(refused, match="starts a Python program"):
        subprocess.run([sys.executable, "-c", "pass"])
    with pytest.raises(refused, match="starts a spawned worker process"):
        multiprocessing.get_context("spawn").Process(target=print).start()
    with pytest.raises(refused, match="trains a run"):
        train.build_model(None, None, None, None, False)
    with multiprocessing.get_context("fork").Pool(1) as pool:  # data/encode.py's tokenizer workers
        assert pool.apply(abs, (-3,)) == 3
    assert subprocess.run(["true"]).returncode == 0  # other programs (a C++ build's g++) are allowed
