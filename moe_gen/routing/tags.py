"""Per-token routing tags: the contract between instructions and routers.

Shape legend: ``...`` is the token layout of the input (``[T]`` or ``[B, S]``), M the number of
modalities, A the attribute-vector width.

Every token carries its task, its modality, its role in the sample (input, target, literal
prompt), the set of modalities its task uses, whether it is causally masked, and the pass
(generative, contrastive, masked) that produced it. Tag-based routers read these instead of, or
next to, the hidden state. Later issues fill tags from instructions; here they are built by hand.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence, Union

import torch

from moe_gen.routing.attributes import attribute_dim, attribute_vector

__all__ = ["MODALITIES", "ROLES", "PASSES", "TokenTags", "TagBatch", "modality_index", "attribute_dim"]

# Built-in vocabularies; the index in each tuple is the tag value.
MODALITIES: tuple[str, ...] = (
    "TEXT", "IMAGE", "AUDIO", "VIDEO", "MOTION", "BOX", "STRUCT", "PHONE", "CATEGORY",
)
ROLES: tuple[str, ...] = ("input", "target", "prompt")
PASSES: tuple[str, ...] = ("generative", "contrastive", "masked")


def _lookup(kind: str, names: Sequence[str], value: Union[str, int]) -> int:
    if isinstance(value, int):
        return value
    try:
        return list(names).index(value)
    except ValueError:
        raise ValueError(f"unknown {kind} {value!r}; known: {', '.join(names)}") from None


def modality_index(name: Union[str, int]) -> int:
    """Index of a built-in modality name (``"IMAGE"`` → 1); ints pass through."""
    return _lookup("modality", MODALITIES, name)


@dataclasses.dataclass(frozen=True)
class TokenTags:
    """Tag tensors shaped like the tokens they describe.

    Attributes:
        task: long ``[...]``, index in the model's task vocabulary.
        modality: long ``[...]``, index in the modality vocabulary (``MODALITIES`` by default).
        role: long ``[...]``, index in ``ROLES`` (input, target, prompt).
        task_modalities: bool ``[..., M]``, multi-hot over the modalities the task uses.
        causal: bool ``[...]``, True where the token is causally masked (decoder side).
        pass_id: long ``[...]``, index in ``PASSES`` (generative, contrastive, masked).
        sample: optional long ``[...]``: which sample a token belongs to, for routers that pool a
            sequence summary (``context``) when several samples are packed into one row.
    """

    task: torch.Tensor
    modality: torch.Tensor
    role: torch.Tensor
    task_modalities: torch.Tensor
    causal: torch.Tensor
    pass_id: torch.Tensor
    sample: torch.Tensor | None = None

    @classmethod
    def constant(
        cls,
        shape: Union[int, Sequence[int], torch.Size],
        *,
        task: int = 0,
        modality: Union[str, int] = "TEXT",
        role: Union[str, int] = "input",
        task_modalities: Sequence[Union[str, int]] | None = None,
        causal: bool = False,
        pass_: Union[str, int] = "generative",
        num_modalities: int = len(MODALITIES),
        device: torch.device | None = None,
    ) -> "TokenTags":
        """Tags with the same value for every token of ``shape`` (build by hand, then ``cat``).

        ``task_modalities`` defaults to just the token's own modality.
        """
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0 for n in shape):
            raise ValueError(f"TokenTags.constant: shape takes token counts >= 0, got {shape}")
        if isinstance(task, bool) or not isinstance(task, numbers.Integral) or task < 0:  # (0.5 was read as task 0)
            raise ValueError(f"TokenTags.constant: task is a task id, a whole number >= 0 (model.task_ids), "
                             f"got {task!r}")
        mod = modality_index(modality)
        used = [mod] if task_modalities is None else [modality_index(m) for m in task_modalities]
        multi_hot = torch.zeros(num_modalities, dtype=torch.bool, device=device)
        for index in used:
            if not 0 <= index < num_modalities:
                raise ValueError(f"task modality index {index} is outside [0, {num_modalities})")
            multi_hot[index] = True

        def full(value: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        return cls(
            task=full(task),
            modality=full(mod),
            role=full(_lookup("role", ROLES, role)),
            task_modalities=multi_hot.expand(*shape, num_modalities).clone(),
            causal=full(int(causal), torch.bool),
            pass_id=full(_lookup("pass", PASSES, pass_)),
        )

    @classmethod
    def cat(cls, parts: Sequence["TokenTags"], dim: int = 0) -> "TokenTags":
        """Concatenates tags along a token dimension (``sample`` kept only if all parts have it)."""
        if not parts:
            raise ValueError("TokenTags.cat needs at least one part")
        fields = {}
        for field in dataclasses.fields(cls):
            values = [getattr(p, field.name) for p in parts]
            if field.name == "sample" and any(v is None for v in values):
                fields[field.name] = None
            else:
                fields[field.name] = torch.cat(values, dim=dim)
        return cls(**fields)

    @property
    def shape(self) -> torch.Size:
        """The token layout (``[T]`` or ``[B, S]``)."""
        return self.task.shape

    def _map(self, fn) -> "TokenTags":
        """Applies ``fn`` to every per-token tensor; ``task_modalities`` keeps its last dim."""
        return TokenTags(
            task=fn(self.task),
            modality=fn(self.modality),
            role=fn(self.role),
            task_modalities=fn(self.task_modalities),
            causal=fn(self.causal),
            pass_id=fn(self.pass_id),
            sample=None if self.sample is None else fn(self.sample),
        )

    def flatten(self) -> "TokenTags":
        """Tags for ``[T]`` tokens (token dims merged, ``task_modalities`` stays ``[T, M]``)."""
        n = self.task.numel()
        return self._map(lambda t: t.reshape(n, *t.shape[self.task.dim():]))

    def select(self, index: torch.Tensor) -> "TokenTags":
        """Tags of a subset of tokens: ``index`` is what indexes each tag tensor (a bool mask or
        long ids over flattened tokens, or a tuple such as ``(rows, columns)`` over ``[B, S]``)."""
        return self._map(lambda t: t[index])

    def to(self, device: Union[str, torch.device]) -> "TokenTags":
        return self._map(lambda t: t.to(device))

    def validate(
        self,
        shape: Sequence[int],
        *,
        num_modalities: int,
        num_roles: int,
        num_passes: int,
        num_tasks: int,
    ) -> None:
        """Raises ``ValueError`` naming the tag at fault: shape, dtype or out-of-range value.

        ``causal`` and ``task_modalities`` must be bool or hold only 0 and 1: ``group_key`` packs
        each into one bit, so a 2 would carry into the next tag and give two different tag
        combinations one tag group (one route). ``sample`` ids must be >= 0: a -1 would fall into
        the previous row's last sample when ``TagBatch`` numbers the sequences to pool."""
        shape = tuple(shape)
        bounds = {  # [low, high) of each tag's values (None: no upper bound)
            "task": (0, num_tasks), "modality": (0, num_modalities), "role": (0, num_roles),
            "causal": (0, 2), "pass_id": (0, num_passes), "sample": (0, None),
        }
        # one reduction for all the integer tags of one dtype (bool ones need none: a bool is 0 or 1)
        ranges = _value_ranges({name: getattr(self, name) for name in bounds}, shape)
        for name, (low, high) in bounds.items():
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"tags.{name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"tags.{name} has shape {tuple(t.shape)} but the tokens are {shape}"
                )
            if t.is_floating_point() or t.is_complex():
                raise ValueError(f"tags.{name} must be an integer or bool tensor, got {t.dtype}")
            if not t.numel() or (t.dtype == torch.bool and (high is None or high >= 2)):
                continue
            lo, hi = ranges.get(name) or (int(v) for v in torch.aminmax(t.long() if t.dtype == torch.bool else t))
            if lo < low or (high is not None and hi >= high):
                allowed = f"lie in [{low}, {high})" if high is not None else f"be >= {low}"
                raise ValueError(f"tags.{name} values must {allowed}, got [{lo}, {hi}]"
                                 + (" (a bool tensor, or 0 and 1)" if name == "causal" else ""))
        _check_task_modalities(self.task_modalities, shape, num_modalities)

    def group_key(self) -> torch.Tensor:
        """One long id per distinct combination of (task, modality, role, causal, pass,
        task_modalities): tokens with equal keys are one tag group and share every
        content-independent route. ``[...]`` long."""
        M = self.task_modalities.shape[-1]
        if M > 40:
            raise ValueError(f"group_key supports at most 40 modalities, got {M}")
        # key = ((((task·2⁸ + modality)·2⁴ + role)·2 + causal)·2⁴ + pass)·2^M + the modalities' bits,
        # accumulated field by field in place, each field scaled by the add (cheaper than one
        # [..., 5 + M] product and sum, or a shifted copy of each field)
        tm = self.task_modalities
        key = torch.mul(self.task.long(), 1 << (8 + 4 + 1 + 4 + M))
        for field, place in ((self.modality, 4 + 1 + 4), (self.role, 1 + 4), (self.causal, 4), (self.pass_id, 0)):
            key.add_(field, alpha=1 << (place + M))
        return key.add_((tm.long() << torch.arange(M, device=tm.device)).sum(-1))

    def attribute_vector(self, num_modalities: int, num_roles: int, num_passes: int) -> torch.Tensor:
        """The multi-hot attribute vector of Uni-Perceiver-MoE, generalised
        (``moe_gen.routing.attributes``): float32 ``[..., A]``."""
        return attribute_vector(self, num_modalities, num_roles, num_passes)


class TagBatch:
    """The tags of one forward pass, flattened to tokens, with what the MoE layers derive from them.

    The model builds one per stack call (or decoding step) and passes it to every MoE layer, so
    validation, flattening and tag grouping run once per forward, not once per layer; everything
    is computed here, up front, and read as plain attributes. Whoever builds it says what its layers
    read beyond the groups (``segments``, ``valid_rows``). An ``MoE`` called with plain
    ``TokenTags`` builds its own. Nothing is kept beyond the object: a new batch is a new
    ``TagBatch``.

    Attributes:
        shape: the token layout (``[T]`` or ``[B, S]``); ``num_tokens`` is T.
        tags: flattened ``TokenTags`` ``[T]``, or None (routers that need no tags).
        valid: bool ``[T]``, False for padding.
        segment: long ``[T]``, the sequence of each token (rows of ``[B, S]``, refined by
            ``tags.sample`` when samples are packed into rows), for context pooling; None unless
            built with ``segments``.
        group_ids: long ``[T]``, the tag group of each token, groups numbered in key order (tokens of
            one group share every content-independent route); None without tags.
        group_keys: the ``TokenTags.group_key`` of each group as Python ints, in group order: a
            hashable name for this set of groups.
        first_G: long ``[G]``, the first token of each group; ``group_tags`` their tags ``[G]``.
        group_counts: long ``[G]``, valid (non-padding) members of each group.
        valid_rows: ``(index_N, group_N)``, the valid tokens in order (None when none is padding)
            and their tag groups, for layers that compute valid rows only (frozen layers); None
            unless built with ``valid_rows``.
        vocab: the vocabulary sizes ``(modalities, roles, passes, tasks)`` the tags were checked
            against (None: not checked).

    Args:
        tags: ``TokenTags`` shaped like the tokens, or None.
        padding_mask: bool shaped like the tokens, True where a position is padding (or None).
        shape: the token layout; defaults to the tags' (or the padding mask's) shape.
        vocab: check the tags against these sizes ``(modalities, roles, passes, tasks)`` first
            (``ValueError`` naming the tag at fault).
        segments: derive ``segment`` (routers that pool each sequence read it).
        valid_rows: derive ``valid_rows``.
    """

    def __init__(
        self,
        tags: TokenTags | None,
        padding_mask: torch.Tensor | None = None,
        *,
        shape: Sequence[int] | None = None,
        device: torch.device | None = None,
        vocab: tuple[int, int, int, int] | None = None,
        segments: bool = True,
        valid_rows: bool = False,
    ) -> None:
        if tags is not None and not isinstance(tags, TokenTags):
            raise ValueError(f"tags must be a TokenTags, got {type(tags).__name__}")
        if shape is None:
            source = tags.task if tags is not None else padding_mask
            if not isinstance(source, torch.Tensor):
                raise ValueError("TagBatch needs tags, a padding mask or shape= to know the token layout")
            shape = source.shape
        self.shape = tuple(int(n) for n in shape)
        self.num_tokens = math.prod(self.shape)
        self.has_tags = tags is not None
        self.vocab = None
        if tags is not None and vocab is not None:
            num_modalities, num_roles, num_passes, num_tasks = vocab
            tags.validate(self.shape, num_modalities=num_modalities, num_roles=num_roles, num_passes=num_passes,
                          num_tasks=num_tasks)
            self.vocab = tuple(vocab)
        self._original = tags
        if device is None:
            device = tags.task.device if tags is not None else None
        self.valid = _valid_tokens(padding_mask, self.shape, self.num_tokens, device)
        self.padded = padding_mask is not None  # (whether some token may be padding, whose values may be anything)
        self.tags = self.group_ids = self.first_G = self.group_tags = self.group_counts = None
        self.group_keys: tuple[int, ...] = ()
        if tags is not None and (self.vocab is not None or _well_formed(tags, self.shape)):
            self._derive(tags)
        self.segment = _segments(self.shape, self.tags, self.valid.device) if segments else None
        self.valid_rows = _valid_rows(self.valid, self.group_ids) if valid_rows else None

    def _derive(self, tags: TokenTags) -> None:
        """The flattened tags and their groups (tags already checked against the tokens)."""
        self.tags = flat = tags.flatten()
        keys_G, group_T = torch.unique(flat.group_key(), return_inverse=True)
        self.group_ids, self.group_keys = group_T, tuple(keys_G.tolist())
        T = group_T.shape[0]
        first_G = torch.full((len(self.group_keys),), T, device=group_T.device)
        self.first_G = first_G.scatter_reduce(0, group_T, torch.arange(T, device=group_T.device), "amin")
        self.group_tags = flat._map(lambda t: t.index_select(0, self.first_G))  # (index_select: cheaper than [])
        self.group_counts = torch.zeros(len(self.group_keys), dtype=torch.long, device=group_T.device).index_add_(
            0, group_T, self.valid.long())

    def validate(self, vocab: tuple[int, int, int, int]) -> None:
        """Checks the tags against the vocabulary sizes ``(modalities, roles, passes, tasks)`` (a
        router's), unless they were checked against these already; derives the groups if the tags
        were not well formed enough to derive them before."""
        if self._original is None or self.vocab == tuple(vocab):
            return
        num_modalities, num_roles, num_passes, num_tasks = vocab
        self._original.validate(self.shape, num_modalities=num_modalities, num_roles=num_roles,
                                num_passes=num_passes, num_tasks=num_tasks)
        self.vocab = tuple(vocab)
        if self.tags is None:
            self._derive(self._original)
            if self.segment is not None:  # asked for: now refined by the packed samples
                self.segment = _segments(self.shape, self.tags, self.valid.device)
            if self.valid_rows is not None:
                self.valid_rows = _valid_rows(self.valid, self.group_ids)


def _value_ranges(tensors: dict[str, torch.Tensor | None], shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """(min, max) of each integer (not bool) tag shaped like the tokens and of ``task``'s dtype (the
    usual one: long), from one reduction; ``validate`` reduces any other one by itself, or names
    what is wrong with it."""
    dtype = getattr(tensors["task"], "dtype", None)
    if dtype in (None, torch.bool) or dtype.is_floating_point or dtype.is_complex or not math.prod(shape):
        return {}
    same = {name: t for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == dtype}
    if not same:
        return {}
    lo, hi = torch.stack(list(same.values())).reshape(len(same), -1).aminmax(dim=1)
    return dict(zip(same, zip(lo.tolist(), hi.tolist())))


def _check_task_modalities(tm, shape: tuple[int, ...], num_modalities: int) -> None:
    """``task_modalities``: a multi-hot ``[..., M]``, bool or 0/1 integers (``group_key`` packs each
    entry into one bit, so a 0.5 or a 2 would merge tag groups)."""
    if not isinstance(tm, torch.Tensor) or tuple(tm.shape) != shape + (num_modalities,):
        got = tuple(tm.shape) if isinstance(tm, torch.Tensor) else type(tm).__name__
        raise ValueError(
            f"tags.task_modalities must have shape {shape + (num_modalities,)} "
            f"(tokens x num_modalities), got {got}"
        )
    if tm.is_floating_point() or tm.is_complex():
        raise ValueError(f"tags.task_modalities must be a bool (or 0/1 integer) multi-hot, got {tm.dtype}")
    if tm.dtype != torch.bool and tm.numel():
        lo, hi = (int(v) for v in torch.aminmax(tm))
        if lo < 0 or hi > 1:
            raise ValueError(f"tags.task_modalities must hold only 0 and 1 (a multi-hot), got values in [{lo}, {hi}]")


def _well_formed(tags: TokenTags, shape: tuple[int, ...]) -> bool:
    """Whether every tag tensor is shaped like the tokens (so flattening and grouping can run before
    a router's vocabulary check names anything else that is wrong)."""
    per_token = [tags.task, tags.modality, tags.role, tags.causal, tags.pass_id]
    if tags.sample is not None:
        per_token.append(tags.sample)
    if not all(isinstance(t, torch.Tensor) and tuple(t.shape) == shape and not t.is_floating_point()
               for t in per_token):
        return False
    tm = tags.task_modalities
    return isinstance(tm, torch.Tensor) and tuple(tm.shape[:-1]) == shape and tm.dim() == len(shape) + 1


def _valid_tokens(padding_mask, shape: tuple[int, ...], T: int, device) -> torch.Tensor:
    """valid_T: True for every token that is not padding (all of them without a padding_mask)."""
    if padding_mask is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    if not isinstance(padding_mask, torch.Tensor) or tuple(padding_mask.shape) != shape:
        got = (f"tensor of shape {tuple(padding_mask.shape)} and dtype {padding_mask.dtype}"
               if isinstance(padding_mask, torch.Tensor) else type(padding_mask).__name__)
        raise ValueError(f"padding_mask must be shaped like the tokens {shape}, got {got}")
    if padding_mask.dtype != torch.bool:
        raise ValueError(f"padding_mask must be bool (True = padding), got {padding_mask.dtype}")
    return ~padding_mask.reshape(T)


def _valid_rows(valid_T: torch.Tensor, group_T: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The valid tokens in order (long ``[N]``; None when no token is padding) and their tag groups
    (None without tags)."""
    index_N = valid_T.nonzero().squeeze(1)
    if index_N.numel() == valid_T.numel():
        return None, group_T
    return index_N, None if group_T is None else group_T.index_select(0, index_N)


def _segments(shape: tuple[int, ...], flat: TokenTags | None, device) -> torch.Tensor:
    """Sequence index of each token, for context pooling: rows of [B, S], refined by tags.sample
    when samples are packed into rows."""
    T = math.prod(shape)
    if len(shape) == 2:
        segment_T = torch.arange(shape[0], device=device).repeat_interleave(shape[1])
    else:
        segment_T = torch.zeros(T, dtype=torch.long, device=device)
    sample = None if flat is None else flat.sample
    if sample is not None and sample.numel():
        # (row, sample) → one id; ids need not be contiguous (pooling sizes by the max id).
        sample_T = sample.long()
        segment_T = segment_T * (int(sample_T.max()) + 1) + sample_T
    return segment_T
