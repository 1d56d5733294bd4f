"""Typed dataclass configs read from YAML with dotted ``key=value`` overrides.

Every stage has one ``@dataclass`` config; shared groups (``model``, ``generation``,
...) are nested dataclasses. A field's docstring-style comment is its help text
(``stable-rlhf <stage> --help`` prints them). ``load_config`` rejects unknown keys and
wrong types with a message naming the key (and the file it came from), before any
work starts; cross-field checks live in each config's ``__post_init__``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union, get_args, get_origin

import yaml

from .io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, missing or of the wrong type."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------- checks


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str, default: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float).

    ``default`` is the field's default value: a section given in part (a mapping for a
    dataclass) keeps the default's other values, not the section class's own defaults."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where, default)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}{key}: expected one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return build_config(tp, value, f"{key}.", where, default if isinstance(default, tp) else None)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
        # Given entries update the default mapping's (an arm given in part keeps its other
        # settings; new names are added), like a section given in part.
        _, val_tp = get_args(tp) or (Any, Any)
        base = default if isinstance(default, dict) else {}
        out = dict(base)
        for k, v in value.items():
            out[k] = _coerce(v, val_tp, f"{key}.{k}", where, base.get(k))
        return out
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}{key}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}{key}: expected int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key}: expected bool (true/false), got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}{key}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{where}{key}: unsupported field type {tp!r}")


def build_config(cls: type[T], data: dict, prefix: str = "", where: str = "", base: Any = None) -> T:
    """``cls`` from ``data``; fields not in ``data`` come from ``base`` (an instance: the
    parent field's default, e.g. ``field(default_factory=lambda: EvalConfig(every=1))``),
    else from ``cls``'s own defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = set(fields)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}{prefix}{unknown[0]}: unknown key for {cls.__name__} "
            f"(known: {', '.join(sorted(names))})"
        )
    kwargs = {name: getattr(base, name) for name in names - set(data)} if base is not None else {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name, where, _field_default(fields[name], base))
    # Nested dataclasses that were not given still get their defaults; checks in
    # __post_init__ raise ValueError, which we re-raise naming the section.
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _field_default(f: dataclasses.Field, base: Any) -> Any:
    if base is not None:
        return getattr(base, f.name)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


# --------------------------------------------------------------------------- overrides


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=3`` -> ("a.b", 3). The value is parsed as YAML (``x=null``, ``l=[1,2]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*", key):  # '-': mapping keys
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _check_override_keys(cls: type, dotted: str) -> None:
    node: Any = cls
    for i, k in enumerate(dotted.split(".")):
        if not dataclasses.is_dataclass(node):
            return  # inside a dict-typed field
        hints = typing.get_type_hints(node)
        if k not in hints:
            path = ".".join(dotted.split(".")[: i + 1])
            raise ConfigError(f"override {path}: unknown key for {node.__name__}")
        node = hints[k]
        if get_origin(node) in (Union, types.UnionType):
            dcs = [a for a in get_args(node) if dataclasses.is_dataclass(a)]
            node = dcs[0] if dcs else None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides."""
    data: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = f"{path}: "
        try:
            loaded = yaml_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _check_override_keys(cls, key)
        _set_dotted(data, key, value)
    return build_config(cls, data, "", where)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_help(cls: type, base: Any = None) -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, help) for every leaf field, for ``--help``.

    The help text is the ``#:`` comment or string literal following the field in the
    class source (the CleanRL convention of docstrings under fields). A nested section's
    defaults are those of the field's own default instance (``base``), e.g. PPO's
    ``generation.top_p`` 1.0, not ``GenerationConfig``'s class default.
    """
    out = []
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = _field_default(f, base)
        if dataclasses.is_dataclass(tp):
            for name, t, d, h in field_help(tp, default if isinstance(default, tp) else None):
                out.append((f"{f.name}.{name}", t, d, h))
            continue
        if base is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            default = "<required>"
        out.append((f.name, _type_name(tp), default, docs.get(f.name, "")))
    return out


def _field_docs(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    import textwrap

    tree = ast.parse(textwrap.dedent(source))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                if isinstance(nxt.value.value, str):
                    docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


# --------------------------------------------------------------------------- shared groups


@dataclasses.dataclass
class ModelConfig:
    """Which causal LM to load and how."""

    name_or_path: str = "smollm2"
    """'smollm2' (the packaged SmolLM2-135M-Instruct GGUF), 'tiny-random' (a small random Llama for tests), 'minilm' (the packaged all-MiniLM-L6-v2 encoder, a small score-model backbone), a hub id or a local directory"""
    gguf_file: Optional[str] = None
    """GGUF file name inside name_or_path, for other GGUF models (dequantised once and cached)"""
    revision: Optional[str] = None
    """hub revision (branch, tag or commit)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """'auto': bfloat16 on CUDA, float32 on CPU"""
    trust_remote_code: bool = False
    """allow model code from the hub (off: only transformers' own architectures)"""
    cache_dir: Optional[str] = None
    """where dequantised GGUF models are cached (default: $STABLE_RLHF_CACHE or ~/.cache/stable_rlhf)"""
    tiny_layers: int = 2
    """tiny-random: number of decoder layers"""
    tiny_hidden: int = 64
    """tiny-random: hidden size"""
    tiny_heads: int = 4
    """tiny-random: attention heads"""
    tiny_seed: int = 0
    """tiny-random: initialisation seed"""

    def __post_init__(self):
        if self.tiny_hidden % self.tiny_heads:
            raise ValueError(f"tiny_hidden ({self.tiny_hidden}) must be divisible by tiny_heads ({self.tiny_heads})")


@dataclasses.dataclass
class GenerationConfig:
    """Sampling responses from a policy."""

    max_new_tokens: int = 64
    """tokens generated per response"""
    temperature: float = 0.7
    """sampling temperature (0: greedy)"""
    top_p: float = 0.95
    """nucleus sampling mass"""
    batch_size: int = 32
    """prompts per generate() call"""
    system_prompt: Optional[str] = None
    """optional system message placed before every prompt in the chat template"""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
