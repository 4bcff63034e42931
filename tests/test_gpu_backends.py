"""The GPU dispatch backends equal the eager oracle: ``triton`` (its kernels run in Triton's
interpreter on this CPU-only machine, compiled on CUDA), ``tutel`` (tutel's fast dispatcher, when
tutel is importable), and ``auto`` picks among them by device, with clear errors when a backend
cannot run.

Without a CUDA device this module sets ``TRITON_INTERPRET=1`` before any kernel is built (Triton
decides between compiling and interpreting when a kernel is wrapped, which moe_gen does at first
use), so the same kernels run on CPU tensors. Tests marked ``gpu`` run only with ``-m gpu``.
"""

from __future__ import annotations

import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import balance_bias_kept, load_script, random_tags, run_with_grads, with_backend  # noqa: E402

from moe_gen import BACKENDS, ExpertsConfig, MoE, MoEConfig, RouterConfig  # noqa: E402
from moe_gen.experts import triton_dispatch, tutel_dispatch  # noqa: E402
from moe_gen.experts.dispatch import AutoDispatch, DispatchBackend  # noqa: E402
from moe_gen.experts.triton_dispatch import TritonDispatch, routing_plan  # noqa: E402
from moe_gen.experts.tutel_dispatch import TutelDispatch  # noqa: E402

D, H, E, T = 16, 24, 8, 40
TRITON_MISSING = TritonDispatch.unavailable_reason()
TUTEL_MISSING = TutelDispatch.unavailable_reason()
needs_triton = pytest.mark.skipif(TRITON_MISSING is not None, reason=f"triton backend unavailable: {TRITON_MISSING}")
needs_tutel = pytest.mark.skipif(TUTEL_MISSING is not None, reason=f"tutel backend unavailable: {TUTEL_MISSING}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Where the triton backend's kernels run: compiled, on CUDA tensors, where there is a CUDA device; in
# the interpreter, on CPU tensors, elsewhere. (The first GPU run, 2026-12-05 on an H100, found these
# tests handing CPU tensors to compiled kernels.) cuBLAS sums the grouped and per-expert matmuls in
# different orders, hence the looser tolerance there.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_TOL = 1e-3 if KERNEL_DEVICE == "cuda" else 1e-5


def assert_same(reference, candidate, atol=1e-5, rtol=1e-5):
    out_r, aux_r, gx_r, grads_r = reference
    out_c, aux_c, gx_c, grads_c = candidate
    torch.testing.assert_close(out_c, out_r, atol=atol, rtol=rtol)
    for name in aux_r:
        torch.testing.assert_close(aux_c[name], aux_r[name], atol=atol, rtol=rtol)
    torch.testing.assert_close(gx_c, gx_r, atol=atol, rtol=rtol)
    assert grads_c.keys() == grads_r.keys(), (grads_c.keys(), grads_r.keys())
    for name in grads_r:
        torch.testing.assert_close(grads_c[name], grads_r[name], atol=atol, rtol=max(rtol, 1e-4), msg=name)


def layer(k, cf, strategy="token", kind="mlp", gate="topk", drop_policy="in_order", bias=True) -> MoE:
    # cf=0.5 with min_capacity=1 drops a good share of the assignments (capacity mode is exercised).
    return MoE(MoEConfig(
        d_model=D, d_hidden=H, num_experts=E, top_k=k, capacity_factor=cf, min_capacity=1, drop_policy=drop_policy,
        router=RouterConfig(strategy=strategy, gate=gate), backend="eager",
        experts=ExpertsConfig(kind=kind, activation="silu" if kind == "glu" else "gelu", bias=bias, shared_expert=True),
    ))


def inputs(device="cpu"):
    """[2, T/2, D] hidden states with tags and 4 padding positions."""
    x = torch.randn(2, T // 2, D)
    padding = torch.zeros(2, T // 2, dtype=torch.bool)
    padding[1, -4:] = True
    return x.to(device), random_tags((2, T // 2)).to(device), padding.to(device)


def run_on_device(moe, x, tags, padding):
    """``run_with_grads`` for any device: the same fixed probe, drawn on CPU and moved to x's device."""
    x = x.detach().clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    with balance_bias_kept(moe):
        out = moe(x, tags=tags, padding_mask=padding)
    probe = torch.randn(out.output.shape, generator=torch.Generator().manual_seed(0)).to(out.output)
    ((out.output * probe).float().sum() + out.aux_loss).backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in moe.named_parameters() if p.grad is not None}
    return (out.output.detach().float().cpu(), {k: v.detach().float().cpu() for k, v in out.aux_losses.items()},
            x.grad.float().cpu(), grads)


# Dropless and capacity modes, k ∈ {1, 2}, content and tag routing, the three expert kinds.
CASES = [
    (1, None, "token", "mlp"), (2, None, "token", "glu"), (1, 0.5, "token", "linear"), (2, 0.5, "token", "mlp"),
    (2, None, "attribute", "linear"), (2, 0.5, "attribute", "glu"), (1, 0.5, "modality", "mlp"),
    (2, None, "hybrid", "mlp"),
]


def check_backend(backend, k, cf, strategy, kind, device="cpu", **kwargs):
    eager = layer(k, cf, strategy, kind, **kwargs).to(device)
    x, tags, padding = inputs(device)
    reference = run_on_device(eager, x, tags, padding)
    candidate = run_on_device(with_backend(eager, backend), x, tags, padding)
    tol = KERNEL_TOL if device == KERNEL_DEVICE else 1e-5
    assert_same(reference, candidate, atol=tol, rtol=tol)
    assert any(name.startswith("router.") for name in reference[3])  # gate weights got gradients
    return eager


# ---- routing metadata ----------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("T_,K,E_,keep", [(37, 2, 8, 0.8), (0, 2, 4, 1.0), (5, 1, 1, 1.0), (9, 3, 5, 0.0),
                                           (300, 2, 64, 0.7), (150, 4, 6, 0.9)])
def test_routing_plan_is_the_stable_sort_by_expert(T_, K, E_, keep):
    g = torch.Generator().manual_seed(T_ + K)
    ids = torch.randint(0, E_, (T_, K), generator=g)
    mask = torch.rand(T_, K, generator=g) < keep
    plan = routing_plan(ids.to(KERNEL_DEVICE), mask.to(KERNEL_DEVICE), E_)
    flat = mask.reshape(-1).nonzero().squeeze(1)
    expert_sorted, order = torch.sort(ids.reshape(-1)[flat], stable=True)
    assert torch.equal(plan.source_N.long().cpu(), flat[order])
    assert plan.counts == torch.bincount(expert_sorted, minlength=E_).tolist() == plan.counts_E.tolist()
    row = torch.full((T_ * K,), -1, dtype=torch.long)
    row[flat[order]] = torch.arange(flat.numel())
    assert torch.equal(plan.row_A.long().cpu(), row)


@needs_triton
@pytest.mark.parametrize("T_,K,E_", [(37, 2, 8), (0, 2, 4), (300, 2, 64)])
def test_a_routing_plan_of_every_slot_reads_nothing_back(T_, K, E_, monkeypatch):
    """``mask_TK=None``: every slot is a row (T·K of them, known without the counts), in the stable
    order by expert; the counts stay a device tensor and nothing is read back to the host."""
    ids = torch.randint(0, E_, (T_, K), generator=torch.Generator().manual_seed(T_))
    expected_rows = torch.sort(ids.reshape(-1), stable=True)[1]
    expected_counts = torch.bincount(ids.reshape(-1), minlength=E_)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: pytest.fail("read back to the host"))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("read back to the host"))
    plan = routing_plan(ids.to(KERNEL_DEVICE), None, E_)
    monkeypatch.undo()
    assert plan.counts is None and plan.source_N.shape == (T_ * K,)
    assert torch.equal(plan.source_N.long().cpu(), expected_rows)
    assert torch.equal(plan.counts_E.cpu(), expected_counts)
    assert torch.equal(plan.row_A.long().cpu()[expected_rows], torch.arange(T_ * K))


@needs_triton
def test_a_triton_layer_reads_nothing_back_and_its_matmuls_do_not_grow_with_experts(monkeypatch):
    """As the ``grouped`` backend (``bench_moe_layer.py --count-ops``, one forward + backward of the
    token-routed, dropless layer): no host read, and 9 matmuls whatever E is — the gate's forward and
    backward, and per projection one grouped GEMM forward and two backward."""
    bench = load_script("bench_moe_layer", monkeypatch)
    for num_experts in (4, 16):
        counted = bench.count_ops("triton", 64, D, H, num_experts, 2)
        assert (counted["host_reads"], counted["matmuls"]) == (0, 9)


def test_routing_plan_refuses_too_many_experts():
    with pytest.raises(ValueError, match="at most 1024 experts.*backend='torch'"):
        routing_plan(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool), 2048)


# ---- triton and tutel equal eager ------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("k,cf,strategy,kind", CASES)
def test_triton_equals_eager(k, cf, strategy, kind):
    check_backend("triton", k, cf, strategy, kind, device=KERNEL_DEVICE)


@needs_triton
@pytest.mark.parametrize("k,cf,strategy,kind", [CASES[1], CASES[3], CASES[5]])
def test_triton_plans_only_the_computed_assignments_where_grouped_mm_is_no_single_kernel(k, cf, strategy, kind,
                                                                                        monkeypatch):
    """Where ``grouped_mm`` would not be one kernel (fp32 on CUDA, say) the backend plans the computed
    assignments only (their counts read back once for the per-expert loop): the same outputs and
    gradients as eager, and fewer rows than slots when padding and capacity leave some out."""
    monkeypatch.setattr(triton_dispatch, "grouped_mm_fits", lambda *a, **k: False)
    plans = []
    real_plan = triton_dispatch.routing_plan

    def planning(ids, mask, num_experts):
        plans.append((mask is None, ids.numel(), real_plan(ids, mask, num_experts)))
        return plans[-1][2]

    monkeypatch.setattr(triton_dispatch, "routing_plan", planning)
    check_backend("triton", k, cf, strategy, kind, device=KERNEL_DEVICE)
    assert plans and not any(every_slot for every_slot, _, _ in plans)
    assert all(plan.source_N.numel() == sum(plan.counts) < slots for _, slots, plan in plans)  # 4 padding tokens


@needs_triton
@pytest.mark.parametrize("gate,k,cf,policy", [("expert_choice", 2, None, "in_order"),
                                               ("topk", 2, 0.5, "batch_prioritized")])
def test_triton_equals_eager_for_other_gates_and_drop_policies(gate, k, cf, policy):
    check_backend("triton", k, cf, "token", "mlp", device=KERNEL_DEVICE, gate=gate, drop_policy=policy)


@needs_tutel
@pytest.mark.parametrize("k,cf,strategy,kind", CASES)
def test_tutel_equals_eager(k, cf, strategy, kind):
    check_backend("tutel", k, cf, strategy, kind)


@needs_tutel
@pytest.mark.parametrize("gate,k,cf,policy", [("expert_choice", 2, None, "in_order"),
                                               ("topk", 2, 0.5, "batch_prioritized")])
def test_tutel_equals_eager_for_other_gates_and_drop_policies(gate, k, cf, policy):
    check_backend("tutel", k, cf, "token", "mlp", gate=gate, drop_policy=policy)


@needs_tutel
@pytest.mark.parametrize("cf", [None, 0.5])
def test_tutel_puts_each_kept_assignment_in_moe_gens_slot(cf):
    moe = layer(2, cf, drop_policy="batch_prioritized")
    x, tags, padding = inputs()
    batch = moe._tag_batch(x, tags, padding)
    x_TD = x.reshape(batch.num_tokens, -1)
    routing = moe.router(x_TD, batch)
    x_ECD = TutelDispatch().dispatch(x_TD, routing).inputs
    assert x_ECD.shape == (E, max(routing.capacity, 1), D)
    expected = torch.zeros_like(x_ECD)
    t, k = routing.mask.nonzero(as_tuple=True)
    expected[routing.topk_ids[t, k], routing.slot_positions()[t, k]] = x_TD[t]
    assert torch.equal(x_ECD, expected)  # kept rows in moe_gen's slots; the rest (drops, NaN padding) absent


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton),
                                     pytest.param("tutel", marks=needs_tutel)])
def test_nan_in_padding_never_reaches_real_tokens(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    moe = MoE(layer(2, 0.5).config.replace(backend=backend)).to(device)
    x, tags, padding = inputs(device)
    x[padding] = float("nan")
    with torch.no_grad():
        out = moe(x, tags=tags, padding_mask=padding).output
    assert torch.isfinite(out[~padding]).all() and (out[padding] == 0).all()


@needs_triton
def test_triton_sort_equals_the_torch_sort_used_by_expert_parallelism():
    moe = layer(2, 0.5).to(KERNEL_DEVICE)
    x, tags, padding = inputs(KERNEL_DEVICE)
    batch = moe._tag_batch(x, tags, padding)
    x_TD = x.reshape(batch.num_tokens, -1)
    routing = moe.router(x_TD, batch)
    flat_r, counts_r = DispatchBackend().sort_assignments(routing)
    flat_c, counts_c = TritonDispatch().sort_assignments(routing)
    assert torch.equal(flat_c, flat_r) and torch.equal(counts_c, counts_r)


@needs_triton
def test_expert_parallel_layer_with_the_triton_sort_equals_eager(tmp_path):
    """ExpertParallel on a one-process gloo group (the exchange is the identity) sorts with the
    layer backend's kernels and still computes the eager function."""
    import torch.distributed as dist

    from moe_gen.experts.parallel import ExpertParallel, ExpertParallelPlan, ExpertShard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    if KERNEL_DEVICE != "cpu":
        pytest.skip("gloo exchanges host tensors and the compiled kernels need CUDA ones (NCCL is not tested here)")
    eager = layer(2, 0.5)
    x, tags, padding = inputs()
    reference = run_with_grads(eager, x, tags, padding)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = with_backend(eager, "triton")
        plan = ExpertParallelPlan(ep_size=1, dp_size=1, rank=0, world_size=1, ep_group=dist.group.WORLD,
                                  replica_group=None, layers={}, expert_params={})
        sharded.backend = ExpertParallel(plan, ExpertShard(offset=0, count=E, total=E), sorter=sharded.backend)
        candidate = run_with_grads(sharded, x, tags, padding)
    finally:
        dist.destroy_process_group()
    assert_same(reference, candidate)


# ---- auto and errors ---------------------------------------------------------------------------------


def test_auto_uses_torch_on_cpu_and_logs_the_choice(caplog):
    eager = layer(2, None)
    x, tags, padding = inputs()
    auto = with_backend(eager, "auto")
    assert isinstance(auto.backend, AutoDispatch) and auto.config.backend == "auto"
    with caplog.at_level(logging.INFO, logger="moe_gen"):
        candidate = run_with_grads(auto, x, tags, padding)
        run_with_grads(auto, x, tags, padding)
    assert auto.backend.chosen == {"cpu": "torch"}
    chosen = [r for r in caplog.records if r.name == "moe_gen" and "'auto' uses 'torch'" in r.getMessage()]
    assert len(chosen) == 1  # once per layer and device, not per call
    assert_same(run_with_grads(eager, x, tags, padding), candidate)
    assert MoE(eager.config.replace(backend="auto")).config.backend == "auto"


def test_auto_prefers_tutel_then_triton_then_torch_on_cuda(monkeypatch):
    cuda = torch.device("cuda")
    # resolve() only asks the backends whether they can run; nothing is allocated on the device.
    monkeypatch.setattr(TutelDispatch, "__init__", lambda self: None)
    monkeypatch.setattr(TutelDispatch, "unavailable_reason", classmethod(lambda cls, device=None: None))
    auto = AutoDispatch()
    auto.resolve(cuda)
    assert auto.chosen == {"cuda": "tutel"}
    monkeypatch.setattr(TutelDispatch, "unavailable_reason", classmethod(lambda cls, device=None: "no tutel"))
    monkeypatch.setattr(TritonDispatch, "unavailable_reason", classmethod(lambda cls, device=None: None))
    monkeypatch.setattr(TritonDispatch, "__init__", lambda self: None)
    auto = AutoDispatch()
    auto.resolve(cuda)
    assert auto.chosen == {"cuda": "triton"}
    monkeypatch.setattr(TritonDispatch, "unavailable_reason", classmethod(lambda cls, device=None: "no triton"))
    auto = AutoDispatch()
    auto.resolve(cuda)
    auto.resolve(torch.device("cpu"))
    assert auto.chosen == {"cuda": "torch", "cpu": "torch"}


def test_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    message = r"backend='torch'.*TRITON_INTERPRET=1|needs the triton package.*backend='torch'"
    assert re_search(message, TritonDispatch.unavailable_reason(torch.device("cpu")))
    x, tags, padding = inputs()
    with pytest.raises(ValueError, match=message):  # at construction without CUDA, else at the call
        MoE(layer(2, None).config.replace(backend="triton"))(x, tags=tags, padding_mask=padding)
    with pytest.raises(ValueError, match=message):  # expert parallelism's sort calls the kernels directly
        routing_plan(torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.bool), 4)


@needs_triton
def test_interpreter_setting_changed_after_triton_was_imported_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_dispatch, "_triton_imported_interpreting",
                        lambda: not triton_dispatch.triton_interpreting())
    with pytest.raises(ValueError, match="set TRITON_INTERPRET before anything imports triton"):
        routing_plan(torch.zeros(4, 2, dtype=torch.long, device=KERNEL_DEVICE),
                     torch.ones(4, 2, dtype=torch.bool, device=KERNEL_DEVICE), 4)


def test_tutel_not_importable_is_a_clear_error(monkeypatch):
    def missing():
        raise ImportError("No module named 'tutel'")

    monkeypatch.setattr(tutel_dispatch, "_tutel_moe", missing)
    with pytest.raises(ValueError, match=r"needs tutel.*pip install.*github.com/microsoft/tutel.*backend='torch'"):
        MoE(layer(2, None).config.replace(backend="tutel"))
    moe = layer(2, None)
    with pytest.raises(ValueError, match="needs tutel"):
        moe.set_backend("tutel")
    assert moe.config.backend == "eager"


def test_unknown_backend_lists_the_registered_ones_and_auto():
    with pytest.raises(ValueError, match="unknown dispatch backend 'fast'; known: eager, .*triton, tutel; or 'auto'"):
        MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, backend="fast"))
    assert {"triton", "tutel"} <= set(BACKENDS.list())


def re_search(pattern, text):
    import re

    return text is not None and re.search(pattern, text) is not None


# ---- on a CUDA device (pytest -m gpu) -----------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "tutel", "grouped", "auto"])
@pytest.mark.parametrize("k,cf,strategy,kind", CASES)
def test_gpu_backend_equals_eager_on_cuda(backend, k, cf, strategy, kind):
    if backend == "tutel" and TutelDispatch.unavailable_reason(torch.device("cuda")) is not None:
        pytest.skip(TutelDispatch.unavailable_reason(torch.device("cuda")))
    if backend == "triton" and triton_dispatch.triton_interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernels would not run")
    eager = layer(k, cf, strategy, kind).cuda()
    x, tags, padding = inputs("cuda")
    reference = run_on_device(eager, x, tags, padding)
    candidate = run_on_device(with_backend(eager, backend), x, tags, padding)
    # TF32 matmuls may differ between the grouped and per-expert paths.
    assert_same(reference, candidate, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_triton_and_grouped_bf16_autocast_on_cuda_are_close_to_eager():
    eager = layer(2, None).cuda()
    x, tags, padding = inputs("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = run_on_device(eager, x, tags, padding)
        for backend in ("triton", "grouped"):
            candidate = run_on_device(with_backend(eager, backend), x, tags, padding)
            assert_same(reference, candidate, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@needs_cuda
def test_benchmark_gpu_rows_run(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_moe_layer.py")
    subprocess.run([sys.executable, script, "--no-cpu", "--tokens", "1024", "--experts", "8", "--topk", "2",
                    "--runs", "2", "--out", str(out)], check=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert {"moe_gen", "triton", "dense"} <= {r["impl"] for r in rows} and {r["device"] for r in rows} == {"cuda"}


# ---- the kernels compile for a GPU, even on a machine without one ---------------------------------

# Compiles each kernel ahead of time for an sm_80 CUDA target (Triton → PTX → cubin with the bundled
# ptxas): catches what the interpreter does not check (types, layouts, loop-carried values). Runs in
# a fresh process: Triton's own library functions are built in interpreter mode once imported so.
_COMPILE_FOR_CUDA = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from moe_gen.experts import triton_dispatch
triton_dispatch._import_triton()  # the kernels name `tl` as a module global

def compile_for_cuda(name, signature, constexprs):
    source = next(fn for fn in triton_dispatch._KERNEL_SOURCES if fn.__name__ == "_" + name)
    signature = {**signature, **{c: "constexpr" for c in constexprs}}
    ast = triton.compiler.ASTSource(fn=JITFunction(source), signature=signature, constexprs=constexprs)
    triton.compile(ast, target=GPUTarget("cuda", 80, 32))

meta = {"E_PAD": 64, "BLOCK": 128}
rows = {"num_rows": "i32", "width": "i32", "K": "i32"}
tokens = {"num_tokens": "i32", "width": "i32", "K": "i32"}
compile_for_cuda("histogram_kernel", {"ids_ptr": "*i64", "keep_ptr": "*u8", "block_counts_ptr": "*i32",
                                      "num_assignments": "i32"}, meta)
compile_for_cuda("offsets_kernel", {"block_counts_ptr": "*i32", "block_offsets_ptr": "*i32", "counts_ptr": "*i64",
                                    "num_blocks": "i32", "num_experts": "i32"}, {"E_PAD": 64, "CHUNK": 128})
compile_for_cuda("permute_kernel", {"ids_ptr": "*i64", "keep_ptr": "*u8", "block_offsets_ptr": "*i32",
                                    "row_ptr": "*i32", "source_ptr": "*i32", "num_assignments": "i32"}, meta)
compile_for_cuda("gather_rows_kernel", {"src_ptr": "*bf16", "source_ptr": "*i32", "scale_ptr": "*fp32",
                                        "out_ptr": "*bf16", **rows}, {"HAS_SCALE": True, "BLOCK_R": 32, "BLOCK_W": 128})
compile_for_cuda("gather_sum_kernel", {"src_ptr": "*bf16", "row_ptr": "*i32", "scale_ptr": "*fp32", "out_ptr": "*bf16",
                                       **tokens}, {"HAS_SCALE": True, "ACC": tl.float32, "BLOCK_T": 32, "BLOCK_W": 128})
compile_for_cuda("row_dot_kernel", {"a_ptr": "*bf16", "b_ptr": "*bf16", "row_ptr": "*i32", "out_ptr": "*fp32",
                                    **tokens}, {"ACC": tl.float32, "BLOCK_T": 32, "BLOCK_W": 128})
print("compiled")
"""


@needs_triton
def test_triton_kernels_compile_for_cuda():
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_CUDA], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
