"""The trainer, fifteenth audit: a step stopped part-way is undone, so fit() called again runs it
as it would have run; a seed torch cannot take is refused when the config is made."""

from __future__ import annotations

import pytest
import torch
from helpers import build, quiet

from moe_gen.config import RouterConfig
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer
from moe_gen.trainer.logs import read_jsonl_log


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _run(tok, tasks, output, stop_at_call=None, dropout=0.0):
    """A 4-step run (2 micro-batches a step; balancing by bias with a running window, so the routers
    change in every forward); the ``stop_at_call``-th loss forward raises KeyboardInterrupt once,
    then fit() is called again. Returns the logged losses and the final weights."""
    router = RouterConfig(strategy="attribute", tag_balance="loss+bias", tag_balance_window=4)
    model = build(tasks, tok, router=router, dropout=dropout)
    trainer = Trainer(model, tasks, quiet(steps=4, batch_size=4, accumulate=2, log_every=1, warmup_steps=0),
                      output_dir=str(output))
    calls, real = [0], trainer.loss_module.forward

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == stop_at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    trainer.loss_module.forward = forward
    if stop_at_call is not None:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        assert trainer.step == 1 and all(p.grad is None for p in model.parameters())
    trainer.fit()
    losses = [r["loss"] for r in read_jsonl_log(str(output / "logs" / "train.jsonl")) if "loss" in r]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # (with dropout the retried step draws the same masks again)
def test_a_step_stopped_in_its_second_micro_batch_is_retried_as_it_would_have_run(tok, tmp_path, dropout):
    tasks = [load_preset(n, "train", limit=8) for n in ("digit_classification", "table_species")]
    straight, weights = _run(tok, tasks, tmp_path / "straight", dropout=dropout)
    retried, retried_weights = _run(tok, tasks, tmp_path / "retried", stop_at_call=4, dropout=dropout)
    assert retried == pytest.approx(straight, rel=1e-6) and len(straight) == 4
    for name, value in weights.items():
        torch.testing.assert_close(retried_weights[name], value, msg=name)


@pytest.mark.parametrize("seed", [2**40, -(2**40), 20251206123456789])
def test_a_seed_torch_cannot_take_is_refused_naming_it(seed):
    with pytest.raises(ValueError, match="seed must be between -2\\*\\*40 and 2\\*\\*40"):
        TrainConfig(seed=seed)
    TrainConfig(seed=2**40 - 1)
