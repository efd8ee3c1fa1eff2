"""The validation pass: one per-token pass of the model gives val_loss, val_bpb and each window's loss,
with the output layer's logits formed a chunk of tokens at a time."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

import model.gpt as gpt
from data.batches import IGNORE, validation_batches
from model import GPT
from training.evaluation import evaluate_loss_and_bpb, window_losses


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_chunked_token_losses_equal_the_full_logits(small_model_config, monkeypatch, softcap):
    torch.manual_seed(0)
    model = GPT(small_model_config(logit_softcap=softcap)).eval()
    x = torch.randint(0, 300, (3, 16))
    y = torch.randint(0, 300, (3, 16))
    y[2, 5:] = IGNORE
    with torch.no_grad():
        logits, mean_loss = model(x, y)
        full = F.cross_entropy(logits.view(-1, 300), y.view(-1), reduction="none").view(3, 16)
        # 7 tokens per chunk: 48 targets in 7 chunks, the last one short; no chunk's logits span more
        monkeypatch.setattr(gpt, "LOGIT_CHUNK_ELEMENTS", 7 * 300 + 299)
        rows = []
        hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
        _, chunked = model(x, y, per_token=True)
        hook.remove()
    assert rows == [7] * 6 + [6]
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    assert (chunked[2, 5:] == 0).all()
    assert chunked[y != IGNORE].mean().item() == pytest.approx(mean_loss.item(), rel=1e-6)


def test_one_pass_gives_the_mean_loss_and_each_window(small_model_config):
    """7 windows in batches of 3 (the last one padded): val_loss is the mean of the model's own mean
    losses per window, and window_losses gives those 7 in window order."""
    torch.manual_seed(1)
    config = small_model_config(eval_windows=7, batch_size=3)
    model = GPT(config)
    tokens = np.random.default_rng(0).integers(0, 300, 400).astype(np.uint16)
    accelerator = Accelerator(cpu=True)
    expected = []
    with torch.no_grad():
        for x, y, n_real in validation_batches(tokens, 16, 3, 7):
            expected += [model(x[i:i + 1], y[i:i + 1])[1].item() for i in range(n_real)]
    per_window = window_losses(model, tokens, config, accelerator)
    assert per_window.shape == (7,)
    np.testing.assert_allclose(per_window.numpy(), expected, rtol=1e-6)
    loss, _ = evaluate_loss_and_bpb(model, tokens, config, accelerator)
    assert loss == pytest.approx(np.mean(expected), rel=1e-6)
    assert model.training  # both leave the model as they found it in training
