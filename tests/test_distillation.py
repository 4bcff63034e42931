"""Distillation from per-task teachers (``TrainConfig.distill_from``, ``moe_gen.teachers``): the
teachers' distributions line up with the student's scored tokens of their tasks in a mixed batch,
the loss mixes them in by ``distill_weight``, a teacher equal to the student adds no gradient, and
what cannot teach is refused naming the task."""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil

import pytest
import torch
from helpers import build, flavour_with, quiet

from moe_gen.analysis.report import task_interference
from moe_gen.model import GeneralistModel
from moe_gen.objectives import GenerativeObjective, LossScales
from moe_gen.tasks import Task, Tokenizer, load_preset
from moe_gen.tasks.batch import IGNORE_INDEX, collate
from moe_gen.teachers import Teachers, soft_cross_entropy
from moe_gen.trainer import TrainConfig, Trainer

NAMES = ["digit_classification", "table_qa"]


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=12) for n in NAMES]


@pytest.fixture(scope="module")
def teacher_dirs(tasks, tok, tmp_path_factory):
    """A specialist per task, each built on its one task (other weights than the student's)."""
    dirs = {}
    for i, task in enumerate(tasks):
        torch.manual_seed(100 + i)
        model = GeneralistModel.build(flavour_with("debug"), [task], tok)
        dirs[task.name] = str(tmp_path_factory.mktemp("teacher") / task.name)
        model.save_pretrained(dirs[task.name])
    return dirs


def _config(**kwargs) -> TrainConfig:
    kwargs.setdefault("steps", 2)
    return quiet(batch_size=8, lr=3e-3, warmup_steps=0, log_every=1, **kwargs)


def test_soft_cross_entropy_is_the_tempered_cross_entropy_and_skips_tokens_without_mass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    logits[:, 5:] = float("-inf")  # a closed set of 5 tokens
    teacher = torch.randn(5, 7, generator=g)
    teacher[:, 5:] = float("-inf")
    soft = (teacher / 2.0).softmax(-1)
    expected = -(soft[:, :5] * (logits[:, :5] / 2.0).log_softmax(-1)).sum(-1) * 4.0
    logits.requires_grad_(True)
    got = soft_cross_entropy(logits, soft, 2.0)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[:, 5:] == 0).all()


def test_teachers_speak_at_their_tasks_scored_tokens_of_a_mixed_batch(tasks, tok, teacher_dirs, tmp_path):
    student = build(tasks, tok)
    trainer = Trainer(student, tasks, _config(distill_from={"table_qa": teacher_dirs["table_qa"]}),
                      output_dir=str(tmp_path))
    (_, [(_, samples, batch)]) = trainer._prepare_micro_batch(1, 0)
    assert {s.task for s in samples} == set(NAMES)  # both tasks in the batch
    scored = batch.labels != IGNORE_INDEX
    task_N = batch.decoder.tags.task[scored]
    soft = batch.soft_labels
    assert soft.shape == (int(scored.sum()), tok.vocab_size)
    taught = task_N == student.task_ids["table_qa"]
    assert taught.any() and (~taught).any()
    assert (soft[~taught] == 0).all()
    torch.testing.assert_close(soft[taught].sum(-1), torch.ones(int(taught.sum())))
    # the same as the teacher gives on its task's samples collated alone
    teacher = trainer.objectives["generative"].teachers.models["table_qa"]
    alone = collate([s for s in samples if s.task == "table_qa"], teacher.tokenizer, teacher.task_ids,
                    modality_ids=teacher.modality_ids)
    with torch.no_grad():
        expected = alone.restrict_to_allowed(teacher(alone).logits)[alone.labels != IGNORE_INDEX].softmax(-1)
    torch.testing.assert_close(soft[taught], expected)


def test_closed_set_teachers_give_mass_only_to_the_allowed_tokens(tasks, tok, teacher_dirs, tmp_path):
    student = build(tasks, tok)
    trainer = Trainer(student, tasks, _config(distill_from={"digit_classification":
                                                            teacher_dirs["digit_classification"]}),
                      output_dir=str(tmp_path))
    (_, [(_, _, batch)]) = trainer._prepare_micro_batch(1, 0)
    scored = batch.labels != IGNORE_INDEX
    allowed = torch.isfinite(batch.restrict_to_allowed(torch.zeros(*batch.labels.shape, tok.vocab_size)))[scored]
    taught = batch.soft_labels.sum(-1) > 0
    assert taught.any() and (batch.soft_labels[taught] > 0).eq(allowed[taught]).all()


def test_a_teacher_only_correct_speaks_where_its_answer_is_the_reference(tasks, tok, teacher_dirs, tmp_path):
    taught = {"digit_classification": teacher_dirs["digit_classification"]}
    config = dataclasses.replace(_config(distill_from=taught, distill_only_correct=True), batch_size=48)
    trainer = Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path))
    samples, batch = trainer._prepare_micro_batch(1, 0)[1][0][1:]
    everywhere = Teachers.load(taught).soft_labels(samples, batch)
    teacher = trainer.objectives["generative"].teachers.models["digit_classification"]
    alone = collate([s for s in samples if s.task == "digit_classification"], teacher.tokenizer, teacher.task_ids,
                    modality_ids=teacher.modality_ids)
    with torch.no_grad():
        answers = alone.restrict_to_allowed(teacher(alone).logits)[alone.labels != IGNORE_INDEX].argmax(-1)
    right = answers == alone.labels[alone.labels != IGNORE_INDEX]
    assert right.any() and (~right).any(), right  # (an untrained teacher: right on some tokens, wrong on others)
    spoken = everywhere.sum(-1) > 0
    expected = everywhere.clone()
    expected[spoken.nonzero()[~right].squeeze(-1)] = 0
    torch.testing.assert_close(batch.soft_labels, expected)


def test_the_loss_mixes_the_teachers_in_by_their_weight(tasks, tok, teacher_dirs, tmp_path):
    student = build(tasks, tok)
    teachers = Teachers.load({"digit_classification": teacher_dirs["digit_classification"]})
    plain = GenerativeObjective(student)
    trainer = Trainer(student, tasks, _config(), output_dir=str(tmp_path))
    samples, batch = trainer._prepare_micro_batch(1, 0)[1][0][1:]
    batch.soft_labels = teachers.soft_labels(samples, batch)
    student.eval()  # (no dropout: the passes compare)
    with torch.no_grad():
        out = student(batch)
        base = plain.loss(batch, out)
        scored = batch.labels != IGNORE_INDEX
        logits = batch.restrict_to_allowed(out.logits.float())[scored]
        ce = torch.nn.functional.cross_entropy(logits, batch.labels[scored], reduction="none")
        taught = batch.soft_labels.sum(-1) > 0
        soft = soft_cross_entropy(logits[taught], batch.soft_labels[taught], 1.0)
        assert (soft - ce[taught]).abs().max() > 0.1  # (the teacher's term is not the reference's)
        for alpha in (0.0, 0.3, 1.0):
            parts = GenerativeObjective(student, teachers=teachers, distill_weight=alpha).loss(batch, out)
            mixed = ce.clone()
            mixed[taught] = (1 - alpha) * ce[taught] + alpha * soft
            torch.testing.assert_close(parts["token_loss"], mixed.mean())
            torch.testing.assert_close(parts["distill_loss"], soft.mean())
            torch.testing.assert_close(parts["reference_loss"], ce.mean())  # (the references alone, comparable)
        assert "distill_loss" not in base
        halved = GenerativeObjective(student, teachers=teachers, distill_weight=0.6).loss(
            batch, out, LossScales(teacher=0.5))
        mixed = ce.clone()
        mixed[taught] = 0.7 * ce[taught] + 0.3 * soft
        torch.testing.assert_close(halved["token_loss"], mixed.mean())
        batch.soft_labels = None
        torch.testing.assert_close(GenerativeObjective(student, teachers=teachers).loss(batch, out)["token_loss"],
                                   base["token_loss"])


def test_a_teacher_equal_to_the_student_adds_no_gradient(tasks, tok, tmp_path):
    digits = [t for t in tasks if t.name == "digit_classification"]
    student = build(digits, tok, dropout=0.0)
    student.eval()
    teachers = Teachers({"digit_classification": copy.deepcopy(student)})
    trainer = Trainer(student, digits, _config(), output_dir=str(tmp_path))
    samples, batch = trainer._prepare_micro_batch(1, 0)[1][0][1:]
    batch.soft_labels = teachers.soft_labels(samples, batch)
    params = [p for p in student.parameters() if p.requires_grad]

    def largest_gradient(alpha: float) -> float:
        objective = GenerativeObjective(student, teachers=teachers, distill_weight=alpha)
        loss = objective.loss(batch, student(batch))["token_loss"]
        return max(float(g.abs().max()) for g in torch.autograd.grad(loss, params, allow_unused=True)
                   if g is not None)

    assert largest_gradient(1.0) < 1e-6 < 1e-3 < largest_gradient(0.0)


def test_a_run_distils_and_logs_the_teachers_loss(tasks, tok, teacher_dirs, tmp_path):
    cfg = _config(steps=3, distill_from=teacher_dirs, distill_weight=0.5, distill_temperature=2.0)
    trainer = Trainer(build(tasks, tok), tasks, cfg, output_dir=str(tmp_path))
    records = [trainer.train_step(step) for step in range(1, 4)]
    assert all(math.isfinite(r["distill_loss"]) and r["distill_loss"] > 0 for r in records)
    assert all(math.isfinite(r["reference_loss"]) and r["reference_loss"] > 0 for r in records)
    plain = Trainer(build(tasks, tok), tasks, _config(steps=3), output_dir=str(tmp_path / "plain"))
    assert not {"distill_loss", "reference_loss"} & set(plain.train_step(1))


def test_micro_batches_log_the_teachers_and_references_losses_as_one_batch(tasks, tok, teacher_dirs, tmp_path):
    config = dataclasses.replace(_config(steps=1, distill_from=teacher_dirs), accumulate=3)
    trainer = Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path))
    objective, seen = trainer.objectives["generative"], []
    loss = objective.loss

    def recorded(batch, out, scales=None):
        parts = loss(batch, out, scales)
        counts = objective.part_counts(batch)
        seen.append({name: (float(parts[name]), counts[name]) for name in ("distill_loss", "reference_loss")})
        return parts

    objective.loss = recorded
    record = trainer.train_step(1)
    assert len(seen) == 3
    for name in ("distill_loss", "reference_loss"):
        pairs = [micro[name] for micro in seen]
        assert len({n for _, n in pairs}) > 1  # (micro-batches of different sizes: a plain mean would differ)
        assert record[name] == pytest.approx(sum(v * n for v, n in pairs) / sum(n for _, n in pairs), rel=1e-5)


def test_routing_analysis_of_a_distilled_run_loads_no_teacher(tasks, tok, tmp_path):
    settings = _config(distill_from={"table_qa": str(tmp_path / "gone")})  # (the run's teachers since deleted)
    matrix = task_interference(build(tasks, tok), tasks, 2, settings=settings)
    assert set(matrix["tasks"]) == set(NAMES)


def _teacher_factors(trainer) -> list:
    """Runs ``trainer`` and returns the ``LossScales.teacher`` its objective was given at each step."""
    objective, seen = trainer.objectives["generative"], []
    loss = objective.loss

    def recorded(batch, out, scales=None):
        seen.append(None if scales is None else scales.teacher)
        return loss(batch, out, scales)

    objective.loss = recorded
    trainer.fit()
    return seen


def test_annealing_lowers_the_teachers_weight_linearly_to_zero_at_the_last_step(tasks, tok, teacher_dirs, tmp_path):
    taught = {"table_qa": teacher_dirs["table_qa"]}
    annealed = Trainer(build(tasks, tok), tasks, _config(steps=3, distill_from=taught, distill_anneal=True),
                       output_dir=str(tmp_path / "annealed"))
    assert _teacher_factors(annealed) == [1.0, 0.5, 0.0]
    constant = Trainer(build(tasks, tok), tasks, _config(steps=3, distill_from=taught),
                       output_dir=str(tmp_path / "constant"))
    assert _teacher_factors(constant) == [None, None, None]  # (the objective's own weight every step)


def test_what_cannot_teach_is_refused_naming_the_task(tasks, tok, teacher_dirs, tmp_path):
    student = build(tasks, tok)
    with pytest.raises(ValueError, match=r"distill_from names tasks not being trained: \['iris'\]"):
        Trainer(student, tasks, _config(distill_from={"iris": teacher_dirs["table_qa"]}), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"distill_from\['table_qa'\]: the teacher does not know task 'table_qa'"):
        Trainer(student, tasks, _config(distill_from={"table_qa": teacher_dirs["digit_classification"]}),
                output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"distill_from\['table_qa'\]: cannot load the teacher at"):
        Trainer(student, tasks, _config(distill_from={"table_qa": str(tmp_path / "missing")}),
                output_dir=str(tmp_path))
    other = Tokenizer.default(vocab_size=3000)
    table = [t for t in tasks if t.name == "table_qa"]
    with pytest.raises(ValueError, match=r"distill_from\['table_qa'\]: the teacher's vocabulary is not the model's"):
        GenerativeObjective(build(table, other), teachers=Teachers.load({"table_qa": teacher_dirs["table_qa"]}))
    for bad, message in [({"distill_weight": 1.5}, "distill_weight must be in"),
                         ({"distill_temperature": 0.0}, "distill_temperature must be > 0"),
                         ({"distill_from": {"table_qa": 3}}, r"distill_from\['table_qa'\] must be the folder"),
                         ({"distill_anneal": True}, "distill_anneal is a setting of distillation: name the teachers"),
                         ({"distill_only_correct": True}, "distill_only_correct is a setting of distillation")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)


def test_a_batch_the_teachers_cannot_line_up_with_is_refused(tasks, tok, teacher_dirs, tmp_path):
    student = build(tasks, tok)
    trainer = Trainer(student, tasks, _config(distill_from={"table_qa": teacher_dirs["table_qa"]}),
                      output_dir=str(tmp_path))
    teachers = trainer.objectives["generative"].teachers
    samples, batch = trainer._prepare_micro_batch(1, 0)[1][0][1:]
    table_rows = [i for i, s in enumerate(samples) if s.task == "table_qa"]
    other = batch.labels.clone()
    scored = other[table_rows[0]] != IGNORE_INDEX
    other[table_rows[0], scored.nonzero()[0]] += 1  # another reference token than the teacher computes
    with pytest.raises(ValueError, match=r"distill_from\['table_qa'\]: the teacher's reference tokens differ"):
        teachers.soft_labels(samples, dataclasses.replace(batch, labels=other))
    packed = collate(samples, tok, student.task_ids, modality_ids=student.modality_ids, pack=True,
                     max_length=10_000)  # (every sample in one row)
    with pytest.raises(ValueError, match=r"distillation \(table_qa\) needs one sample a row"):
        teachers.soft_labels(samples, packed)


def test_a_teacher_of_another_encoding_is_refused_naming_the_task(tasks, tok, teacher_dirs, tmp_path):
    digits = next(t for t in tasks if t.name == "digit_classification")
    impostor = Task("table_qa", digits.instruction, digits.data)  # the name of one task, the inputs of another
    fewer = Task("table_qa", *next((t.instruction, t.data[:6]) for t in tasks if t.name == "table_qa"))
    wider = Task(digits.name, digits.instruction, digits.data, preprocessor_options={"image": {"patch": 4}})
    folders = {}
    for task in (impostor, fewer, wider):
        torch.manual_seed(7)
        folders[task] = str(tmp_path / f"teacher{len(folders)}")
        GeneralistModel.build(flavour_with("debug"), [task], tok).save_pretrained(folders[task])
    for task, message in [(impostor, r"\['table_qa'\]: the teacher encodes the task with other statistics than the "
                                     r"model \(closed_sets, struct differ"),
                          (fewer, r"\['table_qa'\]: the teacher encodes the task with other statistics than the "
                                  r"model \(struct differ")]:  # (column scales fitted on 6 rows, not 12)
        with pytest.raises(ValueError, match=message):
            Trainer(build(tasks, tok), tasks, _config(distill_from={"table_qa": folders[task]}),
                    output_dir=str(tmp_path / "run"))
    # the same statistics, other patches: its image adapter cannot read the task's images
    trainer = Trainer(build(tasks, tok), tasks, _config(distill_from={digits.name: folders[wider]}),
                      output_dir=str(tmp_path / "run"), overwrite=True)
    with pytest.raises(ValueError, match=r"\['digit_classification'\]: the teacher cannot read the task's samples"):
        trainer.fit()


def test_a_teacher_of_a_task_whose_inputs_learn_nothing_is_accepted(tok, tmp_path):
    sudoku = load_preset("sudoku_4x4", "train", limit=4)  # (no statistics: the model keeps an empty mapping)
    torch.manual_seed(3)
    GeneralistModel.build(flavour_with("debug"), [sudoku], tok).save_pretrained(str(tmp_path / "teacher"))
    teachers = Teachers.load({"sudoku_4x4": str(tmp_path / "teacher")})
    teachers.check(build([sudoku], tok))  # no refusal
    assert teachers.models["sudoku_4x4"].encoding_statistics("sudoku_4x4") == {}


def test_a_resumed_run_learns_from_the_teachers_it_began_with(tasks, tok, teacher_dirs, tmp_path):
    folder = str(tmp_path / "teacher")
    shutil.copytree(teacher_dirs["table_qa"], folder)
    run = str(tmp_path / "run")

    def trainer(steps: int, **kwargs):
        config = _config(steps=steps, distill_from={"table_qa": folder}, **kwargs)
        return Trainer(build(tasks, tok), tasks, config, output_dir=run, resume=True)

    with trainer(2) as first:
        first.fit()
    with trainer(3) as resumed:
        assert resumed.step == 2
    torch.manual_seed(11)  # the folder rewritten with another teacher of the same task
    GeneralistModel.build(flavour_with("debug"), [t for t in tasks if t.name == "table_qa"], tok).save_pretrained(
        folder)
    with pytest.raises(ValueError, match=r"learned 'table_qa' from other teachers than distill_from's folders hold"):
        trainer(3)
    shutil.rmtree(run)
    with trainer(2, distill_anneal=True) as first:
        first.fit()
    with pytest.raises(ValueError, match="anneals its teachers' weight to 0 over steps = 2; resumed with steps = 3"):
        trainer(3, distill_anneal=True)
    shutil.rmtree(folder)
    with pytest.raises(ValueError, match=r"distill_from\['table_qa'\]: cannot load the teacher at .*: no such folder"):
        trainer(2, distill_anneal=True)


def test_an_objective_that_does_not_distil_is_refused(tok, teacher_dirs, tmp_path):
    table = load_preset("table_qa", "train", limit=12)
    masked = Task(table.name, table.instruction, table.data, objective="masked")
    with pytest.raises(ValueError, match=r"distill_from\['table_qa'\]: task 'table_qa' trains with the 'masked'"):
        Trainer(build([masked], tok), [masked], _config(distill_from={"table_qa": teacher_dirs["table_qa"]}),
                output_dir=str(tmp_path))
