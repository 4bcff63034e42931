"""Subword regularisation (a TEXT input's ``subword_sampling=alpha``): training reads of an input
draw segmentations of its text, by the sample's seed; evaluation, answers and other slots keep the
tokenizer's own segmentation; slots and vocabularies that cannot sample are refused at plan time."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.tokenizer import BaseTokenizer

ROWS = [{"text": "The assignment statement binds names to objects in the namespace.", "label": "assignment"},
        {"text": "A for loop repeats its block once for every item of the sequence.", "label": "loops"}] * 3


def _input(task, tok, seed, training=True) -> list[int]:
    return task.encode(0, tok, seed=seed, training=training).encoder[0].tokens


def test_a_seed_draws_one_segmentation_of_the_same_text(tok):
    text = ROWS[0]["text"]
    drawn = [tok.encode_sampled(text, 0.3, seed) for seed in range(12)]
    assert tok.encode_sampled(text, 0.3, 5) == drawn[5]  # the same seed, the same pieces
    assert len({tuple(ids) for ids in drawn}) > 3
    assert tuple(tok.encode(text)) in {tuple(ids) for ids in drawn}  # the most likely one is among them
    assert all(tok.decode(ids) == tok.decode(tok.encode(text)) for ids in drawn)
    # alpha sharpens: near 1 the draws stay closer to the most likely segmentation than near 0
    length = len(tok.encode(text))
    sharp = sum(len(tok.encode_sampled(text, 1.0, seed)) for seed in range(12))
    flat = sum(len(tok.encode_sampled(text, 0.05, seed)) for seed in range(12))
    assert 12 * length <= sharp < flat


def test_location_and_sentinel_tokens_stay_whole(tok):
    text = "the box <bin_3> <bin_17> then <extra_id_0> end"
    for seed in range(8):
        ids = tok.encode_sampled(text, 0.1, seed)
        assert [i for i in ids if tok.is_special(i)] == [tok.bin_id(3), tok.bin_id(17), tok.sentinel_id(0)]


def test_training_reads_of_an_input_vary_and_evaluation_reads_the_plain_pieces(tok):
    sampled = Task("topic", "[TEXT:text,subword_sampling=0.2] which topic? -> [TEXT:label,closed_set]", ROWS)
    plain = Task("topic", "[TEXT:text] which topic? -> [TEXT:label,closed_set]", ROWS)
    reference = _input(plain, tok, 0)
    draws = [_input(sampled, tok, seed) for seed in range(8)]
    assert len({tuple(ids) for ids in draws}) > 2 and all(tok.decode(d) == tok.decode(reference) for d in draws)
    assert draws[3] == _input(sampled, tok, 3)  # a sample encodes the same way for the same seed
    assert all(_input(sampled, tok, seed, training=False) == reference for seed in range(4))
    # the answer and the instruction's own words are the plain slot's
    for seed in range(4):
        assert sampled.encode(0, tok, seed=seed).decoder == plain.encode(0, tok, seed=seed).decoder
        assert sampled.encode(0, tok, seed=seed).encoder[1:] == plain.encode(0, tok, seed=seed).encoder[1:]


def test_max_length_cuts_the_drawn_pieces(tok):
    task = Task("topic", "[TEXT:text,subword_sampling=0.05,max_length=6] -> [TEXT:label,closed_set]", ROWS)
    draws = [_input(task, tok, seed) for seed in range(6)]
    assert all(len(ids) <= 6 for ids in draws) and len({tuple(ids) for ids in draws}) > 1


def test_where_sampling_cannot_apply_the_plan_says_why(tok):
    with pytest.raises(ValueError, match=r"task 'a'.*subword_sampling draws segmentations of an input in training; "
                                         r"an answer \(after ->\)"):
        Task("a", "[TEXT:q] -> [TEXT:text,subword_sampling=0.2]", [{"q": "x", "text": "y"}]).plan(tok)
    with pytest.raises(ValueError, match=r"task 'b'.*subword_sampling applies to text read as tokens "
                                         r"\(preprocess=text\), not preprocess=bag_of_words"):
        Task("b", "[TEXT:text,preprocess=bag_of_words,subword_sampling=0.2] -> [TEXT:label,closed_set]",
             ROWS).plan(tok)
    with pytest.raises(ValueError, match=r"subword_sampling must be|subword_sampling.*1\.5"):
        Task("c", "[TEXT:text,subword_sampling=1.5] -> [TEXT:label,closed_set]", ROWS)


def test_a_vocabulary_that_cannot_draw_segmentations_is_refused(tok, monkeypatch):
    monkeypatch.setattr(Tokenizer, "samples_segmentations", False)
    with pytest.raises(ValueError, match=r"task 'd'.*subword_sampling needs a tokenizer that draws segmentations"
                                         r".*this model's is Tokenizer"):
        Task("d", "[TEXT:text,subword_sampling=0.2] -> [TEXT:label,closed_set]", ROWS).plan(tok)
    monkeypatch.undo()
    assert not BaseTokenizer.samples_segmentations
    with pytest.raises(ValueError, match="cannot draw segmentations of a text"):
        BaseTokenizer.encode_sampled(tok, "text", 0.2, 0)


def test_the_words_drawn_one_by_one_read_as_the_whole_text_does(tok):
    """Pieces never span white space: the most likely pieces of each word, one after the other, are
    ``encode``'s pieces of the text, with the white space sentencepiece reads between words."""
    text = "tabs\tand\nnew lines\r\fend  two\x0bjoined <bin_3>x"
    assert [i for w in ["tabs", "and", "new", "lines", "end", "two\x0bjoined", "<bin_3>x"] for i in tok.encode(w)] \
        == tok.encode(text)
    sharpest = tok.encode_sampled(text, 1e9, 0)  # alpha → ∞: the most likely segmentation, always
    assert sharpest == tok.encode(text)


def test_a_seed_draws_the_same_pieces_in_another_process(tok):
    """(sentencepiece's own sampling seeds its generator once per thread: the same seed drew other
    pieces in each process, so a run could not be repeated or resumed to the same batches)."""
    text = ROWS[1]["text"]
    code = ("import json; from moe_gen.tasks import Tokenizer; t = Tokenizer.default(); "
            f"print(json.dumps([t.encode_sampled({text!r}, 0.1, s) for s in range(4)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert json.loads(out.stdout) == [tok.encode_sampled(text, 0.1, s) for s in range(4)]


def test_the_bench_suite_samples_doc_topics_pieces_on_request(tok):
    from moe_gen.quality.report import _run_line
    from moe_gen.quality.runner import BenchConfig, bench_suite
    from moe_gen.quality.suite import suite_tasks

    sampled, = bench_suite(BenchConfig(subword_sampling=0.3, tasks=("doc_topic",)), ["doc_topic"])
    plain, = suite_tasks(["doc_topic"])
    slot = sampled.build("test").instruction.encoder_slots[0]
    assert slot.attrs["subword_sampling"] == 0.3 and slot.attrs.get("preprocess") == "text"
    rows = sampled.build("train")
    assert [_input(rows, tok, s, training=False) for s in range(2)] == [_input(plain.build("train"), tok, s,
                                                                                training=False) for s in range(2)]
    assert len({tuple(_input(rows, tok, s)) for s in range(6)}) > 1
    line = _run_line({**dataclasses.asdict(BenchConfig(subword_sampling=0.3)), "seeds": [0]})
    assert "segmentations drawn in training (subword sampling, alpha 0.3): doc_topic." in line
    assert "subword" not in _run_line({**dataclasses.asdict(BenchConfig()), "seeds": [0]})
    for other in ({"bag_of_words": True}, {"pretrained_inputs": True}):
        with pytest.raises(ValueError, match="choose one"):
            suite_tasks(["doc_topic"], subword_sampling=0.3, **other)
        with pytest.raises(ValueError, match="choose one"):
            BenchConfig(subword_sampling=0.3, **other)
    with pytest.raises(ValueError, match=r"subword_sampling must be in \[0, 1\] \(0: off\), got 1.5"):
        BenchConfig(subword_sampling=1.5)
