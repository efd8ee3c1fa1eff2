"""What train.py drives and the other scripts reuse: checkpoints, run logs, processes, evaluation.

checkpoint.py    the checkpoint format: saving, checking, loading for a resume or for sampling
runlog.py        the run folder's other files (config, tokenizer, metrics and diagnostics logs) and its lock
distributed.py   the Accelerator (DDP, FSDP2 also on CPU) and what every process must agree on
evaluation.py    the validation loss every script reports
"""
