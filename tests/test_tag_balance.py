"""Balanced tag routing (``RouterConfig.tag_balance``, ``moe_gen.routing.balance``): the selection
bias spreads tag groups of very unequal sizes over the experts, chooses experts without changing
gate weights, survives checkpoints, keeps merged inference exact, invalidates cached routes, and
stays identical over processes; the loss variant equals the Switch loss over the tokens."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import socket
import traceback

import pytest
import torch

from moe_gen import MoE, MoEConfig, RouterConfig, TagBatch, TokenTags, merge_for_inference
from moe_gen.analysis import RoutingRecorder, stats
from moe_gen.routing import balance, balance_loss
from moe_gen.trainer.logs import RunLogger, expert_utilisation, read_jsonl_log

E, K, D = 8, 2, 8
# Tokens per task (one tag group each): from 97 down to 9, so no partition is even and the
# smallest groups cannot keep an expert above the 1/(4E) floor alone.
COUNTS = [int(96 * 0.85**t) + 1 for t in range(16)]


@pytest.fixture(autouse=True)
def _one_thread():
    """These layers are tiny: one thread is fastest, and much faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(gen: torch.Generator, counts=COUNTS) -> tuple[TokenTags, torch.Tensor, torch.Tensor]:
    task_T = torch.cat([torch.full((c,), t) for t, c in enumerate(counts)])
    tags = dataclasses.replace(TokenTags.constant(task_T.shape), task=task_T)
    return tags, torch.randn(task_T.shape[0], D, generator=gen), task_T


def _moe(tag_balance: str = "bias", *, strategy: str = "task", backend: str = "torch", **router) -> MoE:
    rc = RouterConfig(strategy=strategy, tag_balance=tag_balance, num_tasks=len(COUNTS), **router)
    return MoE(MoEConfig(d_model=D, d_hidden=16, num_experts=E, top_k=K, router=rc, backend=backend))


def _collapse_(moe: MoE, seed: int) -> None:
    """Routes most tasks to experts 0 and 1 (the state training drifts tag routes into), keeping
    the tasks' preferences among the other experts distinct."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embedding, weight = moe.router.input.embedding.weight, moe.router.weight
        shared = torch.randn(D, generator=gen)
        embedding.copy_(shared + torch.randn(embedding.shape, generator=gen))
        weight[:2] += 6.0 * shared / shared.square().sum()


def _train(moe: MoE, steps: int, seed: int = 0) -> None:
    """Regression onto one random linear map per task (MSE + the layer's auxiliary losses)."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(len(COUNTS), D, D, generator=gen) / D**0.5
    optimizer = torch.optim.Adam(moe.parameters(), lr=3e-3)
    moe.train()
    for _ in range(steps):
        tags, x, task_T = _batch(gen)
        out = moe(x, tags=tags)
        loss = (out.output - torch.einsum("td,tde->te", x, maps[task_T])).square().mean() + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moe.eval()


def _utilisation(moe: MoE) -> float:
    tags, x, _ = _batch(torch.Generator().manual_seed(99))
    with torch.no_grad():
        counts_E = moe(x, tags=tags).routing.expert_counts
    return float(stats.utilisation(counts_E.unsqueeze(0))[0])


# ---- balancing --------------------------------------------------------------------------------


@pytest.mark.parametrize("rule,mode", [("error", "bias"), ("sign", "bias"), ("error", "loss+bias")])
def test_bias_spreads_unequal_tag_groups_from_a_collapsed_start(rule, mode):
    seed = 0
    balanced, unbalanced = _moe(mode, tag_balance_rate=0.05, tag_balance_rule=rule), _moe("none")
    unbalanced.load_state_dict({k: v for k, v in balanced.state_dict().items() if "balance_bias" not in k})
    for moe in (balanced, unbalanced):
        _collapse_(moe, seed)
    start = _utilisation(balanced)
    assert start == _utilisation(unbalanced) <= 0.625
    _train(balanced, 300, seed)
    _train(unbalanced, 300, seed)
    # ≥ 90% of the experts take ≥ 1/(4E) of the tokens with the bias; without it at least two of
    # the eight stay (nearly) idle (a renormalised top-k gate's gradient never reaches the logit of
    # an expert it did not choose; only the task embeddings move). Over 12 initialisations: 1.0
    # with the bias (either rule), 0.25–0.75 without.
    assert _utilisation(balanced) >= 0.9
    assert _utilisation(unbalanced) <= 0.75
    assert float(balanced.router.balance_bias.abs().max()) > 0


def test_the_load_loss_moves_collapsed_routes_too():
    moe, reference = _moe("loss", balance_loss_weight=0.1), _moe("none")
    reference.load_state_dict(moe.state_dict())
    for layer in (moe, reference):
        _collapse_(layer, 0)
    _train(moe, 200)
    _train(reference, 200)
    assert moe.router.balance_bias is None
    assert _utilisation(moe) > _utilisation(reference)


def test_bias_moves_once_per_training_forward_towards_underloaded_experts():
    moe = _moe("bias", tag_balance_rate=0.1)
    tags, x, _ = _batch(torch.Generator().manual_seed(0))
    moe.eval()
    moe(x, tags=tags)
    assert torch.equal(moe.router.balance_bias, torch.zeros(E))  # inference leaves it alone
    moe.train()
    load_E = moe(x, tags=tags).routing.expert_counts.double()
    mean = load_E.mean()
    expected = (0.1 * ((mean - load_E) / mean).clamp(-1, 1)).float()
    torch.testing.assert_close(moe.router.balance_bias, expected)
    assert bool((moe.router.balance_bias[load_E == 0] == 0.1).all())

    sign = _moe("bias", tag_balance_rate=0.1, tag_balance_rule="sign").train()
    load_E = sign(x, tags=tags).routing.expert_counts.double()
    torch.testing.assert_close(sign.router.balance_bias, (0.1 * torch.sign(load_E.mean() - load_E)).float())

    frozen = _moe("bias", tag_balance_rate=0.1).train()  # e.g. fine-tuning only experts or adapters
    frozen.router.requires_grad_(False)
    frozen(x, tags=tags)
    assert torch.equal(frozen.router.balance_bias, torch.zeros(E))


def test_bias_chooses_experts_but_gate_weights_stay_the_unbiased_probabilities():
    moe = _moe("bias").eval()
    tags, x, _ = _batch(torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = moe(x, tags=tags).routing.groups
        # lift group 0's first expert: group 0 keeps its choice, groups without that expert change
        favourite = int(before.ids_GK[0, 0])
        moe.router.balance_bias[favourite] = 10.0
        after = moe(x, tags=tags).routing.groups
    torch.testing.assert_close(after.logits_GE, before.logits_GE)  # the bias is not in the logits
    torch.testing.assert_close(after.probs_GE, before.probs_GE)
    ids_GK = (after.logits_GE + moe.router.balance_bias).topk(K, dim=-1).indices
    assert torch.equal(after.ids_GK, ids_GK)
    chosen_GK = after.probs_GE.gather(1, ids_GK)
    torch.testing.assert_close(after.weights_GK, chosen_GK / chosen_GK.sum(-1, keepdim=True))
    assert bool((after.ids_GK == favourite).any(-1).all())
    assert not torch.equal(after.ids_GK, before.ids_GK)  # the bias did change some choices
    # where a group's choice did not change, its weights are exactly the unbiased ones
    same = (after.ids_GK == before.ids_GK).all(-1)
    assert bool(same[0])
    assert torch.equal(after.weights_GK[same], before.weights_GK[same])


def test_only_tag_routers_with_a_learned_top_k_gate_get_a_bias():
    assert RouterConfig().tag_balance == "loss"  # the default: the bias is opt-in
    assert _moe("bias").router.balance_bias is not None
    assert "router.balance_bias" in _moe("bias").state_dict()
    for moe in (_moe("loss"), _moe("none"), _moe("bias", strategy="token"), _moe("bias", gate="hash"),
                _moe("bias", strategy="hybrid")):
        assert moe.router.balance_bias is None
        assert not any("balance_bias" in k for k in moe.state_dict())
    with pytest.raises(ValueError, match="tag_balance"):
        RouterConfig(tag_balance="sometimes")
    with pytest.raises(ValueError, match="tag_balance_rule"):
        RouterConfig(tag_balance_rule="pid")
    with pytest.raises(ValueError, match="tag_balance_rate"):
        RouterConfig(tag_balance_rate=-1.0)


# ---- checkpoints, merged inference, route cache ----------------------------------------------


def test_checkpoint_round_trip_keeps_the_bias_and_older_checkpoints_load_with_zero_bias():
    moe = _moe("bias", tag_balance_rate=0.05)
    _train(moe, 20)
    state = moe.state_dict()
    assert float(state["router.balance_bias"].abs().max()) > 0
    restored = _moe("bias", tag_balance_rate=0.05)
    restored.load_state_dict(state)
    assert torch.equal(restored.router.balance_bias, moe.router.balance_bias)
    tags, x, _ = _batch(torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(restored.eval()(x, tags=tags).output, moe(x, tags=tags).output)

    older = {k: v for k, v in state.items() if k != "router.balance_bias"}
    restored.load_state_dict(older)  # strict: a model saved before tag balancing still loads
    assert torch.equal(restored.router.balance_bias, torch.zeros(E))


def test_merged_backend_equals_unmerged_after_balancing_updates():
    moe = _moe("bias", tag_balance_rate=0.05)
    _collapse_(moe, 0)
    _train(moe, 60)  # routes moved by the bias
    assert float(moe.router.balance_bias.abs().max()) > 0.5
    tags, x, _ = _batch(torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = moe(x, tags=tags).output
        moe.set_backend("merged")
        merged = moe(x, tags=tags).output
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-5)
    # and with autograd (merged per route, not per set of experts)
    torch.testing.assert_close(moe(x, tags=tags).output, reference, atol=1e-5, rtol=1e-5)


def test_a_bias_update_changes_the_next_inference_routes():
    moe = _moe("bias", tag_balance_rate=50.0)  # one update reorders the experts of some groups
    tags, x, _ = _batch(torch.Generator().manual_seed(0))
    moe.eval()
    with torch.no_grad():
        before = moe(x, tags=tags).routing.groups.ids_GK
        frozen = merge_for_inference(moe)
        assert torch.equal(frozen(x, tags=tags).routing.groups.ids_GK, before)
        moe.train()
        moe(x, tags=tags)  # a training forward (no_grad or not) updates the bias in place
        moe.eval()
        after = moe(x, tags=tags).routing.groups.ids_GK
        kept = frozen(x, tags=tags).routing.groups.ids_GK
    assert not torch.equal(after, before)
    assert torch.equal(kept, before)  # the frozen copy is a snapshot of the weights it was made from
    with pytest.raises(ValueError, match="frozen for inference"):
        frozen.train()  # so it cannot update its bias


# ---- the loss variant --------------------------------------------------------------------------


def test_group_balance_loss_equals_the_switch_loss_over_the_tokens():
    gen = torch.Generator().manual_seed(0)
    G = 6
    logits_GE = torch.randn(G, E, generator=gen, requires_grad=True)
    ids_GK = torch.randn(G, E, generator=gen).topk(K, dim=-1).indices
    count_G = torch.tensor([50, 1, 0, 7, 20, 3])
    grouped = balance.group_balance_loss(logits_GE.softmax(-1), ids_GK, count_G)
    (grad_grouped,) = torch.autograd.grad(grouped, logits_GE)
    group_N = torch.arange(G).repeat_interleave(count_G)
    tokens = balance_loss(logits_GE.softmax(-1)[group_N], ids_GK[group_N])
    (grad_tokens,) = torch.autograd.grad(tokens, logits_GE)
    torch.testing.assert_close(grouped, tokens)
    torch.testing.assert_close(grad_grouped, grad_tokens)
    empty = balance.group_balance_loss(logits_GE.detach().softmax(-1), ids_GK, torch.zeros(G, dtype=torch.long))
    assert float(empty) == 0


def test_the_loss_is_added_only_for_tag_balance_loss_and_is_the_same_with_capacity():
    tags, x, _ = _batch(torch.Generator().manual_seed(0))
    moe = _moe("loss").train()
    dropless = moe(x, tags=tags)
    assert dropless.routing.groups is not None and set(dropless.aux_losses) == {"tag_balance", "z"}
    moe.config = moe.config.replace(capacity_factor=100.0)  # routes expanded to tokens, nothing dropped
    moe.router.config = moe.config
    expanded = moe(x, tags=tags)
    assert expanded.routing.groups is None
    torch.testing.assert_close(expanded.aux_losses["tag_balance"], dropless.aux_losses["tag_balance"])
    assert set(_moe("bias").train()(x, tags=tags).aux_losses) == {"z"}
    both = _moe("loss+bias").train()
    assert set(both(x, tags=tags).aux_losses) == {"tag_balance", "z"}
    assert both.router.balance_bias is not None and float(both.router.balance_bias.abs().max()) > 0
    assert "tag_balance" not in _moe("loss", strategy="token").train()(x, tags=tags).aux_losses


def _one_task(task: int, seed: int) -> tuple[TokenTags, torch.Tensor]:
    """A batch of one tag group: task ``task``'s tokens alone (a one-task micro-batch)."""
    n = COUNTS[task]
    tags = dataclasses.replace(TokenTags.constant((n,)), task=torch.full((n,), task))
    return tags, torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_a_windowed_loss_reads_the_running_load_share():
    """W > 0: the loss's load shares are a running average over forwards (this one's included),
    so a batch of one task is pushed off the experts the earlier batches loaded."""
    W, weight = 4, 0.01
    moe = _moe("loss", tag_balance_window=W, balance_loss_weight=weight).train()
    plain = _moe("loss", balance_loss_weight=weight).train()
    plain.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("router.load_")})
    assert moe.router.load_average is not None and plain.router.load_average is None
    tags, x = _one_task(0, 0)
    first = moe(x, tags=tags)  # no history yet: the forward's own share, as without a window
    torch.testing.assert_close(first.aux_losses["tag_balance"], plain(x, tags=tags).aux_losses["tag_balance"])
    share_a = first.routing.expert_counts.float() / first.routing.expert_counts.sum()
    tags, x = _one_task(5, 1)
    second = moe(x, tags=tags)
    share_b = second.routing.expert_counts.float() / second.routing.expert_counts.sum()
    rho = 1 - 1 / W
    mixed = (rho * (1 - rho) * share_a + (1 - rho) * share_b) / (rho * (1 - rho) + (1 - rho))
    probs_E = second.routing.groups.probs_GE[0]
    torch.testing.assert_close(second.aux_losses["tag_balance"], weight * E * (mixed * probs_E).sum())
    torch.testing.assert_close(moe.router.load_average / moe.router.load_weight, mixed)
    # activation checkpointing's recomputation reads the same share and moves nothing
    before = moe.router.load_average.clone()
    torch.testing.assert_close(moe.router.running_share(second.routing, update=False), mixed)
    assert torch.equal(moe.router.load_average, before)
    # the running share is saved with the layer, and a layer without a window has none to load
    assert {"router.load_average", "router.load_weight"} <= set(moe.state_dict())
    assert not any(k.startswith("router.load_") for k in plain.state_dict())
    assert _moe("bias", tag_balance_window=W).router.load_average is None  # no loss to read it


def test_a_windowed_loss_reads_the_running_load_share_with_capacity_too():
    """Routes expanded to tokens (capacity) read the same running share as group routes."""
    moe = _moe("loss", tag_balance_window=4, balance_loss_weight=0.01).train()
    capped = _moe("loss", tag_balance_window=4, balance_loss_weight=0.01).train()
    capped.load_state_dict(moe.state_dict())
    capped.config = capped.config.replace(capacity_factor=100.0)  # nothing dropped
    capped.router.config = capped.config
    for task, seed in ((0, 0), (5, 1)):
        tags, x = _one_task(task, seed)
        grouped, expanded = moe(x, tags=tags), capped(x, tags=tags)
        assert grouped.routing.groups is not None and expanded.routing.groups is None
        torch.testing.assert_close(expanded.aux_losses["tag_balance"], grouped.aux_losses["tag_balance"])
    torch.testing.assert_close(capped.router.load_average, moe.router.load_average)


# ---- utilisation in the analysis and the training log -----------------------------------------


def test_utilisation_counts_experts_above_a_quarter_of_the_balanced_share():
    counts_LE = torch.tensor([[10.0, 10, 10, 10], [40, 0, 0, 0], [97, 1, 1, 1], [0, 0, 0, 0]])
    assert stats.utilisation(counts_LE).tolist() == [1.0, 0.25, 0.25, 0.0]
    assert stats.utilisation(torch.tensor([[6.0, 2, 1, 0]]), floor=0.25).tolist() == [0.75]  # 1 ≥ 9/16
    assert stats.utilisation(torch.tensor([[5.0, 5, 0, 0]]), num_experts=[2]).tolist() == [1.0]


def test_recorder_and_summary_report_the_utilisation_of_a_balanced_layer():
    moe = _moe("bias", tag_balance_rate=0.05)
    _collapse_(moe, 0)
    _train(moe, 100)
    tags, x, _ = _batch(torch.Generator().manual_seed(99))
    with RoutingRecorder(moe, task_names=[f"t{i}" for i in range(len(COUNTS))]) as recorder, torch.no_grad():
        counts_E = moe(x, tags=tags).routing.expert_counts
    summary = stats.summarize(recorder.tables())
    assert summary["utilisation"] == [pytest.approx(_utilisation(moe))]
    assert summary["mean_utilisation"] == summary["utilisation"][0]
    assert summary["load"][0] == pytest.approx((counts_E / counts_E.sum()).tolist())


def test_train_log_records_utilisation_per_layer(tmp_path):
    logger = RunLogger(str(tmp_path), total_steps=1, progress=False, tensorboard=False)
    load = {"encoder.blocks.1.ffn": [0.5, 0.5, 0.0, 0.0], "decoder.blocks.1.ffn": [0.25] * 4}
    logger.log({"step": 1, "loss": 1.0, "tokens_per_s": 1.0, "expert_load": load})
    logger.close()
    (record,) = read_jsonl_log(str(tmp_path / "logs" / "train.jsonl"))
    assert record["expert_utilisation"] == {"encoder.blocks.1.ffn": 0.5, "decoder.blocks.1.ffn": 1.0}
    assert record["mean_expert_utilisation"] == 0.75
    assert expert_utilisation({}) == {"expert_utilisation": {}, "mean_expert_utilisation": 0.0}


# ---- several processes -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_counts(rank: int) -> list[int]:
    return COUNTS[:10] if rank == 0 else COUNTS[6:]


def _bias_steps(rank: int, distributed) -> dict:
    """Two micro-batches (different on each rank), then the step's synchronisation."""
    torch.manual_seed(0)
    moe = _moe("bias", tag_balance_rate=0.1).train()
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        tags, x, _ = _batch(gen, _rank_counts(rank))
        moe(x, tags=tags).output.sum().backward()
    pending = moe.router.balance_bias.clone()  # nothing applied yet
    distributed.sync_gradients(moe)
    return {"pending": pending.tolist(), "bias": moe.router.balance_bias.tolist()}


def _window_steps(rank: int, distributed) -> dict:
    """One task per micro-batch (two, different on each rank), then the step's synchronisation."""
    torch.manual_seed(0)
    moe = _moe("loss", tag_balance_window=4).train()
    for micro in range(2):
        tags, x = _one_task(2 * rank + micro, micro)
        moe(x, tags=tags).aux_loss.backward()
    pending = moe.router.load_weight.clone()  # nothing applied yet
    distributed.sync_gradients(moe)
    return {"pending": float(pending), "average": moe.router.load_average.tolist(),
            "weight": float(moe.router.load_weight)}


def _worker(rank: int, world: int, port: int, out_dir: str, body: str) -> None:
    """Runs ``body`` (a function of this module) in a gloo group; its result or traceback to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        from moe_gen import distributed

        distributed.init_distributed(backend="gloo", timeout_s=15.0)
        result = globals()[body](rank, distributed)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test through a file
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)


def _spawn(body: str, tmp_path) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, 2, port, str(tmp_path), body)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    errors = [open(tmp_path / f"rank{r}.error").read() for r in range(2) if (tmp_path / f"rank{r}.error").exists()]
    assert not errors and all(p.exitcode == 0 for p in procs), "\n".join(errors)
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]

@pytest.mark.parametrize("rule", ["error", "sign"])
def test_no_load_moves_no_bias(rule):
    bias_E = torch.tensor([0.5, -0.25, 0.0, 0.125])
    balance.nudge_bias_(bias_E, torch.zeros(4), 0.1, rule)
    assert torch.equal(bias_E, torch.tensor([0.5, -0.25, 0.0, 0.125]))


def test_a_sync_after_no_forward_changes_nothing():
    """One process: routers that ran no forward since the last sync contribute zeros, which move
    neither a selection bias nor a running load share; a model without such routers is left alone."""
    biased = _moe("bias", tag_balance_rate=0.1)
    windowed = _moe("loss", tag_balance_window=4)
    model = torch.nn.ModuleList([biased, windowed])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    balance.sync_bias_updates(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    balance.sync_bias_updates(_moe("loss"))  # neither kind of router: nothing to do
    balance.sync_bias_updates(torch.nn.Linear(2, 2))



@pytest.mark.parametrize("rule", ["error", "sign"])
def test_a_deferred_bias_update_applies_the_configured_rule_to_the_summed_load(rule, monkeypatch):
    """What several processes do, in one: forwards only add their load to the pending total, and
    ``sync_bias_updates`` applies one step of the router's own rule from it."""
    moe = _moe("bias", tag_balance_rate=0.1, tag_balance_rule=rule).train()
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(balance, "defer_to_sync", lambda: True)
    load_E = sum(moe(x, tags=tags).routing.expert_counts.double() for tags, x, _ in (_batch(gen), _batch(gen)))
    assert torch.equal(moe.router.balance_bias, torch.zeros(E))  # nothing moved yet
    monkeypatch.undo()  # one process: the sync has nothing to all-reduce
    balance.sync_bias_updates(moe)
    mean = load_E.mean()
    step = torch.sign(mean - load_E) if rule == "sign" else ((mean - load_E) / mean).clamp(-1, 1)
    torch.testing.assert_close(moe.router.balance_bias, (0.1 * step).float())
    assert moe.router.take_pending_load() is None


def test_one_process_group_of_one_moves_the_bias_at_each_forward(tmp_path):
    """Only several processes defer the bias update to the sync: a process group of one (torchrun
    with one process) moves it at every forward, as without torch.distributed."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert not balance.defer_to_sync()
        moe = _moe("bias", tag_balance_rate=0.1).train()
        tags, x, _ = _batch(torch.Generator().manual_seed(0))
        load_E = moe(x, tags=tags).routing.expert_counts.double()
        assert moe.router.take_pending_load() is None and bool(moe.router.balance_bias.abs().sum() > 0)
        # the update a forward without torch.distributed makes: towards the underloaded experts
        mean = load_E.mean()
        torch.testing.assert_close(moe.router.balance_bias, (0.1 * ((mean - load_E) / mean).clamp(-1, 1)).float())
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_processes_advance_one_running_load_from_their_mean_share(tmp_path):
    results = _spawn("_window_steps", tmp_path)
    assert all(r["pending"] == 0.0 for r in results)  # forwards only add to the pending shares
    assert results[0]["average"] == results[1]["average"] and results[0]["weight"] == results[1]["weight"]
    torch.manual_seed(0)
    moe = _moe("loss", tag_balance_window=4).train()
    shares = []
    for task in range(4):
        tags, x = _one_task(task, task % 2)
        counts = moe.router(x, TagBatch(tags)).expert_counts.float()
        shares.append(counts / counts.sum())
    rho = 0.75  # one update, by the mean of the four forwards' shares
    torch.testing.assert_close(torch.tensor(results[0]["average"]), (1 - rho) * torch.stack(shares).mean(0))
    assert results[0]["weight"] == pytest.approx(1 - rho)


@pytest.mark.distributed
def test_processes_apply_one_update_from_their_summed_loads(tmp_path):
    results = _spawn("_bias_steps", tmp_path)
    assert all(r["pending"] == [0.0] * E for r in results)  # forwards only add to the pending load
    assert results[0]["bias"] == results[1]["bias"]  # the replicated biases stay identical

    # the same update as one process seeing both ranks' micro-batches
    torch.manual_seed(0)
    moe = _moe("bias", tag_balance_rate=0.1).train()
    load_E = torch.zeros(E)
    for rank in range(2):
        gen = torch.Generator().manual_seed(rank)
        for _ in range(2):
            tags, x, _ = _batch(gen, _rank_counts(rank))
            load_E += moe.router(x, TagBatch(tags)).expert_counts
    expected = torch.zeros(E)
    balance.nudge_bias_(expected, load_E, 0.1)
    torch.testing.assert_close(torch.tensor(results[0]["bias"]), expected)


def test_under_capacity_the_bias_follows_the_load_the_routes_ask_for():
    """After capacity drops, an expert asked for 8 tokens (4x its 2 slots) counted as busy as one
    asked for 2, and that one, under the mean demand of 2.5, was nudged down by the full step."""
    cfg = MoEConfig(d_model=4, d_hidden=4, num_experts=4, top_k=1, capacity_factor=0.5, min_capacity=1,
                    router=RouterConfig(strategy="task", tag_balance="bias", tag_balance_rate=0.1,
                                        tag_balance_rule="error"))
    moe = MoE(cfg).train()
    with torch.no_grad():  # task 0 (8 tokens) → expert 0, task 1 (2 tokens) → expert 1
        moe.router.input.embedding.weight.zero_()
        moe.router.input.embedding.weight[0, 0] = moe.router.input.embedding.weight[1, 1] = 5.0
        moe.router.weight.copy_(torch.eye(4))
    tags = TokenTags.cat([TokenTags.constant((1, 8), task=0), TokenTags.constant((1, 2), task=1)], dim=1)
    routing = moe(torch.randn(1, 10, 4), tags=tags).routing
    assert routing.expert_counts.tolist() == [2, 2, 0, 0] and int(routing.dropped_tokens) == 6
    demand = torch.tensor([8.0, 2.0, 0.0, 0.0])
    expected = 0.1 * ((demand.mean() - demand) / demand.mean()).clamp(-1, 1)
    torch.testing.assert_close(moe.router.balance_bias, expected)
