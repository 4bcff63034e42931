"""Image patches: overlapping patches (``stride``), the convolutional patch stem (``image_conv``), and
training-time mirrors, rotations and shifts (``augment``)."""

from __future__ import annotations

import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.objectives import GenerativeObjective
from moe_gen.tasks import Task, Tokenizer, collate, load_preset
from moe_gen.tasks.modalities.visual import (
    IMAGE_AUGMENTATIONS,
    ConvPatchAdapter,
    ImagePreprocessor,
    patchify,
    shift_image,
)


def test_patchify_side_by_side_and_overlapping():
    image = torch.randn(3, 32, 32)
    C, H, W, P = 3, 32, 32, 8
    reference = image.reshape(C, H // P, P, W // P, P).permute(1, 3, 2, 4, 0).reshape(-1, P * P * C)
    assert torch.equal(patchify(image, 8), reference)
    overlapping = patchify(image, 8, 4)
    assert overlapping.shape == (49, 192)
    # patch (row 1, column 1) of the stride-4 grid starts at pixel (4, 4)
    assert torch.equal(overlapping[8].view(8, 8, 3), image[:, 4:12, 4:12].permute(1, 2, 0))


def test_overlapping_patches_keep_grid_positions_and_bad_strides_are_refused():
    task = load_preset("digit_classification", "train", limit=2)
    task = Task(task.name, task.instruction, task.data, preprocessor_options={"image": {"stride": 4}})
    sample = task.encode(0, Tokenizer.default(), training=False)
    chunk = next(c for c in sample.encoder if c.tokens is None)
    assert chunk.rows.shape == (49, 192) and chunk.positions[:, 1:].max().item() == 6
    for size, patch, stride in ((32, 8, 5), (32, 8, 0), (32, 8, 9)):
        with pytest.raises(ValueError, match="do not tile"):
            ImagePreprocessor(size, patch, stride)
    with pytest.raises(ValueError, match="the patch adapters hold 64"):
        ImagePreprocessor(512, 16, 4)


def test_a_slot_stride_equals_the_preprocessor_option_and_bad_ones_name_the_slot():
    tok = Tokenizer.default()
    base = load_preset("digit_counting", "train", limit=2)
    assert ",stride=4]" in str(base.instruction)  # the preset declares overlapping patches
    plain = str(base.instruction).replace(",stride=4", "")
    by_option = Task(base.name, plain, base.data, preprocessor_options={"image": {"stride": 4}})
    by_slot = Task(base.name, base.instruction, base.data)
    for seed in range(3):  # training draws (augmented) and evaluation encode the same
        for training in (True, False):
            a, b = (t.encode(1, tok, seed=seed, training=training) for t in (by_option, by_slot))
            assert torch.equal(_image_rows(a), _image_rows(b)) and _image_rows(a).shape == (49, 192)
            chunk = next(c for c in b.encoder if c.tokens is None)
            assert torch.equal(chunk.positions, next(c for c in a.encoder if c.tokens is None).positions)
    for instruction, message in (
            ("[IMAGE:image,stride=5] how many? -> [TEXT:count]", "stride 5 do not tile"),
            ("[IMAGE:image,stride=9] how many? -> [TEXT:count]", "stride 9 do not tile"),
            ("[IMAGE:image,stride=4,preprocess=image_vq] how many? -> [TEXT:count]", "preprocess=image_vq")):
        with pytest.raises(ValueError, match=message) as caught:
            Task("strided", instruction, base.data).encode(0, tok, training=False)
        assert "task 'strided'" in str(caught.value) and "slot [IMAGE:image" in str(caught.value)


def test_conv_stem_trains_through_a_model_and_refuses_non_square_patches():
    base = load_preset("digit_counting", "train", limit=4)
    instruction = str(base.instruction).replace("[IMAGE:image,", "[IMAGE:image,adaptor=image_conv,")
    task = Task(base.name, instruction, base.data, preprocessor_options={"image": {"stride": 4}})
    tok = Tokenizer.default()
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok)
    assert isinstance(model.adapters["image_conv"], ConvPatchAdapter)
    batch = collate(list(task.samples(tok)), tok, model.task_ids)
    GenerativeObjective(model)(batch)["loss"].backward()
    assert model.adapters["image_conv"].stem[0].weight.grad.abs().sum() > 0
    # one patch's output depends on that patch's pixels only
    adapter = model.adapters["image_conv"].eval()
    rows, positions = torch.randn(2, 192), torch.zeros(2, 3, dtype=torch.long)
    changed = rows.clone()
    changed[1] += 1.0
    with torch.no_grad():
        a, b = adapter(rows, positions), adapter(changed, positions)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="square RGB patches"):
        ConvPatchAdapter(100, 64)


def test_region_adds_the_box_crop_as_a_second_frame_and_bad_boxes_name_the_column():
    task = load_preset("grounded_captioning", "train", limit=3)
    assert "region=query_box" in str(task.instruction)
    row = task.data[0]
    sample = task.encode(0, Tokenizer.default(), training=False)
    chunk = next(c for c in sample.encoder if c.tokens is None)
    assert chunk.rows.shape == (32, 192) and chunk.positions[:16, 0].eq(0).all() and chunk.positions[16:, 0].eq(1).all()
    # the second frame is the box's crop, resized and patched like the whole image
    from moe_gen.tasks.modalities.visual import _to_tensor, load_image

    x0, y0, x1, y1 = row["query_box"]
    crop = load_image(row["image"]).crop((x0, y0, x1, y1))
    assert torch.equal(chunk.rows[16:], patchify(_to_tensor(crop, 32), 8))
    from moe_gen.tasks.plan import TaskDataError

    bad = Task("grounded", str(task.instruction), [dict(row, query_box=[10, 10, 500, 20])])
    with pytest.raises(TaskDataError, match="task 'grounded', column 'query_box', row 0"):
        bad.encode(0, Tokenizer.default(), training=False)
    # a box of zero or fractional size still gives a whole pixel of the canvas, never an empty
    # (black) crop
    from PIL import Image

    black = patchify(_to_tensor(Image.new("RGB", (1, 1)), 32), 8)
    x0, y0 = row["query_box"][:2]
    for box in ([x0, y0, x0, y0], [x0 + 0.5, y0, x0 + 1.5, y0 + 5]):
        tiny = Task("grounded", str(task.instruction), [dict(row, query_box=box)])
        frame = next(c for c in tiny.encode(0, Tokenizer.default(), training=False).encoder if c.tokens is None)
        assert frame.rows.shape == (32, 192) and not torch.allclose(frame.rows[16:], black)
    missing = Task("grounded", "[IMAGE:image,region=box] what digit? -> [TEXT:query]",
                   [{"image": row["image"], "query": "3"}])
    with pytest.raises(TaskDataError, match="region=box names a box column the row lacks"):
        missing.encode(0, Tokenizer.default(), training=False)


def _image_rows(sample) -> torch.Tensor:
    return next(c for c in sample.encoder if c.tokens is None).rows


def test_augment_draws_every_symmetry_in_training_and_leaves_evaluation_alone():
    from PIL import Image

    tok = Tokenizer.default()
    counting = load_preset("digit_counting", "train", limit=1)
    assert "augment=dihedral" in str(counting.instruction)
    plain = str(counting.instruction).replace(",augment=dihedral", "")
    image = Image.fromarray(counting.data[0]["image"])
    expected = {}  # each symmetry's patches, as a task without augment encodes the transformed image
    for name in IMAGE_AUGMENTATIONS["dihedral"]:
        turned = image if name is None else image.transpose(getattr(Image.Transpose, name))
        row = dict(counting.data[0], image=turned)
        expected[name] = _image_rows(Task("plain", plain, [row]).encode(0, tok, training=False))
    assert len({tuple(v.flatten()[:64].tolist()) for v in expected.values()}) == 8  # the canvas has no symmetry

    def drawn(seed: int):
        rows = _image_rows(counting.encode(0, tok, seed=seed, training=True))
        return [name for name, want in expected.items() if torch.equal(rows, want)]

    draws = [drawn(seed) for seed in range(48)]
    assert all(len(d) == 1 for d in draws)  # every training encoding is exactly one symmetry
    assert {d[0] for d in draws} == set(IMAGE_AUGMENTATIONS["dihedral"])
    assert drawn(7) == draws[7]  # the same seed draws the same one (exact resume)
    for seed in range(4):  # evaluation sees the image as it is
        assert torch.equal(_image_rows(counting.encode(0, tok, seed=seed, training=False)), expected[None])

    mirror = Task("mirror", plain.replace("[IMAGE:image", "[IMAGE:image,augment=mirror", 1), counting.data)
    assert {name for seed in range(24) for name in [n for n, want in expected.items() if torch.equal(
        _image_rows(mirror.encode(0, tok, seed=seed, training=True)), want)]} == {None, "FLIP_LEFT_RIGHT"}


@pytest.mark.parametrize("instruction, message", [
    ("[IMAGE:image,augment=spin] how many? -> [TEXT:count]",
     "unknown augment 'spin' in 'spin'; known: mirror, dihedral, shift"),
    ("[IMAGE:image,augment=dihedral+spin] how many? -> [TEXT:count]", "unknown augment 'spin' in 'dihedral\\+spin'"),
    ("[IMAGE:image,augment=mirror] where is it? -> [BOX:query_box]", "boxes would no longer match"),
    ("[IMAGE:image,augment=mirror,region=query_box] what digit? -> [TEXT:query]", "boxes would no longer match"),
    ("[TEXT:count] -> [IMAGE:image,augment=mirror]", "applies to input images"),
    ("[IMAGE:image,augment=mirror,preprocess=image_vq] how many? -> [TEXT:count]", "preprocess=image_vq"),
])
def test_augment_is_refused_where_it_would_change_the_answer_or_cannot_apply(instruction, message):
    rows = load_preset("digit_counting", "train", limit=1).data
    with pytest.raises(ValueError, match=message) as caught:
        Task("augmented", instruction, rows).encode(0, Tokenizer.default(), training=True)
    assert "task 'augmented'" in str(caught.value) and "slot [IMAGE:image" in str(caught.value)


def test_shift_moves_the_picture_within_a_sixteenth_of_each_side_on_its_median_colour():
    import random

    import numpy as np
    from PIL import Image

    pixels = np.full((64, 48, 3), 30, dtype=np.uint8)
    pixels[20:24, 10:13] = (200, 100, 50)  # a small object on a plain ground
    pixels[0, :] = 90  # a top row that the median ignores
    image = Image.fromarray(pixels)
    seen = set()
    for seed in range(400):
        out = np.asarray(shift_image(image, random.Random(seed)))
        ys, xs = np.nonzero((out == (200, 100, 50)).all(axis=-1))
        dy, dx = int(ys.min()) - 20, int(xs.min()) - 10
        assert abs(dx) <= 3 and abs(dy) <= 4  # 48 // 16 and 64 // 16
        expected = np.full_like(pixels, 30)  # the uncovered border takes the median colour
        src = pixels[max(0, -dy):64 - max(0, dy), max(0, -dx):48 - max(0, dx)]
        expected[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
        assert np.array_equal(out, expected)
        seen.add((dx, dy))
    assert len(seen) == 7 * 9  # every offset in range is drawn, zero included


def test_augments_combine_left_to_right_and_only_in_training():
    import random

    import numpy as np
    from PIL import Image

    from moe_gen.tasks.modalities.visual import augment_image

    tok = Tokenizer.default()
    counting = load_preset("digit_counting", "train", limit=1)
    both = Task("both", str(counting.instruction).replace("augment=dihedral", "augment=dihedral+shift"), counting.data)
    image = Image.fromarray(counting.data[0]["image"])
    for seed in range(8):  # one dihedral draw, then a shift, from the same generator
        rng = random.Random(seed)
        name = rng.choice(IMAGE_AUGMENTATIONS["dihedral"])
        want = shift_image(image if name is None else image.transpose(getattr(Image.Transpose, name)), rng)
        got = augment_image(image, "dihedral+shift", random.Random(seed))
        assert np.array_equal(np.asarray(got), np.asarray(want))
    plain = _image_rows(counting.encode(0, tok, seed=0, training=False))
    assert torch.equal(_image_rows(both.encode(0, tok, seed=0, training=False)), plain)
    draws = {tuple(_image_rows(both.encode(0, tok, seed=seed, training=True)).flatten()[::97].tolist())
             for seed in range(16)}
    dihedral_only = {tuple(_image_rows(counting.encode(0, tok, seed=seed, training=True)).flatten()[::97].tolist())
                     for seed in range(16)}
    assert len(dihedral_only) <= 8 < len(draws)  # shifts add draws beyond the 8 symmetries
    assert torch.equal(_image_rows(both.encode(0, tok, seed=5, training=True)),
                       _image_rows(both.encode(0, tok, seed=5, training=True)))  # exact resume


def test_a_grid_of_exactly_64_patches_a_side_is_accepted_and_65_refused():
    """The patch adapters hold rows and columns 0 .. 63: 64 patches a side fit, side by side or overlapping."""
    assert ImagePreprocessor(512, 8).size == 512  # (512 - 8) / 8 + 1 = 64
    assert ImagePreprocessor(260, 8, 4).stride == 4  # (260 - 8) / 4 + 1 = 64
    with pytest.raises(ValueError, match="give 65 patches a side; the patch adapters hold 64"):
        ImagePreprocessor(520, 8)


def test_mask_ratio_drops_that_share_of_the_patches_and_keeps_the_rest_at_their_places():
    """mask_ratio=0.75 of a 4x4 grid keeps round(16 * 0.25) = 4 patches in training, each the same
    row, at the same grid position, as in the unmasked encoding; evaluation keeps all 16."""
    tok = Tokenizer.default()
    rows = load_preset("digit_classification", "train", limit=1).data
    masked = Task("masked", "[IMAGE:image,mask_ratio=0.75] what digit? -> [TEXT:label]", rows)
    whole = _image_chunk(masked.encode(0, tok, training=False))
    assert whole.rows.shape == (16, 192)
    grid = {tuple(p.tolist()): r for p, r in zip(whole.positions, whole.rows)}
    kept_sets = set()
    for seed in range(6):
        chunk = _image_chunk(masked.encode(0, tok, seed=seed, training=True))
        assert chunk.rows.shape == (4, 192)
        for position, row in zip(chunk.positions, chunk.rows):
            assert torch.equal(grid[tuple(position.tolist())], row)
        kept_sets.add(tuple(map(tuple, chunk.positions.tolist())))
    assert len(kept_sets) > 1  # a fresh draw per seed


def _image_chunk(sample):
    return next(c for c in sample.encoder if c.tokens is None)


def test_a_region_crop_covers_every_pixel_its_box_touches_and_a_corner_point_takes_the_corner_pixel():
    """The crop runs from floor(x0), floor(y0) to ceil(x1), ceil(y1) (a box's fractional edge keeps
    its pixel), and a zero-size box at the far corner of the image crops that corner's pixel."""
    import math

    from PIL import Image

    from moe_gen.tasks.modalities.visual import _to_tensor, load_image

    task = load_preset("grounded_captioning", "train", limit=1)
    row = task.data[0]
    image = load_image(row["image"])
    width, height = image.size
    x0, y0, x1, y1 = row["query_box"]
    fractional = [x0 + 0.6, y0 + 0.6, x1 - 0.3, y1 - 0.3]
    for box, pixels in ((fractional, (math.floor(fractional[0]), math.floor(fractional[1]), math.ceil(fractional[2]),
                                      math.ceil(fractional[3]))),
                        ([width, height, width, height], (width - 1, height - 1, width, height))):
        encoded = Task("grounded", str(task.instruction), [dict(row, query_box=box)])
        chunk = _image_chunk(encoded.encode(0, Tokenizer.default(), training=False))
        expected = patchify(_to_tensor(image.crop(pixels), 32), 8)
        assert torch.equal(chunk.rows[16:], expected), box
    assert isinstance(image, Image.Image)


def test_video_frames_are_the_middle_of_each_stride_at_evaluation_and_drawn_within_it_in_training():
    """8 frames read as 4: evaluation takes frames 1, 3, 5, 7 (the middle of each stride of 2),
    training one of each stride's two; a draw at the top of [0, 1) still picks a frame of the clip."""
    import random
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from moe_gen.tasks.modalities.base import EncodeContext
    from moe_gen.tasks.modalities.visual import VideoPreprocessor, _to_tensor

    tok = Tokenizer.default()
    video = np.stack([np.full((16, 16, 3), 25 * k, np.uint8) for k in range(8)])
    video[:, :4, :4] = 255  # not a constant frame
    preprocessor = VideoPreprocessor(frames=4, size=16, patch=8)
    slot = SimpleNamespace(attrs={}, column="video")
    evaluated = preprocessor(video, slot, EncodeContext(tok, random.Random(0), training=False))
    assert evaluated.meta["frames"] == [1, 3, 5, 7]
    expected = torch.cat([patchify(_to_tensor(Image.fromarray(video[p]), 16), 8) for p in (1, 3, 5, 7)])
    assert torch.equal(evaluated.features, expected)
    assert evaluated.positions[:, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    drawn = set()
    for seed in range(20):
        picks = preprocessor(video, slot, EncodeContext(tok, random.Random(seed), training=True)).meta["frames"]
        assert all(p in (2 * i, 2 * i + 1) for i, p in enumerate(picks)), picks
        drawn.add(tuple(picks))
    assert len(drawn) > 1

    class Top(random.Random):
        def random(self) -> float:
            return 1 - 2 ** -53

    picks = preprocessor(video[:3], SimpleNamespace(attrs={"length": 3}, column="video"),
                         EncodeContext(tok, Top(), training=True)).meta["frames"]
    assert len(picks) == 3 and all(0 <= p < 3 for p in picks)


def test_image_tensors_are_normalised_by_the_imagenet_statistics():
    """A plain colour, resized, is that colour / 255, less the ImageNet mean, over its deviation."""
    from PIL import Image

    from moe_gen.tasks.modalities.visual import _to_tensor

    colour = (255, 128, 0)
    x = _to_tensor(Image.new("RGB", (8, 8), colour), 16)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for channel in range(3):
        want = (colour[channel] / 255 - mean[channel]) / std[channel]
        assert torch.allclose(x[channel], torch.full((16, 16), want), atol=1e-5)
