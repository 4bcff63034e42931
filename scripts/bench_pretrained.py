"""Pretrained backbones: what loading costs, whether the conversions are exact on the full
checkpoints, and whether a pretrained, upcycled generalist beats one trained from scratch.

    python scripts/bench_pretrained.py                      # all three parts (about 35 minutes)
    python scripts/bench_pretrained.py --part load          # seconds and peak RSS of each from_hf
    python scripts/bench_pretrained.py --part conformance   # full models vs transformers
    python scripts/bench_pretrained.py --part quality --seconds 240 --seeds 0 1 2

Parts:
- ``load``: ``from_hf`` of each shipped checkpoint in a fresh process (seconds, peak RSS, parameters).
- ``conformance``: the converted dense models against transformers on the *whole* checkpoints
  (the tests cut SmolLM2 to 4 layers): max |difference| of MiniLM hidden states, SmolLM2 logits
  (30 layers) and Whisper encoder states / decoder logits on a padded batch, and Whisper's greedy
  transcripts of the 8 real recordings against transformers' greedy tokens.
- ``quality``: generalists on the text-bearing built-in tasks (doc_topic, table_species,
  table_qa, table_to_text, speech_recognition), each trained for the same wall time (steps set
  from a timed calibration of each system), scored on the held-out test splits:
  ``pretrained`` (MiniLM upcycled: every other FFN into 8 attribute-routed experts, top-2, a new
  2-block decoder), ``scratch-same`` (the same widths, depths and MoE layers, randomly
  initialised, moe_gen's own tokenizer), ``scratch-tiny`` (the demo's tiny flavour, attribute
  routing: more steps in the same time).

Prints tables and writes JSON (``--json``, default ``runs/bench_pretrained.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

QUALITY_TASKS = ["doc_topic", "table_species", "table_qa", "table_to_text", "speech_recognition"]
SYSTEMS = ["pretrained", "scratch-same", "scratch-tiny"]
LEARNING_RATES = {"pretrained": 1e-3, "scratch-same": 1e-3, "scratch-tiny": 2e-3}
# The pretrained system's checkpoint weights (encoder, token and position tables, embedding norm)
# train at a tenth of the rate of what is new (decoder, adapters, routers, heads).
PRETRAINED_LR_SCALES = {"encoder.": 0.1, "token_embedding": 0.1, "position_embedding": 0.1, "embedding_norm": 0.1}
UPCYCLE = dict(num_experts=8, top_k=2, router="attribute", layers="every_other")


# ---- load ----------------------------------------------------------------------------------------


def load_one(name: str) -> dict:
    """``from_hf(name)`` in this (fresh) process: seconds, peak RSS, parameters."""
    start = time.perf_counter()
    from moe_gen.pretrained import from_hf

    imported = time.perf_counter()
    model = from_hf(name)
    done = time.perf_counter()
    return {"checkpoint": name, "import_seconds": imported - start, "load_seconds": done - imported,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "parameters": model.num_parameters(), "layout": model.config.layout}


def part_load(names) -> list[dict]:
    rows = []
    for name in names:
        # the parent's thread count (--threads), which the child process would not inherit otherwise
        out = subprocess.run([sys.executable, __file__, "--load-one", name, "--threads", str(torch.get_num_threads())],
                             capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"checkpoint": name, "error": out.stderr.strip().splitlines()[-1]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n| checkpoint | layout | parameters | import s | from_hf s | peak RSS MiB |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['checkpoint']} | error: {r['error']} | | | | |")
        else:
            print(f"| {r['checkpoint']} | {r['layout']} | {r['parameters'] / 1e6:.1f}M | {r['import_seconds']:.1f} | "
                  f"{r['load_seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    return rows


# ---- conformance ---------------------------------------------------------------------------------


def _text_side(model, ids):
    """Token sequences as an input side of ``model`` (right-padded)."""
    from moe_gen.tasks.batch import Side

    return Side.from_token_ids(ids, model.tokenizer.pad_id, model.config.moe.router.num_modalities)


SENTENCES = ["The capital of France is Paris.", "A man is playing a guitar on the street at night.",
             "Zürich's café serves crème brûlée.", "hi"]


def part_conformance() -> list[dict]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from moe_gen.pretrained import from_hf, locate
    from moe_gen.pretrained.ctranslate2 import greedy_decode, load_whisper, prompt_ids
    from moe_gen.tasks import HFTokenizer, Task, collate
    from moe_gen.tasks.sources.speech import load_real_clips

    rows = []
    with torch.no_grad():
        path = locate("minilm")
        reference, model = AutoModel.from_pretrained(path).eval(), from_hf(path).eval()
        side = _text_side(model, [model.tokenizer.encode(s, add_bos=True, add_eos=True) for s in SENTENCES])
        ours = model.encode(side).hidden
        theirs = reference(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).last_hidden_state
        valid = ~side.padding_mask
        rows.append({"checkpoint": "minilm", "compared": "final hidden states",
                     "max_abs_diff": float((ours - theirs)[valid].abs().max())})

        path = locate("smollm2")
        folder, name = os.path.dirname(path), os.path.basename(path)
        reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        hf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = from_hf(reference, tokenizer=HFTokenizer.from_pretrained(hf_tokenizer)).eval()
        side = _text_side(model, [hf_tokenizer(s, add_special_tokens=False).input_ids for s in SENTENCES])
        V = reference.config.vocab_size
        ours = model.output_logits(model.encode(side).hidden)[..., :V]
        theirs = reference(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).logits
        valid = ~side.padding_mask
        rows.append({"checkpoint": "smollm2", "compared": f"logits, {model.config.decoder_layers} layers",
                     "max_abs_diff": float((ours - theirs)[valid].abs().max())})
        del reference, model

        path = locate("whisper-tiny.en")
        reference, _, extractor = load_whisper(path)
        clips = [{"audio": r["audio"], "text": r["text"]} for r in load_real_clips()]
        task = Task("transcribe", "[AUDIO:audio,preprocess=whisper_mel,adaptor=whisper_conv] -> <|notimestamps|> "
                                  "[TEXT:text]", clips)
        model = from_hf(reference, [task], tokenizer=HFTokenizer.from_pretrained(path)).eval()
        batch = collate(list(task.samples(model.tokenizer, training=False))[:3], model.tokenizer, model.task_ids)
        features = torch.cat([extractor(c["audio"], sampling_rate=16000, return_tensors="pt").input_features
                              for c in clips[:3]])
        enc_ours = model.encode(batch.encoder).hidden
        enc_theirs = reference.model.encoder(features).last_hidden_state
        audio = batch.encoder.index["whisper_conv"]
        enc_diff = (enc_ours.reshape(-1, enc_ours.shape[-1])[audio] - enc_theirs.reshape(-1, enc_theirs.shape[-1]))
        V = model.tokenizer.base_vocab_size
        logits = model(batch).logits[..., :V]
        ref_logits = reference(input_features=features, decoder_input_ids=batch.decoder.tokens).logits[..., :V]
        valid = ~batch.decoder.padding_mask
        rows.append({"checkpoint": "whisper-tiny.en", "compared": "encoder states",
                     "max_abs_diff": float(enc_diff.abs().max())})
        rows.append({"checkpoint": "whisper-tiny.en", "compared": "decoder logits (padded batch of 3)",
                     "max_abs_diff": float((logits - ref_logits)[valid].abs().max())})
        predictions = model.infer(task, task.data, max_new_tokens=24)
        same = 0
        for clip, prediction in zip(clips, predictions):
            features = extractor(clip["audio"], sampling_rate=16000, return_tensors="pt").input_features
            same += prediction.tokens == greedy_decode(reference, features, prompt_ids(reference))[:-1]
        rows.append({"checkpoint": "whisper-tiny.en", "compared": "greedy transcripts equal to transformers'",
                     "equal": f"{same}/{len(clips)}",
                     "transcripts": [p.text for p in predictions]})
    print("\n| checkpoint | compared | max abs diff |\n|---|---|---:|")
    for r in rows:
        value = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else r["equal"]
        print(f"| {r['checkpoint']} | {r['compared']} | {value} |")
    return rows


# ---- quality ------------------------------------------------------------------------------------


def _build(system: str, tasks, seed: int):
    from moe_gen.config import RouterConfig
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.pretrained import from_hf, upcycle
    from moe_gen.tasks import Tokenizer

    torch.manual_seed(seed)
    if system == "pretrained":
        model = from_hf("minilm", tasks, decoder_layers=2, dropout=0.1)
        upcycle(model, **UPCYCLE, seed=seed)
        return model
    if system == "scratch-same":  # MiniLM's widths and depths, the upcycled model's MoE layers
        config = flavour("tiny", d_model=384, num_heads=12, encoder_layers=6, decoder_layers=2, ffn_hidden=1536,
                         max_positions=512, dropout=0.1,
                         moe=dict(expert_hidden=1536, num_experts=8, top_k=2, every=2,
                                  router=RouterConfig(strategy="attribute")))
    else:
        config = flavour("tiny", dropout=0.1, moe={"router": RouterConfig(strategy="attribute")})
    return GeneralistModel.build(config, tasks, Tokenizer.default())


def _train_config(system: str, steps: int, seed: int, batch_size: int):
    from moe_gen.trainer import TrainConfig

    return TrainConfig(steps=steps, batch_size=batch_size, lr=LEARNING_RATES[system],
                       lr_scales=PRETRAINED_LR_SCALES if system == "pretrained" else {},
                       warmup_steps=max(1, min(30, steps // 10)), mixing="uniform", seed=seed, progress=False,
                       tensorboard=False, checkpoint_every=0, log_every=max(1, steps // 4), eval_limit=60)


def _seconds_per_step(system: str, tasks, batch_size: int) -> float:
    """Timed on 6 steps after 2 warm-up steps of a throwaway model."""
    from moe_gen.trainer import Trainer

    model = _build(system, tasks, seed=1234)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, tasks, _train_config(system, 8, 1234, batch_size), output_dir=run_dir)
        trainer.train_step(0)
        trainer.train_step(1)
        start = time.perf_counter()
        for step in range(2, 8):
            trainer.train_step(step)
        seconds = (time.perf_counter() - start) / 6
        trainer.close()
        return seconds


def part_quality(seconds: float, seeds, batch_size: int, systems=tuple(SYSTEMS)) -> dict:
    from moe_gen.quality.runner import held_out
    from moe_gen.tasks import load_preset
    from moe_gen.trainer import Trainer
    from moe_gen.trainer.evaluation import evaluate_task

    train = [load_preset(n, "train") for n in QUALITY_TASKS]
    test = [held_out(load_preset(n, "test"), 60) for n in QUALITY_TASKS]
    metrics = {t.name: t.metrics[0] for t in test}
    per_step = {s: _seconds_per_step(s, train, batch_size) for s in systems}
    steps = {s: max(10, int(seconds / per_step[s])) for s in systems}
    print(f"\nseconds per step (batch {batch_size}): " + ", ".join(f"{s} {per_step[s]:.2f}" for s in systems))
    print(f"steps in the budget of {seconds:.0f} s: " + ", ".join(f"{s} {steps[s]}" for s in systems))
    runs = []
    for seed in seeds:
        for system in systems:
            model = _build(system, train, seed)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as run_dir:
                with Trainer(model, train, _train_config(system, steps[system], seed, batch_size),
                             output_dir=run_dir) as trainer:
                    summary = trainer.fit()
            trained = time.perf_counter() - start
            scores = {t.name: evaluate_task(model, t)[metrics[t.name]] for t in test}
            runs.append({"system": system, "seed": seed, "steps": steps[system], "train_seconds": trained,
                         "final_loss": summary["loss"], "scores": scores,
                         "active_parameters": model.num_parameters(active=True),
                         "parameters": model.num_parameters()})
            print(f"  seed {seed} {system}: {trained:.0f} s, " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
                  flush=True)
    table = {}
    print("\n| task | metric | " + " | ".join(systems) + " |\n|---|---|" + "---:|" * len(systems))
    for name in QUALITY_TASKS:
        cells = []
        for system in systems:
            values = [r["scores"][name] for r in runs if r["system"] == system]
            mean = statistics.mean(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            table.setdefault(name, {})[system] = {"mean": mean, "std": spread, "values": values}
            cells.append(f"{mean:.3f} ± {spread:.3f}")
        print(f"| {name} | {metrics[name]} | " + " | ".join(cells) + " |")
    print("\n| system | active parameters | parameters | steps | train s |\n|---|---:|---:|---:|---:|")
    for system in systems:
        first = next(r for r in runs if r["system"] == system)
        train_s = statistics.mean(r["train_seconds"] for r in runs if r["system"] == system)
        print(f"| {system} | {first['active_parameters'] / 1e6:.1f}M | {first['parameters'] / 1e6:.1f}M | "
              f"{steps[system]} | {train_s:.0f} |")
    return {"seconds_budget": seconds, "seconds_per_step": per_step, "steps": steps, "runs": runs, "table": table,
            "metrics": metrics, "learning_rates": LEARNING_RATES, "pretrained_lr_scales": PRETRAINED_LR_SCALES,
            "upcycle": UPCYCLE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["load", "conformance", "quality", "all"], default="all")
    parser.add_argument("--seconds", type=float, default=240.0, help="training wall time per system and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default="runs/bench_pretrained.json")
    parser.add_argument("--load-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load_one:
        print(json.dumps(load_one(args.load_one)))
        return 0
    results: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.part in ("load", "all"):
        results["load"] = part_load(["minilm", "smollm2", "whisper-tiny.en"])
    if args.part in ("conformance", "all"):
        results["conformance"] = part_conformance()
    if args.part in ("quality", "all"):
        results["quality"] = part_quality(args.seconds, args.seeds, args.batch_size, args.systems)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
