"""Sharpness-aware minimisation (``TrainConfig.sam_rho``): a step's gradient is taken at the weights
moved along the normalised gradient of the same micro-batches, the weights come back, the optimizer
steps with the second gradient; routing balance advances once per step; a run resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import build, quiet

from moe_gen.analysis.recorder import RoutingRecorder
from moe_gen.config import RouterConfig
from moe_gen.tasks import load_preset
from moe_gen.trainer import TrainConfig, Trainer
from moe_gen.trainer.optim import _param_groups

NAMES = ["digit_classification", "table_qa"]


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=12) for n in NAMES]


def _config(**kwargs) -> TrainConfig:
    kwargs.setdefault("steps", 3)
    return quiet(batch_size=4, lr=3e-3, warmup_steps=0, log_every=1, **kwargs)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_step_takes_the_gradient_at_the_weights_moved_along_the_first_one(tasks, tok, tmp_path):
    rho = 0.3
    model = build(tasks, tok)
    start = _params(model)
    before = copy.deepcopy(model)
    trainer = Trainer(model, tasks, _config(steps=1, sam_rho=rho, accumulate=2), output_dir=str(tmp_path))
    passes, accumulate = [], trainer._accumulate

    def recorded(step, micro_batches=None):
        at = _params(model)
        out = accumulate(step, micro_batches)
        passes.append({"at": at, "grads": _grads(model), "given": micro_batches, "batches": out[3]})
        return out

    trainer._accumulate = recorded
    trainer.fit()
    first, second = passes
    assert len(passes) == 2 and first["given"] is None and second["given"] is first["batches"]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in first["grads"].values()]))
    for name, weight in start.items():
        assert torch.equal(first["at"][name], weight)
        moved = weight + first["grads"][name] * (rho / norm) if name in first["grads"] else weight
        torch.testing.assert_close(second["at"][name], moved, rtol=0, atol=1e-6)
    assert any(not torch.allclose(second["grads"][n], g) for n, g in first["grads"].items())
    # the optimizer stepped from the first weights with the second gradient, clipped as usual
    cfg = trainer.config
    optimizer = torch.optim.AdamW(_param_groups(before, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.eps)
    for name, p in before.named_parameters():
        p.grad = second["grads"].get(name)
    torch.nn.utils.clip_grad_norm_([p for p in before.parameters() if p.grad is not None], 1.0)
    optimizer.step()
    for name, p in before.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_the_step_logs_the_first_pass_and_zero_rho_is_plain_training(tasks, tok, tmp_path):
    """The loss and the routing numbers of a logged step are those of the weights it starts from."""
    plain = build(tasks, tok)
    plain_record = Trainer(plain, tasks, _config(steps=1), output_dir=str(tmp_path / "a")).train_step(
        1, RoutingRecorder(plain))
    sam = build(tasks, tok)
    sam_record = Trainer(sam, tasks, _config(steps=1, sam_rho=0.5), output_dir=str(tmp_path / "b")).train_step(
        1, RoutingRecorder(sam))
    assert sam_record["loss"] == plain_record["loss"] and sam_record["task_loss"] == plain_record["task_loss"]
    assert plain_record["expert_load"] and sam_record["expert_load"] == plain_record["expert_load"]
    assert not all(torch.equal(p, q) for p, q in zip(plain.parameters(), sam.parameters()))
    zero = build(tasks, tok)
    Trainer(zero, tasks, _config(steps=1, sam_rho=0.0), output_dir=str(tmp_path / "c")).train_step(1)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), zero.parameters()))


@pytest.mark.parametrize("balance", ["bias", "loss"])
def test_routing_balance_advances_once_a_step(tasks, tok, tmp_path, balance):
    """The bias (loss-free balancing) and the running load of a windowed balance loss are what the
    first pass made of them, as in a step without SAM."""
    router = RouterConfig(strategy="attribute", tag_balance=balance, **({"tag_balance_window": 4}
                                                                        if balance == "loss" else {}))
    state = []
    for rho, where in ((0.0, "plain"), (0.5, "sam")):
        model = build(tasks, tok, router=router)
        Trainer(model, tasks, _config(steps=1, sam_rho=rho), output_dir=str(tmp_path / where)).train_step(1)
        state.append({n: b.clone() for n, b in model.named_buffers()
                      if n.endswith(("balance_bias", "load_average", "load_weight"))})
    assert state[0] and state[0].keys() == state[1].keys()
    assert any(b.abs().sum() > 0 for b in state[0].values())  # the step moved them
    for name, value in state[0].items():
        assert torch.equal(state[1][name], value), name


def test_a_step_stopped_in_its_second_pass_runs_again_as_it_would_have(tasks, tok, tmp_path):
    """Ctrl-C in the second pass: the weights are moved back and the step undone, so ``fit`` again
    (and a run resumed from the checkpoint of the step before) trains as an unstopped run."""
    whole = build(tasks, tok)
    Trainer(whole, tasks, _config(steps=4, sam_rho=0.2), output_dir=str(tmp_path / "whole")).fit()
    for again in ("fit", "resume"):
        model = build(tasks, tok)
        trainer = Trainer(model, tasks, _config(steps=4, sam_rho=0.2, checkpoint_every=1),
                          output_dir=str(tmp_path / again))
        accumulate = trainer._accumulate

        def stopped(step, micro_batches=None, accumulate=accumulate):
            if step == 3 and micro_batches is not None:
                raise KeyboardInterrupt
            return accumulate(step, micro_batches)

        trainer._accumulate = stopped
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        trainer._accumulate = accumulate
        if again == "fit":
            trainer.fit()
        else:
            trainer.close()
            model = build(tasks, tok)
            Trainer(model, tasks, _config(steps=4, sam_rho=0.2), output_dir=str(tmp_path / again), resume=True).fit()
        for (name, p), q in zip(whole.named_parameters(), model.parameters()):
            assert torch.equal(p, q), (again, name)


def test_a_negative_rho_is_refused():
    with pytest.raises(ValueError, match=r"sam_rho must be >= 0 \(0: no sharpness-aware minimisation\), got -0.1"):
        TrainConfig(sam_rho=-0.1)
