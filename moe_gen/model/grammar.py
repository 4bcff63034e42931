"""What an answer may look like: the decoder side of a template as a small state machine.

Decoding follows the layout of the training sequences (``moe_gen.tasks.plan``): slots in order,
the slots of a repetition group item by item, literal decoder text forced, EOS at the end, and an
EOS after every value of a free-text target that something other than a box follows
(``TaskPlan.closing_eos``). ``options(state)`` lists what may come next:

- box: exactly 4 location tokens (any bins: the argmax over the bins at every step; ``parse``
  orders the corners);
- image codes: exactly the image tokenizer's N code tokens;
- closed set: a path of the label trie; the label may end where the trie allows EOS (inside the
  answer no EOS is written there, as in training, so what follows decides); the empty label ""
  (EOS at the trie's root) is no token at all, as free text's empty value below;
- free text: any token no other option claims (no location token when the template has boxes,
  no unknown token where the tokenizer never encodes text as it), at most ``max_new_tokens`` per
  value;
- literal text: its tokens, forced;
- after a slot: the first token of the next slot; after the last slot of a repetition group, the
  group's first slot again (another item, while fewer than ``max_items``) or what follows the
  group; after the last slot, EOS. Groups decode at least one item (a training sequence without
  items has no answer to learn from). A free-text value may be empty, wherever it comes (training
  scores its EOS, or the slot after it, right there): a next slot of free text may also begin with
  what would follow its value (``Option.empty``), unless another option takes that token. So may a
  next closed set holding the empty label (then what follows may be empty too: ``Option.more_empty``).

Every state has one tag for the position that predicts its next token (``tag``), as in
training: the tag of the item it predicts where the layout fixes it, the tag of the slot before
where the layout leaves it open (``TaskPlan.open_ends``), so all options of a state are scored by
one distribution. Options that start a value (another box, the next label) compete on their
total probability, the rest on their token's (``Option.action``; see ``generate``).

Answers that stop where the old single-target decoding stopped are unchanged: a box ends after
its 4th location token, text at ``max_new_tokens`` tokens, without an EOS step.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Optional

from moe_gen.tasks.modalities.base import modality_tag_names
from moe_gen.tasks.modalities.box import dequantize_box
from moe_gen.tasks.plan import TARGET, SlotPlan, TaskPlan, slot_followers

__all__ = ["Option", "State", "TargetGrammar", "check_answer_layout", "check_limits"]

Tag = tuple[int, int]  # (modality tag id, role) of a decoder position


def check_limits(task: str, **limits) -> list[int]:
    """The length limits given by name (``max_new_tokens=32``, ...) as ints, in order.

    Raises:
        ValueError: naming the task and the limit, for a value that is not a whole number >= 1
            (a bool, 2.5 or "8"; NumPy integers are whole numbers).
    """
    out = []
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"task {task!r}: {name} must be a whole number >= 1, got {value!r}")
        out.append(int(value))
    return out


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to continue an answer.

    Attributes:
        slot: index of the decoder slot the token belongs to (for an EOS, the slot it ends).
        tokens: the allowed token ids, or None for any id that no other option of the state claims.
        scored: whether the token's log-probability counts in the answer's score (not for literal
            text, which training never scores).
        action: ``"content"`` (a token of the slot being decoded), ``"start"`` (the first token
            of the next slot), ``"close"`` (the EOS ending a free-text value) or ``"end"``
            (the answer's EOS).
        empty: a free-text slot whose value the option leaves empty (or a closed set it gives the
            empty label ""), begun and complete before its token (then ``slot`` and ``action`` say
            what the token does after that value), or None.
        more_empty: the slots after ``empty`` whose values the option leaves empty too, in order
            (closed sets with the empty label, and free text closed by the token).
    """

    slot: int
    tokens: Optional[tuple[int, ...]]
    scored: bool
    action: str
    empty: Optional[int] = None
    more_empty: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class State:
    """Where an answer stands.

    Attributes:
        slot: the decoder slot being decoded, or the last one completed.
        length: tokens of the slot's current value so far.
        node: for closed sets, the label trie node reached.
        complete: the slot's value is complete; only what follows it may come next.
        item: 0-based item of the repetition group holding ``slot`` (0 outside groups).
        done: the answer is complete.
        pieces: ``(slot, item, token)`` of every token decoded so far, EOS markers excluded.
        values: ``(slot, item)`` of every value begun so far, in order, those still without a token
            included: a free-text value may be empty (its EOS, or the next slot, comes first), and
            ``pieces`` alone would not show it.
    """

    slot: int
    length: int = 0
    node: Optional[dict] = dataclasses.field(default=None, compare=False)
    complete: bool = False
    item: int = 0
    done: bool = False
    pieces: tuple[tuple[int, int, int], ...] = ()
    values: tuple[tuple[int, int], ...] = ()


def check_answer_layout(plan: TaskPlan, template: int = 0) -> int:
    """Checks that decoding can give back the answer of template ``template`` as training lays it
    out, and returns the index of its first target slot. ``TargetGrammar`` runs it for the template
    it decodes, and ``Objective.check_task`` for every template when the ``Trainer`` is built, so
    that a task is refused before it trains, not after, in ``infer`` or evaluation.

    Raises:
        ValueError: naming the task (and slot), for a template without a scored decoder slot (it
            would train on the routing loss alone), a ``no_loss`` slot after the first target, a
            target of feature rows (not generated: the default STRUCT cells, image patches), frames
            beside another target or in a repetition group (frames decode only as the single
            target), and a slot after which two free-text slots may start.
    """
    slots = plan.templates[template][1]
    scored = [i for i, p in enumerate(slots) if p.loss]
    if not scored:
        raise ValueError(f"task {plan.name!r} has no scored decoder slot to decode")
    first = scored[0]
    for p in slots[first:]:
        if not p.slot.is_literal and not p.loss:
            raise ValueError(f"task {plan.name!r}: decoder slot {p.slot} (no_loss) comes after the first "
                             "target; inference cannot fill it")
        if p.decode is not None and p.decode.kind == "features":
            fix = (f"; an image target needs an image tokenizer: [IMAGE:{p.slot.column},preprocess=image_vq]"
                   if p.modality.name == "IMAGE" else f"; {p.modality.name} targets are not generated")
            raise ValueError(f"task {plan.name!r}: target {p.slot} is feature rows of the {p.preprocess!r} "
                             f"preprocessor, which cannot be generated{fix}")
        if p.decode is not None and p.decode.kind == "frames" and (len(scored) > 1 or p.slot.repeat is not None):
            raise ValueError(f"task {plan.name!r}: frames ({p.slot}) decode only as the single target")
    kinds = [_slot_kind(p) for p in slots]
    for i in range(first, len(slots)):  # free text takes any token: two could not be told apart
        if sum(f is not None and kinds[f] == "text" for f in slot_followers(slots, i)) > 1:
            raise ValueError(f"task {plan.name!r}: after {slots[i].slot} two free-text slots may start; "
                             "put literal text before one of them")
    return first


def _slot_kind(p: SlotPlan) -> str:
    """What decoding does at a decoder slot: its ``DecodeSpec`` kind, ``literal`` (forced text) or
    ``given`` (a ``no_loss`` value of the forced prefix, never decoded)."""
    return "literal" if p.slot.is_literal else p.decode.kind if p.decode is not None else "given"


class TargetGrammar:
    """The answers a plan's template allows, for constrained decoding.

    Args:
        plan: the task's ``TaskPlan``.
        tokenizer: the model's tokenizer.
        template: which template (inference uses the first).
        max_new_tokens: the most tokens of one free-text value (a target slot's own
            ``max_length``, where it declares one, instead).
        max_items: the most items of one repetition group.
        modality_ids: modality name → tag id (the model's ``modality_ids``); default the modality
            tag vocabulary of this process.

    Raises:
        ValueError: for templates it cannot decode (``check_answer_layout``: frames next to other
            targets, ``no_loss`` slots after the first target, ...), and limits that are not whole
            numbers >= 1.
    """

    def __init__(self, plan: TaskPlan, tokenizer, template: int = 0, *, max_new_tokens: int = 32,
                 max_items: int = 8, modality_ids: Optional[Mapping[str, int]] = None,
                 score_end: bool = True) -> None:
        max_new_tokens, max_items = check_limits(plan.name, max_new_tokens=max_new_tokens, max_items=max_items)
        self.tok = tokenizer
        self.score_end = score_end  # False for the masked pass, whose objective never predicts the EOS
        self.slots = plan.templates[template][1]
        self.max_new_tokens, self.max_items = max_new_tokens, max_items
        # a free-text target that declares max_length (training cuts its values there) may decode
        # that many tokens; the others max_new_tokens
        self.limits = [int(p.slot.attrs.get("max_length") or max_new_tokens)
                       if p.decode is not None and p.decode.kind == "text" else max_new_tokens for p in self.slots]
        self.first = check_answer_layout(plan, template)
        self.closing, self.open_ends = plan.closing_eos(template), plan.open_ends(template)
        self.followers = [slot_followers(self.slots, i) for i in range(len(self.slots))]
        ids = modality_ids if modality_ids is not None else {n: i for i, n in enumerate(modality_tag_names())}
        self.tags: list[Tag] = [(ids[p.modality.name], p.role) for p in self.slots]
        # (a no_loss slot before the first target is part of the forced prefix, never decoded)
        self.kinds = [_slot_kind(p) for p in self.slots]
        self.literals = {i: tuple(tokenizer.encode_literal(p.slot.text)) for i, p in enumerate(self.slots)
                         if p.slot.is_literal}
        self.bins = tuple(tokenizer.bin_id(k) for k in range(tokenizer.num_bins))
        self.renderers = {i: plan.preprocessor(p).to_image for i, p in enumerate(self.slots)
                          if self.kinds[i] == "codes"}
        # Free text never takes EOS (it ends the text), PAD, BOS or UNK where the tokenizer never
        # encodes text as UNK (no target holds them: a value of them decoded to '' or ' ⁇ ' and spent
        # the length budget), nor location tokens when they would be read as a box or image codes.
        # (Sentinels and location tokens written out in a text value are text a task may train on,
        # and so is WordPiece's [UNK] for an emoji: before the fourteenth audit it was refused, and
        # such an answer could never be written.)
        discrete = "box" in self.kinds or "codes" in self.kinds
        unknown = None if getattr(tokenizer, "encodes_unknown", False) else getattr(tokenizer, "unk_id", None)
        never = {tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id, unknown}
        self.reserved = frozenset({t for t in never if t is not None} | set(self.bins if discrete else ()))
        self.keys = [p.name or str(i) for i, p in enumerate(self.slots)]  # a column, or "slot N" by position
        self.groups = sorted({p.slot.repeat for p in self.slots if p.slot.repeat is not None})

    # ---- the state machine ---------------------------------------------------------------

    def tag(self, state: State) -> Tag:
        """``(modality id, role)`` of the position that predicts the state's next token."""
        i = state.slot
        if not state.complete or i in self.open_ends:
            return self.tags[i]
        follower = self.followers[i][0]  # the layout fixes what comes next
        return self.tags[follower] if follower is not None else self.tags[i]

    def start(self) -> State:
        return State(self.first, node=self._root(self.first), values=((self.first, 0),))

    def trained_choices(self, state: State) -> Optional[tuple[int, ...]]:
        """The tokens training's softmax is limited to at the position that predicts the state's
        next token (``TaskPlan._chunks``): a closed set's label-trie node where its labels are all
        that may come, EOS after a closed set that ends the answer; None (the whole vocabulary)
        elsewhere, and where the answer may go on in several ways (``TaskPlan.choice_starts``).
        Scores that compare answers (beam search, ranked candidates) read log-probabilities over
        these, as training does."""
        if state.done:
            return None
        i = state.slot
        if not state.complete:
            return self._label_choices(i, state.node) if self.kinds[i] == "closed_set" else None
        if len(self.followers[i]) > 1:
            return None
        follower = self.followers[i][0]
        if follower is None:
            return (self.tok.eos_id,) if self.kinds[i] == "closed_set" else None
        return self._label_choices(follower, self._root(follower)) if self.kinds[follower] == "closed_set" else None

    def _label_choices(self, slot: int, node: Optional[dict]) -> Optional[tuple[int, ...]]:
        """``trained_choices`` at a label trie node of closed set ``slot``: its tokens, but None
        where a label may end (the empty label "" at the root) and the next slot begin, or go on."""
        if not node:
            return None
        if self.tok.eos_id in node and self.followers[slot] != [None]:
            if len(node) > 1:
                return None  # a label that may end, then the next slot begins, or go on: any token
            # only the empty label: nothing of this slot is written, the position starts what follows
            follower = self.followers[slot][0] if len(self.followers[slot]) == 1 else None
            if follower is None or self.kinds[follower] != "closed_set":
                return None
            return self._label_choices(follower, self._root(follower))
        return tuple(sorted(node))

    def max_steps(self) -> int:
        """An upper bound on the tokens of one answer (the length of the decoder's cache)."""
        def longest(i: int) -> int:
            kind = self.kinds[i]
            if kind == "literal":
                return len(self.literals[i])
            if kind == "box":
                return 4
            if kind == "codes":
                return self.slots[i].decode.length
            if kind == "closed_set":
                return _depth(self.slots[i].decode.trie)
            return self.limits[i] + 1
        once = sum(longest(i) for i in range(self.first, len(self.slots)) if self.slots[i].slot.repeat is None)
        repeated = sum(longest(i) for i in range(self.first, len(self.slots)) if self.slots[i].slot.repeat is not None)
        return once + self.max_items * repeated + 1

    def options(self, state: State) -> list[Option]:
        """What may come next (empty once the answer is done)."""
        if state.done:
            return []
        if state.complete:
            return self._after(state)
        i = state.slot
        kind = self.kinds[i]
        if kind in ("literal", "box", "codes"):
            return [self._content(i, state.length, "content")]
        if kind == "closed_set":
            out = [self._content(i, state.length, "content", state.node)] if set(state.node) - {self.tok.eos_id} else []
            return out + (self._after(state) if self.tok.eos_id in state.node else [])
        out = [self._content(i, state.length, "content")] if state.length < self.limits[i] else []
        if i in self.closing:
            return out + [Option(i, (self.tok.eos_id,), True, "close")]
        return out + self._after(state)

    def claimed(self, options: list[Option]) -> list[int]:
        """The tokens a free-text option (``tokens=None``) among ``options`` may not take."""
        return sorted(self.reserved.union(*(o.tokens for o in options if o.tokens is not None)))

    def advance(self, state: State, option: Option, token: int) -> State:
        """The state after ``token``, chosen under ``option`` (one of ``options(state)``)."""
        for slot in (option.empty, *option.more_empty) if option.empty is not None else ():
            # the values the token skips: begun, and complete without a token
            state = dataclasses.replace(self._begin(state, slot), complete=True)
        if option.action == "end":
            return dataclasses.replace(state, done=True)
        if option.action == "close":
            return dataclasses.replace(state, complete=True)
        if option.action == "start":
            state = self._begin(state, option.slot)
        i = state.slot
        node = state.node[token] if self.kinds[i] == "closed_set" else None
        state = dataclasses.replace(state, length=state.length + 1, node=node,
                                    pieces=state.pieces + ((i, state.item, int(token)),))
        kind, length = self.kinds[i], state.length
        complete = ((kind == "literal" and length == len(self.literals[i])) or (kind == "box" and length == 4)
                    or (kind == "codes" and length == self.slots[i].decode.length)
                    or (kind == "closed_set" and not set(node) - {self.tok.eos_id}))
        only_end = self.followers[i] == [None]
        if only_end and (kind in ("literal", "box", "codes") and complete
                         or kind == "text" and length == self.limits[i] and i not in self.closing):
            return dataclasses.replace(state, complete=True, done=True)  # no EOS step, as before
        return dataclasses.replace(state, complete=complete)

    # ---- reading an answer ---------------------------------------------------------------

    def parse(self, state: State, image_size=(1.0, 1.0)) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
        """The values of an answer.

        Returns:
            ``targets``: slot column (or the slot's index as a string) → value, shaped like a data
            row: a repeated column holds one value per item. ``groups``: per repetition group of
            the template, one dict per item. Every value begun appears, a free-text value without
            tokens as "" (so a repeated column's values stay aligned with its neighbours' items).
            Values are text for text and closed sets, and
            ``[x0, y0, x1, y1]`` in the original image's pixels for boxes, corners ordered (x0 ≤ x1,
            y0 ≤ y1, whichever order the tokens came in; None for a box cut short by the step
            limit), and the decoded image (``uint8 [S, S, 3]``) for image codes.
        """
        # values begun without a token (an empty free-text value) first get their empty list
        values: dict[tuple[int, int], list[int]] = {key: [] for key in state.values}
        for slot, item, token in state.pieces:
            values.setdefault((slot, item), []).append(token)
        targets: dict[str, Any] = {}
        groups: dict[int, dict[int, dict[str, Any]]] = {g: {} for g in self.groups}
        for (slot, item), ids in values.items():
            if self.kinds[slot] == "literal":
                continue
            value = self._value(slot, ids, image_size)
            key, group = self.keys[slot], self.slots[slot].slot.repeat
            if group is None:
                targets[key] = value
            else:
                targets.setdefault(key, []).append(value)
                groups[group].setdefault(item, {})[key] = value
        return targets, [list(groups[g].values()) for g in self.groups]

    def _value(self, slot: int, ids: list[int], image_size) -> Any:
        if self.kinds[slot] == "codes":
            spec = self.slots[slot].decode
            if len(ids) != spec.length:
                return None
            code_of = {token: k for k, token in enumerate(spec.tokens)}
            return self.renderers[slot]([code_of[t] for t in ids])
        if self.kinds[slot] == "closed_set":  # the label itself (a finished answer is one of them)
            label_of = self.slots[slot].decode.label_of or {}
            label = label_of.get(tuple(ids[:-1] if ids and ids[-1] == self.tok.eos_id else ids))
            return label if label is not None else self.tok.decode(ids)
        if self.kinds[slot] != "box":
            return self.tok.decode(ids)
        if len(ids) != 4:
            return None
        # Decoding takes any 4 bins, so the 3rd may come below the 1st (an untrained or unsure model);
        # the box preprocessor refuses an inverted box, and an answer must re-encode (chained tasks,
        # answers fed back as data): the box the two corners span, its corners ordered.
        k0, k1, k2, k3 = (self.tok.bin_index(t) for t in ids)
        ordered = [min(k0, k2), min(k1, k3), max(k0, k2), max(k1, k3)]
        width, height = image_size
        return dequantize_box(ordered, width, height, self.tok.num_bins)

    # ---- helpers -------------------------------------------------------------------------

    def _root(self, slot: int) -> Optional[dict]:
        return self.slots[slot].decode.trie if self.kinds[slot] == "closed_set" else None

    def _content(self, slot: int, length: int, action: str, node: Optional[dict] = None) -> Option:
        """The option for token ``length`` of a value of ``slot``."""
        kind = self.kinds[slot]
        if kind == "literal":
            return Option(slot, (self.literals[slot][length],), False, action)
        if kind == "box":
            return Option(slot, self.bins, True, action)
        if kind == "codes":
            return Option(slot, self.slots[slot].decode.tokens, True, action)
        if kind == "closed_set":
            node = self._root(slot) if node is None else node
            return Option(slot, tuple(sorted(set(node) - {self.tok.eos_id})), True, action)
        return Option(slot, None, True, action)

    def _begin(self, state: State, slot: int) -> State:
        """A value of ``slot`` begun after ``state``, without a token yet."""
        item = self._item(state, slot)
        return State(slot, node=self._root(slot), item=item, pieces=state.pieces, values=state.values + ((slot, item),))

    def _starts(self, state: State, slot: int) -> list[Option]:
        """How a value of ``slot`` after ``state`` may begin: its first token; for free text, and a
        closed set holding the empty label "", also what follows it, the value left empty (as the
        first target's may be: ``options`` of ``start``)."""
        kind, root = self.kinds[slot], self._root(slot) or {}
        out = [self._content(slot, 0, "start")] if kind != "closed_set" or set(root) - {self.tok.eos_id} else []
        if kind == "text" or self.tok.eos_id in root:
            empty = dataclasses.replace(self._begin(state, slot), complete=True)
            # (free text not closed by its own EOS comes before a box or the end only; after an empty
            # label the next value may be empty too: a chain, which ends at the group's max_items)
            after = [Option(slot, (self.tok.eos_id,), True, "close")] if slot in self.closing else self._after(empty)
            out += [dataclasses.replace(o, empty=slot, more_empty=() if o.empty is None else (o.empty, *o.more_empty))
                    for o in after]
        return out

    def _wraps(self, slot: int, follower: int) -> bool:
        """Whether going from ``slot`` to ``follower`` starts another item of the same group."""
        group = self.slots[slot].slot.repeat
        return group is not None and follower <= slot and self.slots[follower].slot.repeat == group

    def _item(self, state: State, follower: int) -> int:
        if self._wraps(state.slot, follower):
            return state.item + 1
        group = self.slots[follower].slot.repeat
        return state.item if group is not None and group == self.slots[state.slot].slot.repeat else 0

    def _after(self, state: State) -> list[Option]:
        """What may follow the (complete) value of ``state.slot``."""
        i = state.slot
        out = []
        for follower in self.followers[i]:
            if follower is None:  # scored where training scores the answer's EOS
                out.append(Option(i, (self.tok.eos_id,), self.slots[i].role == TARGET and self.score_end, "end"))
            elif not (self._wraps(i, follower) and state.item + 1 >= self.max_items):
                out.extend(self._starts(state, follower))
        # an empty value's token that another option takes (the answer's EOS, after a group whose
        # next item would begin with an empty text closed by EOS) is read as that option: one reading.
        # So is that of another item left empty where an option leaving the group takes it past an
        # empty value of its own (the answer's EOS after a closed set's empty label ""): training
        # refuses such an item (``check_decodable``), as it refuses one read as the answer's end.
        def tokens(options) -> set[int]:
            return {t for o in options if o.tokens is not None for t in o.tokens}
        taken = tokens(o for o in out if o.empty is None)
        leaving = taken | tokens(o for o in out if o.empty is not None and not self._wraps(i, o.empty))
        return [o for o in out if o.empty is None
                or not (leaving if self._wraps(i, o.empty) else taken).intersection(o.tokens or ())]


def _depth(trie: dict) -> int:
    """Tokens on the longest path of a trie."""
    return 1 + max(map(_depth, trie.values())) if trie else 0
