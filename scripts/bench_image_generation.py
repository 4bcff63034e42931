"""Image generation through the image tokenizer: text-to-image (autoregressive vs. parallel
MaskGIT decoding) and image infilling, scored on held-out digits.

    python scripts/bench_image_generation.py                  # ~10 min on 2 CPU cores
    python scripts/bench_image_generation.py --steps 300 --eval 40 --seeds 0   # smoke run

For each seed, three dense models of one flavour train for ``--steps`` steps each:
- ``text_to_image`` with the generative objective, decoded left to right (16 decoder passes);
- the same task with the ``parallel`` objective (MaskGIT), decoded in ``--parallel-steps`` passes;
- ``image_infilling`` with the generative objective.

Scores on ``--eval`` held-out rows: ``digit_accuracy`` (an independent logistic regression on
real 8×8 digits reads the generated image as the requested digit), ``digit_fid`` (Fréchet
distance in a PCA of real digit pixels; lower is better) and ``pixel_mse`` against the real
image; greedy and sampled (temperature 1) answers; forward passes of the decoder stack per batch
of rows (``infer`` decodes up to 64 rows at once; a cached autoregressive step is one pass) and
seconds per image. Infilling is compared with the masked input itself and with the tokenizer's
reconstruction of the whole image (the best a code-level answer can do). Prints a Markdown table
and JSON (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(task, flavour_name: str, steps: int, seed: int, threads: int):
    import torch

    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer
    from moe_gen.trainer import TrainConfig, Trainer

    torch.manual_seed(seed)
    model = GeneralistModel.build(flavour(flavour_name).dense_twin(), [task], Tokenizer.default())
    config = TrainConfig(steps=steps, batch_size=16, lr=2e-3, warmup_steps=min(50, steps // 10), seed=seed,
                         progress=False, tensorboard=False, checkpoint_every=0, log_every=max(steps // 4, 1),
                         eval_limit=8, num_threads=threads)
    with tempfile.TemporaryDirectory(prefix="moe_gen_imagegen_") as run_dir:
        Trainer(model, [task], config, output_dir=run_dir, overwrite=True).fit()
    return model.eval()


def _score(model, task, rows, references, **infer) -> dict:
    from moe_gen.tasks.metrics import digit_accuracy, digit_fid, pixel_mse

    calls = []  # forward passes of the decoder stack (a cached autoregressive step is one)
    hook = model.decoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    start = time.perf_counter()
    try:
        images = [p.image for p in model.infer(task, rows, **infer)]
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    return {"digit_accuracy": digit_accuracy(images, references), "digit_fid": digit_fid(images, references),
            "pixel_mse": pixel_mse(images, references), "decoder_passes_per_batch": len(calls),
            "seconds_per_image": seconds / len(rows)}


def _row_subset(task, limit: int):
    from moe_gen.quality.runner import held_out

    subset = held_out(task, limit)
    return subset, [subset.data[i] for i in range(len(subset))]


def run_seed(args, seed: int) -> dict:
    from moe_gen.tasks import Task, load_preset
    from moe_gen.tasks.metrics import pixel_mse
    from moe_gen.tasks.modalities.image_codes import images_to_tensor, load_image_vq

    out = {}
    t2i = load_preset("text_to_image", "train")
    test, rows = _row_subset(load_preset("text_to_image", "test"), args.eval)
    references = [r["image"] for r in rows]
    start = time.perf_counter()
    ar = _train(t2i, args.flavour, args.steps, seed, args.threads)
    out["train_seconds_autoregressive"] = time.perf_counter() - start
    out["autoregressive greedy"] = _score(ar, test, rows, references)
    out["autoregressive sampled"] = _score(ar, test, rows, references, temperature=1.0, seed=seed)
    parallel_task = Task("text_to_image", t2i.instruction, t2i.data, objective="parallel", metrics=t2i.metrics)
    start = time.perf_counter()
    par = _train(parallel_task, args.flavour, args.steps, seed, args.threads)
    out["train_seconds_parallel"] = time.perf_counter() - start
    test_par = Task("text_to_image", test.instruction, test.data, objective="parallel")
    out["parallel greedy"] = _score(par, test_par, rows, references, parallel_steps=args.parallel_steps)
    out["parallel sampled"] = _score(par, test_par, rows, references, parallel_steps=args.parallel_steps,
                                     temperature=1.0, seed=seed)
    fill = _train(load_preset("image_infilling", "train"), args.flavour, args.steps, seed, args.threads)
    test_fill, fill_rows = _row_subset(load_preset("image_infilling", "test"), args.eval)
    fill_refs = [r["image"] for r in fill_rows]
    out["infilling greedy"] = _score(fill, test_fill, fill_rows, fill_refs)
    vq = load_image_vq()
    recon = vq.decode(vq.encode(images_to_tensor(fill_refs, vq.config.size)))
    recon = list((recon.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8"))
    out["infilling baselines"] = {"pixel_mse_masked_input": pixel_mse([r["masked"] for r in fill_rows], fill_refs),
                                  "pixel_mse_tokenizer_reconstruction": pixel_mse(recon, fill_refs)}
    return out


def _table(results: dict) -> str:
    import numpy as np

    systems = ["autoregressive greedy", "autoregressive sampled", "parallel greedy", "parallel sampled",
               "infilling greedy"]
    keys = ["digit_accuracy", "digit_fid", "pixel_mse", "decoder_passes_per_batch", "seconds_per_image"]
    lines = ["| decoding | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for system in systems:
        cells = []
        for key in keys:
            values = [seed_result[system][key] for seed_result in results.values()]
            cells.append(f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else ""))
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    for key in ("pixel_mse_masked_input", "pixel_mse_tokenizer_reconstruction"):
        values = [r["infilling baselines"][key] for r in results.values()]
        lines.append(f"| infilling baseline: {key} | — | — | {np.mean(values):.3f} | — | — |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval", type=int, default=100, help="held-out rows scored")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--flavour", default="debug")
    parser.add_argument("--parallel-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_results/image_generation.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {str(seed): run_seed(args, seed) for seed in args.seeds}
    table = _table(results)
    print(table)
    report = {"config": vars(args), "results": results, "table": table,
              "wall_seconds": time.perf_counter() - start}
    print(json.dumps(report))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
