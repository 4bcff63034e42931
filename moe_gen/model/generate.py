"""Inference from the instruction: decoding constrained by the template's decoder side.

Every target slot is decoded in order, repetition groups item by item, as the training sequences
lay them out (``moe_gen.model.grammar.TargetGrammar`` says what may come next):

- text: any token, until EOS or the next slot;
- closed set: only tokens that continue a label in the trie (so the answer is always a label);
- box: exactly 4 location tokens, mapped back to the original image's pixels;
- literal decoder text: forced;
- repetition group: after every item the model chooses between another item and what follows;
- frames (audio, motion; only as the single target): regression of one row per step until the
  stop flag fires.

The encoder runs once per batch. Token answers decode incrementally with a key-value cache: each
step embeds only the newest token and attends to the cached keys and values of the earlier
positions (cross-attention keys and values are computed once). Greedy decoding is beam search
with one beam; beams reorder the caches. Frame answers feed each generated row back through the
adapter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import torch

from moe_gen.masking import masked_place
from moe_gen.model.cached_decoder import CachedDecoder, with_target
from moe_gen.model.grammar import Option, State, TargetGrammar, check_limits
from moe_gen.tasks.batch import collate
from moe_gen.tasks.plan import Sample

__all__ = ["Prediction", "Sampling", "TextRules", "generate", "rank", "beam_search", "check_search"]


@dataclasses.dataclass
class Prediction:
    """One answer.

    Single-target tasks read ``text``, ``box`` or ``frames``; tasks with several target slots or
    repetition groups read ``targets`` (and ``groups`` or ``items``).

    Attributes:
        text: decoded text (text and closed-set targets) when the task has one target slot.
        box: ``[x0, y0, x1, y1]`` in the original image's pixels, when the one target is a box.
        image: the decoded image (``uint8 [S, S, 3]``), when the one target is an image tokenizer's
            codes (``preprocess=image_vq``).
        frames: float ``[N, F]`` rows of a frame target (audio, motion), as the frame head gives them
            in the target's encoding (``frames_per_row`` frames a row; motion standardised by the
            task's statistics): what evaluation scores. ``targets`` holds them read back as the
            column's value (``Preprocessor.rows_to_value``).
        tokens: the token ids decoded after the forced prefix (literal decoder text and the EOS
            ending a free-text value included, the answer's final EOS not).
        score: sum of log-probabilities of the chosen tokens (forced literal text excluded).
        scores: for ranking, the log-likelihood of every candidate (best first is ``argmax``).
        targets: every target slot's value by column, shaped like a data row: a column of a
            repetition group holds a list with one value per item, e.g. ``{"boxes": [[x0, y0, x1,
            y1], ...], "labels": ["seven", ...]}`` (a slot without a column is keyed by its index);
            a frame target's float32 numpy frames (a MOTION clip ``[T, J]`` in the data's units,
            AUDIO log-mel filterbank features ``[T, 80]``, not a waveform).
        groups: per repetition group of the template, one dict per item, e.g.
            ``[[{"boxes": [x0, y0, x1, y1], "labels": "seven"}, ...]]``.
    """

    text: Optional[str] = None
    box: Optional[list[float]] = None
    image: Optional[Any] = None
    frames: Optional[torch.Tensor] = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    score: float = 0.0
    scores: Optional[list[float]] = None
    targets: dict[str, Any] = dataclasses.field(default_factory=dict)
    groups: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)

    @property
    def items(self) -> list[dict[str, Any]]:
        """The items of the template's repetition group (``groups[0]``; one group only)."""
        if len(self.groups) != 1:
            raise ValueError(f"items needs exactly one repetition group; the template has {len(self.groups)} "
                             "(read groups)")
        return self.groups[0]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Drawing each token instead of taking the best one (token targets, within the grammar).

    What comes next is drawn among what the answer's grammar allows with probability ∝ exp(rank / T):
    a token, ranked by its log-probability, or an option that starts a value (another box, the next
    label) as one item ranked by its total probability, as greedy decoding ranks it; a drawn option
    then draws its first token among its own by their log-probabilities, with the same settings.
    ``top_k`` keeps the k best, ``top_p`` the smallest set of best items holding that much of the
    probability. ``top_k=1``, ``top_p`` near 0 and ``temperature=0`` are greedy decoding.

    Args:
        temperature: T ≥ 0 (0: greedy).
        top_k: keep the ``top_k`` best tokens (None: all).
        top_p: nucleus, in (0, 1] (None: all).
        seed: the draws' seed: the same seed, rows and model give the same answers.
    """

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:  # (nan < 0 is False: NaN and inf reached torch's sampler)
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer (or None: every token), got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1] (or None: every token), got {self.top_p!r}")

    def choose(self, ranks: Sequence[float], generator: torch.Generator, keys: Optional[Sequence] = None) -> int:
        """The index of the drawn candidate among ``ranks`` (sorted best first). With ``keys``
        (one sortable key per candidate, e.g. its token id) the draw walks the kept candidates in
        key order instead of rank order, so that two candidates within rounding of each other
        (a row decoded alone or in a batch: ~1e-6 apart) take the same share of the draw whichever
        ranks first; in rank order the same draw landed on the other one."""
        if self.temperature == 0 or len(ranks) == 1:
            return 0
        logits = torch.tensor(ranks, dtype=torch.float64) / self.temperature
        if self.top_k is not None:
            logits = logits[:self.top_k]
        probs = logits.softmax(0)
        if self.top_p is not None:  # the smallest best-first prefix holding top_p of the mass
            keep = int((probs.cumsum(0) < self.top_p).sum()) + 1
            probs = probs[:keep] / probs[:keep].sum()
        order = list(range(len(probs))) if keys is None else sorted(range(len(probs)), key=lambda i: keys[i])
        return order[int(torch.multinomial(probs[order], 1, generator=generator))]


@dataclasses.dataclass(frozen=True)
class TextRules:
    """Rules for free-text values (decoded within the grammar by every search).

    Attributes:
        no_repeat_ngram: n > 0 forbids a token that would repeat an n-gram of the value so far.
        min_length: a value ends only after this many tokens, whatever would end it: its EOS, the
            answer's, or the start of the next slot (the next box or label, another item).
    """

    no_repeat_ngram: int = 0
    min_length: int = 0

    def __post_init__(self) -> None:
        for name in ("no_repeat_ngram", "min_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: off), got {value!r}")

    def allowed(self, grammar: TargetGrammar, state: State, options: list[Option]) -> list[Option]:
        """``options`` without those ending a free-text value shorter than ``min_length``: of an
        unfinished value, every option but its next token (``content``) ends it, a ``start`` of
        the next slot as much as an EOS; after a value, those that leave a next free-text value empty
        (a closed set's empty label "" stays: the rule is about free text)."""
        if not self.min_length:
            return options
        if state.complete or grammar.kinds[state.slot] != "text" or state.length >= self.min_length:
            # (the next value's first token remains)
            return [o for o in options if not any(grammar.kinds[s] == "text" for s in _left_empty(o))]
        going_on = [o for o in options if o.action == "content"]
        return going_on or options  # never a dead end (a value at its max_length ends anyway)

    def banned(self, grammar: TargetGrammar, state: State) -> list[int]:
        """Tokens that would repeat an n-gram of the free-text value being decoded."""
        n = self.no_repeat_ngram
        if not n or state.complete or grammar.kinds[state.slot] != "text":
            return []
        value = [t for slot, item, t in state.pieces if slot == state.slot and item == state.item]
        if len(value) < n - 1:
            return []
        prefix = tuple(value[len(value) - n + 1:])
        return sorted({value[i + n - 1] for i in range(len(value) - n + 1) if tuple(value[i:i + n - 1]) == prefix})


def _left_empty(option: Option) -> tuple[int, ...]:
    """The slots whose values ``option`` leaves empty."""
    return () if option.empty is None else (option.empty, *option.more_empty)


_NO_RULES = TextRules()


def check_search(plan, *, beams: int = 1, candidates: Optional[Sequence[str]] = None) -> None:
    """Refuses search arguments that would otherwise run something else than asked, silently.

    Args:
        plan: the task's ``TaskPlan``.
        beams: beams of the search (1: greedy decoding).
        candidates: answers to rank instead of generating (None: generate).

    Raises:
        ValueError: naming the task and the value, for ``beams`` that is not an integer >= 1, and
            ``candidates`` that are a single string (each character would be ranked), empty, not
            strings, or given for a task whose answer is not one text value: a candidate is scored
            as the tokens of the first target and then the answer's EOS, so for a box, image or
            frame target, or for several targets, its score would not be the answer's likelihood.
    """
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
        raise ValueError(f"task {plan.name!r}: beams must be an integer >= 1 (1: greedy decoding), got {beams!r}")
    if candidates is None:
        return
    if isinstance(candidates, (str, bytes)):
        raise ValueError(f"task {plan.name!r}: candidates must be a list of answers, got the string "
                         f"{candidates!r} (each of its characters would be ranked); pass [{candidates!r}]")
    if not isinstance(candidates, Sequence) or len(candidates) == 0:
        raise ValueError(f"task {plan.name!r}: candidates must be a non-empty list of answers, got {candidates!r}")
    wrong = [c for c in candidates if not isinstance(c, str)]
    if wrong:
        raise ValueError(f"task {plan.name!r}: candidates must be strings, got {wrong[0]!r}")
    decoder = plan.templates[0][1]
    targets = [p for p in decoder if p.loss]
    if len(targets) != 1 or targets[0].decode is None or targets[0].decode.kind not in ("text", "closed_set") \
            or targets[0].slot.repeat is not None:
        kinds = ", ".join(f"{p.slot} ({p.decode.kind if p.decode is not None else 'given'})" for p in targets)
        raise ValueError(f"task {plan.name!r}: candidates rank answers of one text target (not a repeated one); "
                         f"this task's targets are {kinds}: decode it with generation or beams instead")
    spec = targets[0].decode
    if spec.kind == "closed_set":  # (scored without a word before the twenty-sixth session's audit)
        fold = str.lower if targets[0].slot.attrs.get("uncased") else str
        known = {fold(label) for label in spec.labels}
        unknown = [c for c in candidates if fold(c) not in known]
        if unknown:
            shown = ", ".join(repr(label) for label in spec.labels[:8]) + (", ..." if len(spec.labels) > 8 else "")
            raise ValueError(f"task {plan.name!r}: candidates {unknown} are not labels of the closed set "
                             f"{targets[0].slot} ({shown}): its answer is one of them")
    after = decoder[decoder.index(targets[0]) + 1:]
    if after:  # a candidate is scored as its text and the end marker: training writes this text first
        raise ValueError(f"task {plan.name!r}: candidates score an answer that ends the decoder, and "
                         f"{after[0].slot} follows the target {targets[0].slot}; decode it with generation or "
                         "beams instead")


def check_rules(plan, rules: TextRules, candidates, max_new_tokens) -> TextRules:
    """``rules``, refused where they could do nothing: with ``candidates`` (given, not generated),
    or a ``min_length`` above the most tokens a free-text value may take (``max_new_tokens``, or
    the slot's ``max_length`` where it declares one: no answer could keep both)."""
    if rules != _NO_RULES and candidates is not None:
        raise ValueError(f"task {plan.name!r}: no_repeat_ngram and min_length shape generated text; candidates are "
                         "given, not generated (the rules would do nothing)")
    if isinstance(max_new_tokens, int) and rules.min_length:
        for p in plan.templates[0][1]:
            if p.loss and p.decode is not None and p.decode.kind == "text":
                limit, name = int(p.slot.attrs.get("max_length") or max_new_tokens), "max_new_tokens"
                if p.slot.attrs.get("max_length"):
                    name = f"{p.slot}'s max_length"
                if rules.min_length > limit:
                    raise ValueError(f"task {plan.name!r}: min_length {rules.min_length} is more than {name} "
                                     f"{limit}: no answer could keep both")
    return rules


@torch.no_grad()
def generate(model, plan, samples: Sequence[Sample], *, max_new_tokens: int = 32, max_frames: int = 64,
             max_items: int = 8, sampling: Optional[Sampling] = None,
             rules: TextRules = _NO_RULES, pass_name: str = "generative") -> list[Prediction]:
    """Greedy (or, with ``sampling``, drawn) answers for encoded inference samples
    (``plan.encode(..., inference=True)``).

    Args:
        max_new_tokens: the most tokens of one free-text value.
        max_frames: the most rows of a frame answer.
        max_items: the most items of one repetition group.
        sampling: draw tokens (``Sampling``) instead of taking the best; token targets only.
        rules: ``TextRules`` for free-text values (no repeated n-grams, a minimum length).
        pass_name: the ``pass`` tag of every position (``masked`` for tasks trained with the
            masked objective, whose samples ``moe_gen.masking.masked_view`` gives).
    """
    (max_frames,) = check_limits(plan.name, max_frames=max_frames)
    grammar = TargetGrammar(plan, model.tokenizer, max_new_tokens=max_new_tokens, max_items=max_items,
                            modality_ids=model.modality_ids, score_end=pass_name != "masked")
    target = grammar.slots[grammar.first]
    if target.decode.kind == "frames" and sampling is not None:
        raise ValueError(f"task {plan.name!r}: sampling draws tokens; its target {target.slot} is frames "
                         "(decode it without temperature/top_k/top_p)")
    if target.decode.kind == "frames":
        tok = model.tokenizer
        dev = model.token_embedding.weight.device
        enc_batch = collate(list(samples), tok, model.task_ids, pass_name=pass_name,
                            modality_ids=model.modality_ids).to(dev)
        memory = model.encode(enc_batch.encoder, keep=True)
        frames = _generate_frames(model, samples, target, enc_batch, memory, max_frames, pass_name)
        return [_frame_answer(plan, target, grammar.keys[grammar.first], rows) for rows in frames]
    return _search(model, grammar, samples, beams=1, sampling=sampling, rules=rules, pass_name=pass_name)


@torch.no_grad()
def beam_search(model, plan, samples: Sequence[Sample], *, beams: int = 4, max_new_tokens: int = 32,
                length_penalty: float = 1.0, max_items: int = 8, rules: TextRules = _NO_RULES,
                pass_name: str = "generative") -> list[Prediction]:
    """Beam search over token answers (every target slot, constrained like ``generate``): the
    ``beams`` best partial answers by summed log-probability; an answer that ends retires, and the
    finished ones are ranked by score / length^length_penalty. ``pass_name``: as in ``generate``.
    Raises ``ValueError`` for ``beams`` below 1 (``check_search``) and frame targets."""
    check_search(plan, beams=beams)
    grammar = TargetGrammar(plan, model.tokenizer, max_new_tokens=max_new_tokens, max_items=max_items,
                            modality_ids=model.modality_ids, score_end=pass_name != "masked")
    kind = grammar.slots[grammar.first].decode.kind
    if kind == "frames":
        raise ValueError(f"beam search decodes text, closed-set and box targets, not {kind!r}; use generate")
    return _search(model, grammar, samples, beams=beams, length_penalty=length_penalty, rules=rules,
                   pass_name=pass_name)


@dataclasses.dataclass(frozen=True)
class _Hypothesis:
    state: State
    score: float  # sum of the chosen tokens' log-probabilities
    rank: float  # what the search compares: log-probabilities as training reads them (a closed set's
    # over its labels), a started value counted by its total probability, and literal text counted
    # where it was one of several options
    row: int  # the cache row holding its keys and values
    tokens: tuple[int, ...] = ()  # every chosen token, EOS included
    free: int = 0  # tokens read over the whole vocabulary (what length normalisation counts)


def _search(model, grammar: TargetGrammar, samples: Sequence[Sample], *, beams: int,
            length_penalty: float = 1.0, sampling: Optional[Sampling] = None,
            rules: TextRules = _NO_RULES, pass_name: str = "generative") -> list[Prediction]:
    """Beam search for every sample at once (``beams`` cache rows per sample); one beam is greedy.

    Every step expands each live answer by the best tokens of each of its options, keeps the
    ``beams`` best expansions per sample (those that end the answer retire) and feeds the kept
    tokens. Expansions are ranked by log-probability, except that an option starting a value
    (another box, the next label) counts with its total probability: whether a box comes at all
    is one event, which its 1000 location tokens would otherwise split.
    """
    tok = model.tokenizer
    dev = model.token_embedding.weight.device
    rows = [sample for sample in samples for _ in range(beams)]
    R = len(rows)
    enc_batch = collate(rows, tok, model.task_ids, pass_name=pass_name, modality_ids=model.modality_ids).to(dev)
    memory = model.encode(enc_batch.encoder, keep=True)
    limit = grammar.max_steps()
    target = grammar.slots[grammar.first]
    decoder = CachedDecoder(model, rows, target.modality.name, enc_batch, memory, limit, pass_name=pass_name)
    logp_RV = decoder.log_probs(decoder.prefill()).cpu()  # tagged like the first target, as the start state
    alive = [[_Hypothesis(grammar.start(), 0.0, 0.0, s * beams)] for s in range(len(samples))]
    finished: list[list[_Hypothesis]] = [[] for _ in samples]
    tensors: dict[tuple[int, ...], torch.Tensor] = {}  # allowed token sets as tensors, made once
    draws = None if sampling is None else _row_streams(sampling.seed, samples)
    # Answers compete as training reads them (``trained_choices``) where several are kept: one beam
    # (greedy, sampling) renormalises all of a step's options alike, which changes no choice. The
    # masked objective reads the whole vocabulary everywhere (its samples carry no label sets).
    choices_of = grammar.trained_choices if beams > 1 and pass_name != "masked" else _whole_vocabulary
    candidates = beams if sampling is None else (sampling.top_k or logp_RV.shape[1])
    for _ in range(limit):
        parents, fed, active = list(range(R)), [tok.pad_id] * R, [False] * R
        for s in range(len(samples)):
            expansions = _expansions(grammar, alive[s], logp_RV, candidates, tensors, rules, choices_of)
            if sampling is not None and expansions:  # one draw (greedy keeps the first)
                expansions = [_draw(expansions, sampling, draws[s])]
            kept, retired = _keep_best(grammar, expansions, beams, choices_of)
            finished[s].extend(retired)
            alive[s] = []
            for j, child in enumerate(kept if len(finished[s]) < beams else []):
                row = s * beams + j  # cache row j of the sample continues its parent's row
                parents[row], fed[row], active[row] = child.row, child.tokens[-1], True
                alive[s].append(dataclasses.replace(child, row=row))
        decoder.reorder(parents)
        if not any(alive):
            break
        tags = [grammar.tag(grammar.start())] * R  # rows without an answer run idle
        for hyps in alive:
            for hyp in hyps:
                tags[hyp.row] = grammar.tag(hyp.state)
        logp_RV = decoder.step(fed, tags, active)
    predictions = []
    for s, sample in enumerate(samples):
        pool = finished[s] or alive[s]
        # (a closed set's tokens, read over its labels, add nothing to the length: a label's rank is
        # its probability among the labels, whatever its number of tokens)
        best = max(pool, key=lambda h: h.rank / max(h.free, 1) ** length_penalty)
        predictions.append(_prediction(grammar, best, sample, tok.eos_id))
    return predictions


def _expansions(grammar: TargetGrammar, hyps: list[_Hypothesis], logp_RV: torch.Tensor, beams: int,
                tensors: dict, rules: TextRules,
                choices_of) -> list[tuple[float, float, int, _Hypothesis, Option]]:
    """Every (rank, score, token, parent, option) continuing one sample's live answers by the
    ``beams`` best tokens of each option, best first (ties to the lowest token id)."""
    expansions = []
    for hyp in hyps:
        options = rules.allowed(grammar, hyp.state, grammar.options(hyp.state))
        # answers compete on log-probabilities read as training reads them; their score stays
        # the log-likelihood over the whole vocabulary
        logp_V = logp_RV[hyp.row]
        trained_V = _as_trained(logp_V, choices_of(hyp.state), tensors)
        claimed = grammar.claimed(options)
        banned = rules.banned(grammar, hyp.state)
        if banned:  # (most steps have none: no set over the claimed location tokens)
            claimed = sorted(set(claimed).union(banned))
        for option in options:
            # literal text is never scored, but where it is one of several options its
            # probability is what it competes with
            ranked = option.scored or len(options) > 1
            for rank, trained, token in _best(trained_V, option, claimed, beams, tensors):
                value = float(logp_V[token]) if trained_V is not logp_V else trained
                expansions.append((hyp.rank + rank if ranked else hyp.rank,
                                   hyp.score + value if option.scored else hyp.score, token, hyp, option))
    expansions.sort(key=lambda e: (-e[0], e[2]))
    return expansions


def _whole_vocabulary(state: State) -> None:
    """``trained_choices`` of a pass that reads every position over the whole vocabulary."""
    return None


def _as_trained(logp_V: torch.Tensor, choices: Optional[tuple[int, ...]], tensors: dict) -> torch.Tensor:
    """Log-probabilities as training reads them at this step: renormalised over ``choices`` (a
    closed set's labels, ``TargetGrammar.trained_choices``), unchanged where it is None. The best
    token stays the best; only scores that compare answers move."""
    if choices is None:
        return logp_V
    if choices not in tensors:
        tensors[choices] = torch.tensor(choices)
    return logp_V - logp_V[tensors[choices]].logsumexp(0)


def _row_streams(seed: int, samples: Sequence[Sample]) -> list[torch.Generator]:
    """One random stream per row, seeded by ``seed`` and the row's input: a drawn answer does not
    depend on the rows beside it (one stream for the batch made it)."""
    return [torch.Generator().manual_seed(_row_seed(seed, sample)) for sample in samples]


def _row_seed(seed: int, sample: Sample) -> int:
    """A row's own sampling seed: ``seed`` mixed with a checksum of its encoded input."""
    import zlib

    check = zlib.crc32(str(int(seed)).encode())
    for chunk in sample.encoder + sample.decoder:
        if chunk.tokens is not None:
            check = zlib.crc32(torch.as_tensor(chunk.tokens, dtype=torch.int64).numpy().tobytes(), check)
        if chunk.rows is not None:
            check = zlib.crc32(chunk.rows.detach().cpu().contiguous().numpy().tobytes(), check)
    return check


def _draw(expansions: list[tuple[float, float, int, _Hypothesis, Option]], sampling: Sampling,
          generator: torch.Generator) -> tuple[float, float, int, _Hypothesis, Option]:
    """One expansion drawn (``expansions`` best first): first what comes next — a token, or an option
    that starts a value as one item at its total probability (the rank its best token carries) —
    then, for such an option, which of its tokens, by their own probabilities. Drawn token by
    token instead, each of the option's tokens would carry the whole option's mass (a box's 1000
    location tokens: up to 1000 times the chance of starting another box). Greedy limits of
    ``sampling`` take the best at both draws: greedy decoding."""
    items: list[tuple[float, float, int, _Hypothesis, Option]] = []
    # an option's expansions by (hypothesis, option) object: hashing them would hash a box option's
    # 1000 token ids per expansion (the objects live in ``expansions`` for the whole call)
    members: dict[tuple[int, int], list] = {}
    for expansion in expansions:
        key = (id(expansion[3]), id(expansion[4]))
        if expansion[4].action != "start":
            items.append(expansion)
            continue
        if key not in members:
            members[key] = []
            items.append(expansion)  # the option's best token stands for it
        members[key].append(expansion)
    chosen = items[sampling.choose([e[0] for e in items], generator, [_draw_key(e) for e in items])]
    tokens = members.get((id(chosen[3]), id(chosen[4])))
    return chosen if tokens is None else tokens[sampling.choose([e[0] for e in tokens], generator,
                                                                [_draw_key(e) for e in tokens])]


def _draw_key(expansion: tuple[float, float, int, _Hypothesis, Option]) -> tuple:
    """What fixes an expansion's place in a draw, whatever its rank: its token, then its option."""
    option = expansion[4]
    return expansion[2], option.slot, option.action


def _keep_best(grammar: TargetGrammar, expansions: list[tuple[float, float, int, _Hypothesis, Option]],
               beams: int, choices_of) -> tuple[list[_Hypothesis], list[_Hypothesis]]:
    """The children of the best expansions, split into the (at most ``beams``) that go on and those
    that end their answer on the way."""
    kept: list[_Hypothesis] = []
    retired: list[_Hypothesis] = []
    for rank, score, token, hyp, option in expansions:
        if len(kept) == beams:
            break
        state = grammar.advance(hyp.state, option, token)
        # tokens read over the whole vocabulary and scored (a forced literal token is neither)
        free = hyp.free + (option.scored and choices_of(hyp.state) is None)
        child = _Hypothesis(state, score, rank, hyp.row, hyp.tokens + (token,), free)
        (retired if state.done else kept).append(child)
    return kept, retired


def _best(logp_V: torch.Tensor, option: Option, claimed: list[int], k: int,
          tensors: dict) -> list[tuple[float, float, int]]:
    """The ``k`` best (rank, log-probability, token) an option allows; argmax for one, ties to the
    lowest id, as greedy decoding always did. The rank is the log-probability, except for an
    option that starts a value: its best token ranks with the option's total probability."""
    if option.tokens is None:  # any token the other options do not claim
        if k == 1 and option.action != "start":
            best = int(logp_V.argmax())  # the lowest id of the best value: unclaimed, it is the answer
            if best not in claimed:
                value = float(logp_V[best])
                return [(value, value, best)]
        logp_V = logp_V.clone()
        logp_V[claimed] = float("-inf")
        ids = None
    else:
        if option.tokens not in tensors:
            tensors[option.tokens] = torch.tensor(option.tokens)
        ids = tensors[option.tokens]
        logp_V = logp_V[ids]
    if k == 1:
        best = int(logp_V.argmax())
        pairs = [(float(logp_V[best]), best)]
    else:
        values, index = logp_V.topk(min(k, logp_V.numel()))
        pairs = list(zip(values.tolist(), index.tolist()))
    # a started value ranks by its mass: log sum p = log p(best) + (logsumexp - max)
    lift = float(logp_V.logsumexp(0)) - pairs[0][0] if option.action == "start" else 0.0
    return [(v + lift, v, int(ids[i]) if ids is not None else i) for v, i in pairs]


def _prediction(grammar: TargetGrammar, hyp: _Hypothesis, sample: Sample, eos_id: int) -> Prediction:
    """A decoded answer as a ``Prediction`` (single-target fields filled when there is one target)."""
    tokens = list(hyp.tokens)
    if hyp.state.done and tokens and tokens[-1] == eos_id:
        tokens.pop()
    targets, groups = grammar.parse(hyp.state, sample.meta.get("image_size", (1.0, 1.0)))
    prediction = Prediction(tokens=tokens, score=hyp.score, targets=targets, groups=groups)
    scored = [i for i, p in enumerate(grammar.slots) if p.loss]
    if len(scored) == 1 and not groups:
        value = targets.get(grammar.keys[scored[0]])
        if grammar.kinds[scored[0]] == "box":
            prediction.box = value
        elif grammar.kinds[scored[0]] == "codes":
            prediction.image = value
        else:
            prediction.text = value if value is not None else ""
    return prediction


def _frame_answer(plan, target, key: str, rows_NF: torch.Tensor) -> Prediction:
    """A frame answer: the frame head's rows as ``.frames`` (what evaluation scores against the
    target's encoded rows) and, under the target's column in ``.targets``, the value its
    preprocessor reads them back as (``Preprocessor.rows_to_value``: a MOTION clip ``[T, J]`` in the
    data's units, AUDIO filterbank frames ``[T, 80]``), so ``chain`` can pass it on. Before the
    fifteenth audit ``.targets`` was empty and ``.frames`` alone held the rows, stacked and
    standardised.

    Raises:
        ValueError: naming the task and column, for rows its preprocessor cannot read back.
    """
    try:
        value = plan.preprocessor(target).rows_to_value(rows_NF, target.name)
    except ValueError as exc:
        raise ValueError(f"task {plan.name!r}, column {key!r}: {exc}") from None
    return Prediction(frames=rows_NF, targets={key: value})


def _generate_frames(model, samples, target, enc_batch, memory, max_frames, pass_name: str) -> list[torch.Tensor]:
    """Rows ``[T, F]`` per sample, one per step from the frame head, fed back through the adapter,
    until the stop head fires."""
    adaptor = str(target.adaptor)
    width = int(model.config.adapters[adaptor])
    B = len(samples)
    decoder = CachedDecoder(model, samples, target.modality.name, enc_batch, memory, max_frames,
                             placeholder=(adaptor, width), pass_name=pass_name)
    hidden = decoder.prefill()
    frames = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_frames):
        rows = model.frame_heads[adaptor](hidden)
        stop = torch.sigmoid(model.stop_heads[adaptor](hidden)).squeeze(-1)
        for b in range(B):
            if not done[b]:
                frames[b].append(rows[b])
                done[b] = bool(stop[b] > 0.5)
        if all(done) or step == max_frames - 1:
            break
        hidden = decoder.step_rows(adaptor, rows, torch.full((B,), step, device=rows.device), [not d for d in done])
    return [torch.stack(f).cpu() for f in frames]


@torch.no_grad()
def rank(model, plan, samples: Sequence[Sample], candidates: Sequence[str],
         pass_name: str = "generative") -> list[Prediction]:
    """Scores every candidate text as the answer of every sample: the sum of its tokens'
    log-probabilities (EOS included) given the input, teacher-forced in one batch per sample.
    ``text`` is the best candidate, ``scores`` all of them (retrieval, multiple choice).
    ``pass_name``: as in ``generate``; with ``masked`` a candidate is scored without EOS, which
    the masked objective never predicts. Raises ``ValueError`` for candidates ``check_search``
    refuses (a single string, none, a task whose answer is not one text value), ``TaskDataError``
    for a candidate the target slot cannot encode (naming it)."""
    from moe_gen.tasks.modalities.text import slot_token_ids

    check_search(plan, candidates=candidates)
    candidates = list(candidates)
    tok = model.tokenizer
    target = next(p for p in plan.templates[0][1] if p.loss)
    end = [] if pass_name == "masked" else [tok.eos_id]
    # each candidate as the slot trains its answers: a closed set's label pieces (as its trie holds
    # them; a text outside the set too), free text by the slot's own preprocessor (a PHONE target's phones)
    encoded = [(slot_token_ids(c, target.slot.attrs, tok) if target.decode.kind == "closed_set"
                else plan.target_tokens(target, c, place=f"candidate {k}")) + end for k, c in enumerate(candidates)]
    # a closed set's label tokens are read over its labels alone, as training reads them (the
    # masked objective reads the whole vocabulary)
    grammar = None
    if pass_name != "masked" and target.decode is not None and target.decode.kind == "closed_set":
        grammar = TargetGrammar(plan, tok, modality_ids=model.modality_ids)
    predictions = []
    for sample in samples:
        place = masked_place(sample, target.modality.name) if pass_name == "masked" else None
        pairs = [with_target(sample, target.modality.name, ids, place=place) for ids in encoded]
        batch = collate(pairs, tok, model.task_ids, pass_name=pass_name, modality_ids=model.modality_ids)
        batch = batch.to(model.token_embedding.weight.device)
        logp = model(batch).logits.float().log_softmax(-1).cpu()
        start = sum(len(c) for c in sample.decoder)  # positions before the candidate
        scores = [_candidate_score(logp[b, start:start + len(ids)], ids, grammar) for b, ids in enumerate(encoded)]
        best = max(range(len(candidates)), key=scores.__getitem__)
        # the chosen answer as every answer is (its target by column, its tokens: chain() reads them)
        predictions.append(Prediction(text=candidates[best], score=scores[best], scores=scores,
                                      tokens=encoded[best][:len(encoded[best]) - len(end)],
                                      targets={target.name: candidates[best]}))
    return predictions


def _candidate_score(logp_LV: torch.Tensor, ids: list[int], grammar: Optional[TargetGrammar]) -> float:
    """The summed log-probability of a candidate's tokens, each read as training reads its position
    (``TargetGrammar.trained_choices``) while the candidate follows the grammar; past where it
    leaves it (a text outside the closed set), over the whole vocabulary."""
    state = grammar.start() if grammar is not None else None
    total = 0.0
    for position, token in enumerate(ids):
        choices = grammar.trained_choices(state) if state is not None else None
        if choices is not None and token in choices:
            total += float(logp_LV[position, token] - logp_LV[position, list(choices)].logsumexp(0))
        else:
            total += float(logp_LV[position, token])
        if state is not None:
            option = next((o for o in grammar.options(state) if o.tokens is not None and token in o.tokens), None)
            state = grammar.advance(state, option, token) if option is not None else None
    return total
