"""Inputs read by a frozen pretrained encoder (``bert_states``, ``whisper_states``): the rows equal
what transformers computes, values are encoded once, bad slots and values get clear errors, a
model trains on them and reloads. Needs the shipped checkpoints (``make pretrained``); without
them these tests skip with the install command."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from moe_gen.pretrained import CheckpointMissing, locate
from moe_gen.tasks import Task, TaskDataError, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT_TASK = "[TEXT:text,preprocess=bert_states] which topic? -> [TEXT:topic,closed_set]"
AUDIO_TASK = "[AUDIO:audio,preprocess=whisper_states] which word is spoken? -> [TEXT:text,closed_set]"
ROWS = [{"text": "Lists are mutable sequences of items.", "topic": "lists"},
        {"text": "A dictionary maps hashable keys to values.", "topic": "dicts"},
        {"text": "Tuples are immutable sequences.", "topic": "lists"},
        {"text": "Sets hold unique hashable elements.", "topic": "dicts"}]


def shipped(name: str) -> str:
    try:
        return locate(name)
    except CheckpointMissing as exc:
        pytest.skip(str(exc))


def encoder_rows(task: Task, row, index: int = 0) -> torch.Tensor:
    sample = task.plan(Tokenizer.default()).encode(row, index, training=False)
    (chunk,) = [c for c in sample.encoder if c.rows is not None]
    return chunk.rows


def test_bert_states_are_the_checkpoint_hidden_states_with_their_mean_first():
    from transformers import AutoModel, AutoTokenizer

    path = shipped("minilm")
    tokenizer, reference = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    task = Task("topics", TEXT_TASK, ROWS)
    rows = encoder_rows(task, ROWS[1])
    with torch.no_grad():
        expected = reference(**tokenizer(ROWS[1]["text"], return_tensors="pt")).last_hidden_state[0]
    assert rows.shape == (expected.shape[0] + 1, 384)
    torch.testing.assert_close(rows[1:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[0], expected.mean(0), atol=1e-5, rtol=1e-5)
    # max_length caps the WordPiece tokens ([CLS] and [SEP] included); the mean is over those kept
    short = Task("topics", TEXT_TASK.replace("bert_states", "bert_states,max_length=4"), ROWS)
    rows4 = encoder_rows(short, ROWS[1])
    assert rows4.shape == (5, 384)
    torch.testing.assert_close(rows4[0], rows4[1:].mean(0), atol=1e-5, rtol=1e-5)


def test_values_are_encoded_once_and_the_cache_keeps_at_most_cache_size():
    shipped("minilm")
    task = Task("topics", TEXT_TASK, ROWS, preprocessor_options={"bert_states": {"cache_size": 2}})
    plan = task.plan(Tokenizer.default())
    pre = plan.preprocessor_named("bert_states")
    calls = []
    real = pre.states
    pre.states = lambda prepared: calls.append(prepared) or real(prepared)
    first = encoder_rows(task, ROWS[0])
    again = encoder_rows(task, ROWS[0])
    assert len(calls) == 1 and torch.equal(first, again)
    # the checkpoint given as a folder reads the same states as the shipped name
    folder = Task("topics", TEXT_TASK, ROWS, preprocessor_options={"bert_states": {"checkpoint": locate("minilm")}})
    assert torch.equal(encoder_rows(folder, ROWS[0]), first)
    for row in ROWS[1:]:
        encoder_rows(task, row)
    assert len(calls) == 4 and len(pre._cache) == 2  # the two least recently used were dropped
    encoder_rows(task, ROWS[0])
    assert len(calls) == 5
    # cache_size=0 keeps nothing: every encode runs the encoder, with the same result
    none = Task("topics", TEXT_TASK, ROWS, preprocessor_options={"bert_states": {"cache_size": 0}})
    pre0 = none.plan(Tokenizer.default()).preprocessor_named("bert_states")
    assert torch.equal(encoder_rows(none, ROWS[0]), first) and not pre0._cache


def test_whisper_states_equal_the_encoder_on_a_full_window_and_follow_the_clip_length():
    from moe_gen.pretrained.ctranslate2 import load_whisper
    from moe_gen.tasks.modalities.frozen import whisper_encoder_states

    shipped("whisper-tiny.en")
    model, _, extractor = load_whisper()
    wav = np.random.default_rng(0).standard_normal(16000 * 30).astype(np.float32) * 0.1
    mel = extractor(wav, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        expected = model.model.encoder(mel).last_hidden_state
        got = whisper_encoder_states(model.model.encoder, mel)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # a short clip: one row per 20 ms of its own frames, not 1,500
    clip = {"audio": wav[:8000], "sample_rate": 16000, "text": "yes"}
    rows = encoder_rows(Task("words", AUDIO_TASK, [clip]), clip)
    assert rows.shape == (25, 384)
    short = extractor(wav[:8000], sampling_rate=16000, return_tensors="pt").input_features  # padded to 30 s
    with torch.no_grad():
        torch.testing.assert_close(rows, whisper_encoder_states(model.model.encoder, short[..., :50])[0])


def test_bad_slots_and_values_name_the_task_column_and_row():
    shipped("minilm")
    tok = Tokenizer.default()
    # declarations are refused when the plan is built, naming the task and slot
    with pytest.raises(ValueError, match=r"task 'gen'.*bert_states.*only the encoder reads"):
        Task("gen", "[TEXT:topic] -> [TEXT:text,preprocess=bert_states]", ROWS).plan(tok)
    with pytest.raises(ValueError, match=r"task 'masked': slot .*drop mask_ratio"):
        Task("masked", TEXT_TASK.replace("bert_states", "bert_states,mask_ratio=0.3"), ROWS).plan(tok)
    for length in (2, 513):  # below [CLS] + [SEP] + one token; past MiniLM's 512 positions
        with pytest.raises(ValueError, match=rf"task 'long': slot .*max_length={length}.* to 512"):
            Task("long", TEXT_TASK.replace("bert_states", f"bert_states,max_length={length}"), ROWS).plan(tok)
    with pytest.raises(ValueError, match="cache_size"):
        Task("c", TEXT_TASK, ROWS, preprocessor_options={"bert_states": {"cache_size": -1}}).plan(tok)
    with pytest.raises(ValueError, match=r"'whisper-tiny.en' is a whisper model, not bert; .*minilm"):
        Task("c", TEXT_TASK, ROWS, preprocessor_options={"bert_states": {"checkpoint": "whisper-tiny.en"}}).plan(tok)
    with pytest.raises(ValueError, match=r"task 'c': slot .*'bert_states': checkpoint '/no/such' is neither a "
                                         r"shipped checkpoint .* nor a folder"):
        Task("c", TEXT_TASK, ROWS, preprocessor_options={"bert_states": {"checkpoint": "/no/such"}}).plan(tok)
    with pytest.raises(ValueError, match=r"task 'c': slot .*'bert_states': .*unexpected keyword"):
        Task("c", TEXT_TASK, ROWS, preprocessor_options={"bert_states": {"checkpiont": "minilm"}}).plan(tok)
    # values are refused row by row
    numbers = Task("numbers", TEXT_TASK, [{"text": 3.5, "topic": "x"}])
    with pytest.raises(TaskDataError, match=r"task 'numbers', column 'text', row 0.*needs a str"):
        numbers.plan(tok).encode(numbers.data[0], 0)
    shipped("whisper-tiny.en")
    long_clip = {"audio": np.zeros(16000 * 31, np.float32), "sample_rate": 16000, "text": "yes"}
    with pytest.raises(TaskDataError, match=r"task 'words', column 'audio', row 0.*31 s long.*at most 30 s"):
        Task("words", AUDIO_TASK, [long_clip]).plan(tok).encode(long_clip, 0)


def test_a_model_trains_on_frozen_states_and_reloads(tmp_path):
    from moe_gen.config import RouterConfig
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks.modalities.frozen import BertStates
    from moe_gen.tasks.sources.speech import load_spoken_words
    from moe_gen.trainer import TrainConfig, Trainer

    shipped("minilm")
    shipped("whisper-tiny.en")
    torch.manual_seed(0)
    text = Task("topics", TEXT_TASK, ROWS)
    words = Task("words", AUDIO_TASK, load_spoken_words("train")[:6])
    model = GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}),
                                  [text, words], Tokenizer.default())
    assert dict(model.config.adapters) == {"bert_states": 384, "whisper_states": 384}
    trainer = Trainer(model, [text, words], TrainConfig(steps=40, batch_size=8, lr=2e-3, progress=False),
                      output_dir=str(tmp_path / "run"))
    trainer.fit()
    assert trainer.evaluate(tasks=[text])["topics"]["accuracy"] == 1.0  # four training rows, memorised
    model.save_pretrained(str(tmp_path / "model"))
    loaded = GeneralistModel.from_pretrained(str(tmp_path / "model"))
    before = [p.text for p in model.infer(text, ROWS)]
    assert [p.text for p in loaded.infer(text, ROWS)] == before == [r["topic"] for r in ROWS]
    spoken = words.data[:4]
    assert [p.text for p in loaded.infer(words, spoken)] == [p.text for p in model.infer(words, spoken)]
    # training read the cached rows without writing to them: they still equal a fresh encoding
    pre = model.plan(text).preprocessor_named("bert_states")
    assert len(pre._cache) == len(ROWS)  # the plan training encoded with
    for (value, length), rows in pre._cache.items():
        fresh = BertStates(cache_size=0).states((value, length))
        torch.testing.assert_close(rows, fresh)


def test_the_suite_declares_pretrained_inputs_and_scores_a_linear_model_on_the_states():
    from moe_gen.quality.baselines import frozen_states_score
    from moe_gen.quality.suite import suite_tasks

    shipped("minilm")
    plain = {t.name: t for t in suite_tasks()}
    frozen = {t.name: t for t in suite_tasks(pretrained_inputs=True)}
    assert frozen.keys() == plain.keys()
    assert frozen["doc_topic"].frozen_states == "bert_states" and plain["doc_topic"].frozen_states is None
    assert frozen["spoken_word_classification"].frozen_states == "whisper_states"
    assert str(frozen["doc_topic"].build("train").instruction).startswith("[TEXT:text,preprocess=bert_states]")
    assert frozen["table_wine"] is plain["table_wine"]
    topic = frozen["doc_topic"]
    train = Task("doc_topic", TEXT_TASK, ROWS * 3)
    test = Task("doc_topic", TEXT_TASK, ROWS)
    assert frozen_states_score(dataclasses.replace(topic, label_column="topic"), train, test) == 1.0


def _context(task: str = "t", row=None):
    import random

    from moe_gen.tasks.modalities.base import EncodeContext

    return EncodeContext(Tokenizer.default(), random.Random(0), training=False, task=task, index=0, row=row or {})


def _counting_states(folder: str, cache_size: int, rows_of=None):
    """A FrozenStates whose "encoder" counts its calls (no checkpoint needed: a plain folder)."""
    from moe_gen.tasks.modalities.frozen import FrozenStates

    class Counting(FrozenStates):
        modality = "TEXT"
        family = "bert"

        def key(self, value, slot, ctx):
            return value, value

        def states(self, prepared):
            self.calls.append(prepared)
            return rows_of(prepared) if rows_of else torch.full((2, 3), float(len(prepared)))

    pre = Counting(checkpoint=folder, cache_size=cache_size)
    pre.calls = []
    return pre


def test_the_cache_drops_the_least_recently_used_value_not_the_oldest(tmp_path):
    from moe_gen.tasks.instruction import Slot

    pre = _counting_states(str(tmp_path), cache_size=2)
    slot, ctx = Slot("TEXT", "text"), _context()
    for value in ("a", "bb", "a", "ccc"):  # reading "a" again makes "bb" the least recently used
        pre(value, slot, ctx)
    assert pre.calls == ["a", "bb", "ccc"] and list(pre._cache) == ["a", "ccc"]
    assert torch.equal(pre("a", slot, ctx).features, torch.full((2, 3), 1.0)) and pre.calls == ["a", "bb", "ccc"]
    pre("bb", slot, ctx)
    assert pre.calls == ["a", "bb", "ccc", "bb"] and list(pre._cache) == ["a", "bb"]


def test_non_finite_encoder_states_are_refused_naming_the_row(tmp_path):
    from moe_gen.tasks.instruction import Slot
    from moe_gen.tasks.modalities.base import SlotValueError

    pre = _counting_states(str(tmp_path), cache_size=4, rows_of=lambda v: torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(SlotValueError, match=r"task 'docs', column 'text', row 0: .*not finite"):
        pre("x", Slot("TEXT", "text"), _context("docs"))
    assert not pre._cache


@pytest.mark.parametrize("cache_size", [True, 1.5, "8", -1])
def test_cache_size_must_be_a_non_negative_int(cache_size):
    from moe_gen.tasks.modalities.frozen import BertStates

    with pytest.raises(ValueError, match="cache_size must be an int >= 0"):
        BertStates(cache_size=cache_size)


def test_a_ctranslate2_folder_is_a_whisper_checkpoint_not_a_bert_one(tmp_path):
    from moe_gen.tasks.modalities.frozen import BertStates

    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="holds a whisper checkpoint, not bert"):
        BertStates(checkpoint=str(tmp_path))


def test_whisper_encoder_states_refuse_an_odd_or_out_of_range_frame_count():
    from moe_gen.tasks.modalities.frozen import whisper_encoder_states

    for frames in (51, 1, 0, 3002):  # checked before the encoder is touched
        with pytest.raises(ValueError, match="even number of mel frames from 2 to 3000"):
            whisper_encoder_states(None, torch.zeros(1, 80, frames))


@pytest.mark.parametrize("edit", ["mask_ratio=0.3", "noise_ratio=0.2", "uncased", "no_punctuation"])
def test_bert_states_refuse_every_attribute_that_edits_the_text(edit):
    shipped("minilm")
    name = edit.split("=")[0]
    with pytest.raises(ValueError, match=rf"bert_states reads the text as written; drop {name}"):
        Task("e", TEXT_TASK.replace("bert_states", f"bert_states,{edit}"), ROWS).plan(Tokenizer.default())


def test_bert_states_take_max_length_up_to_the_checkpoint_positions():
    shipped("minilm")
    for length in (3, 512):  # [CLS] + one token + [SEP]; MiniLM's 512 positions
        Task("ok", TEXT_TASK.replace("bert_states", f"bert_states,max_length={length}"), ROWS).plan(Tokenizer.default())


def test_whisper_states_take_a_30_s_clip_and_key_the_clip_with_its_rate():
    from moe_gen.tasks.instruction import Slot
    from moe_gen.tasks.modalities.base import SlotValueError
    from moe_gen.tasks.modalities.frozen import WhisperStates

    shipped("whisper-tiny.en")
    pre, slot = WhisperStates(), Slot("AUDIO", "audio")
    wav = np.random.default_rng(0).standard_normal(16000 * 30).astype(np.float32) * 0.1
    key16, (raw, rate) = pre.key(wav, slot, _context(row={"sample_rate": 16000}))
    assert rate == 16000 and raw.numel() == 16000 * 30
    with pytest.raises(SlotValueError, match=r"30 s long"):
        pre.key(np.concatenate([wav, wav[:16]]), slot, _context(row={"sample_rate": 16000}))
    # the same samples at 8 kHz are another clip (twice as long once resampled): another cache key
    key8, _ = pre.key(wav[:16000 * 15], slot, _context(row={"sample_rate": 8000}))
    key16_short, _ = pre.key(wav[:16000 * 15], slot, _context(row={"sample_rate": 16000}))
    assert len({key16, key8, key16_short}) == 3


def test_whisper_states_round_an_odd_frame_count_up():
    from moe_gen.tasks.modalities.frozen import WhisperStates, _whisper, whisper_encoder_states

    shipped("whisper-tiny.en")
    pre = WhisperStates(cache_size=0)
    extractor, encoder = _whisper(pre.folder)
    wav = np.random.default_rng(1).standard_normal(8000 + 160).astype(np.float32) * 0.1  # 51 hops of 160
    rows = pre.states((torch.from_numpy(wav), 16000))
    mel = extractor(wav, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        expected = whisper_encoder_states(encoder, mel[..., :52])[0]
    assert rows.shape == (26, 384)
    torch.testing.assert_close(rows, expected)
