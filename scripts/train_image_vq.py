"""Trains the image tokenizer the package ships (a VQ-VAE on the scikit-learn digits' training
split, resized to 16×16) and reports its reconstruction error on the test split.

    python scripts/train_image_vq.py --out moe_gen/tasks/data/image_vq_digits.safetensors --threads 1
                                                     # what made the shipped one (models trained on its
                                                     # codes keep their own copy, GeneralistModel.plan)
    python scripts/train_image_vq.py --steps 500     # writes bench_results/image_vq.safetensors

Printed for the held-out digits: pixel MSE and PSNR of the reconstructions, the codebook's use
(distinct codes, perplexity), and the accuracy of an independent digit classifier (a logistic
regression on the real training digits' 8×8 pixels) on the real test digits and on their
reconstructions. Also written as JSON next to the tokenizer unless --no-json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    import torch

    from moe_gen.tasks.metrics import digit_classifier
    from moe_gen.tasks.modalities.image_codes import VQConfig, default_image_vq_path, images_to_tensor, train_image_vq
    from moe_gen.tasks.sources.vision import load_digit_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("bench_results", "image_vq.safetensors"),
                        help=f"where to write it (the shipped one: {os.path.relpath(default_image_vq_path())})")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--codes", type=int, default=128)
    parser.add_argument("--code-dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_rows, test_rows = load_digit_images("train"), load_digit_images("test")
    config = VQConfig(size=args.size, codes=args.codes, code_dim=args.code_dim)
    train = images_to_tensor([r["image"] for r in train_rows], config.size)
    test = images_to_tensor([r["image"] for r in test_rows], config.size)
    start = time.perf_counter()
    vq = train_image_vq(train, config, steps=args.steps, seed=args.seed,
                        log=lambda step, loss: print(f"step {step}: loss {loss:.4f}", flush=True))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        codes = vq.encode(test)
        recon = vq.decode(codes)
    mse = float(((recon - test) ** 2).mean())
    counts = torch.bincount(codes.flatten(), minlength=config.codes).double()
    p = counts / counts.sum()
    perplexity = math.exp(float(-(p[p > 0] * p[p > 0].log()).sum()))
    classify = digit_classifier()
    as_uint8 = lambda x: (x.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")  # noqa: E731
    truth = [r["digit"] for r in test_rows]
    # the real 8x8 digits themselves (not the 16x16 copies the tokenizer reads)
    real_acc = sum(int(a == b) for a, b in zip(classify([r["image"] for r in test_rows]), truth)) / len(truth)
    recon_acc = sum(int(a == b) for a, b in zip(classify(as_uint8(recon)), truth)) / len(truth)
    report = {"config": vars(args) | {"out": os.path.relpath(args.out)}, "train_images": len(train),
              "test_images": len(test), "train_seconds": round(seconds, 1), "test_mse": round(mse, 5),
              "test_psnr_db": round(10 * math.log10(1 / mse), 2), "codes_used": int((counts > 0).sum()),
              "code_perplexity": round(perplexity, 1), "classifier_accuracy_real": round(real_acc, 4),
              "classifier_accuracy_reconstructed": round(recon_acc, 4), "tokens_per_image": codes.shape[1]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    vq.save(args.out)
    print("| held-out digits | value |\n|---|---:|")
    for key in ("test_mse", "test_psnr_db", "codes_used", "code_perplexity", "classifier_accuracy_real",
                "classifier_accuracy_reconstructed", "tokens_per_image", "train_seconds"):
        print(f"| {key} | {report[key]} |")
    print(json.dumps(report))
    if not args.no_json:
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
