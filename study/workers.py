"""compare.py's local worker processes: `--jobs N` trains N runs at once on one machine.

Each worker is a fresh process (spawned, not forked: torch and forked threads do not mix) that pulls
runs from a queue until it is empty. On a machine with GPUs each worker sees one of them
(CUDA_VISIBLE_DEVICES, round robin over the visible ones); on CPU each gets an equal share of the
cores as torch's intra-op threads (OMP_NUM_THREADS = cores // N), unless the user set OMP_NUM_THREADS.
A worker that dies (killed, out of memory) fails only the run it held: the run folder's checkpoints
let the next invocation resume it, and the other workers go on.
"""
import multiprocessing
import os
import queue
import sys


def worker_environments(jobs):
    """One dict of environment variables per worker."""
    import torch
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        return [{"CUDA_VISIBLE_DEVICES": gpus[w % len(gpus)]} for w in range(jobs)]
    if "OMP_NUM_THREADS" in os.environ:  # the user's choice stands
        return [{} for _ in range(jobs)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [{"OMP_NUM_THREADS": str(max(1, cores // jobs))} for _ in range(jobs)]


def _work(worker, tasks, results, run):
    """A worker's loop: (index, args) from tasks -> ("start", index, worker), then ("done", index, row)."""
    import torch
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    def log(message):
        print(f"[worker {worker}] {message}", flush=True)

    while True:
        try:
            index, args = tasks.get_nowait()
        except queue.Empty:
            return
        results.put(("start", index, worker))
        results.put(("done", index, run(*args, worker=f"worker {worker}", log=log)))


def run_in_workers(tasks, jobs, run, log=print):
    """run(*args, worker=..., log=...) -> row for every (index, args) in tasks, on `jobs` workers.
    Returns {index: row}; a run whose worker died comes back as a failed row."""
    context = multiprocessing.get_context("spawn")
    task_queue, results = context.Queue(), context.Queue()
    for task in tasks:
        task_queue.put(task)
    environments = worker_environments(jobs)
    processes = []
    for w, extra in enumerate(environments):
        before = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)  # a spawned process starts with the parent's environment as it is now
        try:
            process = context.Process(target=_work, args=(w, task_queue, results, run), daemon=True)
            process.start()
        finally:
            for k, v in before.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        processes.append(process)
        log(f"worker {w}: pid {process.pid}" + "".join(f", {k}={v}" for k, v in extra.items()))
    rows, holding = {}, {}  # holding: worker -> the index of the run it is training
    try:
        while len(rows) < len(tasks):
            try:
                kind, index, payload = results.get(timeout=1.0)
            except queue.Empty:
                for w, process in enumerate(processes):
                    if not process.is_alive() and w in holding:
                        index = holding.pop(w)
                        rows[index] = {"status": "failed", "error": f"worker {w} exited with code "
                                       f"{process.exitcode} during this run; run the comparison again to resume it"}
                        log(f"worker {w} died (exit code {process.exitcode}) while training run {index}")
                if not any(p.is_alive() for p in processes) and results.empty():
                    break  # every worker is gone: what is left stays for the next invocation
                continue
            if kind == "start":
                holding[payload] = index
            else:
                rows[index] = payload
                holding = {w: i for w, i in holding.items() if i != index}
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        raise
    for process in processes:
        process.join(timeout=10)
    sys.stdout.flush()
    return rows
