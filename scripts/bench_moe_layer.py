"""Benchmark of one MoE layer on this machine: forward + backward time and peak memory.

Usage:
    python scripts/bench_moe_layer.py                 # full grid (~15 min on 2 CPU cores)
    python scripts/bench_moe_layer.py --quick         # small grid (what `make bench` runs)
    python scripts/bench_moe_layer.py --tokens 4096 --experts 64 --topk 2 --runs 7
    python scripts/bench_moe_layer.py --quick --no-cpu  # GPU rows only (needs a CUDA device)

Rows, for each (T tokens, E experts, k):
    moe_gen     moe_gen.MoE, token router, dropless, `torch` backend (the default layer)
    grouped     the same layer with the `grouped` backend (one grouped_mm per projection, the rows
                per expert kept on the device; --impls only on CPU)
    dense       the dense FFN with the same active FLOPs: D → k·H → D (the floor)
    eager       moe_gen.MoE with the `eager` per-expert loop backend (the oracle)
    fairscale   fairscale's GShard MOELayer with Top2Gate (k=2 only, its gate is top-2;
                capacity 2T/E, so it may drop tokens that moe_gen computes)

GPU rows (when a CUDA device is present; otherwise a note says they were skipped), the same grid
on the device:
    moe_gen     the `torch` backend on CUDA
    grouped     the `grouped` backend on CUDA (no host synchronisation in dispatch and experts)
    triton      the `triton` backend (Triton kernels for the routing metadata, gather and combine)
    tutel       the `tutel` backend (tutel's fast dispatcher; rows skipped if tutel is not
                installed with its CUDA extension)
    dense       the dense floor on CUDA
GPU time is measured between torch.cuda.synchronize() calls; peak memory is
torch.cuda.max_memory_allocated above its level before the step.

Time is the median of --runs timed forward+backward passes after --warmup untimed ones, the
implementations interleaved run by run (this machine's speed drifts); peak
memory is what the torch CPU allocator holds above its level before the step, read from the
profiler's memory events in one extra, untimed pass. Results: a table on stdout and JSON
(--out, default bench_results/moe_layer.json) with every row (its "device" included) and the
machine's facts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch  # noqa: E402
from torch import nn  # noqa: E402

from moe_gen import DenseFFN, ExpertsConfig, MoE, MoEConfig  # noqa: E402
from moe_gen.runtime import keep_freed_memory  # noqa: E402

# implementation → dispatch backend of the moe_gen layer it times
MOE_BACKENDS = {"moe_gen": "torch", "grouped": "grouped", "eager": "eager", "triton": "triton", "tutel": "tutel"}


def build(impl: str, d_model: int, d_hidden: int, num_experts: int, top_k: int) -> nn.Module:
    if impl == "dense":
        return DenseFFN(d_model, top_k * d_hidden, ExpertsConfig(kind="mlp"))
    if impl in MOE_BACKENDS:
        return MoE(MoEConfig(d_model=d_model, d_hidden=d_hidden, num_experts=num_experts,
                             top_k=top_k, router="token", capacity_factor=None, backend=MOE_BACKENDS[impl]))
    if impl == "fairscale":
        from fairscale.nn import MOELayer, Top2Gate

        experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(d_model, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_model))
             for _ in range(num_experts)]
        )
        return MOELayer(Top2Gate(d_model, num_experts), experts)
    raise ValueError(f"unknown implementation {impl!r}")


def step_fn(impl: str, module: nn.Module, x: torch.Tensor):
    """One forward + backward, as training runs it (aux losses included where there are any)."""
    if impl == "fairscale":
        num_experts = len(module.experts)
        x_in = x.view(num_experts, -1, x.shape[1])  # MOELayer wants [S, T, D] with E | S

        def step():
            y = module(x_in)
            (y.sum() + module.l_aux).backward()
    elif impl == "dense":
        def step():
            module(x).sum().backward()
    else:
        def step():
            out = module(x)
            (out.output.sum() + out.aux_loss).backward()
    return step


@contextlib.contextmanager
def quiet_stderr():
    """Silences C++-level stderr (the profiler backend logs every start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(step, module: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes the CPU allocator held during one step, above its level at the start."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    memory, start = allocator_trace(step)
    return max(e["args"]["Total Allocated"] for e in memory) - start if memory else 0


def allocator_trace(step) -> tuple[list, int]:
    """The CPU allocator's memory events during ``step()``, in time order, and its level just
    before the first of them."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    # The allocator's running total persists across profiler sessions: measure from its value
    # just before this step's first event.
    return memory, (memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"] if memory else 0)


def cuda_peak_bytes(step, module: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes the CUDA caching allocator handed out during one step, above its level before."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def measure_group(impls, tokens, d_model, d_hidden, num_experts, top_k, runs, warmup, memory=True, device="cpu"):
    """Times every implementation on the same input, interleaved run by run.

    Interleaving (run 1 of each, then run 2 of each, ...) spreads this machine's drifts in speed
    evenly over the implementations, so ratios are fairer than timing each in one block. On CUDA
    each timed step is bracketed by synchronisations (kernels run asynchronously).
    """
    on_cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model, device=device, requires_grad=True)
    entries = []
    for impl in impls:
        torch.manual_seed(0)
        module = build(impl, d_model, d_hidden, num_experts, top_k).to(device)
        entries.append((impl, module, step_fn(impl, module, x), []))
    for _impl, module, step, _ in entries:
        for _ in range(warmup):  # on CUDA this also compiles the Triton kernels
            module.zero_grad(set_to_none=True)
            step()
    for _ in range(runs):
        for _impl, module, step, times in entries:
            module.zero_grad(set_to_none=True)
            x.grad = None
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    rows = []
    for impl, module, step, times in entries:
        peak = None
        if memory:
            peak = (cuda_peak_bytes if on_cuda else peak_bytes)(step, module, x) / 2**20
        rows.append({
            "impl": impl, "device": torch.device(device).type, "tokens": tokens, "experts": num_experts,
            "top_k": top_k, "d_model": d_model, "d_hidden": d_hidden, "runs": runs,
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "peak_mb": peak,
        })
    return rows


def gpu_impls(wanted: list[str]) -> list[str]:
    """The GPU implementations that can run here; prints why the others are skipped."""
    from moe_gen import BACKENDS

    usable = []
    for impl in wanted:
        backend = MOE_BACKENDS.get(impl)
        reason = None if backend is None else BACKENDS.get(backend).unavailable_reason(torch.device("cuda"))
        if reason is None:
            usable.append(impl)
        else:
            print(f"GPU rows for {impl} skipped: {reason}")
    return usable


def run_grid(impls, args, device) -> list[dict]:
    """Every (T, E, k) of the grid for ``impls`` on ``device``, printed as a table; returns the rows."""
    rows = []
    header = f"{'T':>6} {'E':>3} {'k':>2} {'impl':>10} {'median ms':>10} {'/ dense':>8} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for tokens in args.tokens:
        for num_experts in args.experts:
            for top_k in args.topk:
                group_impls = [i for i in impls
                               if i != "fairscale" or (top_k == 2 and tokens % num_experts == 0)]
                group = measure_group(group_impls, tokens, args.d_model, args.d_hidden, num_experts,
                                      top_k, args.runs, args.warmup, memory=not args.no_memory, device=device)
                floor = next((r["median_s"] for r in group if r["impl"] == "dense"), None)
                for row in group:
                    row["ratio_to_dense"] = row["median_s"] / floor if floor else None
                    ratio = f"{row['ratio_to_dense']:.2f}x" if floor else "-"
                    peak = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"
                    print(f"{tokens:>6} {num_experts:>3} {top_k:>2} {row['impl']:>10} "
                          f"{row['median_s'] * 1e3:>10.1f} {ratio:>8} {peak:>8}", flush=True)
                rows.extend(group)
    return rows


# aten operations that move no data (views, metadata, allocation) are not counted as work
_NO_WORK = {"view", "reshape", "_reshape_alias", "as_strided", "empty", "empty_like", "empty_strided", "resize_",
            "t", "transpose", "expand", "expand_as", "permute", "unsqueeze", "squeeze", "select", "slice", "split",
            "split_with_sizes", "chunk", "unbind", "detach", "detach_", "alias", "lift_fresh", "narrow", "unflatten",
            "flatten", "view_as", "numpy_T", "result_type", "is_nonzero", "contiguous", "to", "_unsafe_view",
            "set_", "stride", "size"}
# reads that make the host wait for the device on a GPU: a value (item, int(), bool()), or an output
# whose size depends on values
_HOST_READS = {"_local_scalar_dense", "nonzero", "bincount", "unique", "_unique", "_unique2", "unique_consecutive",
               "masked_select", "unique_dim"}
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "addmm_", "mm_out", "addmm_out"}


def count_ops(impl: str, tokens: int, d_model: int, d_hidden: int, num_experts: int, top_k: int) -> dict:
    """Operations of one forward + backward (after a warm-up pass), counted by ``torch.profiler``:
    aten operations that do work (leaf operations, views and allocations left out; on a GPU each is
    about one kernel launch), the matmuls among them, and the host reads (a value read back, an
    output sized by values, or ``tolist``), each of which makes the host wait for a GPU."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    module = build(impl, d_model, d_hidden, num_experts, top_k)
    x = torch.randn(tokens, d_model, requires_grad=True)
    step = step_fn(impl, module, x)
    step()
    real_tolist, tolists = torch.Tensor.tolist, []

    def counting_tolist(t):
        tolists.append(t.shape)
        return real_tolist(t)

    torch.Tensor.tolist = counting_tolist
    try:
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        torch.Tensor.tolist = real_tolist
    work = matmuls = reads = 0
    for event in prof.events():
        name = event.name.removeprefix("aten::")
        if not event.name.startswith("aten::") or _inside_matmul(event):
            continue  # a matmul counts once: what its CPU kernel calls inside is one kernel on a GPU
        reads += name in _HOST_READS
        leaf = not any(c.name.startswith("aten::") for c in event.cpu_children)
        if name in _MATMULS or (leaf and name not in _NO_WORK):
            work += 1
            matmuls += name in _MATMULS
    return {"impl": impl, "tokens": tokens, "num_experts": num_experts, "top_k": top_k, "ops": work,
            "matmuls": matmuls, "host_reads": reads + len(tolists)}


def _inside_matmul(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.removeprefix("aten::") in _MATMULS:
            return True
        parent = parent.cpu_parent
    return False


def run_op_counts(impls, args) -> list[dict]:
    """``count_ops`` over the grid, printed as a table."""
    header = f"{'T':>6} {'E':>3} {'k':>2} {'impl':>10} {'ops':>6} {'matmuls':>8} {'host reads':>11}"
    print(header)
    print("-" * len(header))
    rows = []
    for tokens in args.tokens:
        for num_experts in args.experts:
            for top_k in args.topk:
                for impl in impls:
                    row = count_ops(impl, tokens, args.d_model, args.d_hidden, num_experts, top_k)
                    print(f"{tokens:>6} {num_experts:>3} {top_k:>2} {impl:>10} {row['ops']:>6} {row['matmuls']:>8} "
                          f"{row['host_reads']:>11}", flush=True)
                    rows.append(row)
    return rows


def init_single_process_group() -> None:
    """fairscale's MOELayer needs a process group; one gloo rank on the loopback address."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with tempfile.NamedTemporaryFile(delete=False) as f:
            store = f.name
        os.unlink(store)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T ∈ {1024, 4096}, E=8, 5 runs (where --tokens, "
                        "--experts and --runs are not given)")
    parser.add_argument("--tokens", type=int, nargs="+", help="default 1024 4096 16384")
    parser.add_argument("--experts", type=int, nargs="+", help="default 8 64")
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=1024)
    parser.add_argument("--runs", type=int, help="default 5")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impls", nargs="+", default=["moe_gen", "dense", "eager", "fairscale"])
    parser.add_argument("--gpu-impls", nargs="+", default=["moe_gen", "grouped", "triton", "tutel", "dense"],
                        help="implementations timed on CUDA (when a CUDA device is present)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU rows")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled memory pass")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tell glibc malloc to reuse freed memory (moe_gen.runtime."
                             "keep_freed_memory), for every implementation alike")
    parser.add_argument("--count-ops", action="store_true",
                        help="instead of timing: count the operations, matmuls and host reads of one forward + "
                             "backward per implementation (CPU, torch.profiler; --impls without fairscale)")
    parser.add_argument("--out", default="bench_results/moe_layer.json")
    args = parser.parse_args(argv)
    # --quick picks a small grid for what the command line leaves open (it overrode --runs too)
    args.tokens = args.tokens or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    args.experts = args.experts or ([8] if args.quick else [8, 64])
    args.runs = args.runs if args.runs is not None else 5

    if args.count_ops:
        impls = [i for i in args.impls if i != "fairscale"]
        print(f"CPU: torch {torch.__version__}, D={args.d_model}, H={args.d_hidden}, one forward+backward counted")
        rows = run_op_counts(impls, args)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"benchmark": "moe_layer_op_counts", "torch": torch.__version__, "rows": rows}, f, indent=2)
        return 0

    if args.keep_freed_memory and not keep_freed_memory():
        print("--keep-freed-memory: not supported on this platform; using the system default",
              file=sys.stderr)
        args.keep_freed_memory = False

    if "fairscale" in args.impls:
        try:
            init_single_process_group()
        except Exception as exc:  # fairscale is a dev extra; the benchmark still runs without it
            print(f"fairscale rows skipped: {exc}", file=sys.stderr)
            args.impls = [i for i in args.impls if i != "fairscale"]

    rows = []
    allocator = "malloc keeps freed memory" if args.keep_freed_memory else "system malloc"
    if not args.no_cpu:
        print(f"CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, D={args.d_model}, "
              f"H={args.d_hidden}, forward+backward, median of {args.runs}, {allocator}")
        rows += run_grid(args.impls, args, "cpu")

    gpu = None
    if args.no_gpu:
        pass
    elif not torch.cuda.is_available():
        print("GPU rows skipped: no CUDA device on this machine (they time the triton and tutel backends "
              "next to torch on CUDA)")
    else:
        impls = gpu_impls(args.gpu_impls)
        gpu = torch.cuda.get_device_name()
        print(f"\nGPU: {gpu}, torch {torch.__version__}, D={args.d_model}, H={args.d_hidden}, "
              f"forward+backward, median of {args.runs}")
        rows += run_grid(impls, args, "cuda")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result = {
        "benchmark": "moe_layer_forward_backward",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "gpu": gpu,
                    "threads": torch.get_num_threads(),
                    "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}},
        "settings": {"runs": args.runs, "warmup": args.warmup, "d_model": args.d_model,
                     "d_hidden": args.d_hidden, "keep_freed_memory": args.keep_freed_memory},
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
