"""Evaluations while training (``TrainConfig.eval_every``): the best one's step and score, its
weights kept in ``best/`` (``keep_best``) and the stop when evaluations stop improving
(``patience``). A part of ``Trainer`` (whose state, evaluation and saving it uses), kept apart
from the training loop."""

from __future__ import annotations

import math
import os
import shutil
from typing import Optional

import torch

from moe_gen import distributed
from moe_gen.trainer.checkpoint import CheckpointError
from moe_gen.trainer.evaluation import eval_score
from moe_gen.trainer.logs import RunLogger, iter_jsonl_log

__all__ = ["EvaluationWhileTraining"]


class EvaluationWhileTraining:
    """``Trainer``'s evaluations while training; it reads the trainer's ``config``, ``state``,
    ``step``, ``rank``, ``device``, ``output_dir`` and ``best_dir`` and calls its ``evaluate``,
    ``save_checkpoint`` and ``save_model``."""

    def _evaluate_while_training(self, step: int, logger: RunLogger) -> None:
        """``eval_every``: evaluates the eval tasks, logs the result and, with ``keep_best``, saves the
        weights to ``best/`` when its ``eval_score`` beats every earlier one (every process calls it:
        FSDP's gathers and the experts' all-to-all are collectives). Its random draws are its own,
        so the training after it is the same as without it. An evaluation that fails stops the run
        after a checkpoint of the step."""
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                results = self.evaluate()
            score = eval_score(results, self.config.best_metric)
        except Exception as exc:  # the steps trained so far are kept before the run stops
            path = self.save_checkpoint()
            exc.add_note(f"[moe_gen] the evaluation at step {step} (TrainConfig.eval_every) failed; training "
                         f"stopped" + (f", its checkpoint is {path}" if path else ", and its checkpoint failed"))
            raise
        self.last_evaluation, self.state["evaluated"] = (step, results), step
        best, since = self.state["best"], self.state["evals_since_best"]
        # process 0's decision for all (their scores agree, and keep_best's save is collective). The
        # state says so before keep_best saves: with expert parallelism the save writes a checkpoint
        # first, which recorded the earlier best before the twenty-seventh session's audit.
        if distributed.any_true(self.rank == 0 and _better(score, best)):
            self.state["best"], self.state["evals_since_best"] = {"step": step, "score": score}, 0
            if not self._keep(step):
                self.state["best"], self.state["evals_since_best"] = best, since + 1
        else:
            self.state["evals_since_best"] += 1
        best = self.state["best"]
        logger.log_eval({"step": step, "eval": results, "eval_score": score,
                         **({"best_step": best["step"], "best_score": best["score"]} if best else {})})

    def _check_best_dir(self) -> None:
        """On resume with ``keep_best``: ``best/`` saved after the checkpoint resumed from (the run
        log's evaluations past it name a later best) holds weights of steps this run trains again,
        where it may train otherwise (another ``lr``, more ``steps``). It is moved aside to
        ``best.discarded-step-N`` with a warning, and the summary names no best model until this run
        saves one (before the twenty-seventh session's audit ``fit`` named ``best/`` for an earlier
        step's best while it held the discarded step's weights)."""
        path = os.path.join(self.output_dir, "logs", "eval.jsonl")
        later = [record.get("best_step") for record in (iter_jsonl_log(path) if os.path.exists(path) else ())
                 if record.get("step", 0) > self.step]
        saved = max((b for b in later if isinstance(b, int) and b > self.step), default=None)
        if saved is None or not os.path.isdir(self.best_dir):
            return
        aside = f"{self.best_dir}.discarded-step-{saved}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(self.best_dir, aside)
        print(f"[moe_gen] {self.best_dir} held step {saved}'s weights, saved after the checkpoint of step "
              f"{self.step} this run resumes from; moved to {aside}. The best evaluation up to step {self.step} "
              f"(step {(self.state['best'] or {}).get('step')}) has no weights kept; the next better one is saved",
              flush=True)

    def _keep(self, step: int) -> bool:
        """With ``keep_best``, saves the weights to ``best/``; False when that failed (a full disk):
        the run goes on, and the next better evaluation tries again."""
        if not self.config.keep_best:
            return True
        try:
            self.save_model(self.best_dir)
        except (OSError, CheckpointError) as exc:
            print(f"[moe_gen] the weights of step {step}, the best evaluation so far, were not saved to "
                  f"{self.best_dir} ({exc}); training goes on", flush=True)
            return False
        return True

    def _out_of_patience(self) -> bool:
        """Whether ``patience`` evaluations in a row have not beaten the best one (the run stops)."""
        return 0 < self.config.patience <= self.state["evals_since_best"]

    def _best_summary(self) -> dict:
        """``fit``'s summary of the evaluations while training: the best one's step and score, the
        weights kept of it (``keep_best``) and whether the run stopped early (``patience``)."""
        if not self.config.eval_every:
            return {}
        best = self.state["best"] or {}
        return {"best_step": best.get("step"), "best_score": best.get("score"),
                **({"best_model": self.best_dir if best and os.path.isdir(self.best_dir) else None}
                   if self.config.keep_best else {}),
                **({"stopped_early": self._out_of_patience()} if self.config.patience else {})}


def _better(score: float, best: Optional[dict]) -> bool:
    """Whether ``score`` beats the best evaluation so far (a NaN score never does, and any number
    beats a NaN best)."""
    if math.isnan(score):
        return best is None
    return best is None or math.isnan(best["score"]) or score > best["score"]
