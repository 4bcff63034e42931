"""Expert parallelism on gloo processes (127.0.0.1): one training step equals the single-process
step on the mean of the ranks' losses (EP 2 on 2 ranks; EP 2 × DP 2 on 4; plain DP on 2; DDP with
and without EP; FSDP2); uneven and empty token counts neither hang nor change the outputs.

Each test launches the processes with ``distributed_scenarios.Launch`` (a scenario function of that
module per process) and compares their results with a single process holding every expert. A
failing rank, expert-shard checkpoints and the trainer on several processes are in
test_distributed_runs.py.
"""

from __future__ import annotations

import pytest
import torch
from distributed_scenarios import (
    KINDS,
    MAX_NORM,
    REPLICA_MAX_NORM,
    ROUNDS,
    WORLD,
    Launch,
    _debug_setup,
    _expert_slice,
    _optimizer,
    _replica_loss,
    _replica_model,
    _routed_layer,
    _run_round,
    _uneven_inputs,
)

pytestmark = pytest.mark.distributed


def _single_process_step(mixed: bool | str = False, trainable: str = "all"):
    """The reference: one process, every expert, one step on the mean of the two ranks' losses.
    Returns the updated model, the two losses, the norm before clipping and the clipped gradients."""
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.trainer.trainer import select_trainable

    model, batches = _debug_setup(mixed)
    if trainable != "all":
        select_trainable(model, trainable)
    objective = GenerativeObjective(model)
    losses = [objective(batch)["loss"] for batch in batches]
    torch.stack(losses).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    _optimizer(model).step()
    return model, losses, norm, grads


@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_training_step_with_expert_parallelism_equals_single_process_step(tmp_path, sharding):
    (r0, info0), (r1, info1) = Launch("train_step", tmp_path, sharding).results()

    model, losses, norm, grads = _single_process_step()

    assert info0["loss"] == pytest.approx(losses[0].item(), abs=1e-5)
    assert info1["loss"] == pytest.approx(losses[1].item(), abs=1e-5)
    assert info0["norm"] == pytest.approx(float(norm), rel=1e-5) and info1["norm"] == info0["norm"]
    assert float(norm) > MAX_NORM  # clipping was active
    shards = [info0["shards"], info1["shards"]]
    assert shards[0] and set(shards[0]) == set(shards[1])
    assert {n for n in r0 if n.startswith("grad/")} == {f"grad/{n}" for n in grads}  # same params have grads
    for name, p in model.named_parameters():
        if name in shards[0]:  # rank r holds experts [offset, offset + count): gather the full tensor
            assert [s[name] for s in shards] == [[0, 2], [2, 2]]
            weight, grad = torch.cat([r0[name], r1[name]]), torch.cat([r0[f"grad/{name}"], r1[f"grad/{name}"]])
        else:
            weight, grad = r0[name], r0.get(f"grad/{name}")
            assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
        if grad is not None:  # synchronised and clipped gradients
            torch.testing.assert_close(grad, grads[name], atol=1e-7, rtol=1e-5, msg=f"gradient of {name}")
        torch.testing.assert_close(weight, p.detach(), atol=1e-5, rtol=0, msg=f"updated {name}")


@pytest.mark.parametrize("ep_size, mixed, accumulate", [(2, False, False), (1, True, True), (2, True, True)],
                         ids=["ep2", "ep1-ranks-with-other-modalities-accumulated", "ep2-mixed-accumulated"])
def test_training_step_with_ddp_equals_single_process_step(tmp_path, ep_size, mixed, accumulate):
    """DDP (``replicate``) averages the replicated gradients in backward, with or without expert
    parallelism, also across a ``no_sync`` pass whose parameters the synchronised pass of this rank
    does not use: the same step as one process."""
    (r0, info0), (r1, info1) = Launch("ddp_step", tmp_path, ep_size, mixed, accumulate).results()

    model, losses, norm, grads = _single_process_step(mixed)

    assert info0["loss"] == pytest.approx(losses[0].item(), abs=1e-5)
    assert info1["loss"] == pytest.approx(losses[1].item(), abs=1e-5)
    assert info0["norm"] == pytest.approx(float(norm), rel=1e-5) and info1["norm"] == info0["norm"]
    assert float(norm) > MAX_NORM  # clipping was active
    assert {n for n in r0 if n.startswith("grad/")} == {f"grad/{n}" for n in grads}  # same params have grads
    if mixed:
        assert not any(n.startswith("grad/adapters.motion_mlp") for n in r0)  # used by no rank: no gradient
    sharded = set(info0["shards"]) if ep_size > 1 else set()
    for name, p in model.named_parameters():
        if name in sharded:  # rank r holds experts [offset, offset + count): gather the full tensor
            weight, grad = torch.cat([r0[name], r1[name]]), torch.cat([r0[f"grad/{name}"], r1[f"grad/{name}"]])
        else:
            weight, grad = r0[name], r0.get(f"grad/{name}")
            assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
        if grad is not None:
            torch.testing.assert_close(grad, grads[name], atol=1e-7, rtol=1e-5, msg=f"gradient of {name}")
        torch.testing.assert_close(weight, p.detach(), atol=1e-5, rtol=0, msg=f"updated {name}")


def test_adapters_only_training_equals_single_process_step_when_a_rank_uses_no_adapter(tmp_path):
    """trainable="adapters", rank 1's batch text only: its loss needed no gradient, so the Trainer
    skipped its backward while rank 0's ran DDP's all-reduce and the all-to-alls (a gloo abort, or
    both waiting for the timeout). Touched with weight 0 it runs backward; the step is still one
    process's: the adapter no rank used keeps no gradient."""
    (r0, info0), (r1, info1) = Launch("ddp_step", tmp_path, 2, "text", False, "adapters").results()

    model, losses, norm, grads = _single_process_step("text", "adapters")

    assert not losses[1].requires_grad  # rank 1 used no trainable parameter
    assert info0["loss"] == pytest.approx(losses[0].item(), abs=1e-5)
    assert info1["loss"] == pytest.approx(losses[1].item(), abs=1e-5)
    assert info0["norm"] == pytest.approx(float(norm), rel=1e-5) and info1["norm"] == info0["norm"]
    assert {n for n in r0 if n.startswith("grad/")} == {f"grad/{n}" for n in grads}
    assert grads and all(n.startswith("adapters.image_patch") for n in grads)
    for name, p in model.named_parameters():
        if name not in info0["shards"]:
            assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
        if name in grads:
            torch.testing.assert_close(r0[f"grad/{name}"], grads[name], atol=1e-7, rtol=1e-5, msg=f"gradient of {name}")
            torch.testing.assert_close(r0[name], p.detach(), atol=1e-5, rtol=0, msg=f"updated {name}")


@pytest.mark.parametrize("shard_size, unit, mixed", [(None, "block", False), (1, "block", False),
                                                   (None, "stack", False), (None, "block", True),
                                                   (1, "block", True)],
                         ids=["fsdp", "hsdp-replicated", "fsdp-per-stack", "fsdp-ranks-with-other-modalities",
                              "hsdp-ranks-with-other-modalities"])
def test_training_step_with_fsdp_equals_single_process_step(tmp_path, shard_size, unit, mixed):
    """Also with ranks whose batches use different adapters (image rows on one, table rows on the
    other) and an adapter no rank uses: sharded adapters, the same step as one process."""
    (r0, info0), (r1, info1) = Launch("fsdp_step", tmp_path, shard_size, unit, mixed).results()

    model, losses, norm, grads = _single_process_step(mixed)

    assert info0["sharded"] and info1["sharded"]
    assert info0["loss"] == pytest.approx(losses[0].item(), abs=1e-5)
    assert info1["loss"] == pytest.approx(losses[1].item(), abs=1e-5)
    assert info0["norm"] == pytest.approx(float(norm), rel=1e-5) and info1["norm"] == info0["norm"]
    assert float(norm) > MAX_NORM  # clipping was active
    full = sum(p.numel() for name, p in model.named_parameters() if name in info0["shard_sizes"])
    held = sum(info0["shard_sizes"].values())

    # scalars and the small parts only some objectives use (heads) stay whole on every process;
    # adapters are sharded
    replicated = ("frame_heads.", "stop_heads.", "contrastive_image.", "contrastive_text.")
    assert set(info0["shard_sizes"]) == {n for n, p in model.named_parameters()
                                         if p.dim() > 0 and not n.startswith(replicated)}
    if mixed:
        assert {n.split(".")[1] for n in info0["shard_sizes"] if n.startswith("adapters.")} == {
            "image_patch", "struct_cells", "motion_mlp"}
        assert not any(n.startswith("grad/adapters.motion_mlp") for n in r0)  # used by no rank: no gradient
    if shard_size == 1:  # replicated by FSDP2: each process holds every parameter whole
        assert held == full == sum(info1["shard_sizes"].values())
    else:
        assert held <= 0.55 * full and held + sum(info1["shard_sizes"].values()) == full
    assert {n for n in r0 if n.startswith("grad/")} == {f"grad/{n}" for n in grads}
    for name, p in model.named_parameters():
        assert torch.equal(r0[name], r1[name])
        if f"grad/{name}" in r0:
            torch.testing.assert_close(r0[f"grad/{name}"], grads[name], atol=1e-7, rtol=1e-5, msg=f"gradient of {name}")
        torch.testing.assert_close(r0[name], p.detach(), atol=1e-5, rtol=0, msg=f"updated {name}")


def test_fsdp_with_bf16_parameters_keeps_fp32_state_and_a_close_loss(tmp_path):
    (_, info0), (_, info1) = Launch("fsdp_bf16", tmp_path).results()
    _, losses, _, _ = _single_process_step()
    assert info0["dtypes"] == info1["dtypes"] == ["torch.float32"]  # parameters and gradients
    assert info0["moments"] == ["torch.float32"]
    for info, loss in zip((info0, info1), losses):
        assert info["loss"] == pytest.approx(loss.item(), rel=0.02)


def test_fsdp_with_bf16_parameters_looks_up_struct_text_ids_above_256(tmp_path):
    """FSDP2 cast the root's inputs, the batch's fp32 feature rows, to bf16: STRUCT text ids 501-504
    were looked up as 500, 502, 504, 504. The root's inputs now keep their dtype."""
    results = Launch("fsdp_bf16_struct_ids", tmp_path).results()
    for rank, (_, info) in enumerate(results):
        assert info["rows"] == [501 + 2 * rank, 502 + 2 * rank]
        assert info["looked_up"] == [info["rows"]]


@pytest.mark.parametrize("world, ep_size", [(4, 2), (2, 1)], ids=["ep2-x-dp2", "dp2"])
def test_replicas_of_a_shard_average_expert_gradients(tmp_path, world, ep_size):
    """World > ep_size: ranks holding the same experts sum their expert gradients (÷ world), so
    the step still equals one process on the mean of all ranks' losses."""
    results = Launch("replicas", tmp_path, ep_size, world=world).results()

    model = _replica_model()
    torch.stack([_replica_loss(model, rank) for rank in range(world)]).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), REPLICA_MAX_NORM)
    _optimizer(model).step()
    assert float(norm) > REPLICA_MAX_NORM
    count = 4 // ep_size
    for rank, (tensors, info) in enumerate(results):
        assert info["groups"] == [ep_size, world // ep_size, rank % ep_size, rank // ep_size]
        assert info["norm"] == pytest.approx(float(norm), rel=1e-5)
        for name, p in model.named_parameters():
            expected = p.detach()
            if name in info["shards"]:
                assert info["shards"][name] == [rank % ep_size * count, count]
                expected = _expert_slice(expected, *info["shards"][name])
            torch.testing.assert_close(tensors[name], expected, atol=1e-5, rtol=0, msg=f"rank {rank}: {name}")


def test_released_plans_leave_no_process_groups_behind_and_their_layers_refuse_to_run(tmp_path):
    """Each shard_experts call creates groups; release() destroys them (not the default group),
    so sharding layer after layer keeps the count flat, and a released layer raises."""
    (r0, info0), (r1, info1) = Launch("release", tmp_path).results()
    for rank, (tensors, info) in enumerate([(r0, info0), (r1, info1)]):
        before, *after = info["counts"]
        assert all(n > before for n in after[0::2]), info["counts"]  # sharding created groups
        assert after[1::2] == [before] * 3, info["counts"]  # released: back to the default group alone
        assert "were destroyed by ExpertParallelPlan.release()" in info["error"]
        assert info["groups"] == [None, None, None]
        y, _ = _run_round(_routed_layer("mlp"), 0, rank)
        for turn in range(3):
            torch.testing.assert_close(tensors[f"y{turn}"], y, atol=1e-5, rtol=1e-5)


def test_release_groups_frees_what_expert_parallelism_and_fsdp_created_and_the_model_refuses_to_run(tmp_path):
    results = Launch("release_fsdp", tmp_path).results()
    for rank, (_, info) in enumerate(results):
        before, *after = info["counts"]
        assert all(n > before for n in after[0::2]), info["counts"]
        assert after[1::2] == [before] * 3, info["counts"]
        assert "were destroyed by moe_gen.distributed.release_groups()" in info["error"]
        # the same model and batch each time: the same loss, and an unsharded model's (one process holds it all)
        assert info["losses"] == pytest.approx([info["unsharded_loss"]] * 3, rel=1e-5), rank


def test_uneven_and_empty_token_counts_match_the_single_process_layer(tmp_path):
    launch = Launch("uneven", tmp_path)
    (r0, info0), (r1, info1) = launch.results()
    ranks = [r0, r1]
    assert "cannot run with expert parallelism" in info0["merged_error"]
    for kind in KINDS:
        assert [info0[kind], info1[kind]] == [0, 2]
        reference = _routed_layer(kind)
        for round_ in range(ROUNDS):
            expert_grads = {}
            for rank in range(WORLD):
                reference.zero_grad(set_to_none=True)
                y, x_grad = _run_round(reference, round_, rank)
                where = f"{kind}, round {round_}, rank {rank}"
                torch.testing.assert_close(ranks[rank][f"{kind}/{round_}/y"], y, atol=1e-5, rtol=1e-5, msg=where)
                torch.testing.assert_close(ranks[rank][f"{kind}/{round_}/x_grad"], x_grad, atol=1e-5, rtol=1e-5,
                                           msg=where)
                torch.testing.assert_close(ranks[rank][f"{kind}/{round_}/router_grad"], reference.router.weight.grad,
                                           atol=1e-5, rtol=1e-5, msg=where)
                for name, p in reference.experts.named_parameters():
                    grad = torch.zeros_like(p) if p.grad is None else p.grad
                    expert_grads[name] = expert_grads.get(name, 0) + grad
            # An expert's gradient sums the gradients of every rank's tokens it computed.
            for rank in range(WORLD):
                for name, grad in expert_grads.items():
                    torch.testing.assert_close(ranks[rank][f"{kind}/{round_}/experts.{name}"],
                                               _expert_slice(grad, 2 * rank, 2), atol=1e-5, rtol=1e-5,
                                               msg=f"{kind}, round {round_}, rank {rank}, expert grad {name}")
        with torch.no_grad():
            for rank in range(WORLD):
                x, mask = _uneven_inputs(0, rank)
                torch.testing.assert_close(ranks[rank][f"{kind}/no_grad/y"], reference(x, padding_mask=mask).output)
