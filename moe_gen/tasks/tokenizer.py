"""The shared text vocabulary: sentencepiece pieces, location bins, sentinels.

One vocabulary serves every text-like slot (TEXT, BOX, PHONE, STRUCT, CATEGORY), as in OFA:

    id 0..3             <pad> <unk> <s> </s>
    next num_bins       <bin_0> … <bin_{num_bins-1}>      box coordinates quantised to bins
    next num_sentinels  <extra_id_0> …                   span-masking sentinels (T5 style)
    the rest            sentencepiece pieces, with byte fallback so any text encodes

The tokenizer is trained by the package from a corpus (``Tokenizer.train``) and saved with the
model (``save`` / ``load``: the sentencepiece model proto plus a small JSON), so a saved model
always decodes with the vocabulary it was trained with. Nothing is downloaded.

``BaseTokenizer`` is what the rest of the package asks of a vocabulary. Its other implementation,
``moe_gen.tasks.hf_tokenizer.HFTokenizer``, keeps a pretrained checkpoint's own ids and appends the
bins, sentinels and phone symbols after them; ``Tokenizer.load`` reads either kind back.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import io
import json
import math
import os
import random
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

__all__ = ["BaseTokenizer", "Tokenizer", "default_corpus", "PHONE_SYMBOLS"]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_WHITE_SPACE = str.maketrans("\t\n\r\f", "    ")  # what sentencepiece reads as spaces between words ("\v" not)

_ARPABET = ("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH "
            "UH UW V W Y Z ZH").split()
# Phone tokens of the PHONE modality: ARPAbet phones, letters and digits (how words missing from
# the pronouncing dictionary are spelled) and the word separator.
PHONE_SYMBOLS: tuple[str, ...] = tuple(
    f"<ph_{p}>" for p in dict.fromkeys([*_ARPABET, *"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", "|"])
)


def default_corpus() -> list[str]:
    """Lines of English prose shipped with CPython (``pydoc_data.topics``: 79 documents, 65k
    words), the corpus the default tokenizer is trained on."""
    from pydoc_data.topics import topics

    return [line.strip() for doc in topics.values() for line in doc.splitlines() if line.strip()]


class BaseTokenizer(abc.ABC):
    """The interface every moe_gen vocabulary offers (what tasks, batches, grammars and the model use).

    A subclass sets ``pad_id``, ``unk_id`` (the unknown token, or None), ``bos_id``, ``eos_id``,
    ``num_bins``, ``num_sentinels`` and the first ids of its two contiguous blocks, ``_first_bin``
    (``<bin_0>`` …) and ``_first_sentinel`` (``<extra_id_0>`` …), and says whether ``encode`` may
    give ``unk_id`` (``encodes_unknown``).
    """

    pad_id: int
    unk_id: Optional[int]
    bos_id: int
    eos_id: int
    num_bins: int
    num_sentinels: int
    _first_bin: int
    _first_sentinel: int

    # Whether ``encode`` may give ``unk_id``, for text its vocabulary does not cover (WordPiece writes
    # an emoji as ``[UNK]``): targets then train on it, and free text decodes it. False (the unknown
    # token is never written) unless a subclass says otherwise, as before it was asked.
    encodes_unknown: bool = False

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (rows of the token embedding and of the output head)."""

    @property
    @abc.abstractmethod
    def piece_ids(self) -> Sequence[int]:
        """Ids of ordinary text pieces: what token noise may draw a replacement from."""

    @abc.abstractmethod
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (location and sentinel tokens written out are recognised)."""

    def encode_literal(self, text: str) -> list[int]:
        """Token ids of an instruction's literal text, whose author may name the vocabulary's own
        special tokens (``<|notimestamps|>``), unlike data (``encode``)."""
        return self.encode(text)

    # Whether ``encode_sampled`` can draw segmentations (a TEXT slot's ``subword_sampling``).
    samples_segmentations: bool = False

    def encode_sampled(self, text: str, alpha: float, seed: int) -> list[int]:
        """Token ids of one segmentation of ``text`` drawn at random (subword regularisation), the
        same for the same ``seed``. Only vocabularies that say ``samples_segmentations``."""
        raise ValueError(f"{type(self).__name__} cannot draw segmentations of a text (subword_sampling needs the "
                         f"package's sentencepiece tokenizer, moe_gen.tasks.Tokenizer)")

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; padding, BOS and EOS are dropped."""

    @abc.abstractmethod
    def symbol_id(self, piece: str) -> int:
        """Id of a symbol such as ``<ph_AA>``; ``ValueError`` when the vocabulary has none."""

    @abc.abstractmethod
    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary entry of each id."""

    @abc.abstractmethod
    def save(self, directory: str) -> list[str]:
        """Writes the tokenizer into ``directory``; returns the names of the files written."""

    def fingerprint(self) -> str:
        """A short hash of the vocabulary: every id's piece, in id order, and the ids of the special
        tokens and blocks. A checkpoint records it, and a run resumed with a tokenizer of another
        fingerprint is refused (its token rows would be read under other texts, silently)."""
        specials = [self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.num_bins, self.num_sentinels,
                    self._first_bin, self._first_sentinel]
        text = json.dumps([specials, self.pieces(range(self.vocab_size))])  # (ASCII: non-ASCII escaped)
        return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]

    def bin_id(self, k: int) -> int:
        """Id of ``<bin_k>``."""
        if not 0 <= k < self.num_bins:
            raise ValueError(f"location bin {k} is outside [0, {self.num_bins})")
        return self._first_bin + k

    def bin_index(self, token_id: int) -> Optional[int]:
        """k for a ``<bin_k>`` id, else None."""
        k = int(token_id) - self._first_bin
        return k if self.num_bins and 0 <= k < self.num_bins else None

    def sentinel_id(self, k: int) -> int:
        """Id of ``<extra_id_k>``."""
        if not 0 <= k < self.num_sentinels:
            raise ValueError(f"sentinel {k} is outside [0, {self.num_sentinels})")
        return self._first_sentinel + k

    def is_special(self, token_id: int) -> bool:
        """Padding, BOS, EOS, bins and sentinels."""
        t = int(token_id)
        return (t in (self.pad_id, self.bos_id, self.eos_id) or self.bin_index(t) is not None
                or 0 <= t - self._first_sentinel < self.num_sentinels)


class Tokenizer(BaseTokenizer):
    """A sentencepiece tokenizer with location-bin and sentinel tokens.

    Args:
        model_proto: the serialised sentencepiece model.
        num_bins: number of ``<bin_k>`` location tokens in the model.
        num_sentinels: number of ``<extra_id_k>`` sentinel tokens in the model.
    """

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    encodes_unknown = False  # byte fallback: any character encodes as pieces or bytes, never <unk>

    def __init__(self, model_proto: bytes, num_bins: int, num_sentinels: int) -> None:
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.num_bins, self.num_sentinels = num_bins, num_sentinels
        self._first_bin = self.sp.piece_to_id("<bin_0>")
        self._first_sentinel = self.sp.piece_to_id("<extra_id_0>")
        if num_bins and self.sp.id_to_piece(self._first_bin) != "<bin_0>":
            raise ValueError("the sentencepiece model has no <bin_0> piece; train it with Tokenizer.train")
        if num_sentinels and self.sp.id_to_piece(self._first_sentinel) != "<extra_id_0>":
            raise ValueError("the sentencepiece model has no <extra_id_0> piece")

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        corpus: Iterable[str],
        *,
        vocab_size: int = 8000,
        num_bins: int = 1000,
        num_sentinels: int = 100,
        extra_symbols: Sequence[str] = (),
    ) -> "Tokenizer":
        """Trains a unigram sentencepiece model on ``corpus`` (an iterable of lines).

        ``vocab_size`` counts every id (specials, bins, sentinels, 256 byte pieces, pieces); it
        must leave room for pieces. Training is deterministic for a given corpus.
        """
        reserved = 4 + num_bins + num_sentinels + len(extra_symbols) + 256
        if vocab_size <= reserved:
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for pieces: {reserved} ids are reserved "
                f"(4 specials, {num_bins} bins, {num_sentinels} sentinels, 256 bytes, "
                f"{len(extra_symbols)} extra)"
            )
        symbols = [f"<bin_{k}>" for k in range(num_bins)]
        symbols += [f"<extra_id_{k}>" for k in range(num_sentinels)] + list(extra_symbols)
        lines = [line for line in corpus if line and line.strip()]
        if not lines:
            raise ValueError("Tokenizer.train needs a non-empty corpus")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            byte_fallback=True,  # any character encodes, no <unk> at inference
            character_coverage=1.0,
            user_defined_symbols=symbols,
            num_threads=1,  # deterministic piece selection
            minloglevel=2,
            # A small corpus cannot always fill the requested size; do not fail, use what it has.
            hard_vocab_limit=False,
        )
        return cls(model.getvalue(), num_bins, num_sentinels)

    @classmethod
    @functools.lru_cache(maxsize=4)
    def default(cls, vocab_size: int = 4000, num_bins: int = 1000, num_sentinels: int = 100) -> "Tokenizer":
        """The tokenizer trained on ``default_corpus()``, with phone tokens (cached per process)."""
        return cls.train(default_corpus(), vocab_size=vocab_size, num_bins=num_bins,
                         num_sentinels=num_sentinels, extra_symbols=PHONE_SYMBOLS)

    def save(self, directory: str) -> list[str]:
        """Writes ``tokenizer.model`` and ``tokenizer.json`` into ``directory``; returns their names."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
            f.write(self.model_proto)
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            json.dump({"num_bins": self.num_bins, "num_sentinels": self.num_sentinels}, f)
        return ["tokenizer.model", "tokenizer.json"]

    @classmethod
    def load(cls, directory: str) -> BaseTokenizer:
        """Reads a tokenizer written by ``save``, or an ``HFTokenizer`` where ``directory`` holds one
        (so ``GeneralistModel.from_pretrained`` reloads either kind)."""
        from moe_gen.tasks import hf_tokenizer  # the tokenizers library only where it is needed

        if os.path.exists(os.path.join(directory, hf_tokenizer.ADDITIONS_FILE)):
            return hf_tokenizer.HFTokenizer.load(directory)
        with open(os.path.join(directory, "tokenizer.model"), "rb") as f:
            proto = f.read()
        with open(os.path.join(directory, "tokenizer.json")) as f:
            meta = json.load(f)
        return cls(proto, int(meta["num_bins"]), int(meta["num_sentinels"]))

    # ---- use -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (location and sentinel tokens written out are recognised)."""
        ids = self.sp.encode(text)
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    samples_segmentations = True

    def encode_sampled(self, text: str, alpha: float, seed: int) -> list[int]:
        """Token ids of a segmentation of ``text`` drawn from the unigram model's distribution over
        segmentations, sharpened by ``alpha`` in [0, 1]: a segmentation of probability p is drawn
        with weight p^alpha (Kudo 2018; 0 draws uniformly, 1 by the model's probabilities, and the
        most likely one, ``encode``'s, is drawn most often). Location and sentinel tokens stay whole.

        Pieces never span white space, so each word is drawn on its own, among its
        ``SAMPLED_SEGMENTATIONS`` most likely segmentations (every one, for most words) with their
        log-probabilities, by ``random.Random(seed)``: the same seed draws the same pieces in every
        process (sentencepiece's own sampling draws from a generator seeded once per thread)."""
        rng = random.Random(seed)
        ids: list[int] = []
        for word in text.translate(_WHITE_SPACE).split(" "):
            if word:
                options, scores = self._segmentations(word)
                top = max(scores)
                ids.extend(rng.choices(options, weights=[math.exp(alpha * (s - top)) for s in scores])[0])
        return ids

    SAMPLED_SEGMENTATIONS = 64

    def _segmentations(self, word: str) -> tuple[list[list[int]], list[float]]:
        """The most likely segmentations of ``word`` and their log-probabilities (sums of the pieces'
        scores), kept for the next draws of the word (up to 65,536 words)."""
        cache = self.__dict__.setdefault("_segmentation_cache", {})
        if word not in cache:
            if len(cache) >= 1 << 16:
                cache.clear()
            options = self.sp.nbest_encode_as_ids(word, nbest_size=self.SAMPLED_SEGMENTATIONS)
            cache[word] = options, [sum(self.sp.get_score(i) for i in option) for option in options]
        return cache[word]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; padding, BOS and EOS are dropped."""
        keep = [int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)]
        return self.sp.decode(keep)

    def symbol_id(self, piece: str) -> int:
        """Id of a user-defined symbol such as ``<ph_AA>`` (no whitespace piece before it)."""
        token = self.sp.piece_to_id(piece)
        if token == UNK_ID or self.sp.id_to_piece(token) != piece:
            raise ValueError(f"the vocabulary has no symbol {piece!r}")
        return token

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    @property
    def piece_ids(self) -> range:
        """Every id after the specials, bins and sentinels (symbols and byte pieces included)."""
        if self.num_sentinels:
            return range(self.sentinel_id(self.num_sentinels - 1) + 1, self.vocab_size)
        return range(self.bin_id(self.num_bins - 1) + 1 if self.num_bins else 4, self.vocab_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and (
            self.model_proto, self.num_bins, self.num_sentinels
        ) == (other.model_proto, other.num_bins, other.num_sentinels)

    def __hash__(self) -> int:
        return hash((len(self.model_proto), self.num_bins, self.num_sentinels))
