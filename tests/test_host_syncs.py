"""A training step that neither logs nor evaluates must not make the host wait for the device.

Every way a tensor's value reaches Python (.item(), bool(), float(), int(), torch.equal) goes through
one of the ops counted here; on a GPU each is a stall. The count is taken between consecutive
optimizer steps, so the window after step k holds step k's logging (if any) and step k+1's work.
"""
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode

import train as train_module

pytestmark = pytest.mark.slow  # every test here trains

HOST_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                 torch.ops.aten.equal.default}


class CountHostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_SYNC_OPS
        return func(*args, **(kwargs or {}))


def syncs_after_each_step(config):
    """{k: host syncs between optimizer step k and step k+1} over a whole train(config)."""
    counter, at_step = CountHostSyncs(), []
    handle = register_optimizer_step_post_hook(lambda *_: at_step.append(counter.count))
    try:
        with counter:
            train_module.train(config, log=lambda *_: None)
    finally:
        handle.remove()
    return {k: at_step[k] - at_step[k - 1] for k in range(1, len(at_step))}


@pytest.mark.parametrize("extras", [{}, {"grad_accum": 2, "z_loss": 1e-4, "diagnostics": True, "grad_clip": 1.0},
                                    {"pos_emb": "rope", "mlp": "swiglu", "logit_softcap": 15.0, "z_loss": 1e-4,
                                     "tie_embeddings": False}])
def test_steps_that_do_not_log_make_no_host_sync(tiny_config, extras):
    config = tiny_config(max_steps=12, log_interval=5, eval_interval=10, **extras)
    syncs = syncs_after_each_step(config)
    logging = {5, 10}
    assert all(syncs[k] > 0 for k in logging), syncs  # the counter sees the log steps' reads
    quiet = {k: n for k, n in syncs.items() if k not in logging}
    assert set(quiet) == {1, 2, 3, 4, 6, 7, 8, 9, 11}
    assert all(n == 0 for n in quiet.values()), f"host syncs on steps that do not log: {quiet}"


def test_a_non_finite_step_never_reaches_the_weights(tiny_config, monkeypatch):
    """The skip is decided on the device: the weights and AdamW's moments after a non-finite step
    equal those before it, and the run goes on from there."""
    seen = {}
    original_step = train_module.NonFiniteSteps.step

    def step(self, optimizer, finite, number):
        if number == 3:
            finite = torch.zeros_like(finite)  # as if the loss had been inf
            before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
            moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
            original_step(self, optimizer, finite, number)
            seen["weights"] = all(torch.equal(a, p) for a, p in zip(before, (p for g in optimizer.param_groups for p in g["params"])))
            seen["moments"] = all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, optimizer.state.values()))
            seen["steps"] = {int(s["step"]) for s in optimizer.state.values()}
            return
        original_step(self, optimizer, finite, number)

    monkeypatch.setattr(train_module.NonFiniteSteps, "step", step)
    result = train_module.train(tiny_config(max_steps=6, log_interval=2, eval_interval=6), log=lambda *_: None)
    assert seen == {"weights": True, "moments": True, "steps": {2}}
    assert result["skipped_steps"] == 1
