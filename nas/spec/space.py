"""Search spaces: ``search_spaces/<name>.yaml`` turned into ArchSpecs.

A space file::

    description: GQA decoders of roughly 5M to 60M parameters
    dimensions:                 # in order: a condition or formula may read only earlier names
      attention: {value: gqa}                      # fixed
      d_model: {choices: [256, 384, 512]}          # categorical
      n_layers: {low: 4, high: 12, step: 2}        # integer range (float range for ffn_ratio)
      n_heads: {choices: [4, 8]}
      head_dim: {expr: "d_model // n_heads"}       # derived from earlier dimensions
      n_kv_heads: {choices: [2, 4], when: "attention == 'gqa'"}   # conditional
    rules:                      # every sampled spec must satisfy each one
      - "n_kv_heads < n_heads"
      - "5e6 <= params <= 60e6"
    training: {tokens: 300000, batch_size: 16}     # this space's default brief training

A dimension that is inactive (its ``when`` is false) is not sampled: it takes its ``default`` if
one is given, else ArchSpec's own (n_kv_heads is derived for mha/mqa/mla, MLA's fields are 0).
Rules see every ArchSpec field plus the derived figures in ``DERIVED``. Errors name the file and
the dotted key.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nas.spec.arch import BOOL_FIELDS, FLOAT_FIELDS, LITERAL_FIELDS, ArchSpec
from nas.spec.errors import ConfigError, NasError, SpecError
from nas.spec.expr import Expr, ExprError
from nas.spec.files import definition_files, parse_yaml_mapping, read_definition
from nas.spec.settings import TrainConfig

FIELDS = {f.name: f for f in dataclasses.fields(ArchSpec)}
REQUIRED = tuple(n for n, f in FIELDS.items() if f.default is dataclasses.MISSING)

# Figures a rule may use besides the spec's fields, computed on the built spec.
DERIVED: dict[str, Callable[[ArchSpec], Any]] = {
    "params": ArchSpec.params,
    "non_embedding_params": ArchSpec.non_embedding_params,
    "embedding_params": ArchSpec.embedding_params,
    "unique_layers": lambda s: s.unique_layers,
    "ffn_hidden": lambda s: s.ffn_hidden,
    "weight_bytes": ArchSpec.weight_bytes,
    "kv_cache_bytes_per_token": ArchSpec.kv_cache_bytes_per_token,
}

# Sampling tries this many random draws to find a spec that passes every rule.
MAX_SAMPLE_TRIES = 2000


class InvalidSample(SpecError):
    """A draw of the dimensions that breaks a rule or makes an inconsistent ArchSpec."""


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str  # "choices" | "int" | "float" | "value" | "expr"
    choices: tuple[Any, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False
    value: Any = None
    expr: Expr | None = None
    when: Expr | None = None
    default: Any = None

    @property
    def searchable(self) -> bool:
        return self.kind in ("choices", "int", "float")

    def describe(self) -> str:
        if self.kind == "choices":
            text = "{" + ", ".join(map(str, self.choices)) + "}"
        elif self.kind in ("int", "float"):
            text = f"[{self.low:g}, {self.high:g}]" + (f" step {self.step:g}" if self.step else "")
            text += " log" if self.log else ""
        elif self.kind == "value":
            text = f"= {self.value}"
        else:
            text = f"= {self.expr.text}"  # type: ignore[union-attr]
        return text + (f"  when {self.when.text}" if self.when else "")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    path: Path
    description: str
    dimensions: tuple[Dimension, ...]
    rules: tuple[Expr, ...]
    training: TrainConfig

    @property
    def searchable(self) -> tuple[Dimension, ...]:
        return tuple(d for d in self.dimensions if d.searchable)

    # --- turning draws into specs ------------------------------------------------------------
    def assemble(self, draw: Callable[[Dimension], Any]) -> ArchSpec:
        """Walk the dimensions in order, asking ``draw`` for each active searchable one, and
        build the spec; raises InvalidSample naming the rule or field that fails."""
        values: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.when is not None and not _holds(dim.when, values, dim.name):
                if dim.default is not None:
                    values[dim.name] = dim.default
                continue
            if dim.kind == "value":
                values[dim.name] = dim.value
            elif dim.kind == "expr":
                try:
                    values[dim.name] = dim.expr(values)  # type: ignore[misc]
                except ExprError as e:
                    raise InvalidSample(f"{dim.name}: {e}") from None
            else:
                values[dim.name] = draw(dim)
        try:
            spec = ArchSpec(**values)
        except SpecError as e:
            raise InvalidSample(str(e)) from None
        self.check_rules(spec)
        return spec

    def check_rules(self, spec: ArchSpec) -> None:
        env = rule_env(spec)
        for rule in self.rules:
            try:
                ok = rule(env)
            except ExprError as e:
                raise InvalidSample(f"rule {rule.text!r}: {e}") from None
            if not ok:
                raise InvalidSample(f"breaks rule {rule.text!r}")

    def from_params(self, params: dict[str, Any]) -> ArchSpec:
        """The spec for a dict of sampled values (e.g. an Optuna trial's params)."""

        def draw(dim: Dimension) -> Any:
            if dim.name not in params:
                raise InvalidSample(f"no value for dimension {dim.name!r}")
            return params[dim.name]

        return self.assemble(draw)

    def sample(self, rng: random.Random) -> ArchSpec:
        """A uniformly drawn spec that satisfies every rule (rejection sampling)."""
        last = ""
        for _ in range(MAX_SAMPLE_TRIES):
            try:
                return self.assemble(lambda dim: _draw_random(dim, rng))
            except InvalidSample as e:
                last = str(e)
        raise NasError(
            f"{self.path}: no valid architecture in {MAX_SAMPLE_TRIES} random draws "
            f"(last: {last}); loosen the rules or the ranges"
        )

    def suggest(self, trial: Any) -> ArchSpec:
        """Draw through an Optuna trial (suggest_categorical / suggest_int / suggest_float);
        raises InvalidSample when the draw breaks a rule."""

        def draw(dim: Dimension) -> Any:
            if dim.kind == "choices":
                return trial.suggest_categorical(dim.name, list(dim.choices))
            if dim.kind == "int":
                return trial.suggest_int(dim.name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
            return trial.suggest_float(dim.name, dim.low, dim.high, step=dim.step, log=dim.log)

        return self.assemble(draw)

    def size(self) -> int | None:
        """Number of raw combinations of the searchable dimensions (None if one is continuous)."""
        n = 1
        for d in self.searchable:
            if d.kind == "choices":
                n *= len(d.choices)
            elif d.kind == "int":
                n *= (int(d.high) - int(d.low)) // int(d.step or 1) + 1
            elif d.step:
                n *= round((d.high - d.low) / d.step) + 1
            else:
                return None
        return n


def _holds(cond: Expr, values: dict[str, Any], where: str) -> bool:
    try:
        return bool(cond(values))
    except ExprError as e:
        raise InvalidSample(f"{where}: {e}") from None


def rule_env(spec: ArchSpec) -> dict[str, Any]:
    env = spec.to_dict()
    env.update({name: fn(spec) for name, fn in DERIVED.items()})
    return env


def _draw_random(dim: Dimension, rng: random.Random) -> Any:
    if dim.kind == "choices":
        return rng.choice(dim.choices)
    if dim.kind == "int":
        step = int(dim.step or 1)
        return rng.randrange(int(dim.low), int(dim.high) + 1, step)
    if dim.step:
        n = round((dim.high - dim.low) / dim.step)
        return round(dim.low + dim.step * rng.randint(0, n), 10)
    return rng.uniform(dim.low, dim.high)


# --- loading ---------------------------------------------------------------------------------------
_DIM_KEYS = {"choices", "low", "high", "step", "log", "value", "expr", "when", "default"}


def _check_value(source: str, key: str, field: str, value: Any) -> Any:
    """Check one value against the ArchSpec field's type; return it (ints widened for floats)."""
    if field in LITERAL_FIELDS:
        if value not in LITERAL_FIELDS[field] or isinstance(value, bool):
            raise ConfigError(source, key, f"{value!r} is not allowed; allowed: {list(LITERAL_FIELDS[field])}")
    elif field in BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"{value!r} must be true or false")
    elif field in FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"{value!r} must be a number")
        return float(value)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(source, key, f"{value!r} must be an integer")
    return value


def _parse_dimension(source: str, name: str, raw: Any, earlier: set[str]) -> Dimension:
    key = f"dimensions.{name}"
    if name not in FIELDS:
        raise ConfigError(source, key, f"unknown dimension; ArchSpec fields are: {', '.join(FIELDS)}")
    if not isinstance(raw, dict):
        # A bare scalar is shorthand for a fixed value, a bare list for choices.
        raw = {"choices": raw} if isinstance(raw, list) else {"value": raw}
    unknown = sorted(set(raw) - _DIM_KEYS)
    if unknown:
        raise ConfigError(source, f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(_DIM_KEYS))}")
    forms = [k for k in ("choices", "low", "value", "expr") if k in raw]
    if len(forms) != 1:
        raise ConfigError(source, key, "give exactly one of choices, low/high, value or expr")

    def expr_at(sub: str) -> Expr:
        try:
            return Expr(raw[sub], earlier)
        except ExprError as e:
            hint = "(a dimension may read only those listed before it)"
            raise ConfigError(source, f"{key}.{sub}", f"{e} {hint}") from None

    when = expr_at("when") if "when" in raw else None
    default = _check_value(source, f"{key}.default", name, raw["default"]) if "default" in raw else None
    common = {"name": name, "when": when, "default": default}
    form = forms[0]
    if form == "choices":
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(source, f"{key}.choices", "must be a non-empty list")
        checked = tuple(_check_value(source, f"{key}.choices[{i}]", name, v) for i, v in enumerate(choices))
        if len(set(checked)) != len(checked):
            raise ConfigError(source, f"{key}.choices", "has a repeated value")
        return Dimension(kind="choices", choices=checked, **common)
    if form == "value":
        return Dimension(kind="value", value=_check_value(source, f"{key}.value", name, raw["value"]), **common)
    if form == "expr":
        return Dimension(kind="expr", expr=expr_at("expr"), **common)
    # A range.
    if "high" not in raw:
        raise ConfigError(source, f"{key}.high", "a range needs both low and high")
    is_float = name in FLOAT_FIELDS
    if not is_float and (name in LITERAL_FIELDS or name in BOOL_FIELDS):
        raise ConfigError(source, key, "a categorical field takes choices or value, not a range")
    low = _check_value(source, f"{key}.low", name, raw["low"])
    high = _check_value(source, f"{key}.high", name, raw["high"])
    step = _check_value(source, f"{key}.step", name, raw["step"]) if raw.get("step") is not None else None
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(source, f"{key}.log", f"{log!r} must be true or false")
    if low > high:
        raise ConfigError(source, key, f"low ({low}) is above high ({high})")
    if step is not None and step <= 0:
        raise ConfigError(source, f"{key}.step", f"must be > 0, got {step}")
    if log and (low <= 0 or step is not None):
        raise ConfigError(source, f"{key}.log", "a log range needs low > 0 and no step")
    return Dimension(kind="float" if is_float else "int", low=low, high=high, step=step, log=log, **common)


def parse_space(text: str, source: str, name: str) -> SearchSpace:
    doc = parse_yaml_mapping(text, source, "'dimensions' (and optionally 'rules', 'training')")
    unknown = sorted(set(doc) - {"description", "dimensions", "rules", "training"})
    if unknown:
        raise ConfigError(source, unknown[0], "unknown key; allowed: description, dimensions, rules, training")
    raw_dims = doc.get("dimensions")
    if not isinstance(raw_dims, dict) or not raw_dims:
        raise ConfigError(source, "dimensions", "must be a non-empty mapping of ArchSpec field -> choices/range/value")
    dims: list[Dimension] = []
    earlier: set[str] = set()
    for dim_name, raw in raw_dims.items():
        dims.append(_parse_dimension(source, str(dim_name), raw, earlier))
        earlier.add(str(dim_name))
    missing = [f for f in REQUIRED if f not in earlier]
    if missing:
        raise ConfigError(source, f"dimensions.{missing[0]}", "is required (ArchSpec has no default for it)")

    raw_rules = doc.get("rules") or []
    if not isinstance(raw_rules, list):
        raise ConfigError(source, "rules", "must be a list of expressions")
    known = set(FIELDS) | set(DERIVED)
    rules = []
    for i, text_rule in enumerate(raw_rules):
        try:
            rules.append(Expr(text_rule, known))
        except ExprError as e:
            raise ConfigError(source, f"rules[{i}]", str(e)) from None

    raw_training = doc.get("training") or {}
    if not isinstance(raw_training, dict):
        raise ConfigError(source, "training", "must be a mapping of training settings")
    try:
        training = TrainConfig(**raw_training)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(source, f"training.{loc}" if loc else "training", err["msg"]) from None

    space = SearchSpace(
        name=name, path=Path(source), description=str(doc.get("description", "")).strip(),
        dimensions=tuple(dims), rules=tuple(rules), training=training,
    )
    try:
        space.sample(random.Random(0))  # a space with no valid architecture is a broken file
    except NasError as e:
        raise ConfigError(source, "rules", str(e).split(": ", 1)[-1]) from None
    return space


# --- finding spaces ----------------------------------------------------------------------------
def list_space_files() -> dict[str, Path]:
    """Name -> file of every shipped space (the checkout's copy wins over the wheel's)."""
    return definition_files("search_spaces")


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A space by name (``gqa_small``) or by path to a YAML file."""
    name, path, text = read_definition(name_or_path, "search_spaces", "search space")
    return parse_space(text, str(path), name)


def iter_spaces() -> Iterator[tuple[str, Path]]:
    yield from list_space_files().items()
