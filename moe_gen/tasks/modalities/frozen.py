"""Inputs read by a frozen pretrained encoder: the checkpoint's hidden states become a slot's
feature rows, and a small adapter that trains with the model projects them to its width.

    [TEXT:text,preprocess=bert_states] which help topic is this from? -> [TEXT:topic,closed_set]
    [AUDIO:audio,preprocess=whisper_states] which word is spoken? -> [TEXT:text,closed_set]

``bert_states`` runs a BERT-family encoder (default: the shipped all-MiniLM-L6-v2, ``minilm``) over
the text: row 0 is the mean of the token states (the checkpoint's sentence embedding, as
sentence-transformers pools it), then one row per WordPiece token (``[CLS]`` and ``[SEP]``
included), at most ``max_length`` tokens (default 256, the checkpoint's training length).
``whisper_states`` runs a Whisper encoder (default: the shipped ``whisper-tiny.en``) over the clip's
own log-mel frames, not padded to 30 s: one row per 20 ms. Each preprocessor names its own adapter
(an MLP plus a row-index embedding, registered under the same name), so a slot needs no
``adaptor=``; the encoder's weights never train and are not saved with the model (the model needs
the checkpoint's package wherever it runs: ``make pretrained``).

Which checkpoint: ``Task(..., preprocessor_options={"bert_states": {"checkpoint": FOLDER}})`` (a
shipped checkpoint's name or a folder transformers reads; for Whisper also a CTranslate2 folder).
Encoded values are kept per preprocessor instance (``cache_size`` values, least recently used
dropped first), so an epoch after the first costs no encoder pass.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
from typing import Any, Optional

import numpy as np
import torch

from moe_gen.tasks.modalities.base import (
    ADAPTERS, PREPROCESSORS, EncodeContext, Preprocessor, SlotEncoding, SlotValueError, brief,
)
from moe_gen.tasks.modalities.signals import (
    SAMPLE_RATE, FrameMLPAdapter, _frame_positions, _slot_waveform, resample,
)

__all__ = ["FrozenStates", "BertStates", "WhisperStates"]

# Attributes that change a text's tokens; a frozen encoder reads the text as written.
_TEXT_EDITS = ("mask_ratio", "noise_ratio", "uncased", "no_punctuation")


def _checkpoint_folder(checkpoint: str) -> str:
    """A shipped checkpoint's folder (``locate``), or ``checkpoint`` itself when it is a folder."""
    from moe_gen.pretrained.checkpoints import CHECKPOINTS, locate

    if checkpoint in CHECKPOINTS:
        return locate(checkpoint)
    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint {checkpoint!r} is neither a shipped checkpoint ({', '.join(CHECKPOINTS)}) "
                         "nor a folder")
    return checkpoint


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

    model = WhisperModel.from_pretrained(folder).eval()
    return WhisperFeatureExtractor(feature_size=model.config.num_mel_bins), model.encoder


class FrozenStates(Preprocessor):
    """Base of the frozen-encoder preprocessors: the encoder's states ``[N, H]`` of a value,
    computed once per value and kept (``cache_size`` values, least recently used dropped first).
    Subclasses set ``modality``, ``default_checkpoint`` and implement ``key`` and ``states``."""

    default_checkpoint = ""
    adaptor: Optional[str] = None  # the adapter registered under the preprocessor's name

    def __init__(self, checkpoint: Optional[str] = None, cache_size: int = 4096) -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.checkpoint = checkpoint or self.default_checkpoint
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[Any, torch.Tensor] = collections.OrderedDict()
        self._width: Optional[int] = None

    def feature_dim(self) -> int:
        if self._width is None:
            self._width = self.width()
        return self._width

    def width(self) -> int:
        raise NotImplementedError

    def key(self, value: Any, slot, ctx: EncodeContext) -> tuple[Any, Any]:
        """(cache key, what ``states`` reads) of a raw value; raises ``SlotValueError`` for bad ones."""
        raise NotImplementedError

    def states(self, prepared: Any) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, value: Any, slot, ctx: EncodeContext) -> SlotEncoding:
        key, prepared = self.key(value, slot, ctx)
        rows = self._cache.get(key)
        if rows is None:
            with torch.no_grad():
                rows = self.states(prepared).float().contiguous()
            if not torch.isfinite(rows).all():
                raise SlotValueError(f"{ctx.where(slot.column)}: the encoder's states of this value are not finite")
            if self.cache_size:
                self._cache[key] = rows
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return SlotEncoding(self.modality, features=rows, positions=_frame_positions(rows.shape[0]),
                            meta={"rows": int(rows.shape[0])})


@PREPROCESSORS.register("bert_states")
class BertStates(FrozenStates):
    """Text → a frozen BERT-family encoder's last hidden states: row 0 their mean over the tokens,
    then one row per token (at most ``max_length`` tokens, default 256)."""

    modality = "TEXT"
    default_checkpoint = "minilm"
    adaptor = "bert_states"
    default_length = 256

    def width(self) -> int:
        return int(_bert(_checkpoint_folder(self.checkpoint))[1].config.hidden_size)

    def key(self, value, slot, ctx):
        edits = [name for name in _TEXT_EDITS if name in slot.attrs]
        if edits:
            raise SlotValueError(f"{ctx.where(slot.column)}: bert_states reads the text as written; "
                                 f"drop {', '.join(edits)}")
        if not isinstance(value, str):
            raise SlotValueError(f"{ctx.where(slot.column)}: bert_states needs a str, got {brief(value)}")
        length = int(slot.attrs.get("max_length", self.default_length))
        return (value, length), (value, length)

    def states(self, prepared) -> torch.Tensor:
        text, length = prepared
        tokenizer, encoder = _bert(_checkpoint_folder(self.checkpoint))
        batch = tokenizer(text, truncation=True, max_length=length, return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state[0]  # [N, H]
        return torch.cat([hidden.mean(0, keepdim=True), hidden])


@PREPROCESSORS.register("whisper_states")
class WhisperStates(FrozenStates):
    """Waveform → a frozen Whisper encoder's last hidden states over the clip's own mel frames
    (not padded to 30 s): one row per 20 ms."""

    modality = "AUDIO"
    default_checkpoint = "whisper-tiny.en"
    adaptor = "whisper_states"

    def width(self) -> int:
        return int(_whisper(_checkpoint_folder(self.checkpoint))[1].config.d_model)

    def key(self, value, slot, ctx):
        wav, rate = _slot_waveform(value, slot, ctx)
        seconds = wav.numel() / rate
        if seconds > 30:
            raise SlotValueError(f"{ctx.where(slot.column)}: the clip is {seconds:.3g} s long; Whisper's encoder "
                                 "reads at most 30 s (cut it)")
        wav = resample(wav, rate).float().contiguous()
        digest = hashlib.blake2b(wav.numpy().tobytes(), digest_size=16).hexdigest()
        return digest, wav

    def states(self, wav: torch.Tensor) -> torch.Tensor:
        extractor, encoder = _whisper(_checkpoint_folder(self.checkpoint))
        mel = extractor(wav.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features  # [1, 80, 3000]
        frames = max(2, int(np.ceil(wav.numel() / extractor.hop_length)))
        frames = min(mel.shape[-1], frames + frames % 2)  # the stem's stride 2 halves an even count
        return whisper_encoder_states(encoder, mel[..., :frames])[0]


def whisper_encoder_states(encoder, mel_BMF: torch.Tensor) -> torch.Tensor:
    """A transformers ``WhisperEncoder``'s last hidden states ``[B, F/2, H]`` for mel frames of any
    even length up to its 3,000 (its own ``forward`` accepts only 3,000): the same stem, positions,
    layers and final norm, the positions cut to the frames' length."""
    gelu = torch.nn.functional.gelu
    x = gelu(encoder.conv2(gelu(encoder.conv1(mel_BMF)))).transpose(1, 2)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    for layer in encoder.layers:
        out = layer(x, attention_mask=None)
        x = out[0] if isinstance(out, tuple) else out
    return encoder.layer_norm(x)


ADAPTERS.register("bert_states")(FrameMLPAdapter)
ADAPTERS.register("whisper_states")(FrameMLPAdapter)
