"""``HybridConfig``: the whole description of a hybrid model, validated at construction."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from typing import Any

import layers  # noqa: F401  (registers the built-in blocks)
from hybrid.pattern import Pattern, parse_pattern, pattern_string
from layers.attention import AttentionOptions
from layers.options import (
    build_options,
    check_type,
    field_types,
    merge_options,
    require,
    require_finite_number,
    require_positive_int,
)
from layers.parallel import resolve_mixers
from layers.registry import get_block

BUILTIN_FAMILIES = (
    "attention", "latent_attention", "mamba2", "mamba1", "gated_deltanet", "kda", "short_conv",
    "mlp", "moe",
)  # fmt: skip


# Fields checked against their annotation before anything else reads them.
SCALAR_FIELDS = (
    "vocab_size", "d_model", "norm_eps", "tie_embeddings", "init_std", "embedding_multiplier",
    "residual_multiplier", "logit_multiplier", "post_norm_sublayers", "modules",
)  # fmt: skip


def changed_fields(options: Any) -> dict[str, Any]:
    """The fields of an options dataclass that differ from their defaults (a ``parallel``
    block's mixers as ``[name, their changed fields]``)."""
    changed = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name == "mixers" and isinstance(value, list):
            value = [[name, changed_fields(o)] for name, o in value]
        elif f.default_factory is not dataclasses.MISSING:
            if value == f.default_factory():
                continue
        elif f.default is not dataclasses.MISSING and value == f.default:
            continue
        changed[f.name] = value
    return changed


@dataclass
class HybridConfig:
    """A hybrid language model: embedding, pre-norm residual sublayers, final norm, LM head.

    Attributes:
        pattern: the layout, in any form :func:`hybrid.pattern.parse_pattern` accepts.
        vocab_size: token vocabulary size.
        d_model: residual stream width.
        attention / latent_attention / mamba2 / mamba1 / gated_deltanet / kda / short_conv / mlp /
        moe: options of each block family (a mapping or the family's options dataclass), used
            by every sublayer of that family (and by the mixers inside ``parallel`` sublayers).
        blocks: options of user-registered block families, by registry name.
        layer_overrides: per-sublayer options by index, e.g. ``{3: {"window": 256}}``
            (the list form of ``pattern`` can carry them too).
        norm_eps: epsilon of the pre-norms and the final norm.
        tie_embeddings: share the embedding matrix with the LM head.
        init_std: std of the normal init of projections and embeddings; projections that write
            into the residual stream get ``init_std / sqrt(n_sublayers)``.
        embedding_multiplier: the token embeddings are multiplied by it (Granite, Falcon-H1).
        residual_multiplier: every sublayer's output is multiplied by it before it is added
            to the residual stream (Granite).
        logit_multiplier: the logits are multiplied by it (Falcon-H1's lm_head_multiplier;
            Granite divides by its logits_scaling).
        post_norm_sublayers: indices of the sublayers whose norm comes after their block,
            ``x + multiplier * norm(block(x))`` (OLMo 2's norm placement, used by OLMo
            hybrid's attention layers); every other sublayer is pre-norm.
        modules: modules imported before the pattern is resolved, so that blocks they register
            can be named (e.g. ``["my_lab.blocks"]``).

    After construction, ``layers`` is the list of registry names (one per sublayer) and
    ``layer_options`` the fully resolved options of each sublayer.

    Raises:
        ValueError: one line naming the field and what is allowed.
    """

    pattern: Pattern
    vocab_size: int = 32000
    d_model: int = 512
    attention: Any = field(default_factory=dict)
    latent_attention: Any = field(default_factory=dict)
    mamba2: Any = field(default_factory=dict)
    mamba1: Any = field(default_factory=dict)
    gated_deltanet: Any = field(default_factory=dict)
    kda: Any = field(default_factory=dict)
    short_conv: Any = field(default_factory=dict)
    mlp: Any = field(default_factory=dict)
    moe: Any = field(default_factory=dict)
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logit_multiplier: float = 1.0
    post_norm_sublayers: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        hints = field_types(HybridConfig)
        for name in SCALAR_FIELDS:
            check_type(getattr(self, name), hints[name], name)
        for module in self.modules:
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ValueError(f"modules: cannot import {module!r}: {error}") from None
        require_positive_int(self.vocab_size, "vocab_size")
        require_positive_int(self.d_model, "d_model")
        require(self.norm_eps > 0, "norm_eps", f"must be > 0; got {self.norm_eps}")
        require(self.init_std > 0, "init_std", f"must be > 0; got {self.init_std}")
        for name in ("embedding_multiplier", "residual_multiplier", "logit_multiplier"):
            setattr(self, name, require_finite_number(getattr(self, name), name))

        for family in BUILTIN_FAMILIES:
            spec = get_block(family)
            setattr(self, family, build_options(spec.options_class, getattr(self, family), family))
        require(isinstance(self.blocks, dict), "blocks", "must map block names to options")
        family_options = {family: getattr(self, family) for family in BUILTIN_FAMILIES}
        for name, values in self.blocks.items():
            spec = get_block(name, where="blocks")
            if name in BUILTIN_FAMILIES:
                raise ValueError(f"blocks.{name}: set built-in options with {name}=..., not blocks")
            family_options[name] = build_options(spec.options_class, values, f"blocks.{name}")

        parsed = parse_pattern(self.pattern)
        self.layer_overrides = layer_overrides_from_data(self.layer_overrides)
        for index in self.layer_overrides:
            require(
                isinstance(index, int) and 0 <= index < len(parsed),
                "layer_overrides",
                f"index {index!r} is not a sublayer index in [0, {len(parsed)})",
            )

        def resolve_block(name: str, overrides: dict[str, Any], where: str | None) -> Any:
            """One block's options: its family's, with ``overrides``, resolved."""
            spec = get_block(name)
            base = family_options.get(name) or spec.options_class()
            family_where = name if name in BUILTIN_FAMILIES else f"blocks.{name}"
            where = where or family_where
            options = merge_options(base, overrides, where) if overrides else base
            if name == "parallel":  # its mixers are resolved like sublayers of their own
                mixers = resolve_mixers(options.mixers, resolve_block, where)
                options = dataclasses.replace(options, mixers=mixers)
            return options.resolve(self.d_model, where)

        self.layers: list[str] = []
        self.layer_options: list[Any] = []
        for index, (name, overrides) in enumerate(parsed):
            overrides = {**overrides, **self.layer_overrides.get(index, {})}
            # A parallel sublayer's options are its own (no family options to name).
            where = f"layers[{index}].{name}" if overrides or name == "parallel" else None
            self.layers.append(name)
            self.layer_options.append(resolve_block(name, overrides, where))
        self._check_positions()
        for index in self.post_norm_sublayers:
            require(
                0 <= index < len(parsed),
                "post_norm_sublayers",
                f"index {index} is not a sublayer index in [0, {len(parsed)})",
            )
        require(
            len(set(self.post_norm_sublayers)) == len(self.post_norm_sublayers),
            "post_norm_sublayers",
            f"lists a sublayer twice: {self.post_norm_sublayers}",
        )
        self.post_norm_sublayers = sorted(self.post_norm_sublayers)

    def _check_positions(self) -> None:
        """Sinusoidal positions are one encoding added to the embeddings: all or none."""
        positions = [(index, options.position) for index, options in enumerate(self.layer_options)
                     if isinstance(options, AttentionOptions)]  # fmt: skip
        sinusoidal = [index for index, position in positions if position == "sinusoidal"]
        if sinusoidal and len(sinusoidal) != len(positions):
            other = next(index for index, position in positions if position != "sinusoidal")
            raise ValueError(
                f"layers[{other}].attention.position: is "
                f"{self.layer_options[other].position!r} but layers[{sinusoidal[0]}] uses "
                "'sinusoidal', which the model adds to the embeddings once for every "
                "attention sublayer; use it for all of them or none"
            )

    @property
    def absolute_position(self) -> str | None:
        """``"sinusoidal"`` when the model adds absolute positions to its embeddings."""
        for options in self.layer_options:
            if isinstance(options, AttentionOptions):
                return "sinusoidal" if options.position == "sinusoidal" else None
        return None

    @property
    def pattern_string(self) -> str:
        """The layout as a symbol string (per-layer overrides are not shown)."""
        return pattern_string(self.layers, self.layer_options)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON / YAML friendly) that :meth:`from_dict` turns back into this config."""
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return json.loads(json.dumps(data, default=list))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridConfig:
        """Build a config from plain data, failing on unknown keys with a suggestion."""
        if not isinstance(data, dict):
            raise ValueError(
                f"model: expected a mapping of config fields, got {type(data).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"{key}: unknown config field; {hint}valid: {', '.join(names)}")
        if "pattern" not in data:
            raise ValueError("pattern: required")
        data = dict(data)
        if "layer_overrides" in data:
            data["layer_overrides"] = layer_overrides_from_data(data["layer_overrides"])
        return cls(**data)

    def fingerprint(self) -> str:
        """Short hash of everything that shapes the weights and the inference state.

        Option fields at their default are left out, so a release that adds an option (off
        by default) keeps every existing model's fingerprint."""
        resolved = {
            "layers": self.layers,
            "options": [changed_fields(o) for o in self.layer_options],
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "tie_embeddings": self.tie_embeddings,
        }
        if self.post_norm_sublayers:  # left out when empty: older fingerprints stay as they were
            resolved["post_norm_sublayers"] = self.post_norm_sublayers
        text = json.dumps(resolved, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def layer_overrides_from_data(data: Any) -> dict[int, dict[str, Any]]:
    """``layer_overrides`` from plain data, where keys may be strings ("3": JSON, CLI)."""
    if not isinstance(data, dict):
        raise ValueError(
            f"layer_overrides: must map sublayer indices to options, got {type(data).__name__}"
        )
    overrides = {}
    for key, options in data.items():
        try:
            index = key if isinstance(key, int) and not isinstance(key, bool) else int(str(key))
        except ValueError:
            raise ValueError(f"layer_overrides: key {key!r} is not a sublayer index") from None
        if not isinstance(options, dict):
            raise ValueError(
                f"layer_overrides.{key}: must be a mapping of options, got {type(options).__name__}"
            )
        overrides[index] = options
    return overrides
