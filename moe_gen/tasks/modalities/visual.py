"""IMAGE and VIDEO: decode, resize, normalise, cut into patches.

Shape legend: H, W image height and width (after resizing), P patch size, C=3 channels,
N patches (rows), F = P·P·C features per patch, T frames.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from moe_gen.registry import ADAPTERS, PREPROCESSORS
from moe_gen.tasks.modalities.base import (
    Adapter,
    EncodeContext,
    ModalitySpec,
    Preprocessor,
    SlotEncoding,
    SlotValueError,
    register_modality,
    regular_file,
    tensor_to_numpy,
    undecoded_media,
)

__all__ = ["load_image", "augment_image", "shift_image", "unknown_augmentations", "IMAGE_AUGMENTATIONS",
           "AUGMENT_KINDS", "ImagePreprocessor", "VideoPreprocessor", "PatchAdapter", "ConvPatchAdapter", "patchify"]

register_modality(ModalitySpec("IMAGE", text_like=False, preprocess="image", adaptor="image_patch"))
register_modality(ModalitySpec("VIDEO", text_like=False, preprocess="video", adaptor="video_patch"))

# Rows and columns, and frames, the patch adapters have position embeddings for.
MAX_GRID_SIDE = 64
MAX_FRAMES = 64
# a float image whose maximum is at most this is a [0, 1] image (bicubic resizing overshoots 1 by up to
# ~15%); above it, pixels are read as [0, 255]
FLOAT_OVERSHOOT = 1.5

# ``augment=`` of an IMAGE input slot: label-preserving geometric changes drawn per sample in
# training (PIL ``Image.Transpose`` names; None is the image as it is). ``mirror``: left-right or not;
# ``dihedral``: the 8 symmetries of the square (4 rotations by 90°, each mirrored or not) — for
# answers that do not depend on orientation, such as how many objects an image shows.
IMAGE_AUGMENTATIONS: dict[str, tuple[Optional[str], ...]] = {
    "mirror": (None, "FLIP_LEFT_RIGHT"),
    "dihedral": (None, "ROTATE_90", "ROTATE_180", "ROTATE_270", "FLIP_LEFT_RIGHT", "FLIP_TOP_BOTTOM",
                 "TRANSPOSE", "TRANSVERSE"),
}
# ``shift``: the picture moved by a whole number of pixels each way, up to ``SHIFT_FRACTION`` of its
# width and height (uniform, zero included), the uncovered border filled with the image's median
# colour (its background, for objects on a plain ground). Kinds combine with "+", applied left to
# right: ``augment=dihedral+shift``.
SHIFT_FRACTION = 1 / 16
AUGMENT_KINDS = (*IMAGE_AUGMENTATIONS, "shift")


def unknown_augmentations(kind: str) -> list[str]:
    """The parts of an ``augment=`` value (``+``-separated) that name no augmentation."""
    return [part for part in kind.split("+") if part not in AUGMENT_KINDS]

# PIL modes with an alpha channel ("a": premultiplied); _rgb composites them onto white.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# ImageNet statistics: the usual normalisation of RGB inputs.
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _from_lists(value: Any, what: str) -> np.ndarray:
    """Nested lists of numbers as a float32 array (numbers beyond float32's range become inf,
    which ``_as_uint8`` refuses)."""
    try:
        with np.errstate(over="ignore"):
            return np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise SlotValueError(f"{what} given as nested lists must be rectangular and hold numbers") from None


def _as_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Pixels as uint8: uint8 as they are; other numbers scaled (floats up to ``FLOAT_OVERSHOOT``
    and 0/1 integers by 255, values beyond 255 down to the array's maximum) and clipped to
    [0, 255]."""
    if array.dtype.kind not in "biuf":
        raise SlotValueError(f"{what} must hold numbers, got dtype {array.dtype}")
    if array.size == 0:
        raise SlotValueError(f"{what} is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        return array
    if not np.isfinite(array).all():
        raise SlotValueError(f"{what} has non-finite values")
    low = float(array.min())
    if low < 0:  # (clipped, an ImageNet-normalised image came out two-thirds black)
        raise SlotValueError(f"{what} has negative pixel values (down to {low:.3g}): pixels are expected in [0, 1] "
                             "or [0, 255]; undo a normalisation such as (x - mean) / std before passing the image")
    high = float(array.max())
    if array.dtype.kind == "f" and high <= FLOAT_OVERSHOOT:
        scale = 255.0  # a [0, 1] image; what a resampling filter overshoots past 1 is clipped
    else:
        scale = 255.0 if high <= 1.0 else 255.0 / high if high > 255 else 1.0
    with np.errstate(over="ignore"):  # float16 pixels times 255 may overflow; the clip bounds them
        return np.clip(array * scale, 0, 255).astype(np.uint8)


def _rgb(image):
    """A PIL image as RGB. A 16-bit image (a 16-bit PNG: ``I;16``) is read on its 16-bit range,
    65535 as 255 (before the twenty-sixth session's audit it was scaled by its brightest pixel as an
    array is, so a dark picture came out nearly white, and one below 256 read as 8-bit); the
    other modes of more than 8 bits a channel (``I``, ``F``), whose range the image does not say,
    are scaled as arrays are (``_as_uint8``): PIL's own conversion clips them at 255, so a
    16-bit image came out nearly white and a float one in [0, 1] nearly black. An image with
    transparency (an alpha channel: ``RGBA``, ``LA``, ``PA``; a transparent colour of a ``P``,
    ``L`` or ``RGB`` image) is composited onto white: dropping the alpha kept whatever colour
    transparent pixels hold, so a black stroke on transparent black (how icons and sketches are
    saved) came out all black."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        pixels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.rint(np.clip(pixels, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8))
    elif image.mode in ("I", "F") or image.mode.startswith("I;"):
        pixels = np.asarray(image).astype(np.float32 if image.mode == "F" else np.int64)
        image = Image.fromarray(_as_uint8(pixels, f"a {image.mode} image"))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def _upright(image):
    """``image`` turned as its EXIF orientation says (a copy), or itself when it has none to apply."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) not in (0, 1) else image


def load_image(value: Any):
    """A PIL RGB image from a PIL image, an array ``[H, W]``/``[H, W, C]`` (C = 1, 3 or 4 for RGBA;
    uint8, or float in [0, 1]), a tensor ``[C, H, W]``, a file path or encoded bytes, or a Hugging
    Face ``{"bytes", "path"}`` dict (``Image(decode=False)``: the bytes, else the path); transparent
    pixels are composited onto white. An image's EXIF orientation is applied (a file's, bytes' or PIL
    image's), so the image is upright as viewers show it and boxes drawn on it land where they were
    drawn (a phone photo was read sideways before the twenty-sixth session's audit). A tensor is
    channels first (C = 1, 3 or 4). Raises ``SlotValueError``."""
    from PIL import Image

    if isinstance(value, Mapping):  # (before the fifteenth audit refused: "needs an image, ..., got dict")
        value = undecoded_media(value, "an IMAGE slot")
    if isinstance(value, str) and not os.path.exists(value):
        raise SlotValueError(f"an IMAGE slot got text {value[:40]!r}, which is neither an image nor an "
                             "existing file")
    if isinstance(value, (list, tuple)):  # nested lists, e.g. from JSONL
        value = _from_lists(value, "an image")
    if isinstance(value, torch.Tensor):  # channels first, as torch (and torchvision's read_image) has them
        value = tensor_to_numpy(value)
        if value.ndim == 3 and value.shape[0] in (1, 3, 4):  # (before the twenty-sixth session's audit a
            value = value.transpose(1, 2, 0)  # [3, H, 3] image read as [H, W, C], and [4, H, W] was refused)
    if isinstance(value, np.ndarray):
        if value.ndim == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        if value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[-1] not in (3, 4)):
            raise SlotValueError(f"an image array must be [H, W] or [H, W, 3] (or [H, W, 4]: RGBA), got shape "
                                 f"{value.shape}")
        value = Image.fromarray(_as_uint8(value, "an image array"))
    try:
        if isinstance(value, Image.Image):
            image = _rgb(_upright(value))
        elif isinstance(value, (bytes, bytearray)):
            image = _rgb(_upright(Image.open(io.BytesIO(value))))
        elif isinstance(value, (str, os.PathLike)):
            with Image.open(regular_file(value, "image")) as img:
                image = _rgb(_upright(img))
        else:
            raise SlotValueError(f"an IMAGE slot needs an image, array, path, bytes or a {{'bytes', 'path'}} dict, got "
                                 f"{type(value).__name__}")
    except Image.DecompressionBombError as exc:
        raise SlotValueError(f"the image is too large to decode safely ({exc})") from None
    except SlotValueError:
        raise
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, EOFError, SyntaxError, ...
        raise SlotValueError(f"cannot decode the image: {exc}") from None
    if image.width == 0 or image.height == 0:
        raise SlotValueError(f"the image is empty ({image.width}x{image.height} pixels)")
    return image


def patchify(image_CHW: torch.Tensor, patch: int, stride: Optional[int] = None) -> torch.Tensor:
    """``[C, H, W]`` → ``[rows·columns, P·P·C]`` row-major patches, each laid out (row, column,
    channel); ``stride < patch`` gives overlapping patches (``(H - P) / stride + 1`` a side)."""
    C, H, W = image_CHW.shape
    stride = stride or patch
    x = image_CHW.unfold(1, patch, stride).unfold(2, patch, stride)  # [C, rows, columns, P, P]
    return x.permute(1, 2, 3, 4, 0).reshape(-1, patch * patch * C)


def augment_image(img, kind: str, rng):
    """``img`` under a random draw of each of ``kind``'s augmentations (``+``-separated, in order):
    one of ``IMAGE_AUGMENTATIONS[part]``'s transformations, uniformly, the identity included, or a
    ``shift``."""
    from PIL import Image

    for part in kind.split("+"):
        if part == "shift":
            img = shift_image(img, rng)
            continue
        name = rng.choice(IMAGE_AUGMENTATIONS[part])
        img = img if name is None else img.transpose(getattr(Image.Transpose, name))
    return img


def shift_image(img, rng, fraction: float = SHIFT_FRACTION):
    """``img`` moved by (dx, dy) pixels, each drawn uniformly from ±``fraction`` of the side, on a
    canvas of its median colour; what moves past an edge is cut off."""
    from PIL import Image

    width, height = img.size
    dx = rng.randint(-int(width * fraction), int(width * fraction))
    dy = rng.randint(-int(height * fraction), int(height * fraction))
    pixels = np.asarray(img)
    fill = np.median(pixels.reshape(-1, pixels.shape[-1]) if pixels.ndim == 3 else pixels.reshape(-1, 1), axis=0)
    fill = tuple(int(round(v)) for v in fill)
    moved = Image.new(img.mode, img.size, fill if len(fill) > 1 else fill[0])
    moved.paste(img, (dx, dy))
    return moved


def _to_tensor(img, size: int) -> torch.Tensor:
    from PIL import Image

    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - _MEAN) / _STD


def _grid_positions(frames: int, side: int, frame_offset: int = 0) -> torch.Tensor:
    f, r, c = torch.meshgrid(torch.arange(frames) + frame_offset, torch.arange(side), torch.arange(side),
                             indexing="ij")
    return torch.stack([f, r, c], dim=-1).reshape(-1, 3)


def _tiling_problem(size: int, patch: int, stride: int) -> Optional[str]:
    """Why ``patch``-pixel patches every ``stride`` pixels do not tile a ``size``² image for the
    patch adapters, or None when they do."""
    if not 0 < stride <= patch or size < patch or (size - patch) % stride:
        return (f"image size {size}, patch {patch} and stride {stride} do not tile: need "
                f"0 < stride <= patch <= size and (size - patch) divisible by the stride")
    if (size - patch) // stride + 1 > MAX_GRID_SIDE:
        return (f"image size {size}, patch {patch} and stride {stride} give {(size - patch) // stride + 1} "
                f"patches a side; the patch adapters hold {MAX_GRID_SIDE} (use a larger patch, with a stride "
                f"up to it, or a smaller size: the stride cannot pass the patch)")
    return None


@PREPROCESSORS.register("image")
class ImagePreprocessor(Preprocessor):
    """Image → resized to ``size``² → normalised → P×P patches, ``stride`` pixels apart (default
    ``patch``: side by side; smaller: overlapping, so that a small object lies whole inside some
    patch); ``mask_ratio`` drops a random share of the patches in training, and at inference when
    the task predicts the image (the kept ones keep their grid positions); ``augment``
    (``mirror``, ``dihedral``, ``shift``, or several joined by ``+``) mirrors, rotates or moves each
    training image at random (``augment_image``)."""

    modality = "IMAGE"
    corruptions = ("mask_ratio",)

    def __init__(self, size: int = 32, patch: int = 8, stride: Optional[int] = None) -> None:
        stride = patch if stride is None else stride
        problem = _tiling_problem(size, patch, stride)
        if problem:
            raise ValueError(problem)
        self.size, self.patch, self.stride = size, patch, stride

    def feature_dim(self) -> int:
        return self.patch * self.patch * 3

    def check_slot(self, where: str, slot) -> None:
        """A slot's own ``stride=`` must tile this preprocessor's size and patch."""
        if "stride" in slot.attrs:
            problem = _tiling_problem(self.size, self.patch, int(slot.attrs["stride"]))
            if problem:
                raise ValueError(f"{where}: {problem}")

    def _stride(self, slot) -> int:
        return int(slot.attrs.get("stride", self.stride))

    def __call__(self, value, slot, ctx: EncodeContext) -> SlotEncoding:
        try:
            img = load_image(value)
        except SlotValueError as exc:
            raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None
        if ctx.training and slot.attrs.get("augment"):
            img = augment_image(img, str(slot.attrs["augment"]), ctx.rng)
        width, height = img.size
        stride = self._stride(slot)
        features = patchify(_to_tensor(img, self.size), self.patch, stride)
        side = (self.size - self.patch) // stride + 1
        positions = _grid_positions(1, side)
        ratio = slot.attrs.get("mask_ratio")
        if ratio and ctx.corrupts(slot.column):
            keep = max(1, round(features.shape[0] * (1 - float(ratio))))
            chosen = sorted(ctx.rng.sample(range(features.shape[0]), keep))
            features, positions = features[chosen], positions[chosen]
        region = slot.attrs.get("region")
        if region:
            crop = self._region(img, str(region), slot, ctx)
            features = torch.cat([features, patchify(_to_tensor(crop, self.size), self.patch, stride)])
            positions = torch.cat([positions, _grid_positions(1, side, frame_offset=1)])
        return SlotEncoding(self.modality, features=features, positions=positions,
                            meta={"original_size": (float(width), float(height)),
                                  "scale": (self.size / width, self.size / height)})

    @staticmethod
    def _region(img, column: str, slot, ctx: EncodeContext):
        """The part of the image inside the row's box ``column`` (``region=column``): a closer look
        at a region the instruction asks about, as a second frame of the same slot."""
        from moe_gen.tasks.modalities.box import check_box

        if ctx.row is None or column not in ctx.row:
            raise SlotValueError(f"{ctx.where(slot.column)}: region={column} names a box column the row lacks")
        try:
            x0, y0, x1, y1 = check_box(ctx.row[column], *img.size)
        except ValueError as exc:
            raise SlotValueError(f"{ctx.where(column)}: {exc}") from None
        # whole pixels covering the box, at least one pixel each way (a zero-size box is a valid BOX)
        width, height = img.size
        left, top = min(math.floor(x0), width - 1), min(math.floor(y0), height - 1)
        right, bottom = max(math.ceil(x1), left + 1), max(math.ceil(y1), top + 1)
        return img.crop((max(left, 0), max(top, 0), min(right, width), min(bottom, height)))


def load_video_frames(value: Any, size: Optional[int] = None) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 frames (T ≥ 1) from an array (uint8, or float in [0, 1]), nested
    lists, a tensor or a video file (PyAV). With ``size``, a file's frames are resized to
    ``size``² (bicubic, as the preprocessor resizes them) as they are decoded, so a long HD file
    does not sit in memory whole (a minute at 1080p is ~11 GB of frames). Raises
    ``SlotValueError``. A Hugging Face ``{"bytes", "path"}`` dict (``Video(decode=False)``) reads
    as its bytes, else its path."""
    if isinstance(value, Mapping):
        value = undecoded_media(value, "a VIDEO slot")
    if isinstance(value, torch.Tensor):
        value = tensor_to_numpy(value)
    if isinstance(value, (list, tuple)):  # nested lists, e.g. from JSONL
        value = _from_lists(value, "a video")
    if isinstance(value, np.ndarray):
        if value.ndim != 4 or value.shape[-1] not in (3, 4):
            raise SlotValueError(f"a video array must be [T, H, W, 3] (or [T, H, W, 4] with alpha), got shape "
                                 f"{value.shape}")
        if value.shape[0] == 0:
            raise SlotValueError("the video has no frames")
        frames = _as_uint8(value, "a video array")
        if frames.shape[-1] == 4:  # transparent pixels onto white, as an IMAGE slot reads them
            from PIL import Image

            frames = np.stack([np.asarray(_rgb(Image.fromarray(frame, "RGBA"))) for frame in frames])
        return frames
    if isinstance(value, (str, os.PathLike, bytes, bytearray)):
        import av

        source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else regular_file(value, "video")
        try:
            with av.open(source) as container:
                if not container.streams.video:  # (decode(video=0) raised "tuple index out of range")
                    held = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
                    raise SlotValueError(f"the file has no video stream (it holds {held})")
                frames = [_decoded_frame(f, size) for f in container.decode(video=0)]
            video = np.stack(frames) if frames else None
        except SlotValueError:
            raise
        except Exception as exc:  # FFmpeg errors, unreadable paths, frames of changing size
            raise SlotValueError(f"cannot decode the video: {exc}") from None
        if video is None:
            raise SlotValueError("the video has no frames")
        if video.size == 0:
            raise SlotValueError(f"the video's frames are empty (shape {video.shape})")
        return video
    raise SlotValueError(f"a VIDEO slot needs frames [T, H, W, 3], a file (path or bytes) or a {{'bytes', 'path'}} "
                         f"dict, got {type(value).__name__}")


def _decoded_frame(frame, size: Optional[int]) -> np.ndarray:
    """A decoded frame as the video is shown: turned by the stream's display rotation (a phone's
    portrait clip is stored sideways), transparent pixels onto white as an IMAGE slot reads them
    (before the twenty-seventh session's audit both were ignored: the clip read sideways, and black
    strokes on transparent black all black); resized to ``size``² where given."""
    from PIL import Image

    alpha = any(component.is_alpha for component in frame.format.components)  # (to_image drops it)
    image = _rgb(Image.fromarray(frame.to_ndarray(format="rgba"), "RGBA") if alpha else frame.to_image())
    rotation = getattr(frame, "rotation", 0) or 0  # degrees counter-clockwise (PyAV >= 13)
    if rotation % 360:
        image = image.rotate(rotation, expand=True)
    if size is not None:
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image)


@PREPROCESSORS.register("video")
class VideoPreprocessor(Preprocessor):
    """Video → ``frames`` evenly spaced frames (random offset within each stride in training) →
    per-frame patches with (frame, row, column) positions."""

    modality = "VIDEO"

    def __init__(self, frames: int = 4, size: int = 32, patch: int = 8) -> None:
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
            raise ValueError(f"video: frames must be a whole number from 1 to {MAX_FRAMES} (the patch adapters' "
                             f"frame embeddings), got {frames!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) for n in (size, patch)) or not 0 < patch <= size:
            raise ValueError(f"video: size and patch must be whole numbers with 0 < patch <= size, got size={size!r}, "
                             f"patch={patch!r}")
        if size % patch or size // patch > MAX_GRID_SIDE:
            raise ValueError(f"video size {size} must be a multiple of the patch size {patch}, "
                             f"at most {MAX_GRID_SIDE} patches a side")
        self.frames, self.size, self.patch = frames, size, patch

    def feature_dim(self) -> int:
        return self.patch * self.patch * 3

    def __call__(self, value, slot, ctx: EncodeContext) -> SlotEncoding:
        try:
            video = load_video_frames(value, size=self.size)
        except SlotValueError as exc:
            raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None
        count = int(slot.attrs.get("length", self.frames))
        stride = len(video) / count
        offsets = [ctx.rng.random() if ctx.training else 0.5 for _ in range(count)]
        picks = [min(len(video) - 1, int((i + o) * stride)) for i, o in enumerate(offsets)]
        from PIL import Image

        patches = [patchify(_to_tensor(Image.fromarray(video[p]), self.size), self.patch) for p in picks]
        side = self.size // self.patch
        return SlotEncoding(self.modality, features=torch.cat(patches),
                            positions=_grid_positions(count, side),
                            meta={"frames": picks, "num_frames": len(video)})


class PatchAdapter(Adapter):
    """Linear patch embedding plus learned frame, row and column embeddings."""

    def __init__(self, feature_dim: int, d_model: int, max_frames: int = MAX_FRAMES,
                 max_side: int = MAX_GRID_SIDE) -> None:
        super().__init__(feature_dim, d_model)
        self.proj = nn.Linear(feature_dim, d_model)
        self.frame = nn.Embedding(max_frames, d_model)
        self.row = nn.Embedding(max_side, d_model)
        self.col = nn.Embedding(max_side, d_model)

    def forward(self, features_NF, positions_N3):
        f, r, c = positions_N3.unbind(-1)
        return self.proj(features_NF) + self.frame(f) + self.row(r) + self.col(c)


class ConvPatchAdapter(PatchAdapter):
    """A small convolutional stem per patch before the projection (``adaptor=image_conv``): two 3×3
    convolutions, the second with stride 2, whose filters are shared by every place in the patch,
    so that a stroke is recognised wherever it falls; then frame, row and column embeddings as in
    ``PatchAdapter``. The features must be square RGB patches laid out (row, column, channel)."""

    def __init__(self, feature_dim: int, d_model: int, max_frames: int = MAX_FRAMES, max_side: int = MAX_GRID_SIDE,
                 channels: int = 32) -> None:
        super().__init__(feature_dim, d_model, max_frames, max_side)
        side = int(round((feature_dim / 3) ** 0.5))
        if 3 * side * side != feature_dim or side % 2:
            raise ValueError(f"image_conv needs square RGB patches of even side; {feature_dim} features are not")
        self.side = side
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU())
        self.proj = nn.Linear(channels * (side // 2) ** 2, d_model)

    def forward(self, features_NF, positions_N3):
        pixels = features_NF.view(-1, self.side, self.side, 3).permute(0, 3, 1, 2)
        f, r, c = positions_N3.unbind(-1)
        return self.proj(self.stem(pixels).flatten(1)) + self.frame(f) + self.row(r) + self.col(c)


ADAPTERS.register("image_conv")(ConvPatchAdapter)
ADAPTERS.register("image_patch")(PatchAdapter)
# OFASys's `image_vit`: a ViT's stem is exactly this linear patch projection plus positions; the
# transformer that follows is the shared model itself.
ADAPTERS.register("image_vit")(PatchAdapter)
ADAPTERS.register("video_patch")(PatchAdapter)
