"""Task plans: from an instruction to encoded samples with per-token routing tags.

Shape legend: n positions of one chunk, F feature width.

``TaskPlan(name, instruction, tokenizer)`` resolves every slot of every template once: its
modality, preprocessor (``preprocess=`` or the modality default; unknown names are errors
naming the known ones), adapter (``adaptor=`` or the default), role, whether it carries loss,
and how it is decoded at inference. ``plan.encode(row, index)`` turns one data row into a
``Sample``: chunks of token ids or feature rows, each with its modality, role and loss flag.

Roles: encoder data slots are ``input``; literal text anywhere is ``prompt``; decoder data slots
are ``target``, except those marked ``no_loss`` (copied prompts), which are ``prompt``. Decoder
literal text is a forced prefix: it is fed, never scored.

Layout of a side: slots in order, except that the slots of a repetition group take turns item by
item (``( [BOX:boxes] [TEXT:labels] )*`` gives box 1, label 1, box 2, label 2, ...). The answer
ends with EOS (unless a slot sets ``disable_auto_boseos``). A free-text target followed by anything
but a box also ends each of its values with EOS (``closing_eos``), whatever the slots set: nothing
else would say where such text stops, since literal text after it is never scored and text after
text runs on. Decoding (``moe_gen.model.grammar``) follows the same layout.

A decoder position is tagged like the item it predicts, except where the layout leaves the next
item open (``open_ends``: after text that may run on, or after the last slot of a repetition
group, whose next item may be another one or the end). There the position is tagged like the slot
before it (``Chunk.lead``), whatever comes next, so its tags never reveal the choice it is to make.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Mapping, Optional, Sequence

import torch

from moe_gen.registry import ADAPTERS, MODALITIES, PREPROCESSORS
from moe_gen.routing.tags import ROLES
from moe_gen.tasks.decodable import check_decodable, slot_followers
from moe_gen.tasks.errors import TaskDataError
from moe_gen.tasks.instruction import Instruction, Slot
from moe_gen.tasks.modalities.base import (
    GROUP_VALUES,
    EncodeContext,
    ModalitySpec,
    SlotEncoding,
    SlotValueError,
    brief,
    group_items,
    is_missing,
    label_text,
)
from moe_gen.tasks.plan_checks import check_augment, check_template, check_windows_and_masks, is_closed, warn_unapplied
from moe_gen.tasks.sample import Chunk, Sample
from moe_gen.tasks.tokenizer import Tokenizer

# Registering modules: importing them fills MODALITIES, PREPROCESSORS and ADAPTERS.
import moe_gen.tasks.modalities.signals  # noqa: F401,E402  isort: skip
import moe_gen.tasks.modalities.table  # noqa: F401,E402  isort: skip
import moe_gen.tasks.modalities.text_like  # noqa: F401,E402  isort: skip
import moe_gen.tasks.modalities.visual  # noqa: F401,E402  isort: skip
import moe_gen.tasks.modalities.image_codes  # noqa: F401,E402  isort: skip
import moe_gen.tasks.modalities.frozen  # noqa: F401,E402  isort: skip
import moe_gen.tasks.modalities.bag_of_words  # noqa: F401,E402  isort: skip
import moe_gen.tasks.modalities.pose_summary  # noqa: F401,E402  isort: skip

__all__ = ["TaskPlan", "SlotPlan", "DecodeSpec", "Chunk", "Sample", "TaskDataError", "build_trie",
           "slot_followers", "MAX_SLOT_POSITIONS"]

INPUT, TARGET, PROMPT = (ROLES.index(r) for r in ("input", "target", "prompt"))
# The default cap on one slot's positions (tokens or feature rows): 164 s of audio, 8192 motion
# frames, 256 video frames; the frame adapters' position tables have as many rows. A bad sample
# rate or an unsplit document fails its row instead of filling memory.
MAX_SLOT_POSITIONS = 4096


def _attrs_text(slot) -> str:
    shown = [k if v is True else f"{k}={v}" for k, v in slot.attrs.items() if k not in ("closed_set", "preprocess")]
    return ", ".join(shown) or "none"


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How a decoder slot is generated at inference.

    Attributes:
        kind: ``text``, ``closed_set`` (answers restricted to ``labels`` through ``trie``),
            ``box`` (exactly 4 location tokens), ``codes`` (exactly ``length`` tokens out of
            ``tokens``: an image tokenizer's codes), ``frames`` (continuous rows with a stop flag)
            or ``features`` (feature rows of an image, video or table slot: no decoding).
        labels: the label set of a closed-set slot.
        trie: nested dicts of token ids of the labels (each label ends with EOS).
        label_of: a closed set's token ids (without EOS) → its label, so that an answer is the label
            itself, not the text its tokens decode to (``uncased`` or sentencepiece's
            normalisation would return "maybe" for "Maybe", "fish" for "ﬁsh").
        length, tokens: for ``codes``, the tokens per value and the allowed token ids (code k is
            ``tokens[k]``).
    """

    kind: str
    labels: tuple[str, ...] = ()
    trie: Optional[dict] = None
    label_of: Optional[dict] = None
    length: int = 0
    tokens: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """One resolved slot of a template."""

    slot: Slot
    side: str  # "encoder" or "decoder"
    modality: ModalitySpec
    preprocess: Optional[str]  # None for literal text
    adaptor: Optional[str]  # None for text-like slots (token embedding)
    role: int
    loss: bool
    decode: Optional[DecodeSpec]
    # its column, or "slot N" for a slot filled by position (Template.slot_names); None for literals
    name: Optional[str] = None


def _kind(value: Any) -> str:
    """A value's type for messages, with its shape where it has one (a 0-d array holds no items)."""
    shape = getattr(value, "shape", None)
    return type(value).__name__ + (f" of shape {tuple(shape)}" if isinstance(shape, tuple) else "")


def build_trie(sequences: Sequence[Sequence[int]]) -> dict:
    """A prefix tree of token-id sequences: ``trie[t1][t2]...`` (a leaf is an empty dict)."""
    root: dict = {}
    for seq in sequences:
        node = root
        for t in seq:
            node = node.setdefault(int(t), {})
    return root


def _in_order(plans: Sequence[SlotPlan], chunks: Sequence[list[Chunk]], closing=frozenset(),
              open_ends=frozenset(), eos_id: int = -1) -> list[Chunk]:
    """A side's chunks in sequence order: slot by slot, but the slots of a repetition group take
    turns item by item. Every value of a slot in ``closing`` is followed by an EOS chunk; a chunk
    after a value of a slot in ``open_ends`` leads with that slot's tags."""
    out: list[Chunk] = []
    before: Optional[SlotPlan] = None  # the slot of the last chunk, if it leaves the next item open
    i = 0
    while i < len(plans):
        group, end = plans[i].slot.repeat, i + 1
        while group is not None and end < len(plans) and plans[end].slot.repeat == group:
            end += 1
        for item in range(max(len(chunks[k]) for k in range(i, end))):
            for k in range(i, end):
                if item < len(chunks[k]):
                    chunk = chunks[k][item]
                    if before is not None:
                        chunk = dataclasses.replace(chunk, lead=(before.modality.name, before.role))
                    out.append(chunk)
                    # an empty value has no position: what follows it takes the position that decided
                    # it was empty, and that position's lead (the tag decoding gives it either way)
                    empty = chunk.tokens is not None and not chunk.tokens
                    if k in closing:  # column None: an EOS marker carries no content (masking)
                        out.append(Chunk(chunk.modality, chunk.role, chunk.loss, tokens=[eos_id],
                                         lead=chunk.lead if empty else None))
                    if not (empty and before is not None and k not in closing):
                        before = plans[k] if k in open_ends else None
        i = end
    return out


def _modality_attributes() -> dict[str, Any]:
    """The attribute specs the parser accepts, for every registered modality."""
    from moe_gen.tasks.instruction import BUILTIN_SLOT_ATTRIBUTES, AttrSpec

    known = dict(BUILTIN_SLOT_ATTRIBUTES)
    generic = {**BUILTIN_SLOT_ATTRIBUTES["VIDEO"], "no_loss": AttrSpec("flag")}  # preprocess, adaptor, no_loss
    for name in MODALITIES.list():
        spec = MODALITIES.get(name)
        known.setdefault(name, dict(spec.attributes) if spec.attributes is not None else generic)
    return known


class TaskPlan:
    """Everything derived from a task's instruction.

    Args:
        name: task name (for tags and error messages).
        instruction: an ``Instruction`` or its text.
        tokenizer: the shared vocabulary.
        closed_sets: labels of closed-set slots by column (``Task`` collects them from its data).
        preprocessor_options: keyword arguments per preprocessor name (e.g. image size).
        max_slot_positions: the most positions (tokens or feature rows) one slot of a row may take;
            a row over it fails with ``TaskDataError``.
    """

    def __init__(
        self,
        name: str,
        instruction,
        tokenizer: Tokenizer,
        *,
        closed_sets: Optional[Mapping[str, Sequence[str]]] = None,
        preprocessor_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        max_slot_positions: int = MAX_SLOT_POSITIONS,
    ) -> None:
        if isinstance(max_slot_positions, bool) or not isinstance(max_slot_positions, int) or max_slot_positions < 1:
            raise ValueError(f"max_slot_positions must be a positive int, got {max_slot_positions!r}")
        self.name = name
        self.max_slot_positions = max_slot_positions
        if isinstance(instruction, str):
            instruction = Instruction.parse(instruction, modalities=_modality_attributes())
        self.instruction: Instruction = instruction
        self.tokenizer = tokenizer
        self.closed_sets = {k: tuple(v) for k, v in (closed_sets or {}).items()}
        options = preprocessor_options or {}
        self._preprocessors: dict[str, Any] = {}
        self.templates: list[tuple[list[SlotPlan], list[SlotPlan]]] = []
        for template in self.instruction.templates:
            names = template.slot_names()
            encoder = [self._plan_slot(s, "encoder", options, n) for s, n in zip(template.encoder, names)]
            decoder = [self._plan_slot(s, "decoder", options, n)
                       for s, n in zip(template.decoder, names[len(template.encoder):])]
            check_template(self, encoder, decoder)
            self.templates.append((encoder, decoder))
        warn_unapplied(self.name, self.instruction, _modality_attributes())

    def first_tokens(self, plan: SlotPlan) -> Optional[set[int]]:
        """The tokens a decoder slot may begin with: None for free text (any), none for a given
        prompt or location bins (which no label holds)."""
        if plan.slot.is_literal:
            return set(self.tokenizer.encode_literal(plan.slot.text)[:1])
        if plan.decode is None:
            return set()
        if is_closed(plan):
            return set(plan.decode.trie) - {self.tokenizer.eos_id}
        return None if plan.decode.kind == "text" else set()

    # ---- planning ----------------------------------------------------------------------------

    def _plan_slot(self, slot: Slot, side: str, options, name: Optional[str]) -> SlotPlan:
        where = f"task {self.name!r}: slot {slot}"
        try:
            modality = MODALITIES.get(slot.modality)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if slot.is_literal:
            role = PROMPT
            return SlotPlan(slot, side, modality, None, None, role, False, None, name)
        preprocess = str(slot.attrs.get("preprocess", modality.preprocess))
        if preprocess not in PREPROCESSORS:
            raise ValueError(f"{where}: unknown preprocessor {preprocess!r}; known: "
                             f"{', '.join(PREPROCESSORS.list())}")
        if preprocess not in self._preprocessors:
            try:
                self._preprocessors[preprocess] = PREPROCESSORS.get(preprocess)(**dict(options.get(preprocess, {})))
            except (ValueError, TypeError) as exc:  # bad preprocessor_options: say which task and slot
                raise ValueError(f"{where}: preprocessor {preprocess!r}: {exc}") from exc
        if "augment" in slot.attrs:
            check_augment(self, where, slot, side, preprocess)
        if "stride" in slot.attrs and preprocess != "image":
            raise ValueError(f"{where}: stride spaces the patches of the 'image' preprocessor; it does not apply "
                             f"to preprocess={preprocess}")
        textual = [a for a in ("noise_ratio", "no_punctuation") if a in slot.attrs]
        if slot.modality == "STRUCT" and textual and preprocess != "struct_text":
            raise ValueError(f"{where}: {' and '.join(textual)} {'act' if len(textual) > 1 else 'acts'} on the text "
                             "of a table: preprocess=struct_text only (the default 'struct' reads cells as numbers "
                             "and values)")
        if "vocab_size" in slot.attrs and preprocess != "bag_of_words":
            raise ValueError(f"{where}: vocab_size sizes a bag of words; it applies to preprocess=bag_of_words only")
        check_windows_and_masks(self, where, slot, side, preprocess)
        # A preprocessor whose rows only one adapter reads (a frozen encoder's states) names it.
        own = getattr(self._preprocessors[preprocess], "adaptor", None)
        if own is not None and side != "encoder":
            raise ValueError(f"{where}: {preprocess!r} makes feature rows that only the encoder reads; use it "
                             "on an input slot (before ->)")
        if hasattr(self._preprocessors[preprocess], "check_slot"):
            self._preprocessors[preprocess].check_slot(where, slot)
        if "adaptor" in slot.attrs and self._preprocessors[preprocess].makes_tokens:
            hint = f"preprocess={slot.attrs['adaptor']}" if str(slot.attrs["adaptor"]) in PREPROCESSORS else \
                "a preprocess= that makes feature rows"
            raise ValueError(f"{where}: preprocess={preprocess} makes tokens, which no adapter reads; adaptor= "
                             f"picks the adapter of feature rows (use {hint}, or drop adaptor=)")
        default = modality.target_adaptor if side != "encoder" and modality.target_adaptor else modality.adaptor
        adaptor = slot.attrs.get("adaptor", own or default)
        if adaptor is not None and str(adaptor) not in ADAPTERS:
            raise ValueError(f"{where}: unknown adaptor {adaptor!r}; known: {', '.join(ADAPTERS.list())}")
        if side == "encoder":
            return SlotPlan(slot, side, modality, preprocess, adaptor, INPUT, False, None, name)
        no_loss = bool(slot.attrs.get("no_loss"))
        return SlotPlan(slot, side, modality, preprocess, adaptor, PROMPT if no_loss else TARGET,
                        not no_loss, None if no_loss else self._decode_spec(slot, modality, preprocess), name)

    def preprocessor(self, plan: SlotPlan):
        """The preprocessor instance that encodes (and, for image codes, renders) ``plan``'s values."""
        return self._preprocessors[plan.preprocess]

    def preprocessor_named(self, name: str):
        """The plan's instance of preprocessor ``name``."""
        return self._preprocessors[name]

    def use_preprocessor(self, name: str, preprocessor) -> None:
        """Encodes the slots of preprocessor ``name`` with ``preprocessor`` instead (a model's own
        image tokenizer, ``GeneralistModel.plan``), and re-plans how its targets decode."""
        if name not in self._preprocessors:
            raise ValueError(f"task {self.name!r} has no slot preprocessed by {name!r}")
        self._preprocessors[name] = preprocessor
        for _, decoder in self.templates:
            for i, p in enumerate(decoder):
                if p.preprocess == name and p.decode is not None:
                    decoder[i] = dataclasses.replace(p, decode=self._decode_spec(p.slot, p.modality, name))

    def _decode_spec(self, slot: Slot, modality: ModalitySpec, preprocess: str) -> DecodeSpec:
        codes = self._preprocessors[preprocess]
        if hasattr(codes, "code_tokens"):  # an image tokenizer: a fixed number of code tokens
            return DecodeSpec("codes", length=codes.code_length, tokens=codes.code_tokens(self.tokenizer))
        if modality.continuous_target:
            return DecodeSpec("frames")
        if not modality.text_like and codes.feature_dim() is not None:
            return DecodeSpec("features")  # trained by regression where a frame head exists; not generated
        if modality.name == "BOX":
            return DecodeSpec("box")
        if slot.attrs.get("closed_set") or modality.name == "CATEGORY":
            if preprocess not in ("text", "category"):  # its trie holds text pieces; training wrote others
                raise ValueError(f"task {self.name!r}: slot {slot} is a closed set read by the {preprocess!r} "
                                 "preprocessor; a closed set's labels are decoded as text pieces, so answers "
                                 "trained as other tokens could never be written: drop closed_set or preprocess=")
            if slot.column is None:  # (the message below said Task collects them, which it never did for one)
                raise ValueError(f"task {self.name!r}: slot {slot} is a closed set filled by position; a closed "
                                 "set's labels are collected from its column, so name one ([TEXT:answer,closed_set], "
                                 "rows as dicts)")
            labels = self.closed_sets.get(slot.column)
            if not labels:
                raise ValueError(
                    f"task {self.name!r}: slot {slot} is a closed set but no labels were given for "
                    f"column {slot.column!r} (Task collects them from its data)"
                )
            from moe_gen.tasks.modalities.text import slot_token_ids

            eos = self.tokenizer.eos_id  # each label as the slot trains it (uncased, max_length...)
            label_of: dict[tuple[int, ...], str] = {}
            for label in map(str, labels):
                ids = tuple(slot_token_ids(label, slot.attrs, self.tokenizer))
                if ids in label_of:  # one answer for two classes: one of them could never be told
                    raise TaskDataError(f"task {self.name!r}: slot {slot}: labels {label_of[ids]!r} and {label!r} "
                                     f"are the same tokens once the slot's attributes ({_attrs_text(slot)}) and "
                                     "the tokenizer's normalisation apply; merge them in the data, or drop the "
                                     "attribute that makes them alike")
                label_of[ids] = label
            trie = build_trie([list(ids) + [eos] for ids in label_of])
            return DecodeSpec("closed_set", tuple(label_of.values()), trie, label_of)
        return DecodeSpec("text")

    # ---- encoding ----------------------------------------------------------------------------

    @property
    def columns(self) -> frozenset[str]:
        return frozenset(c for t in self.instruction.templates for c in t.columns)

    def encode(self, row: Any, index: int = -1, *, rng: Optional[random.Random] = None,
               training: bool = True, template: Optional[int] = None, inference: bool = False) -> Sample:
        """Encodes one data row (a dict by column, or a sequence for slots without columns).

        With ``inference=True`` the decoder keeps only its forced prefix (literal text and
        ``no_loss`` slots before the first scored slot), and target columns may be absent.

        Raises:
            TaskDataError: naming the task, column and row at fault.
        """
        rng = rng or random.Random(index)
        t = rng.randrange(len(self.templates)) if template is None else template
        encoder_plan, decoder_plan = self.templates[t]
        if inference:
            first = next((i for i, p in enumerate(decoder_plan) if p.loss), len(decoder_plan))
            decoder_plan = decoder_plan[:first]
        full_encoder, full_decoder = self.templates[t]
        ctx = EncodeContext(self.tokenizer, rng, training, row if isinstance(row, Mapping) else {},
                            task=self.name, index=index, max_positions=self.max_slot_positions,
                            predicted=frozenset(p.slot.column for p in full_decoder if p.loss and p.slot.column))
        values = self._slot_values(row, encoder_plan + decoder_plan, index, full_encoder + full_decoder)
        encoded = self._encode_slots(values, ctx)
        n_enc = len(encoder_plan)
        # disable_auto_boseos drops the answer's end marker only: the EOS closing a free-text value
        # (closing_eos) is what tells it from the next one, and decoding reads it (before the eighteenth
        # audit both were dropped, and the values ran together where decoding waits for the EOS)
        auto_eos = not inference and not any(p.slot.attrs.get("disable_auto_boseos") for p in decoder_plan)
        check_decodable(self, t, [encoded[i] for i in range(n_enc, len(values))], ctx)
        open_from = self.choice_starts(t)
        ends = [i >= n_enc and slot_followers(full_decoder, i - n_enc) == [None] for i in range(len(values))]
        chunks = [self._chunks(values[i][0], encoded[i], open_from.get(i - n_enc), ends[i]) for i in range(len(values))]
        encoder = _in_order(encoder_plan, chunks[:n_enc])
        decoder = _in_order(decoder_plan, chunks[n_enc:], self.closing_eos(t), self.open_ends(t), self.tokenizer.eos_id)
        # Closed-set chunks carry one allowed list per token plus one for the EOS that ends a label;
        # that last list belongs to the EOS chunk appended below, or to nothing.
        eos_allowed = None
        for i, chunk in enumerate(decoder):
            if chunk.allowed is not None and len(chunk.allowed) == len(chunk) + 1:
                if i == len(decoder) - 1 and None not in open_from:  # (where the end is a choice: all tokens)
                    eos_allowed = [chunk.allowed[-1]]
                elif chunk.allowed[-1] is None and i + 1 < len(decoder) and decoder[i + 1].allowed:
                    # the label may end here ("new") or go on ("new york"): the next slot's first
                    # token competes with the whole vocabulary, as decoding weighs it
                    decoder[i + 1].allowed = [None, *decoder[i + 1].allowed[1:]]
                chunk.allowed = chunk.allowed[:-1]
        if decoder and auto_eos:
            last = decoder[-1]
            if last.tokens is not None:  # text-like target ends with EOS; frames end with a stop flag
                decoder.append(Chunk(last.modality, last.role, last.loss, tokens=[self.tokenizer.eos_id],
                                     allowed=eos_allowed, lead=None if last.tokens else last.lead))
        # the task's modalities (a routing tag): the whole template's, at inference as in training
        used = {"TEXT" if p.slot.is_literal else p.modality.name for p in full_encoder + full_decoder}
        meta = {"template": t, **self._image_size(ctx, full_decoder)}
        return Sample(self.name, index, encoder, decoder, tuple(sorted(used)), meta)

    def target_tokens(self, plan: SlotPlan, value: Any, index: int = -1, *, place: Optional[str] = None) -> list[int]:
        """The tokens a free-text or image-code target slot trains on for ``value`` (without the
        EOS that ends it): encoded by the slot's own preprocessor, as training encodes the answer
        (``uncased``, ``max_length``...; a PHONE slot's phones, a ``struct_text`` table's linearised
        text; an image's code tokens). What a right answer writes: evaluation decodes them into its
        reference and sizes its length budget by them, ranking scores candidates as them (before
        the fourteenth audit both read the value as TEXT, so a perfect phone or table answer scored 0).

        Raises:
            TaskDataError: naming task, column and row (or ``place``), for a value the slot refuses.
        """
        if plan.decode is None or plan.decode.kind not in ("text", "codes"):
            raise ValueError(f"task {self.name!r}: slot {plan.slot} is not a free-text or image-code target")
        ctx = EncodeContext(self.tokenizer, random.Random(index), training=False, task=self.name, index=index,
                            max_positions=self.max_slot_positions, place=place)
        return list(self._encode_slot(plan, value, ctx).tokens)

    def _encode_slots(self, values: list, ctx: EncodeContext) -> dict[int, list[SlotEncoding]]:
        """Each slot's items encoded, by slot index. Non-text slots first, so a BOX can read the
        size of its sample's IMAGE: every item of every data slot goes into ``ctx.encoded`` by
        column (or ``"slot N"``, ``Template.slot_names``), so slots filled by position and a group's
        later items count too."""
        encoded: dict[int, list[SlotEncoding]] = {}
        for i in sorted(range(len(values)), key=lambda i: values[i][0].modality.text_like):
            plan, items = values[i]
            encoded[i] = [self._encode_slot(plan, item, ctx) for item in items]
            if plan.name is None:  # literal text
                continue
            name = repr(plan.name) if plan.slot.column is not None else plan.name
            for k, encoding in enumerate(encoded[i]):
                ctx.encoded[name if len(encoded[i]) == 1 else f"{name}[{k}]"] = encoding
        return encoded

    @staticmethod
    def _image_size(ctx: EncodeContext, decoder: list[SlotPlan]) -> dict[str, Any]:
        """``{"image_size": (width, height)}`` that decoded boxes map back to: for box targets, the
        size ``box_image_size`` gives (the sample's images, refused where they differ in size as
        in training, else the row's ``width`` and ``height``); else the first image's; ``{}``."""
        boxes = [p for p in decoder if p.decode is not None and p.decode.kind == "box"]
        if not boxes:
            sizes = [e.meta["original_size"] for e in ctx.encoded.values() if "original_size" in e.meta]
            return {"image_size": sizes[0]} if sizes else {}
        from moe_gen.tasks.modalities.text_like import box_image_size

        try:
            return {"image_size": box_image_size(ctx, boxes[0].slot)}
        except SlotValueError as exc:
            raise TaskDataError(str(exc)) from None

    def _slot_values(self, row, plans: list[SlotPlan], index: int, template: list[SlotPlan]):
        """(plan, [values]) per slot of ``plans`` (those of ``template`` encoded); repetition groups
        expand to one value per item. A sequence row fills the slots without a column in order: one
        value each of the whole template's at most (at inference the targets' may be left off); a
        value more would be silently dropped, so it fails the row."""
        takes = sum(1 for p in template if p.slot.column is None and not p.slot.is_literal)
        if takes and isinstance(row, (list, tuple)) and len(row) > takes:  # (takes 0: rows by column)
            raise TaskDataError(f"task {self.name!r}, row {index}: the instruction takes {takes} values by "
                                f"position, the row gives {len(row)}; the extra values would be ignored")
        positional = 0
        out = []
        for plan in plans:
            slot = plan.slot
            if slot.is_literal:
                out.append((plan, [slot.text]))
                continue
            if slot.column is None:
                if not isinstance(row, (list, tuple)):
                    raise TaskDataError(
                        f"task {self.name!r}, row {index}: slot {slot} has no column, so rows must be "
                        f"sequences filled by position, got {type(row).__name__}; name a column or pass tuples"
                    )
                if positional >= len(row):
                    raise TaskDataError(f"task {self.name!r}, row {index}: no value for slot {slot} (position "
                                        f"{positional}; the instruction takes {takes} values by position, the "
                                        f"row gives {len(row)})")
                value = row[positional]
                positional += 1
            else:
                if not isinstance(row, Mapping):
                    raise TaskDataError(f"task {self.name!r}, row {index}: rows must be dicts by column, "
                                        f"got {type(row).__name__}")
                if slot.column not in row:
                    raise TaskDataError(
                        f"task {self.name!r}, row {index}: missing column {slot.column!r} "
                        f"(the row has {', '.join(map(repr, row)) or 'no columns'})"
                    )
                value = row[slot.column]
            if slot.repeat is not None:
                items = group_items(value)
                if items is None:
                    raise TaskDataError(f"task {self.name!r}, column {slot.column!r}, row {index}: a slot in a "
                                        f"repetition group needs {GROUP_VALUES}, got {_kind(value)}")
                out.append((plan, items))
            else:
                out.append((plan, [value]))
        self._check_groups(out, index)
        return out

    def _check_groups(self, values, index: int) -> None:
        lengths: dict[int, set] = {}
        for plan, items in values:
            if plan.slot.repeat is not None and not plan.slot.is_literal:
                lengths.setdefault(plan.slot.repeat, set()).add(len(items))
        for group, sizes in lengths.items():
            if len(sizes) > 1:
                raise TaskDataError(f"task {self.name!r}, row {index}: the columns of repetition group "
                                    f"{group} have different lengths {sorted(sizes)}")
            if sizes == {0} and any(p.loss for p, _ in values if p.slot.repeat == group):
                # (it encoded to an answer with nothing scored, not even its end)
                raise TaskDataError(f"task {self.name!r}, row {index}: the answer's repetition group {group} has no "
                                    "items; an answer holds one or more (decoding generates at least one)")
        # Literals inside a group repeat as often as the group's data slots.
        for i, (plan, items) in enumerate(values):
            if plan.slot.is_literal and plan.slot.repeat is not None:
                count = next(iter(lengths.get(plan.slot.repeat, {1})))
                values[i] = (plan, items * count)

    def _encode_slot(self, plan: SlotPlan, value: Any, ctx: EncodeContext) -> SlotEncoding:
        """One value of a slot encoded, and checked: finite features, at most
        ``max_slot_positions`` positions.

        Raises:
            TaskDataError: naming task, column and row, for a ``SlotValueError`` of the
                preprocessor and for any other exception it raises (wrapped, with its type and
                message in the text and the original as ``__cause__``: a data error or a bug,
                either way the row that met it is named).
        """
        if plan.slot.is_literal:
            return SlotEncoding("TEXT", tokens=self.tokenizer.encode_literal(value))
        where = ctx.where(plan.slot.column)
        ctx.target, ctx.slot_name = plan.side == "decoder", plan.name
        try:
            closed = plan.decode is not None and plan.decode.kind == "closed_set"
            if closed and label_text(value) not in plan.decode.labels:
                if is_missing(value):
                    raise TaskDataError(f"{where}: the label is a missing value ({value})")
                raise TaskDataError(f"{where}: label {brief(value)} is not in the closed set "
                                    f"({len(plan.decode.labels)} labels)")
            encoding = self._preprocessors[plan.preprocess](value, plan.slot, ctx)
        except TaskDataError:
            raise
        except SlotValueError as exc:
            message = str(exc)
            if not message.startswith("task "):
                message = f"{where}: {message}"
            raise TaskDataError(message) from None
        except Exception as exc:
            raise TaskDataError(f"{where}: the {plan.preprocess!r} preprocessor failed on {brief(value)}: "
                                f"{type(exc).__name__}: {exc}") from exc
        if encoding.features is not None and not bool(torch.isfinite(encoding.features).all()):
            raise TaskDataError(f"{where}: the {plan.preprocess!r} preprocessor made non-finite features of "
                                f"{brief(value)}")
        if len(encoding) > self.max_slot_positions:
            raise TaskDataError(f"{where}: the value takes {len(encoding)} positions, over the cap of "
                                f"{self.max_slot_positions} positions per slot (truncate it with max_length where "
                                "the slot takes one, or raise Task(max_slot_positions=...))")
        return encoding

    def _chunks(self, plan: SlotPlan, encodings: list[SlotEncoding], open_from: Optional[int] = None,
                ends_answer: bool = False) -> list[Chunk]:
        """A slot's values as chunks; a closed set's carry the tokens its label trie allows at each
        position, except where the answer could also go on otherwise: None there (the whole
        vocabulary). That is the first position of the values from item ``open_from`` on
        (``choice_starts``), and, unless the slot ends the answer (``ends_answer``: its labels end
        with the answer's EOS), the position after a label that is the start of another ("new" of
        "new york"), where the label may end and the next slot begin."""
        out = []
        eos = self.tokenizer.eos_id
        for item, enc in enumerate(encodings):
            column = plan.slot.column
            if enc.tokens is not None:
                allowed = None
                if plan.decode is not None and plan.decode.kind == "closed_set":
                    allowed, node = [], plan.decode.trie
                    for token in [*enc.tokens, eos]:
                        may_end = eos in node and len(node) > 1 and not ends_answer
                        allowed.append(None if may_end else sorted(node))
                        node = node.get(token, {})
                    if open_from is not None and item >= open_from:
                        allowed[0] = None
                out.append(Chunk(plan.modality.name, plan.role, plan.loss, tokens=list(enc.tokens), column=column,
                                 allowed=allowed))
            else:
                out.append(Chunk(plan.modality.name, plan.role, plan.loss, rows=enc.features,
                                 positions=enc.positions, adaptor=str(plan.adaptor), column=column,
                                 padded_values=int(enc.meta.get("padded_values", 0))))
        return out

    def closing_eos(self, template: int = 0) -> frozenset[int]:
        """Decoder slots (indices in the template) whose every value ends with its own EOS: free-text
        targets followed by anything but a box. Before location tokens, or at the end of the answer
        (whose EOS does it), the end of the text needs no mark."""
        decoder = self.templates[template][1]
        is_box = [p.decode is not None and p.decode.kind == "box" for p in decoder]
        return frozenset(i for i, p in enumerate(decoder) if p.decode is not None and p.decode.kind == "text"
                         and any(f is not None and not is_box[f] for f in slot_followers(decoder, i)))

    def choice_starts(self, template: int = 0) -> dict[Optional[int], int]:
        """Where the layout lets the answer go on in more than one way: decoder slot index (None:
        the answer's end) → the first item of the slot whose value starts at such a point. After
        the last slot of a repetition group comes another item or what follows the group, so the
        group's first slot from its second item on (a group decodes at least one item), and the
        slot or end after the group. There a closed set's training softmax is not limited to its
        labels: decoding weighs them against the other ways on, so training must too (before
        2026-12-05 it was limited, and a model never learned where a list of labels ends)."""
        decoder = self.templates[template][1]
        starts: dict[Optional[int], int] = {}
        for i in range(len(decoder)):
            followers = slot_followers(decoder, i)
            if len(followers) > 1:
                for follower in followers:
                    wraps = follower is not None and follower <= i  # another item of the group
                    starts[follower] = min(starts.get(follower, 1), 1 if wraps else 0)
        return starts

    def open_ends(self, template: int = 0) -> frozenset[int]:
        """Decoder slots after whose values the layout leaves the next item open: text and closed
        sets that may run on (free text without its own EOS), and slots with several followers
        (the last slot of a repetition group). The position after such a value is tagged like the
        slot, whatever comes next (``Chunk.lead``)."""
        decoder = self.templates[template][1]
        closing = self.closing_eos(template)
        return frozenset(
            i for i, p in enumerate(decoder)
            if (p.decode is not None and p.decode.kind in ("text", "closed_set") and i not in closing)
            or len(slot_followers(decoder, i)) > 1)

    def decode_specs(self, template: int = 0) -> list[DecodeSpec]:
        """Decode specs of the scored decoder slots of a template, in order."""
        return [p.decode for p in self.templates[template][1] if p.decode is not None]
