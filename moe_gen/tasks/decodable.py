"""Target layouts decoding can write back: which slot may follow which (``slot_followers``, read by
the plan that lays answers out and by ``moe_gen.model.grammar`` that decodes them), and the rows
refused because training would lay out an answer that decoding could never give
(``check_decodable``)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from moe_gen.tasks.errors import TaskDataError
from moe_gen.tasks.modalities.base import EncodeContext, SlotEncoding

# (plans are moe_gen.tasks.plan's TaskPlan and SlotPlan, which import this module: typed as Any here)

__all__ = ["check_decodable", "slot_followers"]


def slot_followers(slots: Sequence[Any], i: int) -> list[Optional[int]]:
    """The slots of a side that may come right after slot ``i``: the next one; or, after the last
    slot of a repetition group, the group's first slot (another item) and what follows the group.
    None stands for the end of the side."""
    group = slots[i].slot.repeat
    after = i + 1 if i + 1 < len(slots) else None
    if group is None or (after is not None and slots[after].slot.repeat == group):
        return [after]
    first = next(j for j, p in enumerate(slots) if p.slot.repeat == group)
    return [first, after]


def check_decodable(plan: Any, template: int, encodings: list[list[SlotEncoding]], ctx: EncodeContext) -> None:
    """Refuses a row whose answer, as laid out for training, decoding (``moe_gen.model.grammar``)
    could never write back: the model would learn an answer it cannot give.

    - A free-text target's value holding location tokens (``<bin_k>`` written out, which
      ``encode`` recognises) in a template with boxes or image codes: there they are only ever
      read as coordinates or codes, and decoded free text never takes them.
    - An item after the first of a repetition group that begins with an empty value whose first
      token (the EOS closing it, or what follows it) is one that what follows the group may begin
      with, past closed sets left at their empty label "": a lone EOS reads as the answer's end
      (this item and all after it lost); an item of no tokens at all vanishes.

    Args:
        template: the template's index.
        encodings: the encoded values of the template's decoder slots, by slot (at inference only
            its forced prefix's).
        ctx: the row's encode context (for the place named).

    Raises:
        TaskDataError: naming task, column and row, and what to do.
    """
    decoder = plan.templates[template][1]
    kinds = {p.decode.kind for p in decoder if p.decode is not None}
    if kinds & {"box", "codes"}:
        for slot_plan, values in zip(decoder, encodings):
            if not slot_plan.loss or slot_plan.decode is None or slot_plan.decode.kind != "text":
                continue
            bins = [t for v in values for t in v.tokens or () if plan.tokenizer.bin_index(t) is not None]
            if bins:
                raise TaskDataError(f"{ctx.where(slot_plan.slot.column)}: the text holds location tokens "
                                    f"({', '.join(plan.tokenizer.pieces(bins[:3]))}), which in a template "
                                    f"with {'boxes' if 'box' in kinds else 'image codes'} are read only as "
                                    f"{'box coordinates' if 'box' in kinds else 'image codes'}: decoded free "
                                    "text never takes them, so the answer could not be given back; write them "
                                    "another way (e.g. 'bin 3')")
    closing = plan.closing_eos(template)
    for group in sorted({p.slot.repeat for p in decoder[:len(encodings)] if p.slot.repeat is not None and p.loss}):
        _check_empty_items(plan, decoder, group, encodings, ctx, closing)

def _check_empty_items(plan: Any, decoder: list[Any], group: int, encodings: list[list[SlotEncoding]],
                       ctx: EncodeContext, closing: frozenset[int]) -> None:
    """The items of repetition ``group`` after the first that begin with an empty value laid out
    as what may follow the group (``_check_decodable``) are refused."""
    members = [k for k in range(len(encodings)) if decoder[k].slot.repeat == group]
    after = slot_followers(decoder, members[-1])[-1]
    eos, ends = plan.tokenizer.eos_id, _starts_after(plan, decoder, after)
    direct = {eos} if after is None else _slot_starts(plan, decoder[after])
    for item in range(1, max(len(encodings[k]) for k in members)):
        first, empty = _item_start(plan, members, encodings, closing, item)
        if empty is None or (first is not None and first not in ends):
            continue
        past = "" if first in direct else f' (past the empty label "" of {decoder[after].slot})'
        what = ("no token at all, so decoding could not tell it was there" if first is None else
                f"a lone EOS, the token that ends the answer after the group{past}, so decoding would read it "
                "as the answer's end, losing this item and all after it" if first == eos else
                f"{decoder[after].slot}'s first token{past}, which decoding would read as the group's end")
        raise TaskDataError(f"{ctx.where(decoder[empty].slot.column)}: item {item + 1} of repetition group "
                            f"{group} begins with an empty value of {decoder[empty].slot}, laid out as {what}; "
                            "give the value text (e.g. a placeholder such as 'none') or drop the item")


def _starts_after(plan: Any, decoder: list[Any], after: Optional[int]) -> set[int]:
    """The tokens decoding reads as the answer going on past a repetition group, slot ``after``
    following it: that slot's first tokens (EOS at the answer's end) and, past a closed set holding
    the empty label "" (no token), those of what follows it in turn (``TargetGrammar`` offers the
    empty label, then what follows, at once); a box or image codes after it begins with any location
    bin. Before the eighteenth audit only the first, without bins: an empty item's lone EOS after
    ``( [TEXT:t] )* [CATEGORY:k]`` passed, and read as k's "" and the end; an empty text item of
    ``( [TEXT:t] [BOX:b] )* [BOX:z]``, laid out as its box's bins, passed and read as z."""
    eos, out = plan.tokenizer.eos_id, set()
    queue, seen = [after], set()
    while queue:
        f = queue.pop()
        if f is None or f in seen:
            out |= {eos} if f is None else set()
            continue
        seen.add(f)
        out |= _slot_starts(plan, decoder[f])
        decode = decoder[f].decode
        if decode is not None and decode.kind == "closed_set" and eos in decode.trie:
            queue.extend(slot_followers(decoder, f))
    return out


def _slot_starts(plan: Any, slot_plan: Any) -> set[int]:
    """The tokens a decoder slot may begin with, location bins for a box or image codes included
    (``first_tokens`` leaves them out: no label holds them)."""
    if slot_plan.decode is not None and slot_plan.decode.kind in ("box", "codes"):
        first_bin = plan.tokenizer.bin_id(0)
        return set(range(first_bin, first_bin + plan.tokenizer.num_bins))
    return plan.first_tokens(slot_plan) or set()


def _item_start(plan: Any, members: list[int], encodings: list[list[SlotEncoding]], closing: frozenset[int],
                item: int) -> tuple[Optional[int], Optional[int]]:
    """The first token of item ``item`` of a repetition group (its slots ``members``) as laid out
    (None: no token, or feature rows), and the first of its slots whose value before that token is
    empty (None: none is)."""
    empty = None
    for k in members:
        if item >= len(encodings[k]):
            continue
        tokens = encodings[k][item].tokens
        if tokens is None:  # feature rows: not a token that could be mistaken
            return None, None
        if tokens:
            return tokens[0], empty
        empty = k if empty is None else empty
        if k in closing:
            return plan.tokenizer.eos_id, empty
    return None, empty
