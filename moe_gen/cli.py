"""The ``moe-gen`` command.

    moe-gen pretrain --config demo                          # a recipe (moe_gen.trainer.recipes) or a YAML file
    moe-gen pretrain --config debug --train.lr 3e-4 --model.flavour tiny --output runs/x
    moe-gen pretrain --config demo --resume                 # continue from the newest checkpoint
    moe-gen pretrain --config demo --overwrite              # start over in a run directory with checkpoints
    moe-gen pretrain --config demo-pretrained               # the demo's tasks on MiniLM, upcycled (make pretrained)
    moe-gen pretrain --config debug --model null --model.init hf:PATH --model.upcycle '{num_experts: 8, top_k: 2}'
    moe-gen finetune --from runs/demo/model --tasks digit_counting --train.trainable experts
    moe-gen eval runs/demo/model --tasks digit_classification table_species --limit 50
    moe-gen infer runs/demo/model --task digit_classification --rows 3          # rows of the preset's test split
    moe-gen infer runs/demo/model --task digit_classification --input rows.jsonl
    moe-gen analyze runs/demo/model --tasks digit_classification table_species --out runs/demo/analysis
    moe-gen presets                                         # built-in tasks: instruction, metrics, source, licence
    moe-gen presets text_to_sql --json
    torchrun --nproc_per_node 2 scripts/pretrain.py --config debug --train.expert_parallel 2

Dotted overrides set any key of the run configuration: ``--train.<TrainConfig field>``,
``--model.<ModelConfig field>`` (``--model.moe.router.strategy token``,
``--model.moe.num_experts 8``), ``--tasks a,b,c``. Values are read as YAML (numbers, booleans,
lists ``[a, b]``, mappings ``{AUDIO: 600}``), as the same text in a run file is. Settings are checked
before anything trains.

Exit status: 0 when the run finished with its model and last checkpoint saved; 1 when it stopped or
could not save everything (the run directory in use by another run, checkpoint writes failing, a
full disk: the message says what was and was not saved); 2 for configuration and data errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Optional, Sequence

from moe_gen.config import merge
from moe_gen.durable import atomic_open
from moe_gen.model_section import _init_section, _model_config, _model_section, _pretrained_model  # noqa: F401

__all__ = ["main", "load_run_config", "apply_overrides", "RunIncomplete"]


# ---- configuration -----------------------------------------------------------------------------

# YAML 1.1 (PyYAML's) reads a float only with a dot: ``1e-3`` and ``1e3`` would stay strings. This
# pattern adds the YAML 1.2 (JSON) forms, so ``lr: 1e-3`` in a run file is the number it looks like.
# YAML 1.2 (core schema) numbers, where PyYAML reads YAML 1.1: 1e-3 and .5e3 are floats, 010 is ten
# (1.1: eight, octal), 0o10 is eight
# (digits may be grouped with underscores, 1_000, as Python's int() and float() read them)
_YAML_FLOAT = re.compile(r"^[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?$"
                         r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
_YAML_INT = re.compile(r"^[-+]?[0-9][0-9_]*$|^0o[0-7]+$|^0x[0-9a-fA-F]+$")


def yaml_load(stream):
    """``yaml.safe_load`` with YAML 1.2's numbers (``1e-3``, ``.5e3`` floats; ``010`` ten, not
    eight), as the dotted flags read them, and a key repeated in a mapping refused."""
    import yaml

    class _Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            _refuse_repeated_keys(self, node)
            return super().construct_mapping(node, deep=deep)

    _Loader.yaml_implicit_resolvers = {  # every resolver but 1.1's int and float
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    _Loader.add_implicit_resolver(_INT_TAG, _YAML_INT, list("-+0123456789"))
    _Loader.add_implicit_resolver(_FLOAT_TAG, _YAML_FLOAT, list("-+.0123456789"))
    _Loader.add_constructor(_INT_TAG, lambda loader, node: _yaml12_int(loader.construct_scalar(node)))
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


def _refuse_repeated_keys(loader, node) -> None:
    """Raises a YAML error at a mapping's second ``key`` (PyYAML keeps the last of two silently: a
    run file naming ``train:`` twice lost the first section). Keys a ``<<`` merge brings in may be
    overridden, as YAML has it."""
    import yaml

    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark)
        except TypeError:  # an unhashable key: PyYAML's own error names it
            continue
        if first is not key_node.start_mark:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found the key {key!r} a second time (first at line {first.line + 1})", key_node.start_mark)


def _yaml12_int(text: str) -> int:
    text = text.replace("_", "")
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16) if text.startswith("0x") else int(text, 10)


def _parse_value(key: str, text: str):
    """A flag's value read as the same text in a run file is (Python's int() and float(), tried
    first, made ``inf``, ``nan`` and ``Infinity`` numbers on the command line and strings in a file)."""
    import yaml

    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--{key}: cannot read {text!r} as a YAML value ({_yaml_problem(exc)})") from None


def _yaml_problem(exc) -> str:
    """A YAML error in one line: what is wrong and where (line and column, 1-based)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Applies ``--a.b.c value`` pairs to a nested dict (in place; returns it): each sets one key,
    as ``merge`` of ``{a: {b: {c: value}}}`` would, so a mapping value merges into the section it
    names key by key, as YAML over a recipe does; ``--a null`` empties section ``a`` for the flags
    after it (``--model null --model.init hf:PATH``), or mapping field ``a`` (``--train.modality_budget
    null``: a ``{}`` would merge into the recipe's and leave it as it was)."""
    items = list(overrides)
    i = 0
    while i < len(items):
        key = items[i]
        if not key.startswith("--") or len(key) <= 2:
            raise ValueError(f"expected a --dotted.key before {key!r}")
        key = key[2:]
        listed = key.split("=", 1)[0].replace("-", "_") in ("tasks", "eval_tasks")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ValueError(f"--{key} needs a value")
            raw = items[i + 1]
            i += 2
            while listed and i < len(items) and not items[i].startswith("--"):  # --tasks a b, like eval's
                raw += "," + items[i]
                i += 1
        value = _parse_value(key, raw)
        path = key.replace("-", "_").split(".")
        if listed and isinstance(value, str):
            from moe_gen.tasks.presets import preset_names

            value = preset_names([value])
        node = config
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or emptied by --part null
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ValueError(f"--{key}: {part!r} is not a section (it holds {child!r})")
            node = child
        last = path[-1]
        node[last] = merge(node[last], value) if isinstance(value, dict) and isinstance(node.get(last), dict) \
            else value
    return config


def load_run_config(name_or_path: str, overrides: Sequence[str] = ()):
    """A recipe by name, or a YAML file of the same keys (``recipe: NAME`` starts from one), with
    dotted overrides applied: a ``RunConfig`` (``moe_gen.trainer``), every key checked."""
    from moe_gen.trainer.recipes import RECIPES, get_recipe

    # a recipe's name is the recipe, even where a file or folder of that name sits in the working
    # directory (a run's output folder named after its recipe hid it, and --resume failed)
    recipe_name = name_or_path in RECIPES or name_or_path.replace("-", "_") in RECIPES
    if name_or_path.endswith((".yaml", ".yml")) or (not recipe_name and os.path.exists(name_or_path)):
        import yaml

        try:
            with open(name_or_path, encoding="utf-8") as f:
                config = yaml_load(f) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the run configuration {name_or_path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{name_or_path} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{name_or_path} must hold a mapping of run configuration keys (model, train, "
                             f"tasks, ...), not a {type(config).__name__}")
        recipe = config.pop("recipe", None)
        if recipe is not None and not isinstance(recipe, str):
            raise ValueError(f"{name_or_path}: recipe must be a recipe name ({', '.join(RECIPES)}), got {recipe!r}")
        base = get_recipe(recipe).to_dict() if recipe is not None else {}
        config = merge(base, config)
    else:
        config = get_recipe(name_or_path).to_dict()
    return _run_config(apply_overrides(config, overrides))


def _run_config(config: dict):
    """The ``RunConfig`` of a merged dict; errors name the key at fault."""
    from moe_gen.config import unknown_keys
    from moe_gen.trainer import RunConfig

    names = sorted(f.name for f in dataclasses.fields(RunConfig))
    unknown = unknown_keys("run configuration", config, names)
    if unknown:
        from moe_gen.registry import did_you_mean

        raise ValueError(f"unknown run configuration keys {unknown}{did_you_mean(unknown, names)}; "
                         f"known: {', '.join(names)}")
    # friendlier words than RunConfig.from_dict's for the usual mistakes
    known = {"model": dict, "train": dict, "tasks": list, "eval_tasks": list, "output_dir": str, "baseline": bool}
    wanted = {dict: "a mapping", list: "a list of preset names", str: "a string", bool: "true or false"}
    for key, kind in known.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise ValueError(f"run configuration key {key!r} must be {wanted[kind]}, got {value!r}")
    if "output_dir" in config and not config["output_dir"]:  # (null fell back to runs/default)
        raise ValueError(f"run configuration key 'output_dir' must name the run's folder, got {config['output_dir']!r}")
    if isinstance(config.get("model"), dict):  # (keys of run files written before model.moe: where they went)
        config["model"] = _model_section(config["model"])  # a misspelt key is named now, not when the run starts
    return RunConfig.from_dict({k: v for k, v in config.items() if v is not None})


def _tasks(names: Sequence[str], split: str):
    from moe_gen.tasks import load_preset, preset_info

    if not names:
        raise ValueError("the run configuration names no tasks (set tasks: or --tasks a,b)")
    for name in names:  # every name known before any task's data is read
        preset_info(name)
    return [load_preset(name, split) for name in names]


def _own_tasks(names: Sequence[str]) -> str:
    """Why the command line cannot read the model's own tasks ``names`` (trained from Python, not
    built in), and what to use instead (as ``GeneralistModel.infer`` says of them)."""
    listed, first, one = ", ".join(map(repr, names)), names[0], len(names) == 1
    return (f"the model's own {'task' if one else 'tasks'} {listed} {'is' if one else 'are'} not built in: the "
            "command line reads built-in tasks only, and a task's instruction is not saved with the model by "
            f"name; use Python: model.infer(Task({first!r}, instruction, rows), rows), or "
            f"moe_gen.trainer.evaluate_task(model, Task({first!r}, instruction, rows))")


def _model_tasks(model, names: Sequence[str], split: str) -> list:
    """The built-in tasks ``names`` on ``split``, for ``model``: a name that is one of the model's own
    tasks and no built-in one is refused, saying so (it was answered "unknown task", as if misspelt)."""
    from moe_gen.registry import TASKS

    own = [name for name in names if name in model.task_ids and name not in TASKS]
    if own:
        raise ValueError(_own_tasks(own))
    return _tasks(names, split)


# ---- output ------------------------------------------------------------------------------------

def metric_table(results: dict, baseline: Optional[dict] = None) -> str:
    """A Markdown table: task, metric, the baseline before training (if given), trained."""
    from moe_gen.trainer.evaluation import LOWER_IS_BETTER

    header = "| task | metric | before training | trained |" if baseline else "| task | metric | value |"
    lines = [header, "|---|---|---:|---:|" if baseline else "|---|---|---:|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            lower = metric.split("/")[0] in LOWER_IS_BETTER  # (``wer/title``: WER of one text column)
            label = metric + (" (lower is better)" if lower else "")
            if baseline:
                before = baseline.get(task, {}).get(metric)
                lines.append(f"| {task} | {label} | {_number(before)} | {_number(value)} |")
            else:
                lines.append(f"| {task} | {label} | {_number(value)} |")
    return "\n".join(lines)


def _number(value) -> str:
    """A table cell: counts as they are (``skipped``), scores to three decimals."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _say(*args) -> None:
    from moe_gen import distributed

    if distributed.is_main_process():
        print(*args, flush=True)


# ---- commands ----------------------------------------------------------------------------------

class RunIncomplete(RuntimeError):
    """The run stopped or finished without saving everything; the message says what is saved."""


def _build_model(config, tasks, train_config):
    """The run's model: from a checkpoint (``model.init``) or built from its configuration."""
    import torch

    from moe_gen.model import GeneralistModel
    from moe_gen.tasks import Tokenizer

    torch.manual_seed(train_config.seed)
    section = config.model
    if "init" in section:
        return _pretrained_model(section, tasks, train_config.seed)
    return GeneralistModel.build(_model_config(section), tasks, Tokenizer.default())


def _fit(trainer, model, tasks, output_dir: str) -> dict:
    """``trainer.fit()`` with what it trains said before and after."""
    from moe_gen.trainer.checkpoint import CheckpointError
    from moe_gen.trainer.trainer import TrainingDiverged

    _say(f"training {model.num_parameters():,} parameters ({model.num_parameters(active=True):,} active per "
         f"token; {trainer.num_trainable:,} trainable) on {len(tasks)} tasks; logs in {output_dir}/logs, "
         f"checkpoints in {output_dir}/checkpoints" + (f"; resumed from {trainer.resumed_from}"
                                                       if trainer.resumed_from else ""))
    try:
        summary = trainer.fit()
    except CheckpointError as exc:
        raise RunIncomplete(f"{exc}; the model was not saved") from None
    except TrainingDiverged as exc:
        latest = trainer.latest_checkpoint()
        kept = f"the latest checkpoint is {latest}" if latest else "no checkpoint was written"
        raise RunIncomplete(f"training stopped: {exc}; the model was not saved; {kept} (its weights may "
                            "already be non-finite if it was written after the loss diverged)") from None
    last = "" if summary["loss"] is None else f"; last loss {summary['loss']:.4f}"
    failed = f"; {summary['failed_checkpoints']} checkpoint writes failed" if summary["failed_checkpoints"] else ""
    _say(f"trained to step {summary['step']} in {summary['seconds']:.0f} s "
         f"({summary['skipped_steps']} steps skipped){last}{failed}")
    return summary


def _save_model(trainer, summary: dict, model_dir: str) -> str:
    """Saves the trained model (before the final evaluation: an error there keeps it); returns
    what the latest checkpoint is (for messages). Raises ``RunIncomplete`` saying what was saved
    when the write fails."""
    from moe_gen.trainer.checkpoint import CheckpointError

    checkpoint = (f"the latest checkpoint is {summary['checkpoint']} (step {summary['checkpoint_step']})"
                  if summary["checkpoint"] else "no checkpoint was written")
    try:
        trainer.save_model(model_dir)
    except (OSError, CheckpointError) as exc:
        raise RunIncomplete(f"the model was not saved to {model_dir} ({exc}); {checkpoint}") from None
    summary["model"] = model_dir
    return checkpoint


def _final_evaluation(trainer, output_dir: str, model_dir: str) -> dict:
    """``trainer.evaluate()`` after training, the model already saved: an error (a metric that
    cannot score the rows chosen, a row without a reference) raises ``RunIncomplete`` saying so.
    Before the fifteenth audit the model was saved after this evaluation, and its error lost it.
    With ``train.eval_every``, the evaluation of the last step is the one made while training (the
    same tasks and rows; it was computed twice before)."""
    if trainer.last_evaluation is not None and trainer.last_evaluation[0] == trainer.step:
        return trainer.last_evaluation[1]
    try:
        return trainer.evaluate()
    except ValueError as exc:
        raise RunIncomplete(f"the model is saved to {model_dir}, but the evaluation after training failed "
                            f"({exc}); {output_dir}/eval.json was not written") from exc


def _save_results(summary: dict, results: dict, baseline, output_dir: str, model_dir: str) -> None:
    """Writes ``eval.json`` (the main process). Raises ``RunIncomplete`` when the write fails."""
    from moe_gen import distributed

    if distributed.is_main_process():
        try:
            with atomic_open(os.path.join(output_dir, "eval.json")) as f:
                _dump_json({"trained": results, "before_training": baseline, "summary": summary}, f)
        except OSError as exc:
            raise RunIncomplete(f"the model is saved to {model_dir}, but {output_dir}/eval.json was not "
                                f"written ({exc})") from None


def _dump_json(value, f) -> None:
    """Strict JSON, as the logs are: a metric with no value (``digit_fid`` of one image: NaN) is null."""
    from moe_gen.analysis.stats import json_ready

    json.dump(json_ready(value), f, indent=2, allow_nan=False)


def _clear_earlier_results(output_dir: str, model_dir: str, overwrite: bool, source: Optional[str]) -> None:
    """Removes what an earlier run left that this one replaces (the main process): its ``eval.json``
    (it would stand beside this run's logs, naming another model, if this run stops before writing
    its own), and under ``--overwrite`` its model too (its checkpoints are already gone), unless
    that model is the one this run fine-tunes (``source``, ``finetune --from``): a run that fails
    must not take the model it was given with it."""
    from moe_gen import distributed

    if not distributed.is_main_process():
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, "eval.json"))
    given = source is not None and _inside(os.path.realpath(source), os.path.realpath(model_dir))
    if overwrite and os.path.isdir(model_dir) and not given:
        shutil.rmtree(model_dir)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_task_settings(config, model) -> None:
    """The training settings that name tasks, checked against the run's task names before any
    data is read (they were refused only after every split had loaded and the model was built)."""
    from moe_gen.trainer.sampling import check_task_settings

    names = list(config.tasks)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tasks {repeated} are named more than once")
    check_task_settings(config.train, names, model.task_ids if model is not None else ())


def _train(config, model=None, resume: bool = False, overwrite: bool = False, source: Optional[str] = None) -> dict:
    """Shared by pretrain and finetune: build (or take) the model, train, save the model, evaluate,
    save the results. Raises ``RunIncomplete`` (saying what was and was not saved) when the model
    or the last step's checkpoint could not be written, or the final evaluation failed."""
    import torch

    from moe_gen import distributed
    from moe_gen.tasks import preset_info
    from moe_gen.trainer import Trainer
    from moe_gen.trainer.lock import RunLock
    from moe_gen.trainer.sampling import check_modality_keys

    train_config, output_dir = config.train, config.output_dir
    _check_run_flags(train_config, resume, overwrite)
    if model is None:  # settings first: no data read, no folder made
        _init_section(config.model) if "init" in config.model else _model_config(config.model)
    check_modality_keys(train_config)
    if distributed.is_main_process() and os.path.isdir(output_dir):
        with RunLock(output_dir):  # a busy run directory is refused now, not after loading data (Trainer locks it)
            pass
    for name in config.eval_tasks or ():
        preset_info(name)
    _check_task_settings(config, model)
    known = set(config.tasks) | (set(model.task_ids) if model is not None else set())
    strangers = [name for name in config.eval_tasks or () if name not in known]
    if strangers:  # before any data is read (evaluation would fail after the whole run)
        nor = " nor known to the model" if model is not None else ""
        raise ValueError(f"eval_tasks {strangers} are not trained in this run{nor}; "
                         f"training: {', '.join(config.tasks)}")
    tasks = _tasks(config.tasks, "train")
    eval_tasks = _tasks(config.eval_tasks or config.tasks, "test")
    if train_config.num_threads:
        torch.set_num_threads(train_config.num_threads)
    if model is None:
        model = _build_model(config, tasks, train_config)
    model_dir = os.path.join(output_dir, "model")
    # The run directory stays locked until the model and eval.json are written.
    with Trainer(model, tasks, train_config, output_dir=output_dir, eval_tasks=eval_tasks, resume=resume,
                 overwrite=overwrite) as trainer:
        _clear_earlier_results(output_dir, model_dir, overwrite, source)
        baseline = trainer.baseline  # a resumed run's, from its checkpoint
        if config.baseline and trainer.resumed_from is None:
            _say(f"evaluating the model before training on {len(eval_tasks)} tasks ...")
            baseline = trainer.baseline = trainer.evaluate()
        summary = _fit(trainer, model, tasks, output_dir)
        checkpoint = _save_model(trainer, summary, model_dir)
        _say(f"saved the model to {model_dir} (load it with GeneralistModel.from_pretrained)")
        results = _final_evaluation(trainer, output_dir, model_dir)
        _say(metric_table(results, baseline))
        _save_results(summary, results, baseline, output_dir, model_dir)
    if summary["checkpoint_step"] != summary["step"]:
        raise RunIncomplete(f"the model is saved to {model_dir}, but the checkpoint of the last step "
                            f"({summary['step']}) was not written ({summary['failed_checkpoints']} failed "
                            f"checkpoint writes); {checkpoint}")
    return {"results": results, "baseline": baseline, "summary": summary, "model_dir": model_dir}


def _cmd_pretrain(args, overrides) -> int:
    from moe_gen import distributed

    config = _with_output(load_run_config(args.config, overrides), args.output)
    distributed.init_distributed()
    _train(config, resume=args.resume, overwrite=args.overwrite)
    distributed.shutdown()
    return 0


def _check_run_flags(train_config, resume: bool, overwrite: bool) -> None:
    """Settings that a run of this command cannot carry out as asked, refused before anything is read."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues the run directory's "
                         "checkpoints, overwrite deletes them")
    for name in ("keep_best", "patience"):  # eval.json would report the chosen step's test scores: optimistic
        if getattr(train_config, name):
            raise ValueError(f"train.{name} chooses a step by its scores on the eval tasks, which moe-gen evaluates "
                             "on the presets' test splits: the scores it reported would be those of the step "
                             "chosen on them. Use train.eval_every alone to follow the test scores while training, "
                             "or choose the step on a validation split from Python (Trainer(..., eval_tasks=...))")


def _with_output(config, output: Optional[str]):
    """``config`` with ``--output`` as its ``output_dir``, where given. An empty one (an unset shell
    variable: ``--output "$RUN"``) is refused: it was ignored, and the run (and ``--overwrite``) went to
    the recipe's own folder."""
    if output is None:
        return config
    if not output:
        raise ValueError("--output must name the run's folder, got an empty string")
    return config.replace(output_dir=output)


def _cmd_finetune(args, overrides) -> int:
    from moe_gen import distributed
    from moe_gen.model import GeneralistModel
    from moe_gen.tasks.presets import preset_names

    config = load_run_config(args.config, overrides)
    if args.tasks:
        config = config.replace(tasks=tuple(preset_names(args.tasks)))
    config = _with_output(config, args.output)
    if config.model:
        raise ValueError("finetune takes the model from --from; drop the model: section / --model.* overrides")
    distributed.init_distributed()
    model = GeneralistModel.from_pretrained(getattr(args, "from"))
    _train(config, model=model, resume=args.resume, overwrite=args.overwrite, source=getattr(args, "from"))
    distributed.shutdown()
    return 0


def _cmd_eval(args, overrides) -> int:
    from moe_gen.model import GeneralistModel
    from moe_gen.registry import TASKS
    from moe_gen.tasks.presets import preset_names
    from moe_gen.trainer.evaluation import evaluate

    if overrides:
        raise ValueError(f"eval takes no overrides, got {' '.join(overrides)}")
    if args.out:  # checked before the evaluation, which may take minutes, not after it
        _json_destination(args.out)
    model = GeneralistModel.from_pretrained(args.model_dir)
    names = preset_names(args.tasks or ())
    if not names:  # every task of the model: the built-in ones (its own tasks cannot be read here)
        names = [name for name in model.config.tasks if name in TASKS]
        own = [name for name in model.config.tasks if name not in TASKS]
        if own and not names:
            raise ValueError(_own_tasks(own))
        if own:
            print(f"moe-gen eval: warning: evaluating the model's built-in tasks only; {_own_tasks(own)}",
                  file=sys.stderr)
    results = evaluate(model, _model_tasks(model, names, args.split), limit=args.limit)
    print(metric_table(results))
    if args.out:
        with atomic_open(args.out) as f:
            _dump_json(results, f)
    return 0


def _cmd_infer(args, overrides) -> int:
    from moe_gen.model import GeneralistModel
    from moe_gen.tasks.errors import TaskDataError

    if overrides:
        raise ValueError(f"infer takes no overrides, got {' '.join(overrides)}")
    model = GeneralistModel.from_pretrained(args.model_dir)
    task = _model_tasks(model, [args.task], "test")[0]
    lines: list[int] = []  # the line of each --input row in its file
    rows = (_input_rows(args.input, task, lines) if args.input is not None
            else [task.data[i] for i in range(min(args.rows, len(task)))])
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p))
                if v is not None}
    if args.parallel_steps is not None:
        sampling["parallel_steps"] = args.parallel_steps
    try:
        predictions = model.infer(task, rows, beams=args.beams, seed=args.seed, **sampling,
                                  no_repeat_ngram=args.no_repeat_ngram, min_length=args.min_length)
    except TaskDataError as exc:
        # "row N" counts the file's rows from 0: say where the row is written (blank lines moved it)
        if args.input is not None and exc.row is not None and 0 <= exc.row < len(lines):
            exc.args = (f"{exc} ({args.input}, line {lines[exc.row]})",)
        raise
    for i, prediction in enumerate(predictions):
        out = {"row": i, "text": prediction.text, "box": prediction.box, "score": round(prediction.score, 4)}
        if len(prediction.targets) > 1 or prediction.groups:  # several targets, or repeated ones
            out["targets"] = _jsonable(prediction.targets)
        if prediction.frames is not None:
            out["frames"] = list(prediction.frames.shape)
        if prediction.image is not None:
            out["image"] = (_save_image(prediction.image, args.images, i) if args.images
                            else list(prediction.image.shape))
        print(json.dumps({k: v for k, v in out.items() if v is not None}))
    return 0


def _input_rows(path: str, task, lines: list) -> list:
    """The rows of ``infer --input`` (``lines`` gets each one's line in the file); a file that cannot be
    read (missing, a folder) is a configuration error naming ``--input`` (an OSError exited 1, the
    status of a run that stopped, naming neither)."""
    from moe_gen.tasks.task import load_jsonl, media_columns

    try:
        return load_jsonl(path, media_columns(task.instruction), line_numbers=lines)
    except OSError as exc:
        raise ValueError(f"--input {path!r}: cannot read the rows of task {task.name!r}: "
                         f"{exc.strerror or exc}") from None


def _jsonable(value):
    """A decoded value for a JSON line: tensors and arrays (frames, images) as their shapes."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return {"shape": list(value.shape)}
    return value


def _json_destination(path: str) -> None:
    """Makes ``--out``'s folder (as ``analyze --out`` and ``--images`` do); refuses a path that is a
    folder. A missing folder was found only when the metrics were written, after the evaluation."""
    if os.path.isdir(path):
        raise ValueError(f"--out must name a file to write the metrics to, got the folder {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {path!r}: cannot make its folder {directory!r}: {exc.strerror}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _save_image(image, directory: str, row: int) -> str:
    """Writes a generated image as ``row<N>.png`` in ``directory``; returns the path."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"row{row}.png")
    Image.fromarray(image).save(path)
    return path


def _cmd_presets(args, overrides) -> int:
    from moe_gen.registry import TASKS
    from moe_gen.tasks import preset_info

    if overrides:
        raise ValueError(f"presets takes no overrides, got {' '.join(overrides)}")
    names = args.names or TASKS.list()
    infos = [preset_info(name) for name in names]  # an unknown name: ValueError with the known ones
    for info in infos:
        fields = {"name": info.name, "instruction": info.instruction, "metrics": list(info.metrics),
                  "objective": info.objective, "source": info.source, "licence": info.licence}
        if args.json:
            print(json.dumps(fields))
        else:
            print(f"{info.name}\n  {info.instruction}\n  metrics: {', '.join(info.metrics)} ({info.objective})"
                  f"\n  source: {info.source}\n  licence: {info.licence}")
    return 0


def _cmd_analyze(args, overrides) -> int:
    from moe_gen.analysis.report import main as analyze

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest  # (main puts "--" first)
    return analyze([*rest, *overrides])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-gen", description="Generalist multimodal MoE models: train, "
                                     "fine-tune, evaluate, infer.", epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # one example a line
    sub = parser.add_subparsers(dest="command", required=True)
    sub_kwargs = {"allow_abbrev": False}
    overrides = ("Any key of the run configuration can be set with a dotted flag: --train.steps 100, --train.lr 1e-3, "
                 "--model.flavour tiny, --model.moe.router.strategy token, --tasks a,b (or --tasks a b); values are "
                 "read as YAML. See moe-gen --help.")
    p = sub.add_parser("pretrain", **sub_kwargs, help="train a model from scratch on a task mixture", epilog=overrides)
    p.add_argument("--config", default="demo", help="recipe name or YAML file (default: demo)")
    p.add_argument("--output", help="run directory (default: the recipe's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    p.add_argument("--overwrite", action="store_true", help="start over, deleting the run directory's checkpoints")
    p = sub.add_parser("finetune", **sub_kwargs, help="continue training a saved model, possibly on new tasks",
                       epilog=overrides)
    p.add_argument("--from", required=True, help="a directory written by save_pretrained")
    p.add_argument("--config", default="finetune")
    p.add_argument("--tasks", nargs="+", help="preset names to fine-tune on (a b or a,b)")
    p.add_argument("--output")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("eval", **sub_kwargs, help="per-task metrics of a saved model")
    p.add_argument("model_dir")
    p.add_argument("--tasks", nargs="+", help="preset names (a b or a,b; default: the model's tasks)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="score N rows per task, evenly spaced over the split (default: every row)")
    p.add_argument("--out", help="also write the metrics as JSON here")
    p = sub.add_parser("infer", **sub_kwargs, help="answers of a saved model for rows of a task")
    p.add_argument("model_dir")
    p.add_argument("--task", required=True)
    p.add_argument("--input", help="a JSONL file of rows (default: rows of the preset's test split)")
    p.add_argument("--rows", type=_positive_int, default=3, help="the first N test rows (without --input)")
    p.add_argument("--beams", type=_positive_int, default=1, help="beam search with N beams (1: greedy)")
    p.add_argument("--temperature", type=float, help="draw token answers at this temperature (0: greedy)")
    p.add_argument("--top-k", type=int, help="draw among the k best tokens")
    p.add_argument("--top-p", type=float, help="draw among the best tokens holding this much probability")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--no-repeat-ngram", type=int, default=0, help="free text: no repeated n-gram of this size")
    p.add_argument("--min-length", type=int, default=0, help="free text: at least this many tokens")
    p.add_argument("--parallel-steps", type=int,
                   help="image-code targets: decode in this many parallel passes (MaskGIT; parallel-objective tasks)")
    p.add_argument("--images", help="write generated images as PNG files to this folder (row<N>.png)")
    p = sub.add_parser("presets", **sub_kwargs, help="the built-in tasks: instruction, metrics, source, licence")
    p.add_argument("names", nargs="*", help="preset names (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p = sub.add_parser("analyze", **sub_kwargs, help="routing analysis report of a saved model (see --help)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["analyze"]:  # its own parser reads its options in any order (argparse's remainder did not)
        argv = ["analyze", "--", *argv[1:]]
    args, overrides = _parser().parse_known_args(argv)
    command = {"pretrain": _cmd_pretrain, "finetune": _cmd_finetune, "eval": _cmd_eval, "infer": _cmd_infer,
               "presets": _cmd_presets, "analyze": _cmd_analyze}
    from moe_gen.trainer.checkpoint import CheckpointError
    from moe_gen.trainer.lock import RunDirectoryInUse

    try:
        return command[args.command](args, overrides)
    except ValueError as exc:  # the configuration, the data or an argument
        print(f"moe-gen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (RunIncomplete, RunDirectoryInUse, CheckpointError, OSError) as exc:  # the run, not its settings
        print(f"moe-gen {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
