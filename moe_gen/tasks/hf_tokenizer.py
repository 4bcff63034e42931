"""A moe_gen vocabulary on top of a pretrained checkpoint's Hugging Face tokenizer.

The checkpoint's ids stay as they are, so its embedding rows (and output head) stay valid; moe_gen's
own tokens are appended after them:

    id 0 … base_vocab_size-1     the checkpoint's vocabulary (WordPiece for BERT, byte-level BPE
                                 for Llama and Whisper), its own special tokens included
    then, where it has none      <pad>, <s>, </s>
    then num_bins                <bin_0> … <bin_{num_bins-1}>
    then num_sentinels           <extra_id_0> …
    then extra symbols           PHONE_SYMBOLS by default

Pad, BOS, EOS and unknown map to the checkpoint's special tokens where it defines them (BERT:
[PAD], [CLS], [SEP], [UNK]). Plain text encodes exactly as the checkpoint's tokenizer does with
``add_special_tokens=False``. A model built on such a vocabulary grows its token rows with
``resize_token_rows``.

Saved (``save``/``load``) as the Hugging Face ``tokenizer.json`` with the appended tokens, plus
``moe_gen_tokenizer.json`` naming the roles and blocks; ``Tokenizer.load`` recognises the folder.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from moe_gen.tasks.tokenizer import PHONE_SYMBOLS, BaseTokenizer

__all__ = ["HFTokenizer", "resize_token_rows", "ADDITIONS_FILE"]

HF_FILE = "tokenizer.json"  # the Hugging Face name, so the saved folder also loads with transformers
ADDITIONS_FILE = "moe_gen_tokenizer.json"  # roles, blocks and base size: what marks the folder as ours

ROLES = ("pad", "bos", "eos", "unk")
# The names checkpoints give each role, checked in order when nothing names the role explicitly.
# BERT's sequence start/end ([CLS], [SEP]) serve as BOS/EOS; Whisper's decoder starts with
# <|startoftranscript|>; GPT-2-style vocabularies use <|endoftext|> for both.
_KNOWN_NAMES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "bos": ("[CLS]", "<s>", "<|begin_of_text|>", "<|startoftranscript|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("[SEP]", "</s>", "<|end_of_text|>", "<|endoftext|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}
_WHISPER_START = "<|startoftranscript|>"
# Appended when the checkpoint has no token for the role (no unknown: byte-level BPE needs none).
_APPENDED_NAMES = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
# transformers' attribute names for each role, first found wins (BERT defines cls/sep, not bos/eos).
_HF_ATTRIBUTES = {"pad": ("pad_token",), "bos": ("bos_token", "cls_token"),
                  "eos": ("eos_token", "sep_token"), "unk": ("unk_token",)}


class HFTokenizer(BaseTokenizer):
    """A checkpoint's tokenizer with moe_gen's bins, sentinels and symbols appended.

    Build one with ``from_pretrained``; the constructor takes a backend that already holds the
    appended tokens (what ``from_pretrained`` and ``load`` make).

    Args:
        backend: the ``tokenizers.Tokenizer``, appended tokens included.
        base_vocab_size: ids below it are the checkpoint's.
        specials: role (``pad``, ``bos``, ``eos``, ``unk``) → token text; ``unk`` may be None.
        num_bins: number of ``<bin_k>`` tokens.
        num_sentinels: number of ``<extra_id_k>`` tokens.
        extra_symbols: further appended symbols (phones).
    """

    def __init__(self, backend: RustTokenizer, *, base_vocab_size: int, specials: Mapping[str, Optional[str]],
                 num_bins: int, num_sentinels: int, extra_symbols: Sequence[str] = ()) -> None:
        self.backend = backend
        # The checkpoint's own special tokens typed in a user's text ("[SEP]", "<|endoftext|>") are
        # that text, not the tokens (they would end a target in its middle, or vanish when decoded);
        # moe_gen's appended tokens are not "special" and are still matched (<bin_12>).
        backend.encode_special_tokens = True
        self.base_vocab_size = int(base_vocab_size)
        self.specials = {role: specials.get(role) for role in ROLES}
        self.num_bins, self.num_sentinels = int(num_bins), int(num_sentinels)
        self.extra_symbols = tuple(extra_symbols)
        self.pad_id, self.bos_id, self.eos_id = (self._id_of(self.specials[r], r) for r in ("pad", "bos", "eos"))
        # A pad / BOS / EOS appended for a checkpoint that had none is special too: "<pad>" or "</s>"
        # typed in a user's text stays text (as a role token it would end a target in its middle,
        # or vanish when decoded). (A flag update: the ids stay; folders saved before are upgraded.)
        roles = {self.specials[r] for r in ("pad", "bos", "eos")
                 if getattr(self, f"{r}_id") >= self.base_vocab_size}
        backend.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                               special=True) for t in sorted(roles)])
        self.unk_id = None if self.specials["unk"] is None else self._id_of(self.specials["unk"], "unk")
        self._first_bin = self._block_start([f"<bin_{k}>" for k in range(self.num_bins)])
        self._first_sentinel = self._block_start([f"<extra_id_{k}>" for k in range(self.num_sentinels)])
        self._block_start(self.extra_symbols)
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def _id_of(self, token: Optional[str], role: str) -> int:
        token_id = None if token is None else self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the {role} token {token!r} is not in the vocabulary")
        return token_id

    def _block_start(self, tokens: Sequence[str]) -> int:
        """Id of ``tokens[0]``, checking that the block is contiguous and appended."""
        if not tokens:
            return self.base_vocab_size
        first = self._id_of(tokens[0], "appended")
        ids = [self.backend.token_to_id(t) for t in tokens]
        if first < self.base_vocab_size or ids != list(range(first, first + len(tokens))):
            raise ValueError(f"{tokens[0]} … {tokens[-1]} are not consecutive ids after the checkpoint's "
                             f"{self.base_vocab_size}")
        return first

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: Any,
        *,
        num_bins: int = 1000,
        num_sentinels: int = 100,
        extra_symbols: Sequence[str] = PHONE_SYMBOLS,
        pad_token: Optional[str] = None,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        unk_token: Optional[str] = None,
    ) -> "HFTokenizer":
        """The vocabulary of a checkpoint, with moe_gen's tokens appended.

        Args:
            source: a folder holding ``tokenizer.json`` (and, if it has them, ``tokenizer_config.json``
                / ``special_tokens_map.json`` naming the special tokens); a ``tokenizer.json`` file; a
                ``.gguf`` file (read through transformers, which needs the ``gguf`` package); a
                transformers tokenizer; or a ``tokenizers.Tokenizer``.
            num_bins, num_sentinels: sizes of the two appended blocks.
            extra_symbols: symbols appended after them (the PHONE modality's by default).
            pad_token, bos_token, eos_token, unk_token: the checkpoint's token for a role, where the
                checkpoint's own files do not say (or say otherwise than wanted).

        A role nothing names is looked for among well-known names ([PAD], <pad>, [CLS], <s>,
        <|startoftranscript|>, [SEP], </s>, <|endoftext|>, [UNK], <unk> …); a missing pad, BOS or
        EOS is appended as ``<pad>``, ``<s>``, ``</s>`` (special tokens: typed in text they stay
        text); a missing unknown token stays None. A Whisper vocabulary's BOS is
        ``<|startoftranscript|>`` whatever its files name (``<|endoftext|>``), unless ``bos_token``
        says otherwise.
        """
        backend, named = _read_source(source)
        # Our own copy: moe_gen encodes whole texts, so the checkpoint's truncation and padding go.
        backend = RustTokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
        vocab = backend.get_vocab(with_added_tokens=True)
        base_vocab_size = max(vocab.values()) + 1
        specials = _resolve_roles(backend, vocab, named,
                                  {"pad": pad_token, "bos": bos_token, "eos": eos_token, "unk": unk_token})
        missing = [_APPENDED_NAMES[r] for r in ("pad", "bos", "eos") if specials[r] is None]
        for role in ("pad", "bos", "eos"):
            specials[role] = specials[role] or _APPENDED_NAMES[role]
        appended = [*missing, *(f"<bin_{k}>" for k in range(num_bins)),
                    *(f"<extra_id_{k}>" for k in range(num_sentinels)), *extra_symbols]
        clashes = [t for t in appended if t in vocab]
        if clashes or len(set(appended)) != len(appended):
            raise ValueError(f"cannot append {clashes[:3] or 'repeated tokens'}: the vocabulary has them "
                             "already (a folder saved by HFTokenizer.save reads back with HFTokenizer.load)")
        # Whole tokens, matched in the raw text (not lowercased by BERT's normaliser: <ph_AA>), and
        # not "special", so decoding keeps them (a box is its bin tokens).
        backend.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                       special=False) for t in appended])
        return cls(backend, base_vocab_size=base_vocab_size, specials=specials, num_bins=num_bins,
                   num_sentinels=num_sentinels, extra_symbols=extra_symbols)

    def save(self, directory: str) -> list[str]:
        """Writes ``tokenizer.json`` (appended tokens included) and ``moe_gen_tokenizer.json``;
        returns their names."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, HF_FILE))
        additions = {"base_vocab_size": self.base_vocab_size, "num_bins": self.num_bins,
                     "num_sentinels": self.num_sentinels, "extra_symbols": list(self.extra_symbols),
                     **{f"{role}_token": token for role, token in self.specials.items()}}
        with open(os.path.join(directory, ADDITIONS_FILE), "w", encoding="utf-8") as f:
            json.dump(additions, f, indent=1, ensure_ascii=False)
        return [HF_FILE, ADDITIONS_FILE]

    @classmethod
    def load(cls, directory: str) -> "HFTokenizer":
        """Reads a tokenizer written by ``save``."""
        with open(os.path.join(directory, ADDITIONS_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        backend = _read_file(os.path.join(directory, HF_FILE))
        return cls(backend, base_vocab_size=int(meta["base_vocab_size"]),
                   specials={role: meta[f"{role}_token"] for role in ROLES}, num_bins=int(meta["num_bins"]),
                   num_sentinels=int(meta["num_sentinels"]), extra_symbols=meta["extra_symbols"])

    # ---- use -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def piece_ids(self) -> list[int]:
        """The checkpoint's ids but its special tokens (padding, [CLS]/[SEP], <|endoftext|>...):
        what token noise draws from."""
        special = {i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}
        special |= {self.pad_id, self.bos_id, self.eos_id} | ({self.unk_id} if self.unk_id is not None else set())
        return [i for i in range(self.base_vocab_size) if i not in special]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``: the checkpoint tokenizer's, without its template (no [CLS]/[SEP]
        added), and one id for each appended token written out (``<bin_12>``)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_literal(self, text: str) -> list[int]:
        """Token ids of an instruction's literal text: the checkpoint's special tokens it names
        (``<|notimestamps|>``) are those tokens, as its author meant."""
        self.backend.encode_special_tokens = False
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = True

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` by the checkpoint's decoder; padding, BOS and EOS are dropped, other
        special tokens kept. WordPiece splits every punctuation mark off and its decoder cannot
        tell where spaces were, so it writes "1.4" as "1. 4": a point between digits is joined
        back (decimal numbers are what generated text holds most; "step 1. 4 apples" is rare)."""
        drop = (self.pad_id, self.bos_id, self.eos_id)
        text = self.backend.decode([i for i in self._checked(ids) if i not in drop], skip_special_tokens=False)
        if type(self.backend.decoder).__name__ == "WordPiece":
            text = _DECIMAL_POINT.sub(".", text)
        return text

    def symbol_id(self, piece: str) -> int:
        """Id of a vocabulary entry such as ``<ph_AA>``."""
        token = self.backend.token_to_id(piece)
        if token is None:
            raise ValueError(f"the vocabulary has no symbol {piece!r}")
        return token

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in self._checked(ids)]

    def _checked(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as ints, refusing any outside the vocabulary (ids of a model with another
        vocabulary would decode to nothing, or to other tokens, silently)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside this tokenizer's vocabulary of {self._vocab_size}")
        return ids

    @property
    def encodes_unknown(self) -> bool:
        """Whether ``encode`` may give ``unk_id``: where the checkpoint has an unknown token and its
        model no byte fallback (WordPiece: an emoji, a word over 100 characters). A byte-level
        vocabulary (GPT-2 style BPE: SmolLM2, whose "unknown" token is ``<|endoftext|>``) covers
        every byte and never does."""
        if self.unk_id is None or getattr(self.backend.model, "byte_fallback", False):
            return False
        return not _byte_level(json.loads(self.backend.to_str()).get("pre_tokenizer"))

    def _key(self) -> tuple:
        return (self.backend.to_str(), self.base_vocab_size, tuple(self.specials.items()), self.num_bins,
                self.num_sentinels, self.extra_symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.base_vocab_size, self._vocab_size, self.num_bins, self.num_sentinels))


_DECIMAL_POINT = re.compile(r"(?<=\d) ?\. ?(?=\d)")


def _resolve_roles(backend: RustTokenizer, vocab: Mapping[str, int], named: Mapping[str, str],
                   overrides: Mapping[str, Optional[str]]) -> dict[str, Optional[str]]:
    """Role → the checkpoint's token for it (None where it has none): the one given, else the one
    its files name, else a well-known name in its vocabulary; a Whisper vocabulary's BOS is
    <|startoftranscript|> unless given (its files and transformers tokenizer name <|endoftext|>,
    which is not what its decoder starts with: that start gave wrong transcripts)."""
    specials: dict[str, Optional[str]] = {}
    for role in ROLES:
        given = overrides[role] or named.get(role)
        if given is not None and given not in vocab:
            raise ValueError(f"the {role} token {given!r} is not in the checkpoint's vocabulary")
        model_unk = getattr(backend.model, "unk_token", None) if role == "unk" else None
        known = next((t for t in _KNOWN_NAMES[role] if t in vocab), None)
        specials[role] = given or (model_unk if model_unk in vocab else None) or known
    if overrides["bos"] is None and _WHISPER_START in vocab:
        specials["bos"] = _WHISPER_START
    return specials


def _read_source(source: Any) -> tuple[RustTokenizer, dict[str, str]]:
    """The ``tokenizers.Tokenizer`` of ``source`` and the special tokens it names, by role."""
    if isinstance(source, RustTokenizer):
        return source, {}
    if hasattr(source, "backend_tokenizer"):  # a transformers tokenizer
        return source.backend_tokenizer, _named_by_attributes(source)
    path = os.fspath(source)
    if path.endswith(".gguf"):
        from transformers import AutoTokenizer  # slow to import; only GGUF files need it

        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such GGUF file")
        hf = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
        return hf.backend_tokenizer, _named_by_attributes(hf)
    folder, file = (path, os.path.join(path, HF_FILE)) if os.path.isdir(path) else (os.path.dirname(path), path)
    if not os.path.isfile(file):
        raise ValueError(f"{path}: no Hugging Face tokenizer file ({HF_FILE}) there")
    return _read_file(file), _named_by_files(folder)


def _read_file(path: str) -> RustTokenizer:
    try:
        return RustTokenizer.from_file(path)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
        raise ValueError(f"{path}: not a Hugging Face tokenizer file ({exc})") from None


def _named_by_attributes(hf: Any) -> dict[str, str]:
    named = {}
    for role, attributes in _HF_ATTRIBUTES.items():
        token = next((getattr(hf, a, None) for a in attributes if getattr(hf, a, None)), None)
        if token is not None:
            named[role] = str(token)
    return named


def _named_by_files(folder: str) -> dict[str, str]:
    """Special tokens named in ``special_tokens_map.json`` / ``tokenizer_config.json`` (the latter
    wins), as transformers reads them; a value is a string or ``{"content": ...}``."""
    entries: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                entries.update({k: v for k, v in json.load(f).items() if k.endswith("_token") and v})
    named = {}
    for role, attributes in _HF_ATTRIBUTES.items():
        value = next((entries[a] for a in attributes if a in entries), None)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            named[role] = value
    return named


def resize_token_rows(weight: torch.Tensor, new_vocab_size: int, *, noise: float = 1e-5,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A token embedding (or output head) grown or cut to ``new_vocab_size`` rows.

    Kept rows are copied; each new row is the mean of the old rows plus Gaussian noise whose
    covariance is ``noise`` times theirs. The mean makes a new token's logit, under a head tied to
    (or copied from) these rows, the average of the old logits, so the pretrained next-token
    distribution barely moves and no new token starts out dominating it; random rows of the
    usual scale can (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language
    Models"; transformers' ``resize_token_embeddings(mean_resizing=True)`` does the same, with
    the same 1e-5). The small noise only makes the new rows distinct. Deterministic by default.

    Where a checkpoint has more rows than tokenizer entries (Whisper tiny.en: 51864 rows, 50363
    tokens), pass ``weight[:tokenizer.base_vocab_size]`` so the untrained padding rows are not
    reused for the appended tokens.

    Args:
        weight: ``[V_old, D]``.
        new_vocab_size: V_new.
        noise: covariance scale of the noise (0 gives the plain mean).
        generator: random source of the noise (default: seeded with 0).

    Returns:
        ``[V_new, D]``, of ``weight``'s dtype and device.
    """
    V_old, D = weight.shape
    if new_vocab_size <= V_old:
        return weight[:new_vocab_size].clone()
    w_VD = weight.detach().to(torch.float64)
    mean_D = w_VD.mean(0)
    centred_VD = w_VD - mean_D
    cov_DD = centred_VD.T @ centred_VD / max(V_old - 1, 1)
    # Σ = Q Λ Qᵀ; z·√Λ·Qᵀ has covariance Σ (eigh, not Cholesky: Σ may be singular).
    eigenvalues_D, q_DD = torch.linalg.eigh(cov_DD)
    generator = generator or torch.Generator().manual_seed(0)
    z_ND = torch.randn(new_vocab_size - V_old, D, generator=generator, dtype=torch.float64)
    new_ND = mean_D + (noise ** 0.5) * (z_ND * eigenvalues_D.clamp_min(0).sqrt()) @ q_DD.T
    return torch.cat([weight.detach().clone(), new_ND.to(weight.dtype).to(weight.device)])


def _byte_level(pre_tokenizer) -> bool:
    """Whether a tokenizer.json ``pre_tokenizer`` (or one of a ``Sequence`` of them) maps text to bytes."""
    if not isinstance(pre_tokenizer, dict):
        return False
    return pre_tokenizer.get("type") == "ByteLevel" or any(map(_byte_level, pre_tokenizer.get("pretokenizers") or ()))
