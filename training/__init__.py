"""What train.py drives and the other scripts reuse: the checkpoint format, the run folder's logs and
lock, the Accelerator and the agreements between processes, evaluation."""
