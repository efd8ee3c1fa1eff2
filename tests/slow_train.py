"""train.py's command line with test-only delays injected from outside, so a test can kill the
process at a chosen moment; the production code has no test hooks.

    TEST_STEP_DELAY=0.05          sleep this long before every training batch
    TEST_HANG_SAVE_AT_STEP=20     hang inside the save of step 20, after every file is written
                                  and before the rename that would publish the checkpoint
"""
import os
import sys
import time

from repo import ROOT

sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
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

if __name__ == "__main__":
    sys.argv = ["train.py"] + sys.argv[1:]
    train.run_main(train.main)
