"""Speech recognition from a frozen Whisper encoder's states against the model's own fbank stem.

Usage:
    python scripts/bench_frozen_inputs.py                      # 3 seeds, 600 steps each, ~4 min on 2 cores
    python scripts/bench_frozen_inputs.py --seeds 0 --steps 200

The `speech_recognition` preset (18 words x 21 synthetic voices; test = 4 unheard voices, 72 clips)
trained on the debug flavour (attribute-routed MoE) from scratch, its AUDIO slot declared two ways:
the preset's own (`audio_fbank` + `audio_conv`) and `[AUDIO:audio,preprocess=whisper_states]`
(Whisper tiny.en's encoder, frozen; the text decoder still learns from nothing). Word error rate on
every test clip, per seed. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from moe_gen.config import RouterConfig  # noqa: E402
from moe_gen.model import GeneralistModel, flavour  # noqa: E402
from moe_gen.tasks import Task, Tokenizer, preset_info  # noqa: E402
from moe_gen.trainer import TrainConfig, Trainer  # noqa: E402

INPUTS = {"fbank": "[AUDIO:audio]", "whisper_states": "[AUDIO:audio,preprocess=whisper_states]"}


def run(inputs: str, seed: int, steps: int, run_dir: str) -> dict:
    """One model trained on the train split and scored (WER) on the whole test split."""
    info = preset_info("speech_recognition")
    if info.instruction.count(INPUTS["fbank"]) != 1:
        raise SystemExit(f"speech_recognition's instruction {info.instruction!r} no longer holds {INPUTS['fbank']}")
    instruction = info.instruction.replace(INPUTS["fbank"], INPUTS[inputs])
    train, test = (Task(info.name, instruction, info.build(split), metrics=info.metrics) for split in ("train", "test"))
    torch.manual_seed(seed)
    model = GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}), [train],
                                  Tokenizer.default())
    config = TrainConfig(steps=steps, batch_size=16, lr=2e-3, warmup_steps=min(50, steps // 10), seed=seed,
                         progress=False, tensorboard=False, checkpoint_every=0)
    start = time.perf_counter()
    trainer = Trainer(model, [train], config, output_dir=run_dir, overwrite=True)
    trainer.fit()
    seconds = time.perf_counter() - start
    wer = trainer.evaluate(tasks=[test], limit=None)[info.name]["wer"]
    return {"inputs": inputs, "seed": seed, "steps": steps, "wer": wer, "train_seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="bench_results/frozen_inputs.json")
    args = parser.parse_args(argv)
    import tempfile

    results = []
    with tempfile.TemporaryDirectory(prefix="moe_gen_frozen_") as tmp:
        for seed in args.seeds:
            for inputs in INPUTS:
                results.append(run(inputs, seed, args.steps, os.path.join(tmp, f"{inputs}_{seed}")))
                r = results[-1]
                print(f"{inputs:<15} seed {seed}: WER {r['wer']:.3f} ({r['train_seconds']:.0f} s)", flush=True)
    print("\n| audio input | WER per seed | mean ± std | train s (mean) |\n|---|---|---:|---:|")
    for inputs in INPUTS:
        rows = [r for r in results if r["inputs"] == inputs]
        wers = [r["wer"] for r in rows]
        spread = statistics.stdev(wers) if len(wers) > 1 else 0.0  # the sample std, as every report here
        print(f"| {inputs} | {', '.join(f'{w:.3f}' for w in wers)} | {statistics.fmean(wers):.3f} ± {spread:.3f} | "
              f"{statistics.fmean(r['train_seconds'] for r in rows):.0f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "frozen_inputs", "task": "speech_recognition", "runs": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
