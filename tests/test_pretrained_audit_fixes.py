"""What an audit of pretrained loading found (2026-12-05, eighth session), each pinned: Whisper's
default tokenizer starts the decoder with <|startoftranscript|>, and a frozen-encoder input refuses
a checkpoint folder of another family."""

from __future__ import annotations

import warnings

import pytest

from moe_gen.pretrained import locate
from moe_gen.tasks import Task, Tokenizer

WHISPER = "[AUDIO:audio,preprocess=whisper_mel,adaptor=whisper_conv] -> <|notimestamps|> [TEXT:text]"


def test_from_hf_whisper_with_its_default_tokenizer_transcribes_as_transformers_does():
    from moe_gen.pretrained.checkpoints import CheckpointMissing
    from moe_gen.pretrained.ctranslate2 import greedy_decode, load_whisper, prompt_ids
    from moe_gen.pretrained.hf import from_hf
    from moe_gen.tasks.sources.speech import load_real_clips

    try:
        path = locate("whisper-tiny.en")
    except CheckpointMissing as exc:  # not installed: the message names the command
        pytest.skip(str(exc))
    rows = [{"audio": r["audio"], "text": r["text"]} for r in load_real_clips()][:2]
    task = Task("transcribe", WHISPER, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_hf("whisper-tiny.en", [task]).eval()  # no tokenizer given: the checkpoint's
        reference, hf_tokenizer, extractor = load_whisper(path)
    assert model.tokenizer.bos_id == model.tokenizer.backend.token_to_id("<|startoftranscript|>")  # was EOS's
    for row, prediction in zip(rows, model.infer(task, rows, max_new_tokens=24)):
        features = extractor(row["audio"], sampling_rate=16000, return_tensors="pt").input_features
        ids = greedy_decode(reference, features, prompt_ids(reference), 24)
        assert prediction.text.strip() == hf_tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_a_frozen_encoder_refuses_a_folder_of_another_family(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)).save_pretrained(str(tmp_path))
    rows = [{"text": "Lists are mutable.", "topic": "lists"}]
    task = Task("t", "[TEXT:text,preprocess=bert_states] which topic? -> [TEXT:topic,closed_set]", rows,
                preprocessor_options={"bert_states": {"checkpoint": str(tmp_path)}})
    with pytest.raises(ValueError, match="holds a llama checkpoint, not bert"):
        task.plan(Tokenizer.default())
