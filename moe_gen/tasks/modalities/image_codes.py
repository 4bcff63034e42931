"""IMAGE as discrete codes: a small VQ-VAE image tokenizer, and the ``image_vq`` preprocessor that
turns an image into a grid of code tokens a decoder can predict (and back into pixels).

Shape legend: B images, C=3 channels, S image side (pixels), G code-grid side (S / 4), N = G·G
codes per image, K codebook size, Z code width.

The tokenizer (``ImageVQ``) is a VQ-VAE (van den Oord et al. 2017): a strided convolutional
encoder maps an S×S image to a G×G grid of Z-wide vectors, each replaced by its nearest codebook
entry, and a transposed-convolution decoder maps the grid of entries back to pixels. It trains on
reconstruction error plus the codebook and commitment terms, with the straight-through gradient;
codebook entries that no vector chose in a step are moved onto vectors of the batch, so every
code stays in use. ``scripts/train_image_vq.py`` trains the one the package ships
(``moe_gen/tasks/data/image_vq_digits.safetensors``, on the scikit-learn digits' training split)
and prints its reconstruction error.

The tokenizer encodes and decodes in float32 whatever the dtype around it: a model cast to bf16
(``model.to(torch.bfloat16)``) keeps its copy's weights in float32 (``ImageVQ._apply``), and
``encode``/``decode`` run with autocast off, on float32 inputs. The nearest-code lookup is a
discrete choice: with bf16 weights or arithmetic about 3% of the codes of the digits came out
different, changing a bf16 model's inputs and image targets against the fp32 model's.

Codes share the vocabulary's discrete-value block with box coordinates: code k is the token
``<bin_k>`` (so K ≤ the tokenizer's bins). The slot's IMAGE modality tag tells the model which
reading applies, as OFASys's image codes and location tokens both sit after the text pieces.
An instruction names the tokenizer with ``[IMAGE:img,preprocess=image_vq]`` (``image_vqgan``,
OFASys's spelling, is the same preprocessor); as a target it decodes as exactly N code tokens,
and ``model.infer`` returns the decoded image (``uint8 [S, S, 3]``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_gen.durable import fsync_file, shareable
from moe_gen.registry import PREPROCESSORS
from moe_gen.tasks.modalities.base import EncodeContext, Preprocessor, SlotEncoding, SlotValueError
from moe_gen.tasks.modalities.visual import load_image

__all__ = ["VQConfig", "ImageVQ", "train_image_vq", "default_image_vq_path", "load_image_vq",
           "ImageCodePreprocessor", "images_to_tensor"]

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """An image tokenizer's shape.

    Attributes:
        size: image side S (images are resized to S×S RGB).
        codes: codebook size K.
        code_dim: code width Z.
        hidden: convolution channels.
        beta: weight of the commitment term.
    """

    size: int = 16
    codes: int = 128
    code_dim: int = 16
    hidden: int = 64
    beta: float = 0.25

    def __post_init__(self) -> None:
        if self.size < 4 or self.size % 4:
            raise ValueError(f"VQConfig.size must be a multiple of 4 (two stride-2 stages), got {self.size}")
        if self.codes < 2 or self.code_dim < 1 or self.hidden < 1:
            raise ValueError(f"VQConfig needs codes >= 2, code_dim >= 1, hidden >= 1; got {self}")

    @property
    def grid(self) -> int:
        """G: codes per side."""
        return self.size // 4


class ImageVQ(nn.Module):
    """The VQ-VAE: ``encode`` images ``[B, 3, S, S]`` in [0, 1] → code ids ``[B, N]``; ``decode``
    code ids → images; ``forward`` → (reconstruction, loss, code ids) for training."""

    def __init__(self, config: VQConfig = VQConfig()) -> None:
        super().__init__()
        self.config = config
        H, Z = config.hidden, config.code_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(3, H // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(H // 2, H, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(H, H, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(H, Z, 1))
        self.codebook = nn.Parameter(torch.randn(config.codes, Z) * 0.1)
        self.decoder = nn.Sequential(
            nn.Conv2d(Z, H, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(H, H, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(H, H // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(H // 2, 3, 3, padding=1))

    def _vectors(self, images_BCSS: torch.Tensor) -> torch.Tensor:
        """Encoder outputs as rows ``[B·N, Z]`` (grid row-major)."""
        z = self.encoder(images_BCSS * 2 - 1)
        return z.permute(0, 2, 3, 1).reshape(-1, self.config.code_dim)

    def _nearest(self, z_MZ: torch.Tensor) -> torch.Tensor:
        return torch.cdist(z_MZ, self.codebook).argmin(-1)

    def _pixels(self, q_MZ: torch.Tensor, batch: int) -> torch.Tensor:
        G, Z = self.config.grid, self.config.code_dim
        grid = q_MZ.reshape(batch, G, G, Z).permute(0, 3, 1, 2)
        return torch.sigmoid(self.decoder(grid))

    def _apply(self, fn, recurse: bool = True):
        """Moves between devices as any module does, but float32 weights stay float32 when a cast
        (``.to(torch.bfloat16)``, ``.half()``, a model's ``.to(dtype)``) reaches the tokenizer: it is
        frozen, small, and its codes are a nearest-entry choice that lower precision changes."""
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            applied = fn(t)
            if t.dtype == torch.float32 and applied.is_floating_point() and applied.dtype != torch.float32:
                return t.to(applied.device)
            return applied

        return super()._apply(keep_fp32, recurse)

    def _fp32(self) -> "ImageVQ":
        """This tokenizer with float32 weights: itself, or a float32 copy where its weights are held
        in another dtype (set by hand, or a model saved in bf16 before casts left its copy in fp32)."""
        if all(p.dtype == torch.float32 for p in self.parameters()):
            return self
        return copy.deepcopy(self).float()

    @torch.no_grad()
    def encode(self, images_BCSS: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, N]`` (long), grid row-major; in float32 (on the tokenizer's device)
        whatever the images' dtype, the weights' and any autocast around the call."""
        vq = self._fp32()
        images_BCSS = images_BCSS.to(vq.codebook.device, torch.float32)
        with torch.autocast(images_BCSS.device.type, enabled=False):
            return vq._nearest(vq._vectors(images_BCSS)).reshape(images_BCSS.shape[0], -1)

    @torch.no_grad()
    def decode(self, codes_BN: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` (float32, on the tokenizer's device) in [0, 1] from code ids
        ``[B, N]``; in float32 as ``encode`` is."""
        codes_BN = torch.as_tensor(codes_BN, dtype=torch.long)
        if codes_BN.dim() != 2 or codes_BN.shape[1] != self.config.grid ** 2:
            raise ValueError(f"expected code ids of shape [B, {self.config.grid ** 2}], got {tuple(codes_BN.shape)}")
        if codes_BN.numel() and not 0 <= int(codes_BN.min()) <= int(codes_BN.max()) < self.config.codes:
            raise ValueError(f"code ids must lie in [0, {self.config.codes}), got {int(codes_BN.min())}.."
                             f"{int(codes_BN.max())}")
        vq = self._fp32()
        codes_BN = codes_BN.to(vq.codebook.device)
        with torch.autocast(codes_BN.device.type, enabled=False):
            return vq._pixels(vq.codebook[codes_BN.reshape(-1)], codes_BN.shape[0])

    def forward(self, images_BCSS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self._vectors(images_BCSS)
        ids = self._nearest(z.detach())
        q = self.codebook[ids]
        codebook_loss = F.mse_loss(q, z.detach())
        commitment = F.mse_loss(z, q.detach())
        q_st = z + (q - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        recon = self._pixels(q_st, images_BCSS.shape[0])
        loss = F.mse_loss(recon, images_BCSS) + codebook_loss + self.config.beta * commitment
        return recon, loss, ids.reshape(images_BCSS.shape[0], -1)

    # ---- files ---------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Weights and config in one safetensors file (written to a temporary name, then renamed)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata={"config": json.dumps(dataclasses.asdict(self.config))})
        shareable(tmp)  # (safetensors creates it owner-only)
        fsync_file(tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "ImageVQ":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} is not an image tokenizer saved by ImageVQ.save (no config in its metadata)")
        with torch.random.fork_rng(devices=[]):  # its initial draws are overwritten: the caller's seed stays as set
            model = cls(VQConfig(**json.loads(meta["config"])))
        model.load_state_dict(load_file(path))
        return model.eval()


def images_to_tensor(images: Sequence[Any], size: int) -> torch.Tensor:
    """Images (anything ``load_image`` reads) → ``[B, 3, size, size]`` float in [0, 1]."""
    from PIL import Image

    out = []
    for image in images:
        img = load_image(image).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out).clamp(0, 1)


def _restart_dead_codes(model: ImageVQ, z_MZ: torch.Tensor, ids_M: torch.Tensor, generator: torch.Generator) -> int:
    """Moves codebook entries no vector chose onto random vectors of the batch; returns how many."""
    used = torch.bincount(ids_M, minlength=model.config.codes) > 0
    dead = (~used).nonzero().flatten()
    if len(dead):
        picks = torch.randint(len(z_MZ), (len(dead),), generator=generator)
        with torch.no_grad():
            model.codebook[dead] = z_MZ[picks].detach()
    return len(dead)


def train_image_vq(images: torch.Tensor, config: VQConfig = VQConfig(), *, steps: int = 2000,
                   batch_size: int = 64, lr: float = 2e-3, seed: int = 0, restart_every: int = 50,
                   log=None) -> ImageVQ:
    """Trains an ``ImageVQ`` on ``images`` ``[B, 3, S, S]`` in [0, 1] (``images_to_tensor``).

    Dead codes are restarted every ``restart_every`` steps (on the step's batch) until the last
    fifth of training, which settles the codebook. ``log(step, loss)``, if given, is called every
    100 steps.
    """
    if images.dim() != 4 or images.shape[1:] != (3, config.size, config.size):
        raise ValueError(f"expected images [B, 3, {config.size}, {config.size}], got {tuple(images.shape)}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ImageVQ(config)
    with torch.no_grad():  # start the codebook on encoder outputs, not at random
        z = model._vectors(images[torch.randperm(len(images), generator=generator)[:batch_size]])
        model.codebook.copy_(z[torch.randint(len(z), (config.codes,), generator=generator)])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        _, loss, ids = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if restart_every and step % restart_every == 0 and step < 0.8 * steps:
            _restart_dead_codes(model, model._vectors(batch), ids.flatten(), generator)
        if log is not None and step % 100 == 0:
            log(step, float(loss))
    return model.eval()


def default_image_vq_path() -> str:
    """The tokenizer the package ships, trained on the scikit-learn digits (``scripts/train_image_vq.py``)."""
    return os.path.join(DATA_DIR, "image_vq_digits.safetensors")


def load_image_vq(path: Optional[str] = None) -> ImageVQ:
    """An ``ImageVQ`` from ``path`` (default: the shipped digits tokenizer)."""
    path = path or default_image_vq_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image tokenizer at {path}; train one with scripts/train_image_vq.py")
    return ImageVQ.load(path)


@PREPROCESSORS.register("image_vq")
class ImageCodePreprocessor(Preprocessor):
    """Image → resized to the tokenizer's side → its G×G code ids as tokens ``<bin_k>``.

    Args:
        tokenizer: path of an ``ImageVQ`` file (default: the shipped digits tokenizer). Give it as
            ``preprocessor_options={"image_vq": {"tokenizer": path}}`` on the ``Task``. A model
            built for the task keeps a copy and encodes and decodes with it (``GeneralistModel.plan``).
    """

    modality = "IMAGE"
    makes_tokens = True

    def __init__(self, tokenizer: Optional[str] = None) -> None:
        self.path = tokenizer or default_image_vq_path()
        self.vq = load_image_vq(self.path)

    def with_tokenizer(self, vq: ImageVQ) -> "ImageCodePreprocessor":
        """A copy of this preprocessor that encodes and decodes with ``vq`` (a model's own copy)."""
        other = object.__new__(type(self))
        other.path, other.vq = f"<a model's copy of {self.path}>", vq
        return other

    @property
    def code_length(self) -> int:
        """N: code tokens per image (the target's fixed length)."""
        return self.vq.config.grid ** 2

    def code_tokens(self, tokenizer) -> tuple[int, ...]:
        """The token ids of codes 0..K-1."""
        if self.vq.config.codes > tokenizer.num_bins:
            raise ValueError(f"the image tokenizer has {self.vq.config.codes} codes but the vocabulary only "
                             f"{tokenizer.num_bins} location bins to hold them")
        return tuple(tokenizer.bin_id(k) for k in range(self.vq.config.codes))

    def check_slot(self, where: str, slot) -> None:
        """Refuses the image attributes that act on patches: codes are the whole image's."""
        unread = [name for name in ("mask_ratio", "region", "augment", "stride") if name in slot.attrs]
        if unread:
            raise ValueError(f"{where}: image_vq encodes the whole image as codes and does not apply "
                             f"{', '.join(unread)}; drop {'it' if len(unread) == 1 else 'them'}")

    def __call__(self, value, slot, ctx: EncodeContext) -> SlotEncoding:
        """The image's codes as tokens; its meta holds the codes and, as ``ImagePreprocessor``'s
        does, the image's ``original_size`` (width, height) that a BOX slot beside it measures
        pixel boxes against and the resize ``scale`` (S / width, S / height)."""
        try:
            img = load_image(value)
        except SlotValueError as exc:
            raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None
        width, height = img.size
        size = self.vq.config.size
        ids = self.vq.encode(images_to_tensor([img], size))[0].tolist()  # fp32 even in a bf16 model's copy
        tokens = self.code_tokens(ctx.tokenizer)
        return SlotEncoding(self.modality, tokens=[tokens[k] for k in ids],
                            meta={"codes": ids, "original_size": (float(width), float(height)),
                                  "scale": (size / width, size / height)})

    def to_image(self, codes: Sequence[int]) -> np.ndarray:
        """Code ids → the decoded image, ``uint8 [S, S, 3]``."""
        pixels = self.vq.decode(torch.as_tensor([list(codes)]))[0].cpu()
        return (pixels.permute(1, 2, 0).float().numpy() * 255).round().astype(np.uint8)


PREPROCESSORS.register("image_vqgan")(ImageCodePreprocessor)  # OFASys's name for its image tokenizer
