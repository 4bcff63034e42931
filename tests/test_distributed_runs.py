"""Several gloo processes (127.0.0.1) beyond one step's equivalence: a failing rank stops its peer
with an error; expert-shard checkpoints load across layouts (also in one process, with hand-made
layouts: a rank reads only the files it needs; stale, incomplete, misfit or wrapper files are refused);
the single-process defaults and errors (clipping equals torch's; the merging arithmetic by hand);
the ``Trainer`` on 2 processes (objectives whose collectives cannot pair are refused, the logged loss
and its parts are the processes' mean, an unsharded copy leaves the RNG alone, only-expert training
needs no DDP, resuming with more processes is refused on every process). Split from
test_distributed.py; the launch machinery is ``distributed_scenarios``.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from distributed_scenarios import LAUNCH_LIMIT_S, D, Launch, _ckpt_model, _ckpt_tensors, _expert_slice, _trainer_tasks
from torch import nn

from moe_gen import MoE, MoEConfig
from moe_gen.distributed import (
    clip_grad_norm_,
    init_distributed,
    load_shards,
    save_shards,
    sync_gradients,
    world_info,
)
from moe_gen.experts.parallel import expert_plan, shard_experts

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("sharding", ["replicate", "ddp", "fsdp"], ids=["expert-parallel", "ddp", "fsdp"])
def test_a_failing_rank_stops_its_peer_with_an_error(tmp_path, sharding):
    launch = Launch("failure", tmp_path, sharding)
    assert not launch.hung, f"ranks {launch.hung} hung until killed after {LAUNCH_LIMIT_S}s"
    assert launch.exitcodes == [1, 1], launch.errors
    assert "rank 1 fails on purpose" in launch.errors[1]
    assert "fails on purpose" not in launch.errors[0] and "Error" in launch.errors[0], launch.errors[0]
    assert launch.seconds < LAUNCH_LIMIT_S


def test_expert_shards_load_across_layouts(tmp_path):
    full_model = _ckpt_model()
    full = _ckpt_tensors(full_model)
    written = save_shards(str(tmp_path / "single"), "model", full, full_model)
    assert sorted(os.path.basename(p) for p in written) == [
        "model-dense.safetensors", "model-experts-0000-0002.safetensors", "model-experts-0000-0004.safetensors"]

    (r0, info0), (r1, info1) = Launch("checkpoint", tmp_path).results()
    assert info0["round_trip_equal"] and info1["round_trip_equal"]
    # Rank 0 writes the dense file and its shards; rank 1 only its shards.
    assert info0["written"] == ["model-dense.safetensors", "model-experts-0000-0001.safetensors",
                                "model-experts-0000-0002.safetensors"]
    assert info1["written"] == ["model-experts-0001-0001.safetensors", "model-experts-0002-0002.safetensors"]
    assert not [f for f in os.listdir(tmp_path / "ep2") if f.startswith(".tmp")]

    # Written on 1 process, read with EP 2: each rank gets its slice.
    for rank, (tensors, info) in enumerate([(r0, info0), (r1, info1)]):
        assert sorted(tensors) == sorted(f"single/{k}" for k in full)
        for key, value in full.items():
            shard = info["shards"].get(key.split("::")[0])
            expected = value if shard is None or value.dim() == 0 else _expert_slice(value, *shard)
            assert torch.equal(tensors[f"single/{key}"], expected), (rank, key)

    # Written with EP 2, read on 1 process: the full tensors, bit for bit.
    back = load_shards(str(tmp_path / "ep2"), "model", full_model)
    assert sorted(back) == sorted(full)
    for key, value in full.items():
        assert torch.equal(back[key], value), key
    full_model.load_state_dict({k: v for k, v in back.items() if "::" not in k})

    # A missing shard file is named, with the experts it held.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "ep2", broken)
    os.remove(broken / "model-experts-0002-0002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model-experts-0002-0002.*experts 2\.\.3 of the 4-expert layers"):
        load_shards(str(broken), "model", full_model)
    with pytest.raises(FileNotFoundError, match="optimizer-dense.safetensors is missing"):
        load_shards(str(broken), "optimizer", full_model)


def test_a_wrapper_of_the_expert_sharded_model_is_refused_without_a_plan(tmp_path):
    """Only an explicit plan was checked against the names: given a wrapper and no plan, the plan read
    from the MoE layers named none of the wrapper's parameters, so expert shards passed for dense ones
    (sync_gradients averaged rank 0's experts 0-1 with rank 1's 2-3, clip_grad_norm_ measured another
    norm, save_shards wrote rank 0's two experts as the whole layer)."""
    (_, info0), (_, info1) = Launch("wrapper_plan", tmp_path).results()
    for info in (info0, info1):
        assert set(info["errors"]) == {"sync_gradients", "clip_grad_norm_", "save_shards", "load_shards"}
        for name, error in info["errors"].items():
            assert error is not None and error.startswith("ValueError: the plan shard_experts attached to its "
                                                          "MoE layers names expert parameters"), (name, error)
            assert "pass the model that shard_experts sharded (not a wrapper or a submodule)" in error
    assert info0["norm"] == info1["norm"]  # the model itself is accepted
    assert not (tmp_path / "rank0").exists()  # refused before anything was written


def test_save_pretrained_refuses_a_model_this_process_holds_a_part_of(tmp_path):
    """With its experts spread over 2 processes, save_pretrained wrote rank 0's 2 experts of every
    layer under a config of 4 (the folder failed only when loaded)."""
    for _, info in Launch("save_pretrained_sharded", tmp_path).results():
        assert "experts are spread over processes (shard_experts" in info["experts"]
        assert "save with Trainer.save_model, or moe_gen.distributed.save_shards" in info["experts"]
        assert "parameters are FSDP shards" in info["fsdp"] and "moe_gen.fsdp.unsharded_copy" in info["fsdp"]
        assert not info["experts_written"] and not info["fsdp_written"]


def test_without_local_rank_every_choice_of_gpu_is_the_global_rank(tmp_path, monkeypatch):
    """init_distributed took the global rank for the GPU (cuda.set_device on NCCL), world_info said 0
    and the Trainer put the model on cuda:0: rank 1 of a launcher without LOCAL_RANK (srun, a
    hand-written spawn) set cuda:1 and trained on cuda:0."""
    from moe_gen.trainer.trainer import _resolve_device

    assert [info["local_rank"] for _, info in Launch("without_local_rank", tmp_path).results()] == [0, 1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert _resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_RANK")
    assert _resolve_device("auto") == torch.device("cuda", 0)


# ---- single-process checks (no launch) ------------------------------------------------------------


def test_single_process_defaults_and_clear_errors(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None) and world_info() == info

    model = _ckpt_model()
    with pytest.raises(ValueError, match=r"'ffn' has E=4 experts, which is not divisible by ep_size P=3"):
        shard_experts(model, 3)
    with pytest.raises(ValueError, match="must divide the number of processes, which is 1"):
        shard_experts(model, 2)
    merged = nn.ModuleDict({"moe": MoE(MoEConfig(d_model=D, d_hidden=8, num_experts=4, router="modality",
                                                 backend="merged"))})
    with pytest.raises(ValueError, match="'moe' uses backend 'merged'.*cannot run with expert parallelism"):
        shard_experts(merged, 2)

    # ep_size 1 in one process: nothing changes, and the layout is the unsharded one.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = shard_experts(model, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert plan.layers == expert_plan(_ckpt_model()).layers
    assert plan.expert_params["ffn.experts.w_in"].count == 4 and "head.weight" not in plan.expert_params
    # Clipping without processes equals torch's.
    x = torch.randn(5, D)
    model["head"](model["proj"](model["ffn"](x).output).output).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    norm = clip_grad_norm_(model, 0.1, plan)
    assert float(norm) == pytest.approx(float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g) for g in grads]))), rel=1e-5)
    sync_gradients(model, plan)  # a no-op in one process


def test_touching_the_adapters_reaches_new_frame_and_stop_heads():
    """On several processes with only new heads training (trainable="new_adapters"), a batch of
    another task's rows must still give a loss that needs a gradient: the heads are touched too,
    and recorded as "<adapter>:heads" only where a batch used them."""
    from helpers import spoken_words_and_a_new_speaking_task

    from moe_gen.objectives import GenerativeObjective
    from moe_gen.tasks import Tokenizer, collate
    from moe_gen.trainer.trainer import select_trainable

    tok = Tokenizer.default()
    old, model, new = spoken_words_and_a_new_speaking_task(tok)
    added = model.add_tasks([new])
    assert added == ["audio_conv:heads"]
    select_trainable(model, "new_adapters", added)
    model.touch_all_adapters = True
    objective = GenerativeObjective(model)
    loss = objective(collate(list(old.samples(tok))[:2], tok, model.task_ids))["loss"]
    assert loss.requires_grad
    loss.backward()
    heads = [p for n, p in model.named_parameters() if p.requires_grad]
    assert len(heads) == 4 and all(p.grad is not None and not p.grad.any() for p in heads)
    assert model.adapters_in_step == {"audio_conv"}
    objective(collate(list(new.samples(tok))[:2], tok, model.task_ids))
    assert model.adapters_in_step == {"audio_conv", "audio_conv:heads"}


@pytest.mark.parametrize("settings", [{"expert_parallel": 2}, {"sharding": "fsdp"}], ids=["ep", "fsdp"])
def test_tasks_of_several_objectives_are_refused_where_the_processes_collectives_must_pair(tmp_path, settings):
    """Each process runs the objectives its own batch holds: with a contrastive and a generative
    task, expert parallelism crashed (gloo: collective mismatch) and FSDP hung until the timeout."""
    (_, info0), (_, info1) = Launch("trainer", tmp_path, ("digit_classification", "image_text_retrieval"),
                                    settings).results()
    for info in (info0, info1):
        assert "tasks of several objectives (contrastive, generative) cannot train" in info["error"]


def test_every_task_in_every_batch_trains_several_objectives_under_expert_parallelism(tmp_path):
    """With mixing="all" every process runs every objective each micro-batch: allowed."""
    (r0, info0), (r1, info1) = Launch("trainer", tmp_path, ("digit_classification", "image_text_retrieval"),
                                      {"expert_parallel": 2, "mixing": "all"}).results()
    assert info0["error"] is None and info1["error"] is None
    assert all(torch.equal(r0[name], r1[name]) for name in r0 if ".experts." not in name)


def test_the_logged_loss_is_the_processes_mean(tmp_path):
    """Each process logged its own batch's loss (rank 0's in train.jsonl), not the step's."""
    (_, info0), (_, info1) = Launch("trainer", tmp_path, ("digit_classification", "table_species"),
                                    {"batch_tasks": "single"}).results()
    assert info0["loss"] == info1["loss"]


def test_an_unsharded_copy_draws_nothing_from_the_runs_random_numbers(tmp_path):
    """Its throwaway initialisation consumed the global RNG, so an FSDP run's later draws depended
    on whether an evaluation (which copies) ran before."""
    (_, info0), (_, info1) = Launch("unsharded_copy_rng", tmp_path).results()
    assert info0["rng_untouched"] and info1["rng_untouched"]


def test_every_logged_part_is_merged_over_the_processes(tmp_path):
    """Only the loss was the processes' mean: with one task per batch, each process logged its own
    task's loss and modality share, so train.jsonl (rank 0's) showed one task of the two."""
    (_, info0), (_, info1) = Launch("step_record", tmp_path, ("digit_classification", "table_species"),
                                    {"batch_tasks": "single", "seed": 0}).results()  # ranks draw different tasks
    assert info0 == info1
    assert set(info0["task_loss"]) == {"digit_classification", "table_species"}
    assert set(info0["modality_share"]) >= {"IMAGE", "STRUCT"}
    assert sum(info0["modality_share"].values()) == pytest.approx(1.0, abs=1e-3)


def test_only_experts_training_under_expert_parallelism_needs_no_ddp(tmp_path):
    """trainable="experts" with expert_parallel=2 stopped at start with DDP's "not needed when a
    module doesn't have any parameter that requires a gradient"."""
    (r0, info0), (r1, info1) = Launch("trainer", tmp_path, ("digit_classification",),
                                      {"expert_parallel": 2, "trainable": "experts"}).results()
    assert info0["error"] is None and info1["error"] is None
    assert all(torch.equal(r0[name], r1[name]) for name in r0 if ".experts." not in name)


@pytest.mark.parametrize("settings", [{}, {"expert_parallel": 2}], ids=["ddp", "ep"])
def test_adapters_train_on_every_process_when_one_batch_uses_none(tmp_path, settings):
    """trainable="adapters" and a process drawing text rows only (seed 0: rank 1 draws doc_topic): its
    loss needed no gradient and its backward was skipped, while the other's ran DDP's all-reduce (gloo
    aborted) or the all-to-alls (both waited for the timeout)."""
    settings = {"trainable": "adapters", "batch_tasks": "single", "seed": 0, **settings}
    model, _ = _trainer_tasks(("digit_classification", "doc_topic"))
    (r0, info0), (r1, info1) = Launch("trainer", tmp_path, ("digit_classification", "doc_topic"), settings).results()
    assert info0["error"] is None and info1["error"] is None
    for name, p in model.named_parameters():
        if ".experts." not in name:
            assert torch.equal(r0[name], r1[name]), name
            assert torch.equal(r0[name], p.detach()) != name.startswith("adapters."), name  # adapters alone trained


@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_evaluations_while_training_agree_over_processes_and_keep_the_best_weights_once(tmp_path, sharding):
    """Every process evaluates (FSDP's gathers are collectives) and takes process 0's decision; the
    main process writes the log and the best weights, which are the trained model's at that step."""
    from moe_gen.model import GeneralistModel
    from moe_gen.trainer.logs import read_jsonl_log

    settings = {"steps": 4, "eval_every": 2, "keep_best": True, "eval_limit": 4, "sharding": sharding}
    (r0, info0), (_, info1) = Launch("trainer", tmp_path, ("digit_classification",), settings).results()
    assert info0["error"] is None and info0 == {**info1, "loss": info0["loss"]}
    records = read_jsonl_log(str(tmp_path / "run" / "logs" / "eval.jsonl"))
    assert [r["step"] for r in records] == [2, 4] and info0["best_step"] == records[-1]["best_step"]
    best = GeneralistModel.from_pretrained(info0["best_model"])
    # four steps score 0 at both evaluations: an equal score does not replace the first step's weights
    assert info0["best_step"] == 2 and [r["eval_score"] for r in records] == [0.0, 0.0]
    assert not all(torch.equal(p.detach(), r0[name]) for name, p in best.named_parameters())


@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_sharpness_aware_steps_advance_the_balance_bias_once(tmp_path, sharding):
    """Several processes sum their routers' loads when gradients are synchronised: the loads of a SAM
    step's second pass are dropped, so the bias moves as in a step without SAM, the same on both."""
    (b0, _), (b1, _) = Launch("sam_balance", tmp_path, {"sharding": sharding}).results()
    names = [name.split("/", 1)[1] for name in b0 if name.startswith("0.0/")]
    assert names and any(b0[f"0.0/{name}"].abs().sum() > 0 for name in names)
    for name in names:
        assert torch.equal(b0[f"0.5/{name}"], b0[f"0.0/{name}"]) and torch.equal(b1[f"0.5/{name}"], b0[f"0.0/{name}"])


def test_resuming_with_more_processes_than_wrote_the_checkpoint_is_refused_on_every_process(tmp_path):
    """The new process refused and the old one went on into the step, then died on a closed
    connection (or waited for the timeout)."""
    model, tasks = _trainer_tasks(("digit_classification",))
    from moe_gen.trainer import TrainConfig, Trainer

    Trainer(model, tasks, TrainConfig(steps=2, batch_size=4, progress=False, tensorboard=False),
            output_dir=str(tmp_path / "run")).fit()
    (_, info0), (_, info1) = Launch("trainer", tmp_path, ("digit_classification",), {"steps": 4},
                                    True).results()
    assert "has no state for process 1" in info1["error"]
    assert "has no state for process 1" in info0["error"] or "another process refused" in info0["error"]


# ---- the same helpers in one process: hand-made layouts, the merging arithmetic ---------------------


def _ep_plan(model: nn.Module, rank: int, ep_size: int):
    """The plan ``shard_experts(model, ep_size)`` gives rank ``rank`` (no process groups: save_shards and
    load_shards use none)."""
    import dataclasses

    from moe_gen.experts.parallel import ExpertShard

    full = expert_plan(model)

    def shard(s):
        count = s.total // ep_size
        return ExpertShard(offset=rank * count, count=count, total=s.total)

    return dataclasses.replace(full, ep_size=ep_size, dp_size=1, rank=rank, world_size=ep_size, replica_group=None,
                               layers={n: shard(s) for n, s in full.layers.items()},
                               expert_params={n: shard(s) for n, s in full.expert_params.items()})


def _local(tensors: dict, plan) -> dict:
    """Each expert tensor cut to the plan's experts (what that rank holds)."""
    out = {}
    for key, value in tensors.items():
        s = plan.expert_params.get(key.split("::")[0])
        out[key] = value if s is None or value.dim() == 0 else _expert_slice(value, s.offset, s.count)
    return out


def test_a_rank_loads_its_experts_when_only_the_files_it_needs_are_there(tmp_path):
    """Written by 2 ranks, read by one process (the full tensors) and by rank 0 alone after rank 1's
    files are gone: rank 0 reads only the files holding its experts."""
    model = _ckpt_model()
    full = _ckpt_tensors(model)
    plans = [_ep_plan(model, rank, 2) for rank in (0, 1)]
    for plan in plans:
        save_shards(str(tmp_path), "model", _local(full, plan), plan)
    back = load_shards(str(tmp_path), "model", model)
    assert sorted(back) == sorted(full) and all(torch.equal(back[k], v) for k, v in full.items())
    for name in ("model-experts-0002-0002.safetensors", "model-experts-0001-0001.safetensors"):
        os.remove(tmp_path / name)
    mine = load_shards(str(tmp_path), "model", plans[0])
    expected = _local(full, plans[0])
    assert sorted(mine) == sorted(expected) and all(torch.equal(mine[k], v) for k, v in expected.items())


def test_shards_of_another_layer_size_or_another_save_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _ckpt_model()
    full = _ckpt_tensors(model)
    save_shards(str(tmp_path), "model", full, model)
    wider = nn.ModuleDict({"ffn": MoE(MoEConfig(d_model=D, d_hidden=12, num_experts=8, top_k=2)),
                           "proj": model["proj"], "head": model["head"]})
    with pytest.raises(ValueError, match=r"'ffn\.experts\.\w+(::\w+)?': the checkpoint's layer has 4 experts, "
                                         "this model's 8"):
        load_shards(str(tmp_path), "model", wider)
    path = str(tmp_path / "model-experts-0000-0004.safetensors")
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={**metadata, "total": "8"})  # a file of another save under the same name
    with pytest.raises(ValueError, match="model-experts-0000-0004.safetensors does not match the manifest"):
        load_shards(str(tmp_path), "model", model)
    save_file({k: v for k, v in tensors.items() if k != "ffn.experts.w_in"}, path, metadata=metadata)
    with pytest.raises(ValueError, match="model-experts-0000-0004.safetensors lacks 'ffn.experts.w_in', which the "
                                         "manifest lists"):
        load_shards(str(tmp_path), "model", model)


def test_a_manifest_naming_a_wrappers_expert_key_is_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    from moe_gen.distributed import FORMAT

    model = _ckpt_model()
    manifest = [{"total": 4, "count": 4, "keys": ["model.ffn.experts.w_in"]}]
    save_file({"head.weight": torch.zeros(3, D)}, str(tmp_path / "model-dense.safetensors"),
              metadata={"format": FORMAT, "ep_size": "1", "experts": json.dumps(manifest)})
    with pytest.raises(ValueError, match="hold 'model.ffn.experts.w_in', which is not a parameter of the sharded "
                                         "model but ends with its expert parameter 'ffn.experts.w_in'"):
        load_shards(str(tmp_path), "model", model)


def test_an_expert_tensor_not_holding_the_ranks_experts_is_refused(tmp_path):
    model = _ckpt_model()
    tensors = _ckpt_tensors(model)
    tensors["ffn.experts.w_in::exp_avg"] = tensors["ffn.experts.w_in::exp_avg"][:3]
    with pytest.raises(ValueError, match=r"'ffn.experts.w_in::exp_avg' belongs to an expert parameter of which this "
                                         r"rank holds 4 experts \(of 4\), but its dim 0 is 3"):
        save_shards(str(tmp_path), "model", tensors, model)


def test_a_failed_shard_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    def torn(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    model = _ckpt_model()
    monkeypatch.setattr(safetensors.torch, "save_file", torn)
    with pytest.raises(OSError, match="No space left"):
        save_shards(str(tmp_path), "model", _ckpt_tensors(model), model)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("max_norm", [0.05, 1e4])
def test_clipping_in_one_process_equals_torchs(max_norm):
    """Above max_norm the gradients are scaled down as torch does; below it they are left alone
    (the factor is at most 1)."""
    import copy

    model = _ckpt_model()
    twin = copy.deepcopy(model)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
    for m in (model, twin):
        m["head"](m["proj"](m["ffn"](x).output).output).sum().backward()
    norm = clip_grad_norm_(model, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
    torch.testing.assert_close(norm, expected)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_merged_over_processes_averages_each_mean_over_its_reporters_and_sums_counts(monkeypatch):
    """Hand-worked: 'a' reported by 3 processes (1, 2, 6: mean 3), 'b' by one (4: not 4/3); positions
    summed per modality."""
    import torch.distributed as dist

    from moe_gen import distributed

    parts = [({"a": 1.0}, {"IMAGE": 3}), ({"a": 2.0, "b": 4.0}, {"TEXT": 7, "IMAGE": 5}), ({"a": 6.0}, {})]

    def all_gather_object(out, mine):
        assert mine == parts[0]
        out[:] = parts

    monkeypatch.setattr(distributed, "_active", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 3)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    means, counts = distributed.merged_over_processes(*parts[0])
    assert means == {"a": 3.0, "b": 4.0}
    assert counts == {"IMAGE": 8, "TEXT": 7} and list(counts) == ["IMAGE", "TEXT"]
