"""The ``moe-gen`` command.

    moe-gen pretrain --config demo                          # a recipe (moe_gen.trainer.recipes) or a YAML file
    moe-gen pretrain --config debug --train.lr 3e-4 --model.flavour tiny --output runs/x
    moe-gen pretrain --config demo --resume                 # continue from the newest checkpoint
    moe-gen pretrain --config demo --overwrite              # start over in a run directory with checkpoints
    moe-gen finetune --from runs/demo/model --tasks digit_counting --train.trainable experts
    moe-gen eval runs/demo/model --tasks digit_classification table_species --limit 50
    moe-gen infer runs/demo/model --task digit_classification --rows 3          # rows of the preset's test split
    moe-gen infer runs/demo/model --task digit_classification --input rows.jsonl
    moe-gen analyze runs/demo/model --tasks digit_classification table_species --out runs/demo/analysis
    torchrun --nproc_per_node 2 scripts/pretrain.py --config debug --train.expert_parallel 2

Dotted overrides set any key of the run configuration: ``--train.<TrainConfig field>``,
``--model.<ModelConfig field>`` (``--model.router.strategy token``), ``--tasks a,b,c``. Values are
read as YAML (numbers, booleans, lists ``[a, b]``, mappings ``{AUDIO: 600}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "load_run_config", "apply_overrides"]


# ---- configuration -----------------------------------------------------------------------------

def _parse_value(text: str):
    import yaml

    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    value = yaml.safe_load(text)
    return value


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Applies ``--a.b.c value`` pairs to a nested dict (in place; returns it)."""
    items = list(overrides)
    i = 0
    while i < len(items):
        key = items[i]
        if not key.startswith("--") or len(key) <= 2:
            raise ValueError(f"expected a --dotted.key before {key!r}")
        key = key[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ValueError(f"--{key} needs a value")
            raw = items[i + 1]
            i += 2
        value = _parse_value(raw)
        path = key.replace("-", "_").split(".")
        if path[0] in ("tasks", "eval_tasks") and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        node = config
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--{key}: {part!r} is not a section (it holds {child!r})")
            node = child
        node[path[-1]] = value
    return config


def load_run_config(name_or_path: str, overrides: Sequence[str] = ()) -> dict:
    """A recipe by name, or a YAML file with the same structure, with dotted overrides applied."""
    from moe_gen.trainer.recipes import get_recipe

    if name_or_path.endswith((".yaml", ".yml")) or os.path.exists(name_or_path):
        import yaml

        with open(name_or_path) as f:
            config = yaml.safe_load(f) or {}
        base = get_recipe(config.pop("recipe")) if "recipe" in config else {}
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key].update(value)
            else:
                base[key] = value
        config = base
    else:
        config = get_recipe(name_or_path)
    config = apply_overrides(config, overrides)
    known = {"model", "train", "tasks", "eval_tasks", "output_dir", "baseline"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown run configuration keys {unknown}; known: {', '.join(sorted(known))}")
    return config


def _model_config(section: dict):
    from moe_gen.model import ModelConfig, flavour

    section = dict(section)
    name = section.pop("flavour", "debug")
    base = flavour(name).to_dict()
    for key, value in section.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return ModelConfig.from_dict(base)


def _tasks(names: Sequence[str], split: str):
    from moe_gen.tasks import load_preset

    if not names:
        raise ValueError("the run configuration names no tasks (set tasks: or --tasks a,b)")
    return [load_preset(name, split) for name in names]


# ---- output ------------------------------------------------------------------------------------

def metric_table(results: dict, baseline: Optional[dict] = None) -> str:
    """A Markdown table: task, metric, the baseline before training (if given), trained."""
    from moe_gen.trainer.evaluation import LOWER_IS_BETTER

    header = "| task | metric | before training | trained |" if baseline else "| task | metric | value |"
    lines = [header, "|---|---|---:|---:|" if baseline else "|---|---|---:|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            label = metric + (" (lower is better)" if metric in LOWER_IS_BETTER else "")
            if baseline:
                before = baseline.get(task, {}).get(metric)
                lines.append(f"| {task} | {label} | {before:.3f} | {value:.3f} |")
            else:
                lines.append(f"| {task} | {label} | {value:.3f} |")
    return "\n".join(lines)


def _say(*args) -> None:
    from moe_gen import distributed

    if distributed.is_main_process():
        print(*args, flush=True)


# ---- commands ----------------------------------------------------------------------------------

def _train(config: dict, model=None, resume: bool = False, overwrite: bool = False) -> dict:
    """Shared by pretrain and finetune: build (or take) the model, train, evaluate, save."""
    import torch

    from moe_gen import distributed
    from moe_gen.model import GeneralistModel
    from moe_gen.tasks import Tokenizer
    from moe_gen.trainer import TrainConfig, Trainer

    train_config = TrainConfig.from_dict(config.get("train", {}))
    tasks = _tasks(config.get("tasks", []), "train")
    eval_tasks = _tasks(config.get("eval_tasks") or config.get("tasks", []), "test")
    output_dir = config.get("output_dir", "runs/default")
    if train_config.num_threads:
        torch.set_num_threads(train_config.num_threads)
    if model is None:
        torch.manual_seed(train_config.seed)
        model = GeneralistModel.build(_model_config(config.get("model", {})), tasks, Tokenizer.default())
    trainer = Trainer(model, tasks, train_config, output_dir=output_dir, eval_tasks=eval_tasks, resume=resume,
                      overwrite=overwrite)
    baseline = None
    if config.get("baseline") and trainer.resumed_from is None:
        _say(f"evaluating the model before training on {len(eval_tasks)} tasks ...")
        baseline = trainer.evaluate()
    _say(f"training {model.num_parameters():,} parameters ({model.num_parameters(active=True):,} active per token; "
         f"{trainer.num_trainable:,} trainable) on {len(tasks)} tasks; logs in {output_dir}/logs, "
         f"checkpoints in {output_dir}/checkpoints" + (f"; resumed from {trainer.resumed_from}"
                                                       if trainer.resumed_from else ""))
    summary = trainer.fit()
    last = "" if summary["loss"] is None else f"; last loss {summary['loss']:.4f}"
    _say(f"trained to step {summary['step']} in {summary['seconds']:.0f} s "
         f"({summary['skipped_steps']} steps skipped){last}")
    results = trainer.evaluate()
    model_dir = os.path.join(output_dir, "model")
    trainer.save_model(model_dir)
    if distributed.is_main_process():
        with open(os.path.join(output_dir, "eval.json"), "w") as f:
            json.dump({"trained": results, "before_training": baseline, "summary": summary}, f, indent=2)
    _say(metric_table(results, baseline))
    _say(f"saved the model to {model_dir} (load it with GeneralistModel.from_pretrained)")
    return {"results": results, "baseline": baseline, "summary": summary, "model_dir": model_dir}


def _cmd_pretrain(args, overrides) -> int:
    from moe_gen import distributed

    config = load_run_config(args.config, overrides)
    if args.output:
        config["output_dir"] = args.output
    distributed.init_distributed()
    _train(config, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_finetune(args, overrides) -> int:
    from moe_gen import distributed
    from moe_gen.model import GeneralistModel

    config = load_run_config(args.config, overrides)
    if args.tasks:
        config["tasks"] = list(args.tasks)
    if args.output:
        config["output_dir"] = args.output
    if config.get("model"):
        raise ValueError("finetune takes the model from --from; drop the model: section / --model.* overrides")
    distributed.init_distributed()
    model = GeneralistModel.from_pretrained(getattr(args, "from"))
    _train(config, model=model, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_eval(args, overrides) -> int:
    from moe_gen.model import GeneralistModel
    from moe_gen.trainer.evaluation import evaluate

    if overrides:
        raise ValueError(f"eval takes no overrides, got {' '.join(overrides)}")
    model = GeneralistModel.from_pretrained(args.model_dir)
    names = args.tasks or list(model.config.tasks)
    results = evaluate(model, _tasks(names, args.split), limit=args.limit)
    print(metric_table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _cmd_infer(args, overrides) -> int:
    from moe_gen.model import GeneralistModel
    from moe_gen.tasks import load_preset
    from moe_gen.tasks.task import load_jsonl

    if overrides:
        raise ValueError(f"infer takes no overrides, got {' '.join(overrides)}")
    model = GeneralistModel.from_pretrained(args.model_dir)
    task = load_preset(args.task, "test")
    rows = load_jsonl(args.input) if args.input else [task.data[i] for i in range(min(args.rows, len(task)))]
    for i, prediction in enumerate(model.infer(task, rows, beams=args.beams)):
        out = {"row": i, "text": prediction.text, "box": prediction.box, "score": round(prediction.score, 4)}
        if prediction.frames is not None:
            out["frames"] = list(prediction.frames.shape)
        print(json.dumps({k: v for k, v in out.items() if v is not None}))
    return 0


def _cmd_analyze(args, overrides) -> int:
    from moe_gen.analysis.report import main as analyze

    return analyze([*args.rest, *overrides])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-gen", description="Generalist multimodal MoE models: train, "
                                     "fine-tune, evaluate, infer.", epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    sub_kwargs = {"allow_abbrev": False}
    p = sub.add_parser("pretrain", **sub_kwargs, help="train a model from scratch on a task mixture")
    p.add_argument("--config", default="demo", help="recipe name or YAML file (default: demo)")
    p.add_argument("--output", help="run directory (default: the recipe's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    p.add_argument("--overwrite", action="store_true", help="start over, deleting the run directory's checkpoints")
    p = sub.add_parser("finetune", **sub_kwargs, help="continue training a saved model, possibly on new tasks")
    p.add_argument("--from", required=True, help="a directory written by save_pretrained")
    p.add_argument("--config", default="finetune")
    p.add_argument("--tasks", nargs="+", help="preset names to fine-tune on")
    p.add_argument("--output")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("eval", **sub_kwargs, help="per-task metrics of a saved model")
    p.add_argument("model_dir")
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", help="also write the metrics as JSON here")
    p = sub.add_parser("infer", **sub_kwargs, help="answers of a saved model for rows of a task")
    p.add_argument("model_dir")
    p.add_argument("--task", required=True)
    p.add_argument("--input", help="a JSONL file of rows (default: rows of the preset's test split)")
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--beams", type=int, default=1)
    p = sub.add_parser("analyze", **sub_kwargs, help="routing analysis report of a saved model (see --help)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    command = {"pretrain": _cmd_pretrain, "finetune": _cmd_finetune, "eval": _cmd_eval, "infer": _cmd_infer,
               "analyze": _cmd_analyze}
    try:
        return command[args.command](args, overrides)
    except ValueError as exc:
        print(f"moe-gen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
