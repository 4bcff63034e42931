"""The layouts and refusals of expert parallelism (``moe_gen.experts.parallel``) and FSDP
(``moe_gen.fsdp``) checked in one process: the shards a rank of a larger world holds (the world
size handed in by hand, no process group), the refusals before any group is made, the meshes
FSDP asks for, and FSDP2 on a one-process gloo group (its units, what it leaves replicated, the
unused adapters' gradients, the unsharded copy). The exchanges themselves run on several processes
in test_distributed.py."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from moe_gen import MoE, MoEConfig
from moe_gen.experts import parallel
from moe_gen.experts.parallel import ExpertParallelPlan, ExpertShard, shard_experts

D = 8


def _two_layers() -> nn.ModuleDict:
    """4 MLP experts and 2 linear experts (as distributed_scenarios._ckpt_model)."""
    torch.manual_seed(0)
    return nn.ModuleDict({
        "ffn": MoE(MoEConfig(d_model=D, d_hidden=12, num_experts=4, top_k=2)),
        "proj": MoE(MoEConfig(d_model=D, d_hidden=D, num_experts=2, top_k=1, experts="linear")),
        "head": nn.Linear(D, 3),
    })


@pytest.fixture
def world_of_four(monkeypatch):
    """``shard_experts`` run as rank ``ranks[0]`` of 4 processes: the groups it asks for are
    recorded, none is made."""
    ranks, asked = [0], []
    monkeypatch.setattr(parallel, "_process_info", lambda: (ranks[0], 4))
    monkeypatch.setattr(parallel, "_new_groups", lambda *args: asked.append(args) or (None, None, None))
    return ranks, asked


@pytest.mark.parametrize("rank", range(4))
def test_a_rank_of_four_with_ep_size_2_holds_its_slice_of_every_layer(world_of_four, rank):
    """Rank r holds experts [(r mod P)·E/P, (r mod P + 1)·E/P): ranks 0 and 2 the first half,
    1 and 3 the second; r // P is its replica."""
    ranks, asked = world_of_four
    ranks[0] = rank
    model = _two_layers()
    full = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen = model["proj"].experts.weight.requires_grad_(False)
    assert not frozen.requires_grad

    plan = shard_experts(model, 2)

    assert asked == [("cpu", 2, 2)]
    assert (plan.ep_size, plan.dp_size, plan.rank, plan.world_size) == (2, 2, rank, 4)
    assert (plan.ep_rank, plan.replica_rank) == (rank % 2, rank // 2)
    assert plan.layers == {"ffn": ExpertShard(offset=2 * (rank % 2), count=2, total=4),
                           "proj": ExpertShard(offset=rank % 2, count=1, total=2)}
    for name, p in model.named_parameters():
        shard = plan.expert_params.get(name)
        if shard is None:
            assert not name.split(".")[1:2] == ["experts"] and torch.equal(p, full[name]), name
            continue
        assert shard == plan.layers[name.split(".")[0]], name
        assert torch.equal(p, full[name][shard.offset:shard.offset + shard.count]), name
    assert sorted(plan.expert_params) == sorted(n for n in full if ".experts." in n)
    assert model["ffn"].experts.num_experts == 2 and model["proj"].experts.num_experts == 1
    assert not model["proj"].experts.weight.requires_grad  # frozen experts stay frozen
    assert model["ffn"].expert_parallel.plan is plan
    assert repr(model["ffn"].expert_parallel) == f"ExpertParallel(ep_size=2, experts [{2 * (rank % 2)}, " \
                                                 f"{2 * (rank % 2) + 2}) of 4)"
    assert parallel.expert_plan(model) is plan


def test_plan_positions_of_a_rank_in_a_larger_world():
    plan = ExpertParallelPlan(ep_size=4, dp_size=3, rank=9, world_size=12, ep_group=None, replica_group=None,
                              layers={}, expert_params={})
    assert (plan.ep_rank, plan.replica_rank) == (1, 2)


@pytest.mark.parametrize("ep_size", [0, -2, 2.0, "2"])
def test_an_ep_size_that_is_no_positive_integer_is_refused(ep_size):
    with pytest.raises(ValueError, match=rf"ep_size must be a positive integer, got {ep_size!r}"):
        shard_experts(_two_layers(), ep_size)


def test_a_sharded_layer_and_experts_that_cannot_be_sliced_are_refused_before_any_group(world_of_four):
    _, asked = world_of_four
    model = _two_layers()
    shard_experts(model, 2)
    with pytest.raises(ValueError, match=r"MoE layer 'ffn' is already sharded \(ExpertParallel\(ep_size=2"):
        shard_experts(model, 2)
    nested = _two_layers()
    nested["ffn"].experts.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"layer 'ffn': expert parameter 'extra.weight' sits in a submodule"):
        shard_experts(nested, 2)
    for shape in ((3,), ()):
        odd = _two_layers()
        odd["proj"].experts.scale = nn.Parameter(torch.ones(shape))
        where = re.escape(f"layer 'proj': expert parameter 'scale' has shape {shape}; ")
        with pytest.raises(ValueError, match=where + "expert parallelism needs a leading dimension of E=2"):
            shard_experts(odd, 2)
    bare = MoE(MoEConfig(d_model=D, d_hidden=12, num_experts=3, top_k=1))
    with pytest.raises(ValueError, match="MoE layer '<root>' has E=3 experts, which is not divisible by ep_size P=2"):
        shard_experts(bare, 2)
    assert asked == [("cpu", 2, 2)]  # the first sharding's alone


def test_an_ep_size_not_dividing_the_world_names_the_missing_init_outside_torchrun():
    with pytest.raises(ValueError, match=r"ep_size=2 must divide the number of processes, which is 1 \(torch"
                                         r"\.distributed is not initialised; call init_distributed\(\) under "
                                         r"torchrun first\)"):
        shard_experts(_two_layers(), 2)


def _layer_step(moe: MoE, x: torch.Tensor):
    """Output, and the gradients of the input, the router and the experts (None where there is none),
    of a fixed projection of the output plus the aux loss."""
    x = x.clone().requires_grad_(True)
    out = moe(x)
    probe = torch.randn(out.output.shape, generator=torch.Generator().manual_seed(1))
    ((out.output * probe).sum() + out.aux_loss).backward()
    experts = {n: None if p.grad is None else p.grad.clone() for n, p in moe.experts.named_parameters()}
    return out.output.detach(), x.grad, moe.router.weight.grad.clone(), experts


@pytest.mark.parametrize("tokens", [6, 0])
@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_the_all_to_all_layer_on_one_process_equals_the_eager_layer(one_process, kind, tokens):
    """P = 1: the exchanges are the identity, the regrouping by local expert and the combine are not.
    With no tokens the experts' gradients are zeros, not None: the empty output is tied to the
    graph (on several processes that keeps the backward's exchanges paired)."""
    import copy

    import torch.distributed as dist

    from moe_gen.experts.parallel import ExpertParallel, keep_local_experts

    torch.manual_seed(0)
    eager = MoE(MoEConfig(d_model=D, d_hidden=16 if kind == "mlp" else D, num_experts=4, top_k=2, experts=kind))
    sharded = copy.deepcopy(eager)
    plan = ExpertParallelPlan(ep_size=1, dp_size=1, rank=0, world_size=1, ep_group=dist.group.WORLD,
                              replica_group=None, layers={}, expert_params={})
    keep_local_experts(sharded, plan, ExpertShard(offset=0, count=4, total=4))
    assert isinstance(sharded.expert_parallel, ExpertParallel)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(0))
    expected, got = _layer_step(eager, x), _layer_step(sharded, x)
    torch.testing.assert_close(got[:3], expected[:3], atol=1e-6, rtol=1e-5)
    for name, grad in expected[3].items():
        if tokens == 0:
            assert got[3][name] is not None and not got[3][name].any(), name
        else:
            torch.testing.assert_close(got[3][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- FSDP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size, shape, names", [(None, (4,), ("shard",)), (4, (4,), ("shard",)),
                                                      (2, (2, 2), ("replicate", "shard")),
                                                      (1, (4, 1), ("replicate", "shard"))])
def test_fsdp_meshes_shard_over_the_world_or_within_groups_of_shard_size(monkeypatch, shard_size, shape, names):
    import torch.distributed.device_mesh as device_mesh

    from moe_gen import fsdp

    asked = []
    monkeypatch.setattr(fsdp.dist, "get_world_size", lambda *args: 4)
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda *args, **kwargs: asked.append((args, kwargs)))
    fsdp._mesh("cpu", shard_size)
    assert asked == [(("cpu", shape), {"mesh_dim_names": names})]


@pytest.mark.parametrize("shard_size", [3, 0, -4, 8])
def test_a_shard_size_not_dividing_the_world_is_refused(monkeypatch, shard_size):
    from moe_gen import fsdp

    monkeypatch.setattr(fsdp.dist, "get_world_size", lambda *args: 4)
    with pytest.raises(ValueError, match=rf"shard_size={shard_size} must be a positive divisor of the number of "
                                         r"processes \(4\)"):
        fsdp._mesh("cpu", shard_size)


@pytest.fixture
def one_process(tmp_path):
    """A one-process gloo group (FSDP2 shards over a world of 1)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _debug_model(names=("digit_classification",)):
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset

    tasks = [load_preset(name, "train", limit=4) for name in names]
    torch.manual_seed(0)
    return GeneralistModel.build(flavour("debug"), tasks, Tokenizer.default()), tasks


@pytest.mark.parametrize("unit", ["block", "stack"])
def test_fsdp_units_are_the_blocks_or_the_stacks_and_scalars_and_per_batch_parts_stay_whole(one_process, unit):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from moe_gen.fsdp import is_sharded, shard_dense, shard_group

    model, _ = _debug_model()
    assert not is_sharded(model) and shard_group(model) is None
    shard_dense(model, unit=unit)
    assert isinstance(model, FSDPModule) and model.touch_all_adapters
    for stack in (model.encoder, model.decoder):
        assert isinstance(stack, FSDPModule) == (unit == "stack")
        assert [isinstance(b, FSDPModule) for b in stack.blocks] == [unit == "block"] * len(stack.blocks)
    whole = {n for n, p in model.named_parameters() if not isinstance(p, DTensor)}
    per_batch = ("frame_heads.", "stop_heads.", "contrastive_image.", "contrastive_text.")
    assert "logit_scale" in whole and any(n.startswith("contrastive_image.") for n in whole)
    assert whole == {n for n, p in model.named_parameters() if p.dim() == 0 or n.startswith(per_batch)}
    assert is_sharded(model) and shard_group(model) is not None


def test_fsdp_refuses_an_unknown_unit(one_process):
    from moe_gen.fsdp import shard_dense

    with pytest.raises(ValueError, match="unit must be 'block' or 'stack', got 'layer'"):
        shard_dense(_debug_model()[0], unit="layer")


def test_gradients_of_adapters_no_batch_used_are_dropped_and_the_record_cleared(one_process):
    from moe_gen.fsdp import drop_unused_adapter_grads

    model, _ = _debug_model(("digit_classification", "table_species", "motion_classification"))
    adapters = sorted(model.adapters)
    assert len(adapters) == 3

    def fill():
        for p in model.adapters.parameters():
            p.grad = torch.ones_like(p)

    fill()
    model.adapters_in_step = {"image_patch"}
    drop_unused_adapter_grads(model)  # not touching its adapters: nothing to do
    assert all(p.grad is not None for p in model.adapters.parameters())
    assert model.adapters_in_step == {"image_patch"}
    model.touch_all_adapters = True
    drop_unused_adapter_grads(model)
    for name in adapters:
        kept = [p.grad is not None for p in model.adapters[name].parameters()]
        assert kept == [name == "image_patch"] * len(kept), name
    assert model.adapters_in_step == set()
    fill()
    drop_unused_adapter_grads(model)  # the next step used none
    assert all(p.grad is None for p in model.adapters.parameters())


@pytest.mark.parametrize("training", [False, True])
def test_an_unsharded_copy_holds_the_weights_in_the_models_mode_and_draws_nothing(one_process, training):
    from moe_gen.fsdp import is_sharded, shard_dense, unsharded_copy
    from moe_gen.model import GeneralistModel

    model, _ = _debug_model()
    model.train(training)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shard_dense(model)
    rng = torch.get_rng_state()
    copy = unsharded_copy(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert type(copy) is GeneralistModel and not is_sharded(copy) and copy.training == training
    state = copy.state_dict()
    assert sorted(state) == sorted(before) and all(torch.equal(state[k], v) for k, v in before.items())
