"""TEXT read as a bag of words (``preprocess=bag_of_words``): the row equals scikit-learn's TF-IDF,
the vocabulary comes from training rows and is saved with the model, bad values and slots are
refused naming what is wrong, and the quality suite declares doc_topic with it on request."""

from __future__ import annotations

import pytest
import torch
from helpers import train_steps
from sklearn.feature_extraction.text import TfidfVectorizer

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.quality.runner import BenchConfig
from moe_gen.quality.suite import suite_tasks
from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.instruction import InstructionError
from moe_gen.tasks.plan import TaskDataError

INSTRUCTION = "[TEXT:text,preprocess=bag_of_words] what is this about? -> [TEXT:topic,closed_set]"
TRAIN = [
    {"text": "the cat sat on the mat", "topic": "animals"},
    {"text": "a dog and a cat, and the dog barked", "topic": "animals"},
    {"text": "stocks fell as the market closed", "topic": "money"},
    {"text": "the bank raised its rates; the market fell", "topic": "money"},
]
HELD_OUT = [{"text": "The dog chased the cat to the bank!", "topic": "animals"},
            {"text": "no known word here: xyzzy", "topic": "money"}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def bag(task: Task, row: dict, tok: Tokenizer, statistics=None) -> torch.Tensor:
    chunk = task.plan(tok, statistics).encode(row, 0, training=False).encoder[0]
    assert chunk.adaptor == "bag_of_words" and chunk.tokens is None
    return chunk.rows


@pytest.mark.parametrize("size", [2048, 5])
def test_the_row_is_scikit_learns_tfidf_of_the_training_vocabulary(tok, size):
    instruction = INSTRUCTION.replace("bag_of_words", f"bag_of_words,vocab_size={size}")
    task = Task("topics", instruction, TRAIN)
    vectorizer = TfidfVectorizer(max_features=size, sublinear_tf=True).fit([r["text"] for r in TRAIN])
    for row in TRAIN + HELD_OUT:
        expected = torch.tensor(vectorizer.transform([row["text"]]).toarray(), dtype=torch.float32)
        got = bag(task, row, tok)
        assert got.shape == (1, size)  # always the slot's width, however many words were fitted
        assert torch.allclose(got[:, :expected.shape[1]], expected, atol=1e-6)
        assert not got[:, expected.shape[1]:].any()
    assert not bag(task, HELD_OUT[1], tok).any()  # no known word: an all-zero row


def test_the_vocabulary_comes_from_training_rows_and_is_saved_with_the_model(tok, tmp_path):
    train, test = Task("topics", INSTRUCTION, TRAIN), Task("topics", INSTRUCTION, HELD_OUT)
    stats = train.fit_statistics()["bag_of_words"]["text"]
    assert "cat" in stats["words"] and "chased" not in stats["words"] and len(stats["idf"]) == len(stats["words"])
    assert test.fit_statistics()["bag_of_words"]["text"] != stats  # held-out rows alone would weigh otherwise
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}), [train], tok)
    assert model.config.adapters["bag_of_words"] == 2048
    train_steps(model, train, tok)
    assert model.adapters["bag_of_words"].mlp[0].weight.grad.abs().sum() > 0  # the adapter trains
    model.eval()
    model.save_pretrained(str(tmp_path / "m"))
    loaded = GeneralistModel.from_pretrained(str(tmp_path / "m"))
    empty = Task("topics", INSTRUCTION, [])  # nothing to fit a vocabulary on
    plan_stats = loaded.encoding_statistics(empty)
    for row in HELD_OUT:
        assert torch.equal(bag(empty, row, loaded.tokenizer, plan_stats), bag(train, row, tok))
    with pytest.raises(TaskDataError, match=r"task 'topics', column 'text', row 1: bag_of_words has no vocabulary"):
        test.encode(1, tok, statistics={})  # (no statistics given: nothing fitted)
    expected = [p.text for p in model.infer(train, HELD_OUT)]
    assert [p.text for p in loaded.infer(empty, HELD_OUT)] == expected


def test_bad_values_and_slots_are_refused_naming_them(tok):
    task = Task("topics", INSTRUCTION, TRAIN + [{"text": 3.5, "topic": "money"}])
    with pytest.raises(TaskDataError, match=r"task 'topics', column 'text', row 4: bag_of_words needs a str, got "
                                            r"3\.5"):
        task.encode(4, tok)
    assert task.fit_statistics()["bag_of_words"]["text"]["words"]  # the bad row is passed over when fitting
    numbered = Task("topics", INSTRUCTION, TRAIN + [{"text": 20240, "topic": "money"}])
    assert numbered.fit_statistics() == Task("topics", INSTRUCTION, TRAIN).fit_statistics()  # not read as "20240"
    masked = Task("topics", INSTRUCTION.replace("bag_of_words", "bag_of_words,mask_ratio=0.2"), TRAIN)
    with pytest.raises(ValueError, match=r"task 'topics': slot .*bag_of_words reads whole words, not tokens; drop "
                                         r"mask_ratio"):
        masked.plan(tok)
    for size in ("0", "many", "70000"):
        with pytest.raises(InstructionError, match=r"task 'topics': bad value for 'vocab_size': expected int in "
                                                   rf"\[1, 65536\], got '{size}'"):
            Task("topics", INSTRUCTION.replace("bag_of_words", f"bag_of_words,vocab_size={size}"), TRAIN)
    plain = Task("topics", "[TEXT:text,vocab_size=10] what is this about? -> [TEXT:topic]", TRAIN)
    with pytest.raises(ValueError, match="vocab_size sizes a bag of words; it applies to preprocess=bag_of_words only"):
        plain.plan(tok)
    target = Task("topics", "[TEXT:text] what is this about? -> [TEXT:topic,preprocess=bag_of_words]", TRAIN)
    with pytest.raises(ValueError, match="only the encoder reads; use it on an input slot"):
        target.plan(tok)


@pytest.mark.parametrize("edit", ["mask_ratio=0.2", "noise_ratio=0.1", "no_punctuation", "max_length=5"])
def test_every_attribute_that_edits_tokens_is_refused_on_a_bag_of_words(tok, edit):
    name = edit.split("=")[0]
    task = Task("topics", INSTRUCTION.replace("bag_of_words", f"bag_of_words,{edit}"), TRAIN)
    with pytest.raises(ValueError, match=rf"bag_of_words reads whole words, not tokens; drop {name}$"):
        task.plan(tok)


def test_statistics_that_do_not_fit_the_slot_are_refused_and_wordless_text_fits_an_empty_vocabulary(tok):
    statistics = Task("topics", INSTRUCTION, TRAIN).fit_statistics()
    small = Task("topics", INSTRUCTION.replace("bag_of_words", "bag_of_words,vocab_size=3"), HELD_OUT)
    with pytest.raises(TaskDataError, match=r"task 'topics', column 'text', row 0: the fitted vocabulary has \d+ "
                                            r"words but the slot says vocab_size=3"):
        small.encode(0, tok, statistics=statistics)  # e.g. a model trained with the default size
    corrupt = {"bag_of_words": {"text": {"words": ["cat", "dog"], "idf": [1.0]}}}
    with pytest.raises(ValueError, match=r"task 'topics': slot .*preprocessor 'bag_of_words': bag_of_words "
                                         r"statistics of column 'text': 2 words but 1 idf values"):
        Task("topics", INSTRUCTION, HELD_OUT).plan(tok, corrupt)
    wordless = Task("topics", INSTRUCTION, [{"text": "! ? 1 2", "topic": "a"}, {"text": "- -", "topic": "b"}])
    assert wordless.fit_statistics()["bag_of_words"]["text"] == {"words": [], "idf": []}
    assert not bag(wordless, {"text": "the cat sat", "topic": "a"}, tok).any()  # every word unknown: all zero


def test_the_suite_declares_doc_topic_as_a_bag_of_words_on_request():
    plain, = suite_tasks(["doc_topic"])
    bow, = suite_tasks(["doc_topic"], bag_of_words=True)
    def preprocess(task):
        return [s.attrs["preprocess"] for s in task.build("test").instruction.encoder_slots if "preprocess" in s.attrs]

    assert preprocess(plain) == [] and preprocess(bow) == ["bag_of_words"]
    assert bow.frozen_states is None  # no second logistic regression: the classical one reads TF-IDF already
    with pytest.raises(ValueError, match="choose one"):
        suite_tasks(["doc_topic"], bag_of_words=True, pretrained_inputs=True)
    with pytest.raises(ValueError, match="choose one"):
        BenchConfig(bag_of_words=True, pretrained_inputs=True)
