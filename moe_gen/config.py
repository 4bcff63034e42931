"""Typed, keyword-only configuration dataclasses, nested the way the modules nest.

    MoEConfig ─┬─ RouterConfig   (strategy, gate, noise, auxiliary-loss weights)
               └─ ExpertsConfig  (expert kind, activation, bias, shared expert)

Every config converts to and from plain dicts (``to_dict`` / ``from_dict``) so it can be saved as
JSON next to weights and overridden from the command line by dotted keys. A model's
``ModelConfig.moe`` (``moe_gen.model.MoELayers``) holds a ``RouterConfig`` and an ``ExpertsConfig``,
and the model builds each MoE layer's ``MoEConfig`` from them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from typing import Any, TypeVar, Union

import numpy as np

__all__ = ["ConfigBase", "RouterConfig", "ExpertsConfig", "MoEConfig", "merge", "unknown_keys"]

C = TypeVar("C", bound="ConfigBase")


def merge(base: dict, override: dict) -> dict:
    """``override`` laid over ``base`` key by key at every depth (a nested mapping in both is
    merged; anything else is replaced) — the one rule for a YAML file over its recipe, a run's
    ``model`` section over its flavour, and dotted flags over either. Returns a new dict."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def unknown_keys(owner: str, data: dict, known) -> list[str]:
    """The keys of the settings ``data`` that are not in ``known``, sorted. A key that is not a string
    (YAML reads ``1:`` as an int) is refused, naming ``owner`` (sorting it beside names failed with a
    bare TypeError)."""
    odd = [key for key in data if not isinstance(key, str)]
    if odd:
        raise ValueError(f"{owner} keys must be names (strings), got {odd[0]!r}")
    return sorted(set(data) - set(known))


@dataclasses.dataclass(kw_only=True)
class ConfigBase:
    """Shared dict conversion for config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (nested configs become nested dicts)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Builds the config from a dict as written by ``to_dict``; unknown keys are errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = unknown_keys(cls.__name__, data, fields)
        if unknown:
            from moe_gen.registry import did_you_mean

            raise ValueError(
                f"unknown {cls.__name__} keys {unknown}{did_you_mean(unknown, fields)}; "
                f"known: {', '.join(sorted(fields))}"
            )
        hints = _field_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            sub = _config_type(hints[name])
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = _typed(cls.__name__, name, hints[name], value)
        return cls(**kwargs)

    def check_types(self) -> None:
        """Raises ``ValueError`` naming the first field whose value does not fit its type hint
        (integral floats in int fields, such as YAML's ``1e3``, become ints). ``from_dict`` checks
        every config; each config's ``__post_init__`` calls this before comparing values, so a config
        built in Python is checked as one read from YAML or flags is."""
        hints = _field_hints(type(self))
        for field in dataclasses.fields(self):
            setattr(self, field.name, _typed(type(self).__name__, field.name, hints[field.name],
                                             getattr(self, field.name)))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a config class's fields, read once per class (resolving them takes
    about 0.2 ms, and every config checks its fields against them when it is built)."""
    return typing.get_type_hints(cls)


def _config_type(hint: Any) -> type | None:
    """The ConfigBase subclass inside a type hint such as ``RouterConfig | str``, if any."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (Union, _UnionType) else (hint,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, ConfigBase):
            return candidate
    return None


_UnionType = type(int | str)


def _typed(owner: str, name: str, hint: Any, value: Any) -> Any:
    """``value`` of field ``owner.name`` checked against its type hint (and converted where that is
    lossless: integral floats to int, lists to tuples); raises ``ValueError`` naming the field."""
    fits, value = _fit(hint, value)
    if not fits:
        raise ValueError(f"{owner}.{name} must be {_describe(hint)}, got {value!r}")
    return value


def _fit(hint: Any, value: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits ``hint``, the value converted). Hints this does not know pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, _UnionType):
        if value is None:  # None where None is allowed; never an emptied mapping (masked_alpha: a number or a
            return type(None) in args, None  # mapping; null became {}, α 1.0 for every modality)
        for arg in args:
            fits, converted = _fit(arg, value)
            if fits:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:  # (numpy's bool too, as numpy's integers are integers)
        return isinstance(value, (bool, np.bool_)), bool(value) if isinstance(value, np.bool_) else value
    if isinstance(value, (bool, np.bool_)):  # bool is an int subclass, but True is no count or rate
        return hint is Any or hint is object, value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return isinstance(value, numbers.Integral), int(value) if isinstance(value, numbers.Integral) else value
    if hint is float:  # (numpy's as Python's: a np.float32 setting failed where it was written as JSON)
        real = isinstance(value, numbers.Real)
        return real, float(value) if real and type(value) not in (int, float) else value
    if hint is str:
        return isinstance(value, str), value
    if hint is dict or origin is dict:  # null empties a mapping, as --section null empties a section
        return (True, {}) if value is None else (isinstance(value, dict), _plain(value))
    if hint is tuple or origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False, value
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if items and len(items) != len(value):
            return False, value
        converted = []
        for item_hint, item in zip(items or [Any] * len(value), value):
            fits, item = _fit(item_hint, item)
            if not fits:
                return False, value
            converted.append(item)
        return True, tuple(converted)
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        return isinstance(value, hint), value
    return True, value


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars inside mappings and lists as Python numbers and bools (what a
    checkpoint's JSON can hold)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def _describe(hint: Any) -> str:
    """A type hint in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, _UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    words = {type(None): "null (None)", bool: "true or false", int: "an integer", float: "a number",
             str: "a string", dict: "a mapping", tuple: "a list"}
    if hint in words:
        return words[hint]
    if origin in words:
        return words[origin]
    return f"a {getattr(hint, '__name__', str(hint))}"

NOISE_POLICIES = ("none", "gaussian", "jitter", "gumbel")
TAG_BALANCE = ("bias", "loss", "loss+bias", "none")
TAG_BALANCE_RULES = ("error", "sign")
DROP_POLICIES = ("in_order", "batch_prioritized")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
BALANCE_GROUPS = ("modality", "task")


@dataclasses.dataclass(kw_only=True)
class RouterConfig(ConfigBase):
    """How tokens choose experts.

    Attributes:
        strategy: router input (registry ``ROUTERS``): ``token``, ``context``, ``modality``,
            ``task``, ``attribute``, ``hybrid`` or ``instruction`` (attributes plus the task's
            prompt words, ``task_words``).
        gate: how logits become assignments (registry ``GATES``): ``topk``, ``expert_choice``,
            ``balanced`` (BASE layers, k=1) or ``hash`` (fixed, parameter-free; for tests).
        score: how logits become the router probabilities that weight the experts: ``softmax``
            over the E experts, or ``sigmoid`` (an independent affinity per expert, DeepSeek-V3;
            experts are then chosen by affinity, to which ``selection_bias`` and the group scores
            add, and the weights are usually renormalised). The balance and importance losses
            then take the affinities as they are, unnormalised, for the probabilities P_e.
        normalize: renormalise the k gate weights to sum to 1. ``None`` means "when k > 1": with
            k = 1 a renormalised weight is the constant 1 and the router would get no gradient.
            ``False`` keeps the softmax over all E experts (Qwen2-MoE's ``norm_topk_prob=False``).
        weight_scale: factor on the gate weights after renormalisation (DeepSeek-V3's
            ``routed_scaling_factor``, which keeps renormalised weights from shrinking the routed
            output next to the shared expert). ``topk`` gate only.
        expert_groups, topk_groups: group-limited routing (DeepSeek-V3): the experts form
            ``expert_groups`` equal groups, each scored per token by the sum of its two best
            selection scores, and a token chooses its k experts inside its ``topk_groups`` best
            groups (in DeepSeek-V3 a group is a node, so this bounds the traffic per token).
            ``1, 1`` routes over all experts. ``topk`` gate only.
        selection_bias: give the router a per-expert bias (buffer ``balance_bias``) added to the
            scores only to choose experts, even where ``tag_balance`` does not ask for one: it
            holds DeepSeek-V3's ``e_score_correction_bias`` for imported layers. Only the tag
            balancing below updates it; on content routers it stays as loaded.
        noise: ``none``, ``gaussian`` (N(0, σ²) on the logits, σ = ``noise_std`` or 1/E as in
            Uni-Perceiver-MoE), ``jitter`` (router input times U(1-ε, 1+ε), Switch) or ``gumbel``
            (Gumbel noise on the logits when choosing, GShard-style sampling). Training only.
        noise_std: σ for gaussian noise; ``None`` means 1/num_experts.
        jitter_eps: ε for jitter noise.
        num_modalities, num_roles, num_passes, num_tasks: sizes of the tag vocabularies, used by
            the tag-based strategies (embedding tables and the attribute vector); at most 40
            modalities, 16 roles, 16 passes and 2^(46 − num_modalities) tasks, what one tag group
            key (``TokenTags.group_key``) holds.
        balance_loss_weight: Switch/GShard load-balance loss weight (content routers only).
        balance_loss_groups: also compute the balance loss within each ``modality`` and/or ``task``
            group and average over groups (``balance_modality``, ``balance_task``).
        z_loss_weight: router z-loss weight (ST-MoE): mean squared log-sum-exp of the logits.
        importance_loss_weight: importance loss weight (Shazeer et al. 2017): squared coefficient
            of variation of the summed gate probabilities per expert.
        tag_balance: load balancing of tag-routed layers (strategies ``modality``, ``task``,
            ``attribute`` with a learned top-k gate), which the token-count losses skip
            (``moe_gen.routing.balance``): ``loss`` (default: the Switch balance loss over tag
            groups weighted by their token counts, at ``balance_loss_weight``), ``bias``
            (loss-free: a per-expert bias added to the logits only to choose experts, nudged after
            each training forward towards underloaded experts; Wang et al. 2024, DeepSeek-V3),
            ``loss+bias`` (both: the loss shapes the probabilities, the bias revives experts whose
            probability has collapsed, which the loss's gradient barely reaches) or ``none``. No
            effect on content-dependent strategies, which have the losses above.
        task_words: for the ``instruction`` strategy, the prompt words of each task's instruction
            (``Instruction.prompt_words``), by task id; ``GeneralistModel.build`` and
            ``add_tasks`` fill it from the tasks. Tasks without an entry read no words.
        word_buckets: W, the width of the hashed bag of prompt words the ``instruction`` strategy
            reads (each word sets bucket crc32(word) mod W).
        tag_balance_rate: u, the largest step of a bias update, in logit units.
        tag_balance_rule: how the bias moves: ``error`` (``b_e += u·clip((mean − load_e) / mean,
            -1, 1)``: experts near the mean load barely move, so coarse tag groups stop hopping
            between experts) or ``sign`` (``b_e += u·sign(mean − load_e)``, as in the paper).
        tag_balance_window: the load the tag-balance loss reads (``loss``, ``loss+bias``): 0, the
            forward's own tokens; W > 0, a running average of each expert's share of the load
            over about the last W updates (each weighs 1/W: forwards in one process, optimizer
            steps under several, where the processes' loads are summed), this forward's included.
            One task per micro-batch (``TrainConfig.batch_tasks="single"``) needs it: a batch's
            own load cannot show the experts other tasks crowd.
    """

    strategy: str = "token"
    gate: str = "topk"
    score: str = "softmax"
    normalize: bool | None = None
    weight_scale: float = 1.0
    expert_groups: int = 1
    topk_groups: int = 1
    selection_bias: bool = False
    noise: str = "none"
    noise_std: float | None = None
    jitter_eps: float = 0.01
    num_modalities: int = 9
    num_roles: int = 3
    num_passes: int = 3
    num_tasks: int = 64
    balance_loss_weight: float = 0.01
    balance_loss_groups: tuple[str, ...] = ()
    z_loss_weight: float = 0.001
    importance_loss_weight: float = 0.0
    tag_balance: str = "loss"
    tag_balance_rate: float = 0.01
    tag_balance_rule: str = "error"
    tag_balance_window: int = 0
    task_words: tuple[tuple[str, ...], ...] = ()
    word_buckets: int = 64

    @property
    def tag_vocab(self) -> tuple[int, int, int, int]:
        """The vocabulary sizes ``(modalities, roles, passes, tasks)`` tags are checked against."""
        return (self.num_modalities, self.num_roles, self.num_passes, self.num_tasks)

    def __post_init__(self) -> None:
        if not isinstance(self.task_words, (list, tuple)) or any(
                isinstance(words, str) or not isinstance(words, (list, tuple)) for words in self.task_words):
            raise ValueError("router task_words lists each task's words as a sequence of strings (one per task "
                             f"id), got {self.task_words!r}")
        self.task_words = tuple(tuple(str(w) for w in words) for words in self.task_words)
        self.check_types()  # "false" for a bool, "8" for an int: named here, before any comparison below
        if self.word_buckets < 1:
            raise ValueError(f"router word_buckets must be >= 1, got {self.word_buckets}")
        if len(self.task_words) > self.num_tasks:
            raise ValueError(f"router task_words lists {len(self.task_words)} tasks but num_tasks is {self.num_tasks}")
        if self.noise not in NOISE_POLICIES:
            raise ValueError(f"unknown router noise {self.noise!r}; known: {', '.join(NOISE_POLICIES)}")
        if self.score not in SCORE_FUNCTIONS:
            raise ValueError(f"unknown router score {self.score!r}; known: {', '.join(SCORE_FUNCTIONS)}")
        if self.score == "sigmoid" and self.noise == "gumbel":
            raise ValueError("router noise 'gumbel' samples from the softmax; with score='sigmoid' use "
                             "noise 'gaussian', 'jitter' or 'none'")
        if self.gate == "expert_choice" and self.noise == "gumbel":
            raise ValueError("router noise 'gumbel' perturbs which experts a token selects; gate 'expert_choice' "
                             "lets experts select tokens by the clean probabilities, so it would change nothing: "
                             "use noise 'gaussian' or 'jitter'")
        if not 0 < self.weight_scale < math.inf:  # (inf passed "> 0" and every loss was NaN)
            raise ValueError(f"router weight_scale must be a finite number > 0, got {self.weight_scale}")
        if self.expert_groups < 1 or not 1 <= self.topk_groups <= self.expert_groups:
            raise ValueError(
                f"router expert_groups must be >= 1 and topk_groups in [1, expert_groups]; got "
                f"expert_groups={self.expert_groups}, topk_groups={self.topk_groups}"
            )
        if self.noise_std is not None and not 0 <= self.noise_std < math.inf:
            raise ValueError(f"router noise_std must be a finite number >= 0, got {self.noise_std}")
        if not 0 <= self.jitter_eps < 1:
            raise ValueError(f"router jitter_eps must be in [0, 1), got {self.jitter_eps}")
        for group in self.balance_loss_groups:
            if group not in BALANCE_GROUPS:
                raise ValueError(
                    f"unknown balance_loss_groups entry {group!r}; known: {', '.join(BALANCE_GROUPS)}"
                )
        for name in ("num_modalities", "num_roles", "num_passes", "num_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"router {name} must be >= 1, got {getattr(self, name)}")
        # TokenTags.group_key packs every tag into one 63-bit id: roles and passes 4 bits each,
        # modalities one bit each (at most 40), the task above them all
        for name, limit in (("num_roles", 16), ("num_passes", 16), ("num_modalities", 40)):
            if getattr(self, name) > limit:
                raise ValueError(f"router {name} must be <= {limit} (the tag group key's width), got "
                                 f"{getattr(self, name)}")
        if self.num_tasks > 1 << (46 - self.num_modalities):
            raise ValueError(f"router num_tasks must be <= {1 << (46 - self.num_modalities)} with "
                             f"{self.num_modalities} modalities (the tag group key's width), got {self.num_tasks}")
        if self.tag_balance not in TAG_BALANCE:
            raise ValueError(f"unknown tag_balance {self.tag_balance!r}; known: {', '.join(TAG_BALANCE)}")
        if self.tag_balance_rule not in TAG_BALANCE_RULES:
            raise ValueError(f"unknown tag_balance_rule {self.tag_balance_rule!r}; known: "
                             f"{', '.join(TAG_BALANCE_RULES)}")
        for name in ("balance_loss_weight", "z_loss_weight", "importance_loss_weight", "tag_balance_rate",
                     "tag_balance_window"):
            if not 0 <= getattr(self, name) < math.inf:  # (NaN passed "< 0" and switched its loss off)
                raise ValueError(f"router {name} must be a finite number >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(kw_only=True)
class ExpertsConfig(ConfigBase):
    """The experts: stacked weights ``[E, D, H]`` and ``[E, H, D]``.

    Attributes:
        kind: registry ``EXPERTS``: ``mlp`` (Linear-act-Linear), ``glu`` (gated, SwiGLU with
            ``activation="silu"``) or ``linear`` (one projection per expert; mixtures of linear
            experts merge exactly, as Uni-Perceiver-MoE does for attention projections).
        activation: ``gelu``, ``gelu_tanh``, ``relu`` or ``silu``.
        bias: whether expert projections have biases.
        shared_expert: add a dense expert that every token uses (DeepSeek-MoE style).
        shared_hidden: hidden size of the shared expert; ``None`` means ``d_hidden``.
        shared_gate: scale the shared expert's output per token by ``sigmoid(x · w)``, with a
            learned ``w`` of width D (Qwen2-MoE's ``shared_expert_gate``); needs ``shared_expert``.
    """

    kind: str = "mlp"
    activation: str = "gelu"
    bias: bool = True
    shared_expert: bool = False
    shared_hidden: int | None = None
    shared_gate: bool = False

    def __post_init__(self) -> None:
        self.check_types()
        if self.shared_hidden is not None and self.shared_hidden < 1:
            raise ValueError(f"shared_hidden must be >= 1, got {self.shared_hidden}")
        if self.shared_gate and not self.shared_expert:
            raise ValueError("shared_gate=True gates the shared expert; set shared_expert=True too")


@dataclasses.dataclass(kw_only=True)
class MoEConfig(ConfigBase):
    """A mixture-of-experts layer.

    ``MoEConfig(d_model=..., d_hidden=..., num_experts=..., top_k=..., router=...,
    capacity_factor=None, backend=...)`` is the public API.

    Attributes:
        d_model: width D of the tokens.
        d_hidden: hidden width H of each expert.
        num_experts: E.
        top_k: experts per token (k >= 1, k <= E). For ``expert_choice`` it sets the average
            number of experts per token (capacity k·T/E per expert).
        router: a ``RouterConfig`` or just its strategy name (``"attribute"``).
        experts: an ``ExpertsConfig`` or just its kind (``"glu"``).
        capacity_factor: ``None`` is dropless (every assignment is computed). A float f gives each
            expert ``max(min_capacity, ceil(f·k·T/E))`` slots; assignments beyond are dropped,
            counted, and the token keeps its residual path (MoE output 0 for that assignment).
        min_capacity: lower bound on the per-expert capacity.
        drop_policy: which assignments win slots when an expert is full: ``in_order`` (first
            choices before second choices, then token order; GShard/tutel) or
            ``batch_prioritized`` (first choices before second, then by gate weight; V-MoE BPR).
        backend: dispatch backend (registry ``BACKENDS``): ``torch`` (default), ``grouped`` (one
            grouped GEMM per projection, nothing read back to the host), ``eager``,
            ``einsum``, ``merged``, ``triton`` (GPU kernels; CPU only under ``TRITON_INTERPRET=1``),
            ``tutel`` (when tutel is installed), or ``auto`` (tutel, then triton on CUDA, else torch).
        check_finite: raise ``ValueError`` on non-finite inputs (costs a reduction per call).
    """

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int = 2
    router: Union[RouterConfig, str] = "token"
    experts: Union[ExpertsConfig, str] = "mlp"
    capacity_factor: float | None = None
    min_capacity: int = 4
    drop_policy: str = "in_order"
    backend: str = "torch"
    check_finite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.router, str):
            self.router = RouterConfig(strategy=self.router)
        if isinstance(self.experts, str):
            self.experts = ExpertsConfig(kind=self.experts)
        self.check_types()
        for name in ("d_model", "d_hidden", "num_experts", "top_k"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} is larger than num_experts={self.num_experts}"
            )
        if self.capacity_factor is not None and not 0 < self.capacity_factor < math.inf:  # (inf: OverflowError)
            raise ValueError(f"MoEConfig.capacity_factor must be a finite number > 0 or None (dropless), got "
                             f"{self.capacity_factor}")
        if self.min_capacity < 0:
            raise ValueError(f"MoEConfig.min_capacity must be >= 0, got {self.min_capacity}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(
                f"unknown drop_policy {self.drop_policy!r}; known: {', '.join(DROP_POLICIES)}"
            )
        rc = self.router
        if (rc.expert_groups > 1 or rc.weight_scale != 1.0) and rc.gate != "topk":
            raise ValueError(
                f"router expert_groups and weight_scale apply to the 'topk' gate only, got gate {rc.gate!r}"
            )
        if self.num_experts % rc.expert_groups:
            raise ValueError(
                f"num_experts={self.num_experts} does not split into expert_groups={rc.expert_groups} "
                "equal groups"
            )
        eligible = rc.topk_groups * (self.num_experts // rc.expert_groups)
        if self.top_k > eligible:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} is larger than the {eligible} experts of the "
                f"topk_groups={rc.topk_groups} groups a token may use"
            )
        self._check_gate_options()

    def _check_gate_options(self) -> None:
        """Settings a gate or expert kind would ignore or could not add up, refused by name."""
        rc, experts = self.router, self.experts
        if rc.gate == "expert_choice" and rc.selection_bias:
            raise ValueError("router selection_bias shifts which experts a token selects; gate 'expert_choice' lets "
                             "experts select tokens by the clean probabilities, so it would change nothing")
        if rc.gate != "topk" and rc.normalize:
            raise ValueError(f"router normalize=True renormalises the top-k gate's weights; gate {rc.gate!r} sets its "
                             "own weights and would ignore it; leave normalize None")
        if rc.gate == "hash" and rc.noise != "none":  # (jitter too: it scales the input the fixed hash reads)
            raise ValueError(f"router noise {rc.noise!r} would make the fixed 'hash' gate route tokens at random in "
                             "training and differently at inference; use noise 'none'")
        if experts.kind == "linear" and experts.shared_expert and experts.shared_hidden not in (None, self.d_hidden):
            raise ValueError(f"a linear shared expert outputs shared_hidden={experts.shared_hidden} features, which "
                             f"cannot add to the linear experts' d_hidden={self.d_hidden}; leave shared_hidden None")

    @property
    def normalize_gates(self) -> bool:
        """Whether the k gate weights are renormalised (see ``RouterConfig.normalize``)."""
        assert isinstance(self.router, RouterConfig)
        if self.router.normalize is None:
            return self.top_k > 1
        return self.router.normalize
