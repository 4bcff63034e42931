"""Images with transparency, fifteenth audit: RGBA, LA and palette images with a transparent
colour are composited onto white before patching (the alpha was dropped, so a black stroke on a
transparent background, as icons and sketches are saved, came out all black); images without
transparency, the built-in digits among them, read as before."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from moe_gen.tasks import Task
from moe_gen.tasks.modalities.visual import load_image
from moe_gen.tasks.sources.vision import load_digit_images, make_canvases


def _bar() -> np.ndarray:
    """32×32 RGBA: an opaque black vertical bar, elsewhere transparent black."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 14:18, 3] = 255
    return rgba


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def _bar_on_white() -> np.ndarray:
    expected = np.full((32, 32, 3), 255, np.uint8)
    expected[8:24, 14:18] = 0
    return expected


@pytest.mark.parametrize("value", [
    _bar(),
    Image.fromarray(_bar(), "RGBA"),
    _encoded(Image.fromarray(_bar(), "RGBA")),
    _encoded(Image.fromarray(_bar(), "RGBA").convert("LA")),
    Image.fromarray(_bar(), "RGBA").convert("PA"),
], ids=["RGBA array", "RGBA image", "RGBA PNG", "LA PNG", "PA image"])
def test_transparent_pixels_read_as_white(value):
    assert np.array_equal(np.asarray(load_image(value)), _bar_on_white())


@pytest.mark.parametrize("mode, fmt", [("P", "PNG"), ("P", "GIF"), ("L", "PNG"), ("RGB", "PNG")])
def test_a_transparent_colour_reads_as_white(mode, fmt):
    image = Image.fromarray(_bar_on_white()).convert(mode)  # white ground, black bar
    inverted = Image.fromarray(255 - np.asarray(image.convert("L"))).convert(mode)  # black ground, white bar
    key = inverted.getpixel((0, 0))  # the ground's colour (its palette index for P) is the transparent one
    data = _encoded_with_transparency(inverted, fmt, key)
    loaded = np.asarray(load_image(data))
    assert loaded.shape == (32, 32, 3)
    assert (loaded[0, 0] == 255).all() and (loaded[12, 15] == 255).all()  # ground and bar both white now


def _encoded_with_transparency(image: Image.Image, fmt: str, key) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, transparency=key)
    return out.getvalue()


def test_half_transparent_black_reads_as_mid_grey():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 128
    assert np.abs(np.asarray(load_image(rgba)).astype(int) - 127).max() <= 1


def test_opaque_images_and_the_built_in_digits_read_as_before():
    opaque = np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    assert np.array_equal(np.asarray(load_image(opaque)), opaque[..., :3])
    digit = load_digit_images("train")[0]["image"]  # [8, 8] grey
    assert np.array_equal(np.asarray(load_image(digit)), np.repeat(digit[..., None], 3, axis=2))
    canvas = make_canvases("train", count=1)[0]["image"]  # [64, 64, 3]
    assert np.array_equal(np.asarray(load_image(canvas)), canvas)


def test_an_rgba_picture_encodes_as_the_picture_on_white(tok):
    rows = [{"image": v, "label": "one"} for v in (_encoded(Image.fromarray(_bar(), "RGBA")), _bar_on_white(),
                                                    np.zeros((32, 32, 3), np.uint8))]
    task = Task("bars", "[IMAGE:image] which digit? -> [TEXT:label]", rows)
    features = [task.encode(i, tok, training=False).encoder[0].rows for i in range(3)]
    assert torch.equal(features[0], features[1]) and not torch.equal(features[0], features[2])
