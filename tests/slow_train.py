"""train.py's command line with test-only delays injected from outside, so a test can kill the
process at a chosen moment; the production code has no test hooks.

    TEST_STEP_DELAY=0.05          sleep this long before every training batch
    TEST_HANG_SAVE_AT_STEP=20     hang inside the save of step 20, after every file is written
                                  and before the rename that would publish the checkpoint
    TEST_KILL_IN_REWRITE=metrics  the first time a file whose name contains "metrics" is opened for
                                  writing from its start ("w"), write half of what is written to it,
                                  then SIGKILL this process: a kill in the middle of a log rewrite
    TEST_CWD_BY_RANK=a,b          process R (of a multi-process launch) works in the R-th folder, so
                                  a relative out_dir is a different folder on each: as on nodes
                                  without a shared filesystem
"""
import builtins
import io
import os
import signal
import sys
import time

from repo import ROOT

sys.path.insert(0, str(ROOT))
from training import checkpoint  # noqa: E402
import train  # noqa: E402

step_delay = float(os.environ.get("TEST_STEP_DELAY", "0"))
hang_step = os.environ.get("TEST_HANG_SAVE_AT_STEP")

if step_delay:
    original_next = train.TrainBatches.next

    def slow_next(self, *args, **kwargs):
        time.sleep(step_delay)
        return original_next(self, *args, **kwargs)

    train.TrainBatches.next = slow_next

if hang_step:
    original_replace = os.replace
    marker = f".tmp_step_{int(hang_step):07d}"

    def hanging_replace(src, dst, *args, **kwargs):
        if str(src).endswith(marker):
            time.sleep(600)  # the test kills us here
        return original_replace(src, dst, *args, **kwargs)

    checkpoint.os.replace = hanging_replace

kill_in_rewrite = os.environ.get("TEST_KILL_IN_REWRITE")
if kill_in_rewrite:
    real_open = io.open

    class DieHalfway:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def dying_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and kill_in_rewrite in os.path.basename(str(file)):
            return DieHalfway(f)
        return f

    io.open = builtins.open = dying_open  # pathlib's write_text opens through io.open

cwd_by_rank = os.environ.get("TEST_CWD_BY_RANK")
if cwd_by_rank:
    os.chdir(cwd_by_rank.split(",")[int(os.environ["RANK"])])

if __name__ == "__main__":
    sys.argv = ["train.py"] + sys.argv[1:]
    train.run_main(train.main)
