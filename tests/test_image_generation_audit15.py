"""Image-generation defects found by the fifteenth audit (parallel decoding, image-code references,
the digit metrics); each test failed before its fix."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.sources.vision import load_digit_images


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def rows():
    return [{"label": r["label"], "image": r["image"]} for r in load_digit_images("train")[:6]]


class _EveryCodeMasked(random.Random):
    """cos(π/2 · 0) = 1: mask_code_targets masks every code, as parallel decoding's first pass."""

    def random(self):
        return 0.0


def test_parallel_decoding_reads_the_literal_text_after_the_codes_as_training_did(tok, rows):
    """Training's bidirectional decoder read BOS, the masked codes and "done"; decoding built BOS,
    the masks and an EOS, so every code position saw another sequence than it trained on."""
    from moe_gen.model.parallel import mask_code_targets
    from moe_gen.tasks.batch import collate

    task = Task("draw", "draw [TEXT:label] -> here: [IMAGE:image,preprocess=image_vq] done", rows,
                objective="parallel")
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    sample = model.plan(task).encode(rows[0], 0, training=True)
    codes = frozenset(tok.bin_id(k) for k in range(tok.num_bins))
    trained = mask_code_targets(collate([sample], tok, model.task_ids, pass_name="masked",
                                        modality_ids=model.modality_ids), [sample], tok, codes, _EveryCodeMasked())
    seen, decode = [], model.decode
    # (the pass's input, copied: decoding writes the fixed codes into it afterwards)
    model.decode = lambda side, *args, **kwargs: seen.append((side.tokens.clone(), side.tags)) or \
        decode(side, *args, **kwargs)
    model.infer(task, [{"label": rows[0]["label"]}], parallel_steps=1)
    assert len(seen) == 1
    tokens, tags = seen[0]
    assert tokens.tolist() == trained.decoder.tokens.tolist()
    assert tok.decode(tokens[0, -len(tok.encode_literal("done")):].tolist()).strip() == "done"
    for field in dataclasses.fields(tags):
        assert torch.equal(getattr(tags, field.name), getattr(trained.decoder.tags, field.name)), field.name


def test_beams_on_a_parallel_objective_task_are_refused_naming_it(tok, rows):
    """beams=2 silently decoded a parallel-objective task left to right (causal, generative pass),
    a way it never trained; parallel_steps with beams was refused, without naming the task."""
    task = Task("draw_parallel", "draw [TEXT:label] -> [IMAGE:image,preprocess=image_vq]", rows,
                objective="parallel")
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    calls = []
    hook = model.decoder.register_forward_pre_hook(lambda module, args: calls.append(args))
    try:
        for kwargs in ({"beams": 2}, {"beams": 2, "parallel_steps": 4}):
            with pytest.raises(ValueError, match="task 'draw_parallel': parallel decoding .* does not combine "
                                                 "with beams > 1 or candidates"):
                model.infer(task, [{"label": "seven"}], **kwargs)
        for cut in ({"top_k": 5}, {"top_p": 0.9}):
            with pytest.raises(ValueError, match="task 'draw_parallel': parallel decoding .* temperature only"):
                model.infer(task, [{"label": "seven"}], **cut)
    finally:
        hook.remove()
    assert calls == []  # refused before any decoder pass
    assert len(model.infer(task, [{"label": "seven"}], beams=1)[0].tokens) == 16


def test_an_image_code_target_beside_another_is_scored_against_its_reconstruction(tok):
    """With a caption beside the image, exact_match / accuracy compared the decoded image with the
    row's raw 8x8 image, which no answer equals: a perfect answer scored 0.0, as a wrong one."""
    from moe_gen.model.generate import Prediction
    from moe_gen.trainer.evaluation import evaluate_task

    rows = [{"label": r["label"], "image": r["image"], "caption": f"a handwritten {r['label']}"}
            for r in load_digit_images("test")[:4]]
    task = Task("draw_and_say", "draw [TEXT:label] -> [IMAGE:image,preprocess=image_vq] [TEXT:caption]", rows,
                metrics=("exact_match", "accuracy"))
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    plan = model.plan(task)
    target = next(p for p in plan.templates[0][1] if p.slot.column == "image")

    def drawn(row):  # the image tokenizer's own codes of the row's image, decoded
        codes = next(c.tokens for c in plan.encode(row, 0, training=True).decoder if c.column == "image")
        return plan.preprocessor(target).to_image([tok.bin_index(t) for t in codes])

    def answers(blank: bool):
        def infer(task_, rows_, **kwargs):
            return [Prediction(targets={"image": drawn({**row, "image": row["image"] * (not blank)}),
                                        "caption": row["caption"]}) for row in rows_]
        return infer

    model.infer = answers(blank=False)
    pairs = []
    assert evaluate_task(model, task, pairs=pairs) == {"exact_match": 1.0, "accuracy": 1.0}
    predicted, reference = pairs[0]
    assert reference["image"].shape == predicted["image"].shape == (16, 16, 3)
    model.infer = answers(blank=True)  # a blank image, the right captions
    assert evaluate_task(model, task) == {"exact_match": 0.0, "accuracy": 0.0}


def test_digit_fid_of_a_single_image_is_nan_and_a_one_row_evaluation_saves_the_run(tmp_path):
    """eval_limit 1 (documented valid) on an image task: digit_fid raised "needs at least two images",
    every task's results were lost, and `moe-gen pretrain` exited 2 without saving the model."""
    import json
    import math

    from moe_gen.cli import main
    from moe_gen.tasks.metrics import digit_fid

    digits = [r["image"] for r in load_digit_images("test")[:2]]
    assert math.isnan(digit_fid(digits[:1], digits[:1]))
    assert math.isfinite(digit_fid(digits, digits[::-1]))
    run = tmp_path / "run"
    code = main(["pretrain", "--config", "image_generation", "--output", str(run), "--train.steps", "2",
                 "--train.warmup_steps", "0", "--train.eval_limit", "1", "--baseline", "false",
                 "--train.progress", "false", "--train.tensorboard", "false"])
    assert code == 0 and (run / "model").is_dir()
    trained = json.loads((run / "eval.json").read_text())["trained"]
    # (strict JSON, as the logs: the metric with no value is null)
    assert trained["text_to_image"]["digit_fid"] is None and "pixel_mse" in trained["text_to_image"]
    json.loads((run / "eval.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in eval.json"))


def test_an_evaluation_error_after_training_keeps_the_saved_model(tmp_path, monkeypatch, capsys):
    """The model was saved only after the final evaluation, so any error there lost the trained model."""
    from moe_gen.cli import main
    from moe_gen.model import GeneralistModel
    from moe_gen.trainer import Trainer

    def failing(self, *args, **kwargs):
        raise ValueError("task 'x': a metric that cannot score these rows")

    monkeypatch.setattr(Trainer, "evaluate", failing)
    run = tmp_path / "run"
    code = main(["pretrain", "--config", "debug", "--output", str(run), "--train.steps", "2", "--baseline", "false",
                 "--train.progress", "false", "--train.tensorboard", "false"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"the model is saved to {run / 'model'}, but the evaluation after training failed" in err
    assert "a metric that cannot score these rows" in err and "eval.json was not written" in err
    GeneralistModel.from_pretrained(str(run / "model"))
    assert not (run / "eval.json").exists()


def test_digit_accuracy_reads_image_file_references_as_the_other_image_metrics_do(tmp_path, tok):
    """A reference given as an image file (as a JSONL task's media column holds it) failed digit_accuracy
    with numpy's "invalid literal for int()", where pixel_mse and digit_fid read it as an IMAGE slot
    does; the metrics' refusals named neither the metric nor the image."""
    import io
    import json

    from PIL import Image

    from moe_gen.tasks.metrics import digit_accuracy, digit_fid, pixel_mse
    from moe_gen.trainer.evaluation import evaluate_task

    digits = load_digit_images("test")[:6]
    images = [r["image"] for r in digits]
    with open(tmp_path / "test.jsonl", "w") as f:
        for i, r in enumerate(digits):
            Image.fromarray(r["image"]).save(tmp_path / f"{i}.png")  # lossless 8x8 grey PNG
            f.write(json.dumps({"label": r["label"], "image": f"{i}.png"}) + "\n")
    task = Task("draw_files", "draw a handwritten [TEXT:label] -> [IMAGE:image,preprocess=image_vq]",
                str(tmp_path / "test.jsonl"), metrics=("digit_accuracy", "digit_fid", "pixel_mse"))
    files = [task.data[i]["image"] for i in range(len(task))]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    expected = digit_accuracy(images, images)
    assert digit_accuracy(images, files) == digit_accuracy(images, encoded) == expected > 0
    assert pixel_mse(images, files) == 0.0 and digit_fid(images, files) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok)
    assert set(evaluate_task(model, task, limit=2)) == {"digit_accuracy", "digit_fid", "pixel_mse"}
    missing = str(tmp_path / "missing.png")
    for metric, call in (("digit_accuracy: reference 1", lambda: digit_accuracy(images[:2], [files[0], missing])),
                         ("digit_accuracy: prediction 1", lambda: digit_accuracy([None, missing], files[:2])),
                         ("pixel_mse: reference 1", lambda: pixel_mse(images[:2], [files[0], missing])),
                         ("pixel_mse: prediction 0", lambda: pixel_mse([missing], files[:1])),
                         ("digit_fid: reference 1", lambda: digit_fid(images[:2], [files[0], missing])),
                         ("digit_fid: prediction 0", lambda: digit_fid([missing, images[1]], files[:2]))):
        with pytest.raises(ValueError, match=f"^{metric}: cannot read the image"):
            call()
    with pytest.raises(ValueError, match="^digit_fid: prediction 1 is missing"):
        digit_fid([images[0], None], files[:2])


def test_a_later_run_that_fails_leaves_no_earlier_results_in_the_run_folder(tmp_path, monkeypatch, capsys):
    """An earlier run's eval.json (and, under --overwrite, its model) stayed beside a later run's logs
    when that run failed, naming another model's checkpoint and metrics."""
    from moe_gen.cli import main
    from moe_gen.trainer import Trainer

    run = tmp_path / "run"
    common = ["pretrain", "--config", "debug", "--output", str(run), "--train.progress", "false",
              "--train.tensorboard", "false", "--train.eval_limit", "2", "--train.warmup_steps", "0",
              "--baseline", "false"]
    assert main([*common, "--train.steps", "2"]) == 0 and (run / "eval.json").exists()
    diverging = ["--overwrite", "--train.steps", "6", "--train.lr", "1e30", "--train.max_bad_steps", "1"]
    assert main([*common, *diverging]) == 1
    assert not (run / "eval.json").exists() and not (run / "model").exists()
    assert main([*common, "--overwrite", "--train.steps", "2"]) == 0 and (run / "eval.json").exists()

    def failing(self, *args, **kwargs):
        raise ValueError("task 'x': a metric that cannot score these rows")

    monkeypatch.setattr(Trainer, "evaluate", failing)
    assert main([*common, "--resume", "--train.steps", "4"]) == 1
    assert not (run / "eval.json").exists() and (run / "model").is_dir()  # the resumed run's model, saved
    capsys.readouterr()


def test_finetune_overwrite_into_its_source_run_keeps_the_model_it_was_given_when_it_fails(tmp_path, capsys):
    """--overwrite removes the earlier run's model when a run starts, but not the model a finetune
    reads (--from RUN/model --output RUN): a failed finetune deleted it."""
    from moe_gen.cli import main

    run = tmp_path / "run"
    quiet_flags = ["--train.progress", "false", "--train.tensorboard", "false", "--baseline", "false",
                   "--train.eval_limit", "2", "--train.warmup_steps", "0"]
    assert main(["pretrain", "--config", "debug", "--output", str(run), "--train.steps", "1", *quiet_flags]) == 0
    code = main(["finetune", "--from", str(run / "model"), "--output", str(run), "--overwrite", "--tasks",
                 "table_species", "--train.steps", "4", "--train.lr", "1e30", "--train.max_bad_steps", "1",
                 *quiet_flags])
    assert code == 1 and (run / "model" / "model.safetensors").exists()
    capsys.readouterr()
