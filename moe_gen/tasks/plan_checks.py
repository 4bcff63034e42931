"""The checks a ``TaskPlan`` runs on its instruction when it is built (``moe_gen.tasks.plan``).

Each takes the plan (its name, tokenizer and preprocessors) and the resolved slots (lists of
``SlotPlan``; this module does not import ``plan``, which imports it), and raises
``ValueError`` (the instruction cannot work) or ``TaskDataError`` (the data's labels cannot be read
back), naming the task and slot; ``warn_unapplied`` warns of attributes parsed but not applied.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from moe_gen.tasks.decodable import slot_followers
from moe_gen.tasks.errors import TaskDataError
from moe_gen.tasks.instruction import Slot

__all__ = ["check_template", "check_windows_and_masks", "check_augment", "warn_unapplied", "is_closed",
           "continuations_at_label_ends", "same_tokens_as"]


def is_closed(plan) -> bool:
    return plan.decode is not None and plan.decode.kind == "closed_set"


def continuations_at_label_ends(trie: dict, eos: int) -> set[int]:
    """The tokens that continue a label where a shorter label of the trie ends."""
    out, stack = set(), [trie]
    while stack:
        node = stack.pop()
        if eos in node and len(node) > 1:
            out |= set(node) - {eos}
        stack.extend(child for token, child in node.items() if token != eos)
    return out


def same_tokens_as(preprocess: str) -> str:
    """A preprocessor's name, or the name of another that encodes values as the same tokens."""
    return {"category": "text", "text_phone": "phone"}.get(preprocess, preprocess)


def check_template(plan, encoder: list, decoder: list) -> None:
    """The checks of one resolved template of ``plan``: no column predicted twice, no input that
    hands the model its answer, an answer that can end, and labels that can be read back."""
    check_targets_distinct(plan, decoder)
    check_answers_hidden(plan, encoder, decoder)
    check_answer_ends(plan, decoder)
    check_label_boundaries(plan, decoder)


def check_targets_distinct(plan, decoder: list) -> None:
    """Refuses two scored decoder slots that name one column: training would score the value
    twice, and the decoded answer (keyed by column) would keep only the second slot's value.
    (A repetition group's slot names its column once; its items are the values of one list.)"""
    seen: dict[str, Slot] = {}
    for p in decoder:
        if not p.loss or p.slot.is_literal or not p.slot.column:
            continue
        if p.slot.column in seen:
            raise ValueError(f"task {plan.name!r}: slots {seen[p.slot.column]} and {p.slot} both predict column "
                             f"{p.slot.column!r}; an answer holds one value per column: read another column "
                             "in one of them")
        seen[p.slot.column] = p.slot


def check_label_boundaries(plan, decoder: list) -> None:
    """A closed set whose labels go on past a shorter one ("new", "new york") right before a
    slot that may begin with the same token ("york", or free text: any token) could not be read
    back: "new" + "york" and "new york" + ... are the same tokens, and decoding takes one reading
    even when the model wrote the other. So may a slot after closed sets holding the empty label
    "" (no token at all: "new" + "" + "york"). Refused, naming both slots: literal text between
    them tells them apart."""
    eos = plan.tokenizer.eos_id
    for i, p in enumerate(decoder):
        going_on = continuations_at_label_ends(p.decode.trie, eos) if is_closed(p) else set()
        for f, empty in next_values(plan, decoder, i) if going_on else ():
            starts = plan.first_tokens(decoder[f])
            if starts is None or going_on & starts:  # the labels come from the data: a data error
                past = f" (past {', '.join(str(decoder[k].slot) for k in empty)}, which may be empty)" \
                    if empty else ""
                raise TaskDataError(f"task {plan.name!r}: slot {p.slot}'s labels go on past shorter ones, and "
                                    f"{decoder[f].slot} after it{past} may begin with the token that goes on; "
                                    "the answer could not be read back (\"new\" + \"york\" or \"new york\" + "
                                    "...): put literal text between them")


def next_values(plan, decoder: list, i: int) -> list[tuple[int, tuple[int, ...]]]:
    """The slots whose value may come right after slot ``i``'s, each with the slots left empty
    on the way: its followers, and the followers of a follower that is a closed set holding the
    empty label "" (no token: the chain decoding follows, ``Option.more_empty``), in turn. (Before
    the fourteenth audit only the followers: "new" + "" + "york" passed the check.)"""
    out, queue, seen = [], [(f, ()) for f in slot_followers(decoder, i)], set()
    while queue:
        f, empty = queue.pop(0)
        if f is None or f in seen:
            continue
        seen.add(f)
        out.append((f, empty))
        if is_closed(decoder[f]) and plan.tokenizer.eos_id in decoder[f].decode.trie:
            queue.extend((g, empty + (f,)) for g in slot_followers(decoder, f))
    return out


def check_answer_ends(plan, decoder: list) -> None:
    """``disable_auto_boseos`` on a decoder slot drops the answer's end marker, which decoding
    stops at: refused where the answer ends in a slot of no fixed length (text, a closed set,
    frames), which then never learns to stop ("one" could not be told from "one hundred"), or in a
    repetition group, whose last item only that marker tells from one more (before the twenty-sixth
    session's audit a group of boxes passed, and every answer ran on to ``max_items``)."""
    flagged = [p.slot for p in decoder if p.slot.attrs.get("disable_auto_boseos")]
    i = next((i for i in reversed(range(len(decoder))) if decoder[i].decode is not None), None)
    if not flagged or i is None:
        return
    last = decoder[i]
    if last.decode.kind in ("text", "closed_set", "frames"):
        raise ValueError(f"task {plan.name!r}: slot {flagged[0]} sets disable_auto_boseos, which drops the "
                         f"answer's end marker; the answer ends in {last.slot}, whose length only that marker "
                         "ends (decoding could not stop, nor tell a label from a longer one)")
    if len(slot_followers(decoder, i)) > 1:
        raise ValueError(f"task {plan.name!r}: slot {flagged[0]} sets disable_auto_boseos, which drops the "
                         f"answer's end marker; the answer ends in a repetition group (its last slot {last.slot}), "
                         "whose last item only that marker tells from one more (decoding would add items up to "
                         "max_items)")


def warn_unapplied(name: str, instruction, specs: dict[str, Any]) -> None:
    """Warns of slot attributes of task ``name`` parsed for OFASys instructions that moe_gen does not
    apply (``specs``: the attribute specs by modality, as the parser read them)."""
    for template in instruction.templates:
        for slot in template.encoder + template.decoder:
            unapplied = [a for a in slot.attrs if a in specs.get(slot.modality, {})
                         and not specs[slot.modality][a].applied]
            if unapplied:
                warnings.warn(f"task {name!r}: slot {slot} sets {', '.join(unapplied)}, which moe_gen "
                              "parses (OFASys instructions use it) but does not apply", UserWarning, stacklevel=3)
        for slot in template.decoder:  # corrupting an answer would train on a corrupted answer
            corrupted = [a for a in ("mask_ratio", "noise_ratio") if a in slot.attrs and not slot.is_literal]
            if corrupted:
                warnings.warn(f"task {name!r}: slot {slot} sets {', '.join(corrupted)} on the answer side, "
                              "which moe_gen parses but does not apply (the model would learn corrupted answers, "
                              "and a closed set's tokens outside its labels); corrupt an input slot",
                              UserWarning, stacklevel=3)
        for slot in template.encoder:
            answers_only = [a for a in ("closed_set", "no_loss", "disable_auto_boseos") if slot.attrs.get(a)]
            if answers_only:
                warnings.warn(f"task {name!r}: slot {slot} sets {', '.join(answers_only)} on an input, "
                              "where it does nothing (it applies to answer slots, after ->)", UserWarning,
                              stacklevel=3)


def check_answers_hidden(plan, encoder: list, decoder: list) -> None:
    """Refuses an input that hands the model its answer: an encoder slot, or a given ``no_loss``
    decoder slot (decoding is handed it as its prefix), encoding a column as the decoder
    predicts it (a scored slot whose preprocessor gives the same tokens: the same one, or TEXT
    and CATEGORY; ``[TEXT:text] -> [PHONE:text]`` is a conversion, not a copy), unless its preprocessor corrupts it
    (``Preprocessor.corruptions``, such as ``mask_ratio``: infilling, denoising), or an image
    ``region`` cropped by a predicted box."""
    predicted = {p.slot.column for p in decoder if p.loss and p.slot.column and not p.slot.is_literal}
    copies = {(p.slot.column, same_tokens_as(p.preprocess)) for p in decoder
              if p.loss and p.slot.column and not p.slot.is_literal}
    for given in encoder + [p for p in decoder if not p.loss]:  # inputs, and what the decoder is given
        slot = given.slot
        if slot.is_literal:
            continue
        region = slot.attrs.get("region")
        if isinstance(region, str) and region in predicted:
            raise ValueError(f"task {plan.name!r}: slot {slot} crops its image by {region!r}, a column the "
                             "task predicts, so the input would show the answer; crop by another column")
        corruptions = plan.preprocessor(given).corruptions
        if (slot.column, same_tokens_as(given.preprocess)) in copies and not any(
                slot.attrs.get(a) for a in corruptions):
            how = (f"corrupt it ({', '.join(f'{a}=...' for a in corruptions)}) for an infilling or denoising "
                   "task, or read another column") if corruptions else "read another column"
            raise ValueError(f"task {plan.name!r}: slot {slot} reads {slot.column!r}, a column the task "
                             f"predicts, as the task predicts it, so the input would hold the answer; {how}")


def check_windows_and_masks(plan, where: str, slot: Slot, side: str, preprocess: str) -> None:
    """Refuses motion windows, ``feature_noise``, ``mask_ratio`` and ``subword_sampling`` where they
    cannot apply."""
    if "subword_sampling" in slot.attrs:
        _check_subword_sampling(plan, where, side, preprocess)
    if slot.modality == "MOTION" and slot.attrs.get("min_length", 0) > slot.attrs.get("max_length", math.inf):
        raise ValueError(f"{where}: min_length {slot.attrs['min_length']} is above max_length "
                         f"{slot.attrs['max_length']}")
    if slot.modality == "MOTION" and "min_length" in slot.attrs and side != "encoder":
        # a target cut at a random length would end there, teaching its stop flag random cut points
        raise ValueError(f"{where}: min_length draws shorter training windows of an input; a target "
                         "(after ->) is read whole, up to max_length")
    if "feature_noise" in slot.attrs and preprocess != "pose_summary":
        raise ValueError(f"{where}: feature_noise perturbs window statistics; it applies to "
                         "preprocess=pose_summary only")
    sentinels = plan.preprocessor_named(preprocess).masks_with_sentinels
    if slot.attrs.get("mask_ratio") and sentinels and not plan.tokenizer.num_sentinels:
        raise ValueError(f"{where}: mask_ratio replaces spans by sentinel tokens, and the tokenizer has none "
                         "(num_sentinels=0); build it with sentinels, or corrupt with noise_ratio")


def _check_subword_sampling(plan, where: str, side: str, preprocess: str) -> None:
    """``subword_sampling`` draws segmentations of text inputs read as pieces of a vocabulary that can."""
    if side != "encoder":
        raise ValueError(f"{where}: subword_sampling draws segmentations of an input in training; an answer "
                         "(after ->) is written and scored in the tokenizer's own segmentation")
    if preprocess != "text":
        raise ValueError(f"{where}: subword_sampling applies to text read as tokens (preprocess=text), not "
                         f"preprocess={preprocess}")
    if not plan.tokenizer.samples_segmentations:
        raise ValueError(f"{where}: subword_sampling needs a tokenizer that draws segmentations (the package's "
                         f"sentencepiece Tokenizer); this model's is {type(plan.tokenizer).__name__}")


def check_augment(plan, where: str, slot: Slot, side: str, preprocess: str) -> None:
    """``augment=`` is for image inputs patched by the ``image`` preprocessor, in tasks whose
    answers a mirror, rotation or shift leaves true: none with boxes, which would no longer match."""
    from moe_gen.tasks.modalities.visual import AUGMENT_KINDS, unknown_augmentations

    kind = str(slot.attrs["augment"])
    unknown = unknown_augmentations(kind)
    if unknown:
        raise ValueError(f"{where}: unknown augment {', '.join(map(repr, unknown))} in {kind!r}; known: "
                         f"{', '.join(AUGMENT_KINDS)} (combine them with '+')")
    if side != "encoder" or preprocess != "image":
        raise ValueError(f"{where}: augment applies to input images of the 'image' preprocessor, not to "
                         f"{'a target' if side != 'encoder' else f'preprocess={preprocess}'}")
    slots = [s for t in plan.instruction.templates for s in t.encoder + t.decoder]
    if "region" in slot.attrs or any(s.modality == "BOX" for s in slots):
        raise ValueError(f"{where}: augment moves pixels, so the task's boxes would no longer match the "
                         "image; drop augment or the BOX slots / region")

