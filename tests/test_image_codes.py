"""The image tokenizer (VQ-VAE), image-code targets end to end, and the generated-image metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.model.grammar import TargetGrammar
from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.metrics import digit_accuracy, digit_classifier, digit_fid, pixel_mse
from moe_gen.tasks.modalities.image_codes import ImageVQ, VQConfig, images_to_tensor, train_image_vq
from moe_gen.tasks.plan import TaskDataError
from moe_gen.tasks.sources.vision import load_digit_images

INSTRUCTION = "draw a handwritten [TEXT:label] -> [IMAGE:image,preprocess=image_vq]"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def digits():
    return load_digit_images("train")[:64], load_digit_images("test")[:40]


def test_vq_trains_saves_and_reloads_to_the_same_codes(digits, tmp_path):
    train, _ = digits
    config = VQConfig(size=8, codes=16, code_dim=4, hidden=16)
    images = images_to_tensor([r["image"] for r in train], config.size)
    first = train_image_vq(images, config, steps=30, batch_size=16, seed=0)
    again = train_image_vq(images, config, steps=30, batch_size=16, seed=0)
    codes = first.encode(images)
    assert codes.shape == (64, 4) and codes.dtype == torch.long
    assert torch.equal(codes, again.encode(images))  # seeded: the same tokenizer twice
    path = str(tmp_path / "vq.safetensors")
    first.save(path)
    loaded = ImageVQ.load(path)
    assert loaded.config == config and torch.equal(loaded.encode(images), codes)
    decoded = loaded.decode(codes)
    assert decoded.shape == (64, 3, 8, 8) and 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    with pytest.raises(ValueError, match=r"code ids must lie in \[0, 16\)"):
        loaded.decode(torch.full((1, 4), 16))
    with pytest.raises(ValueError, match="shape"):
        loaded.decode(torch.zeros(1, 5, dtype=torch.long))


def test_shipped_tokenizer_reconstructs_held_out_digits_the_classifier_still_reads(digits):
    from moe_gen.tasks.modalities.image_codes import load_image_vq

    _, test = digits
    vq = load_image_vq()
    images = images_to_tensor([r["image"] for r in test], vq.config.size)
    recon = vq.decode(vq.encode(images))
    assert float(((recon - images) ** 2).mean()) < 0.01
    as_uint8 = (recon.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    read = digit_classifier()(list(as_uint8))
    assert np.mean([a == r["digit"] for a, r in zip(read, test)]) >= 0.85


def test_image_code_targets_encode_decode_and_infer_returns_images(digits, tok):
    train, _ = digits
    rows = [{"label": r["label"], "image": r["image"]} for r in train[:12]]
    task = Task("draw", INSTRUCTION, rows)
    sample = task.encode(0, tok, training=False)
    target = [c for c in sample.decoder if c.loss and c.column == "image"]
    assert len(target) == 1 and len(target[0].tokens) == 16
    assert all(tok.bin_index(t) is not None and tok.bin_index(t) < 128 for t in target[0].tokens)
    plan = task.plan(tok)
    grammar = TargetGrammar(plan, tok)
    assert grammar.kinds[grammar.first] == "codes" and grammar.max_steps() == 16 + 1
    # OFASys's spelling names the same tokenizer
    alias = Task("draw2", INSTRUCTION.replace("image_vq", "image_vqgan"), rows).encode(0, tok, training=False)
    assert [c.tokens for c in alias.decoder] == [c.tokens for c in sample.decoder]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    predictions = model.infer(task, rows[:3])
    for prediction in predictions:
        assert prediction.image.shape == (16, 16, 3) and prediction.image.dtype == np.uint8
        assert len(prediction.tokens) == 16 and all(tok.bin_index(t) < 128 for t in prediction.tokens)
        assert prediction.text is None
    sampled = model.infer(task, rows[:2], temperature=1.0, seed=3)
    again = model.infer(task, rows[:2], temperature=1.0, seed=3)
    assert [p.tokens for p in sampled] == [p.tokens for p in again]


def test_bad_images_for_an_image_code_slot_name_the_row(tok):
    task = Task("draw", INSTRUCTION, [{"label": "one", "image": "not an image"}])
    with pytest.raises(TaskDataError, match=r"task 'draw', column 'image', row 0"):
        task.encode(0, tok, training=False)


def test_generated_image_metrics(digits):
    _, test = digits
    real = [r["image"] for r in test]
    accuracy = digit_accuracy(real, real)
    assert accuracy >= 0.9  # the classifier on real digits
    assert digit_accuracy([None] * len(real), real) == 0.0
    blank = [np.zeros((16, 16, 3), np.uint8)] * len(real)
    assert digit_accuracy(blank, real) <= 0.2
    with pytest.raises(ValueError, match="reference 0 is not a scikit-learn digit"):
        digit_accuracy([real[0]], [np.ones((8, 8), np.uint8)])
    assert digit_fid(real, real) == pytest.approx(0.0, abs=1e-6)
    assert digit_fid(blank, real) > digit_fid(real[::-1], real) + 1.0
    assert pixel_mse(real, real) == 0.0
    assert pixel_mse([None], [real[0]]) == 1.0
    assert pixel_mse([np.full((16, 16, 3), 255, np.uint8)], [np.zeros((8, 8), np.uint8)]) == 1.0


def test_colour_images_are_read_as_the_mean_of_their_red_green_and_blue():
    grey = np.full((8, 8), 60, np.uint8)
    colour = np.zeros((8, 8, 3), np.uint8) + np.array([30, 60, 90], np.uint8)
    assert pixel_mse([colour], [grey]) == 0.0
    with_alpha = np.concatenate([colour, np.full((8, 8, 1), 255, np.uint8)], axis=-1)  # alpha is no colour
    assert pixel_mse([with_alpha], [grey]) == 0.0
    assert pixel_mse([np.zeros((8, 8), np.uint8)], [colour]) == pytest.approx((60 / 255) ** 2)


def test_pixel_mse_reads_image_files_as_slots_take_them(digits, tmp_path):
    from PIL import Image

    _, test = digits
    path = tmp_path / "digit.png"
    Image.fromarray(test[0]["image"]).save(path)
    assert pixel_mse([test[0]["image"]], [str(path)]) == 0.0
    grey = test[0]["image"].astype(np.float32) / 255
    assert pixel_mse([str(path)], [np.zeros((8, 8), np.uint8)]) == pytest.approx(float((grey ** 2).mean()))


def test_images_of_every_form_a_slot_takes_are_read_alike(digits, tmp_path):
    """Float images in [0, 1] (an IMAGE slot takes them) were clipped as bytes by the metrics (white
    scored as black), and 16-bit PNGs and PIL 'F' images reached the model nearly white or black."""
    from PIL import Image

    from moe_gen.tasks.modalities.visual import load_image

    assert pixel_mse([np.ones((8, 8), np.float32)], [np.zeros((8, 8), np.uint8)]) == 1.0
    image = digits[1][0]["image"]
    as_float = image.astype(np.float32) / 255
    assert pixel_mse([as_float], [image]) == pytest.approx(0.0, abs=1e-5)
    deep = image.astype(np.uint16) * 257
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    # a 16-bit PNG reads on its 16-bit range: the 8-bit picture it was made from (since the twenty-sixth
    # session's audit; before, it was scaled by its brightest pixel, as the uint16 array still is)
    for other, same in ((str(tmp_path / "deep.png"), image), (Image.fromarray(as_float), as_float)):
        np.testing.assert_array_equal(np.asarray(load_image(other)), np.asarray(load_image(same)))
    dark = np.full((8, 8), 200, np.uint16)  # 200 of 65535: nearly black, not 200 of 255
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert np.asarray(load_image(str(tmp_path / "dark.png"))).max() == 1


def test_parallel_objective_masks_codes_and_parallel_decoding_takes_steps_passes(digits, tok):
    import random

    from moe_gen.model.parallel import mask_token, masked_counts
    from moe_gen.objectives import ParallelObjective
    from moe_gen.tasks.batch import IGNORE_INDEX

    assert masked_counts(16, 4) == [14, 11, 6, 0] and masked_counts(16, 1) == [0]
    train, _ = digits
    rows = [{"label": r["label"], "image": r["image"]} for r in train[:8]]
    task = Task("draw", INSTRUCTION, rows, objective="parallel")
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok)
    samples = list(task.samples(tok))
    objective = ParallelObjective(model)
    batch = objective.prepare(samples, random.Random(0))
    scored = batch.labels != IGNORE_INDEX
    assert not batch.causal and scored.any()
    assert (batch.decoder.tokens[scored] == mask_token(tok)).all()  # scored exactly where masked
    assert ((batch.decoder.tokens == mask_token(tok)) == scored).all()
    assert all(tok.bin_index(t) < 128 for t in batch.labels[scored].tolist())
    loss = objective(batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    calls = []
    decode = model.decode
    model.decode = lambda *a, **k: calls.append(k.get("causal", True)) or decode(*a, **k)
    predictions = model.infer(task, rows[:3], parallel_steps=4)
    assert calls == [False] * 4  # four bidirectional decoder passes for 16 codes
    calls.clear()
    assert len(model.infer(task, rows[:1], parallel_steps=40)[0].tokens) == 16
    assert calls == [False] * 16  # one code a pass at the least: no pass for nothing
    for prediction in predictions:
        assert prediction.image.shape == (16, 16, 3) and len(prediction.tokens) == 16
        assert prediction.targets["image"] is prediction.image
    drawn = [p.tokens for p in model.infer(task, rows[:3], parallel_steps=4, temperature=1.0, seed=5)]
    assert drawn == [p.tokens for p in model.infer(task, rows[:3], parallel_steps=4, temperature=1.0, seed=5)]
    with pytest.raises(ValueError, match="parallel decoding needs a single image-code target"):
        text = Task("name", "[IMAGE:image] -> [TEXT:label]", rows)
        GeneralistModel.build(flavour("debug"), [text], tok).infer(text, rows[:1], parallel_steps=4)
    with pytest.raises(ValueError, match="does not combine with beams"):
        model.infer(task, rows[:1], parallel_steps=4, beams=2)


def test_chained_generation_feeds_each_answer_to_the_next_task(digits, tok):
    from moe_gen.model import Link, chain
    from moe_gen.tasks import load_preset

    draw = load_preset("text_to_image", "train", limit=10)
    read = load_preset("digit_classification", "train", limit=10)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [draw, read], tok).eval()
    rows = [{"label": "seven"}, {"label": "two"}]
    out = chain(model, rows, [Link("text_to_image", {"image": "image"}),
                              Link("digit_classification", {"label": "read_back"})])
    assert rows == [{"label": "seven"}, {"label": "two"}]  # the inputs are left alone
    for row in out:
        assert row["image"].shape == (16, 16, 3)
        assert row["read_back"] in set(read.data[i]["label"] for i in range(len(read)))
    # the second link reads exactly the generated image
    direct = model.infer("digit_classification", [{"image": out[0]["image"]}])[0].text
    assert direct == out[0]["read_back"]
    with pytest.raises(ValueError, match="has no target column 'picture'"):
        chain(model, rows, [Link("text_to_image", {"picture": "image"})])
    with pytest.raises(ValueError, match="at least one target column"):
        Link("text_to_image", {})


def test_cli_infer_writes_generated_images(digits, tok, tmp_path, capsys):
    import json

    from PIL import Image

    from moe_gen.cli import main
    from moe_gen.tasks import load_preset

    task = load_preset("text_to_image_maskgit", "train", limit=8)
    torch.manual_seed(0)
    GeneralistModel.build(flavour("debug"), [task], tok).save_pretrained(str(tmp_path / "model"))
    assert main(["infer", str(tmp_path / "model"), "--task", "text_to_image_maskgit", "--rows", "2",
                 "--parallel-steps", "2", "--images", str(tmp_path / "images")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["row"] for line in lines] == [0, 1]
    for line in lines:
        assert Image.open(line["image"]).size == (16, 16)


def test_an_image_target_without_a_tokenizer_is_a_clear_error_at_inference(digits, tok):
    train, _ = digits
    rows = [{"label": r["label"], "image": r["image"]} for r in train[:4]]
    task = Task("patches", "draw a handwritten [TEXT:label] -> [IMAGE:image]", rows)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok)
    with pytest.raises(ValueError, match=r"cannot be generated; an image target needs an image tokenizer: "
                                         r"\[IMAGE:image,preprocess=image_vq\]"):
        model.infer(task, rows[:1])


def test_the_model_keeps_its_image_tokenizer_and_uses_it_after_reloading(digits, tok, tmp_path):
    import shutil

    from moe_gen.tasks.modalities.image_codes import default_image_vq_path

    train, _ = digits
    config = VQConfig(size=8, codes=16, code_dim=4, hidden=16)
    images = images_to_tensor([r["image"] for r in train], config.size)
    own = str(tmp_path / "own_vq.safetensors")
    train_image_vq(images, config, steps=20, batch_size=16, seed=1).save(own)
    rows = [{"label": r["label"], "image": r["image"]} for r in train[:6]]
    options = {"image_vq": {"tokenizer": own}}
    task = Task("draw", INSTRUCTION, rows, preprocessor_options=options)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    assert model.config.image_tokenizers == {"draw/image_vq": dataclasses_asdict(config)}
    assert not any(p.requires_grad for p in model.image_tokenizers.parameters())
    parameters = model.num_parameters()
    assert parameters == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("image_tokenizers."))
    from moe_gen.trainer import select_trainable

    assert select_trainable(model, "all") == parameters  # training everything leaves the tokenizer frozen
    assert not any(p.requires_grad for p in model.image_tokenizers.parameters())
    before = [p.image for p in model.infer(task, rows[:2])]
    assert before[0].shape == (8, 8, 3)  # the task's own 8-pixel tokenizer, not the shipped one
    model.save_pretrained(str(tmp_path / "model"))
    shutil.move(own, str(tmp_path / "moved.safetensors"))  # the file is gone; the model still has it
    loaded = GeneralistModel.from_pretrained(str(tmp_path / "model")).eval()
    # a task object that names no tokenizer (the shipped 16-pixel one) is bound to the model's copy
    fresh = Task("draw", INSTRUCTION, rows)
    after = [p.image for p in loaded.infer(fresh, rows[:2])]
    assert [a.shape for a in after] == [(8, 8, 3)] * 2 and all((a == b).all() for a, b in zip(after, before))
    # encoding with the model's tokenizer and statistics reuses the plan the model bound
    sample = fresh.encode(0, loaded.tokenizer, training=False, statistics=loaded.encoding_statistics(fresh))
    assert len([c for c in sample.decoder if c.column == "image"][0].tokens) == 4
    assert default_image_vq_path().endswith("image_vq_digits.safetensors")


def dataclasses_asdict(config):
    import dataclasses

    return dataclasses.asdict(config)


def test_parallel_decoding_places_codes_after_a_literal_decoder_prefix(digits, tok):
    import random

    from moe_gen.model.parallel import mask_token
    from moe_gen.objectives import ParallelObjective
    from moe_gen.tasks.batch import IGNORE_INDEX, collate

    train, _ = digits
    rows = [{"label": r["label"], "image": r["image"]} for r in train[:6]]
    task = Task("drawn", "draw a handwritten [TEXT:label] -> here it is: [IMAGE:image,preprocess=image_vq]", rows,
                objective="parallel")
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    samples = list(task.samples(tok))
    plain = collate(samples, tok, model.task_ids)
    batch = ParallelObjective(model).prepare(samples, random.Random(0))
    scored = batch.labels != IGNORE_INDEX
    # a masked position t is scored with the code it held, the item plain teacher forcing predicts at t - 1
    rows_, cols = scored.nonzero(as_tuple=True)
    assert (batch.labels[rows_, cols] == plain.labels[rows_, cols - 1]).all()
    prefix = len(tok.encode("here it is:"))
    assert int(cols.min()) >= prefix + 1  # BOS and the literal prefix are never masked or scored
    assert (batch.decoder.tokens[:, :prefix + 1] == plain.decoder.tokens[:, :prefix + 1]).all()
    seen = []
    hook = model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    answers = model.infer(task, rows[:2])  # a parallel-objective task decodes in parallel by default
    hook.remove()
    assert len(seen) == 4 and all(a.image.shape == (16, 16, 3) for a in answers)
    for answer in answers:
        assert all(tok.bin_index(t) < 128 for t in answer.tokens) and mask_token(tok) not in answer.tokens
    # one pass = the most likely code at each code position of the all-masked sequence
    from moe_gen.model.parallel import _masked_batch

    plan = model.plan(task)
    encoded = [plan.encode(row, i, training=False, inference=True) for i, row in enumerate(rows[:2])]
    grammar = TargetGrammar(plan, tok, modality_ids=model.modality_ids)
    slot = grammar.first
    spec = grammar.slots[slot].decode
    masked = _masked_batch(model, grammar, slot, encoded, mask_token(tok))
    with torch.no_grad():
        hidden = model.decode(masked.decoder, masked.encoder, model.encode(masked.encoder), causal=False).hidden
        codes = torch.tensor(spec.tokens)
        where = prefix + 1 + torch.arange(spec.length)
        best = model.output_logits(hidden[:, where])[..., codes].argmax(-1)
    single = model.infer(task, rows[:2], parallel_steps=1)
    assert [a.tokens for a in single] == [[spec.tokens[k] for k in row] for row in best.tolist()]


def test_loading_image_tokenizers_leaves_the_seed_as_set(tok):
    """A task's image tokenizer is loaded when its plan is first made (inside the first build), and a
    model keeps a frozen copy: neither may draw from the global RNG, or the same seed would give a
    model other weights depending on whether its Task objects had been used before."""
    from moe_gen.tasks import load_preset
    from moe_gen.tasks.modalities.image_codes import default_image_vq_path

    torch.manual_seed(0)
    state = torch.get_rng_state()
    ImageVQ.load(default_image_vq_path())
    assert torch.equal(torch.get_rng_state(), state)
    tasks = [load_preset("digit_masked_modeling", "train", limit=8)]
    weights = []
    for _ in range(2):  # the first build makes the task's plan, the second reuses it
        torch.manual_seed(0)
        weights.append(GeneralistModel.build(flavour("debug"), tasks, tok).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("box_target", [False, True])
def test_a_box_beside_an_image_code_slot_is_measured_against_that_image(tok, box_target):
    """image_vq records the image's original size (and resize scale) as the ``image`` preprocessor
    does, so a BOX slot beside it needs no width/height columns and gets the same tokens."""
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)  # 60 wide, 40 high
    row = {"img": image, "box": [5, 5, 30, 20], "y": "cat"}
    template = ("[IMAGE:img,preprocess={}] where is the cat? -> [BOX:box]" if box_target
                else "[IMAGE:img,preprocess={}] [BOX:box] what is here? -> [TEXT:y]")
    boxes, sizes = {}, {}
    for pre in ("image", "image_vq"):
        sample = Task("t", template.format(pre), [row]).encode(0, tok, training=False)
        boxes[pre] = [c.tokens for c in (sample.decoder if box_target else sample.encoder) if c.modality == "BOX"]
        sizes[pre] = sample.meta["image_size"]  # what a decoded box maps back to
    assert boxes["image_vq"] == boxes["image"] and len(boxes["image"][0]) == 4
    assert sizes["image_vq"] == sizes["image"] == (60.0, 40.0)


def test_image_code_meta_matches_the_image_preprocessor(tok):
    import random

    from moe_gen.tasks.instruction import Slot
    from moe_gen.tasks.modalities.base import EncodeContext
    from moe_gen.tasks.modalities.image_codes import ImageCodePreprocessor
    from moe_gen.tasks.modalities.visual import ImagePreprocessor

    image = (np.random.default_rng(1).random((30, 50, 3)) * 255).astype(np.uint8)
    slot = Slot("IMAGE", "img")
    ctx = EncodeContext(tok, random.Random(0), training=False)
    codes = ImageCodePreprocessor()(image, slot, ctx).meta
    patches = ImagePreprocessor(size=16, patch=8)(image, slot, ctx).meta
    assert codes["original_size"] == patches["original_size"] == (50.0, 30.0)
    assert codes["scale"] == patches["scale"] == (16 / 50, 16 / 30)
    assert len(codes["codes"]) == 16


def test_a_model_cast_to_bf16_reads_the_same_image_codes(digits, tok):
    """The model's frozen copy of the tokenizer keeps fp32 weights under ``model.to(bf16)`` and
    encodes in fp32: with bf16 weights and inputs ~3% of the codes (inputs and image targets) changed."""
    train, _ = digits
    rows = [{"label": r["label"], "image": r["image"]} for r in train[:48]]
    task = Task("draw", INSTRUCTION, rows)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()

    def codes():
        plan = model.plan(task)
        return [[c.tokens for c in plan.encode(r, i, training=False).decoder if c.column == "image"][0]
                for i, r in enumerate(rows)]

    fp32 = codes()
    fp32_image = model.plan(task).preprocessor_named("image_vq").to_image(range(16))
    model.to(torch.bfloat16)
    assert codes() == fp32
    assert {p.dtype for p in model.image_tokenizers.parameters()} == {torch.float32}
    generated = model.plan(task).preprocessor_named("image_vq").to_image(range(16))
    assert generated.dtype == np.uint8 and generated.shape == (16, 16, 3) and (generated == fp32_image).all()
    predictions = model.infer(task, rows[:1])
    assert predictions[0].image.dtype == np.uint8 and predictions[0].image.shape == (16, 16, 3)


def test_the_tokenizer_encodes_in_fp32_under_autocast_and_with_low_precision_weights(digits):
    import copy

    from moe_gen.tasks.modalities.image_codes import load_image_vq

    train, _ = digits
    vq = load_image_vq()
    images = images_to_tensor([r["image"] for r in train], vq.config.size)
    codes, pixels = vq.encode(images), vq.decode(vq.encode(images))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vq.encode(images), codes) and torch.equal(vq.decode(codes), pixels)
    assert torch.equal(vq.encode(images.to(torch.float64)), codes)
    # weights held in bf16 (set directly, as a model saved in bf16 by an older version loads them):
    # the lookup still runs in fp32, on those weights upcast, and decodes to fp32 pixels
    held = copy.deepcopy(vq)
    for p in held.parameters():
        p.data = p.data.to(torch.bfloat16)
    upcast = copy.deepcopy(held).float()
    assert torch.equal(held.encode(images), upcast.encode(images))
    decoded = held.decode(codes)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, upcast.decode(codes))
    assert {p.dtype for p in held.parameters()} == {torch.bfloat16}  # encoding leaves the module as it was


@pytest.mark.parametrize("size", [2, 6, 10, 18])
def test_vq_config_refuses_a_side_two_stride_2_stages_do_not_divide(size):
    with pytest.raises(ValueError, match="multiple of 4"):
        VQConfig(size=size)
    assert VQConfig(size=size + 2).grid == (size + 2) // 4  # the multiples of 4 beside it are taken


def _small_vq(seed: int = 0, beta: float = 0.25) -> tuple[ImageVQ, torch.Tensor]:
    torch.manual_seed(seed)
    vq = ImageVQ(VQConfig(size=8, codes=16, code_dim=4, hidden=16, beta=beta))
    return vq, torch.rand(4, 3, 8, 8)


def test_vq_loss_is_reconstruction_plus_codebook_plus_beta_commitment():
    vq, images = _small_vq(beta=0.3)
    recon, loss, ids = vq(images)
    z = vq._vectors(images)
    q = vq.codebook[torch.cdist(z, vq.codebook).argmin(-1)]
    gap = ((q - z) ** 2).mean()  # codebook and commitment terms have the same value; only gradients differ
    expected = ((recon - images) ** 2).mean() + gap + 0.3 * gap
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(ids.flatten(), torch.cdist(z, vq.codebook).argmin(-1))


def test_vq_gradients_are_straight_through_and_the_codebook_learns_only_from_its_term():
    """Encoder: the reconstruction's gradient at the chosen codes, passed to the encoder outputs
    unchanged (straight-through), plus β·commitment; codebook: only ‖q - sg(z)‖²."""
    vq, images = _small_vq(beta=0.25)
    _, loss, _ = vq(images)
    loss.backward()
    got = {name: p.grad.clone() for name, p in vq.named_parameters()}

    ref, _ = _small_vq(beta=0.25)
    z = ref._vectors(images)
    ids = torch.cdist(z.detach(), ref.codebook).argmin(-1)
    q_leaf = ref.codebook[ids].detach().requires_grad_()
    recon_loss = ((ref._pixels(q_leaf, len(images)) - images) ** 2).mean()
    grad_q, = torch.autograd.grad(recon_loss, q_leaf, retain_graph=True)
    recon_loss.backward()  # the decoder's own gradient
    q = ref.codebook[ids]
    (((q - z.detach()) ** 2).mean() + 0.25 * ((z - q.detach()) ** 2).mean()).backward(retain_graph=True)
    z.backward(grad_q)  # straight-through: dL/dz = dL/dq
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert float(got["encoder.0.weight"].abs().sum()) > 0


def test_dead_codes_are_exactly_the_unchosen_ones_and_move_onto_batch_vectors():
    from moe_gen.tasks.modalities.image_codes import _restart_dead_codes

    torch.manual_seed(0)
    vq = ImageVQ(VQConfig(size=8, codes=4, code_dim=3, hidden=8))
    before = vq.codebook.detach().clone()
    z = torch.randn(5, 3) + 10  # far from the initial entries, so a moved entry is recognisable
    ids = torch.tensor([0, 0, 2, 2, 0])  # code 0 chosen thrice, 2 twice, 1 and 3 never
    assert _restart_dead_codes(vq, z, ids, torch.Generator().manual_seed(0)) == 2
    after = vq.codebook.detach()
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    for k in (1, 3):
        assert any(torch.equal(after[k], row) for row in z)
    assert _restart_dead_codes(vq, z, torch.tensor([0, 1, 2, 3, 3]), torch.Generator()) == 0


def test_dead_code_restarts_stop_for_the_last_fifth_of_training(digits, monkeypatch):
    from moe_gen.tasks.modalities import image_codes

    calls = []
    real = image_codes._restart_dead_codes
    monkeypatch.setattr(image_codes, "_restart_dead_codes", lambda *a: calls.append(1) or real(*a))
    config = VQConfig(size=8, codes=4, code_dim=2, hidden=4)
    images = images_to_tensor([r["image"] for r in digits[0][:8]], config.size)
    train_image_vq(images, config, steps=10, batch_size=4, restart_every=1)
    assert len(calls) == 8  # steps 0..7: step < 0.8 · 10
    calls.clear()
    train_image_vq(images, config, steps=10, batch_size=4, restart_every=3)
    assert len(calls) == 3  # steps 0, 3, 6
    calls.clear()
    train_image_vq(images, config, steps=3, batch_size=4, restart_every=0)
    assert calls == []


def test_to_image_rounds_the_decoded_pixels():
    from moe_gen.tasks.modalities.image_codes import ImageCodePreprocessor

    pre = ImageCodePreprocessor()
    codes = list(range(pre.code_length))
    pixels = pre.vq.decode(torch.tensor([codes]))[0].permute(1, 2, 0).numpy().astype(np.float64)
    expected = np.round(pixels * 255).astype(np.uint8)
    assert np.array_equal(pre.to_image(codes), expected)


def test_code_tokens_fill_a_vocabulary_with_exactly_as_many_bins_as_codes():
    from moe_gen.tasks.modalities.image_codes import ImageCodePreprocessor

    pre = ImageCodePreprocessor()
    codes = pre.vq.config.codes
    exact = Tokenizer.default(num_bins=codes)
    assert pre.code_tokens(exact) == tuple(exact.bin_id(k) for k in range(codes))
    with pytest.raises(ValueError, match=f"{codes} codes but the vocabulary only {codes - 1} location bins"):
        pre.code_tokens(Tokenizer.default(num_bins=codes - 1))
