"""What train.py drives and the other scripts reuse: checkpoints, run logs, processes, evaluation.

checkpoint.py    the checkpoint format: saving, checking, loading for a resume or for sampling
runlog.py        the run folder's other files (config, tokenizer, metrics and diagnostics logs, train.log) and its lock
metrics.py       the one schema of what a run measures: metrics.jsonl keys, tracker names, result keys
curves.py        a run's own curves.png (loss and learning rate against step)
distributed.py   the Accelerator (DDP, FSDP2 also on CPU) and what every process must agree on
evaluation.py    the validation loss every script reports
"""
