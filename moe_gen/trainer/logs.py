"""Run logs: one JSON object per logged step (``logs/train.jsonl``), one per evaluation while
training (``logs/eval.jsonl``, ``TrainConfig.eval_every``), TensorBoard scalars (``tensorboard/``)
and a tqdm progress bar with loss, tokens/s, modality shares and ETA.

Records with per-layer expert loads (``expert_load``: layer → shares) are written with the
utilisation of each layer beside them (``expert_utilisation``: share of the layer's experts taking
at least 1/(4E) of its assignments, ``moe_gen.analysis.stats.utilisation``) and its mean over the
layers (``mean_expert_utilisation``)."""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import torch

from moe_gen.analysis.stats import json_ready, utilisation

__all__ = ["RunLogger", "iter_jsonl_log", "read_jsonl_log", "expert_utilisation", "routing_summary"]

# Short names for the progress bar.
_SHORT = {"TEXT": "txt", "IMAGE": "img", "AUDIO": "aud", "VIDEO": "vid", "MOTION": "mot", "BOX": "box",
          "STRUCT": "tab", "PHONE": "phn", "CATEGORY": "cat"}


def iter_jsonl_log(path: str) -> Iterator[dict]:
    """The records of a JSONL log one at a time (a torn last line, from a killed run, ends them)."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return


def read_jsonl_log(path: str) -> list[dict]:
    """The records of a JSONL log (a torn last line, from a killed run, is ignored)."""
    return list(iter_jsonl_log(path))


def _keep_records_up_to(path: str, step: int) -> None:
    """Rewrites the JSONL log at ``path`` with its records of steps up to ``step``, one record at a
    time (before the fourteenth audit the whole log was read into memory first: 1.4 GB for 80,000
    logged steps of a 12-layer, 32-expert model)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as kept:
        for record in iter_jsonl_log(path):
            if record.get("step", 0) <= step:
                kept.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def expert_utilisation(load: dict[str, list[float]]) -> dict:
    """``{"expert_utilisation": {layer: share}, "mean_expert_utilisation": mean}`` from per-layer
    expert-load shares (layers of any expert count)."""
    per_layer = {name: float(utilisation(torch.tensor([shares], dtype=torch.float64))[0])
                 for name, shares in load.items()}
    mean = sum(per_layer.values()) / len(per_layer) if per_layer else 0.0
    return {"expert_utilisation": {k: round(v, 4) for k, v in per_layer.items()},
            "mean_expert_utilisation": round(mean, 4)}


class RunLogger:
    """Writes logs on the main process only (``enabled=False`` elsewhere).

    Args:
        output_dir: the run directory.
        total_steps, start_step: for the progress bar.
        enabled: write anything at all (the main process).
        progress, tensorboard: optional outputs.
        resume_step: when resuming, log lines after this step (written by the interrupted run
            after its last checkpoint) are dropped so the log reads like one uninterrupted run.
    """

    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0, *, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True, resume_step: Optional[int] = None) -> None:
        self.enabled = enabled
        self.path = os.path.join(output_dir, "logs", "train.jsonl")
        self.eval_path = os.path.join(output_dir, "logs", "eval.jsonl")
        self._bar = self._tb = self._file = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for path in (self.path, self.eval_path):
            if resume_step is not None and os.path.exists(path):
                _keep_records_up_to(path, resume_step)
            elif resume_step is None and os.path.exists(path):
                os.remove(path)  # a fresh run starts fresh logs
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is optional
                print("[moe_gen] tensorboard is not installed; logging to JSONL only", flush=True)
            else:
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        """Writes one step's record (flat scalars plus nested dicts/lists for loads)."""
        if not self.enabled:
            return
        if record.get("expert_load") and "expert_utilisation" not in record:
            record = {**record, **expert_utilisation(record["expert_load"])}
        # strict JSON (any parser reads it): a skipped step's NaN loss or norm is written as null
        self._file.write(json.dumps(json_ready(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{key}/{sub}", v, step)
        if self._bar is not None:
            shares = " ".join(f"{_SHORT.get(m, m.lower())}{100 * s:.0f}%"
                              for m, s in sorted(record.get("modality_share", {}).items(), key=lambda kv: -kv[1]))
            self._bar.set_postfix_str(f"loss {record['loss']:.3f} {record['tokens_per_s']:.0f} tok/s "
                                      f"imb {record.get('expert_imbalance', 0):.2f} {shares}", refresh=False)

    def log_eval(self, record: dict) -> None:
        """Writes one evaluation while training (``{"step", "eval": {task: {metric: value}},
        "eval_score", ...}``) to ``logs/eval.jsonl`` and TensorBoard (``eval/<task>/<metric>``,
        ``eval/score``), and prints its score above the progress bar."""
        if not self.enabled:
            return
        with open(self.eval_path, "a") as f:
            f.write(json.dumps(json_ready(record), allow_nan=False) + "\n")
        if self._tb is not None:
            for task, scores in record["eval"].items():
                for metric, value in scores.items():
                    self._tb.add_scalar(f"eval/{task}/{metric}", value, record["step"])
            self._tb.add_scalar("eval/score", record["eval_score"], record["step"])
        if self._bar is not None:
            self._bar.write(f"[moe_gen] step {record['step']}: eval_score {record['eval_score']:.4f}"
                            + (f" (best: step {record['best_step']})" if record.get("best_step") else ""))

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def routing_summary(tables) -> dict:
    """Per-step routing numbers for the log from a ``RoutingRecorder``'s tables: expert-load shares per
    layer, their mean imbalance (max/mean), per modality the imbalance of its own assignments
    (averaged over layers), and dropped tokens."""
    counts_LEM = tables.counts_LETMR.sum((2, 4))
    load, exact, imbalance = {}, {}, []
    by_modality: dict[str, list[float]] = {}
    for layer, (name, E) in enumerate(zip(tables.layer_names, tables.num_experts)):
        counts_E = counts_LEM[layer, :E].sum(-1)
        if counts_E.sum() > 0:
            exact[name] = [float(c) for c in counts_E / counts_E.sum()]
            load[name] = [round(c, 4) for c in exact[name]]  # the log's shares; utilisation from the exact ones
            imbalance.append(float(counts_E.max() / counts_E.mean()))
        for m, modality in enumerate(tables.modality_names):
            counts_e = counts_LEM[layer, :E, m]
            if counts_e.sum() > 0:
                by_modality.setdefault(modality, []).append(float(counts_e.max() / counts_e.mean()))
    return {"expert_load": load, **expert_utilisation(exact),
            "expert_imbalance": sum(imbalance) / len(imbalance) if imbalance else 0.0,
            "modality_expert_imbalance": {m: round(sum(v) / len(v), 4) for m, v in by_modality.items()},
            "dropped_tokens": int(tables.dropped_LTMR.sum())}
