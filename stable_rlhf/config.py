"""Typed dataclass configs read from YAML with dotted ``key=value`` overrides.

Every stage has one ``@dataclass`` config; shared groups (``model``, ``generation``,
...) are nested dataclasses. A field's docstring-style comment is its help text
(``stable-rlhf <stage> --help`` prints them). ``load_config`` rejects unknown keys and
wrong types with a message naming the key (and the file it came from), before any
work starts; cross-field checks live in each config's ``__post_init__``.

Type checking is pydantic's (``TypeAdapter`` over the plain dataclasses, in strict JSON
mode); this module only merges the given values onto the defaults and words the errors.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar, Union, get_args, get_origin

import pydantic
import pydantic_core
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


# --------------------------------------------------------------------------- building


def build_config(cls: type[T], data: dict, prefix: str = "", where: str = "", base: Any = None) -> T:
    """``cls`` from ``data``; ``where`` and ``prefix`` lead the key path in error messages.

    A field not given keeps ``base``'s value (an instance: the parent field's default, e.g.
    ``field(default_factory=lambda: EvalConfig(every=1))``), else its own default; a
    section or mapping given in part keeps the rest of that default."""
    return _build(cls, data, base, lambda path: where + ((prefix + path).rstrip(". :") or cls.__name__))


def _build(cls: type[T], data: dict, base: Any, name: Callable[[str], str]) -> T:
    """``name`` words where a key path (``inner.steps``, ``tasks[0]``, '' for ``cls``) came from."""
    merged = _merge(pydantic_core.to_jsonable_python(_defaults(cls, base)), pydantic_core.to_jsonable_python(data))
    # Strict JSON mode is our rule set for YAML values: a bool is not an int, an int is a
    # float (widened), a number is not a str, and a section is a mapping of known keys.
    # (Strict *Python* mode would want dataclass instances, not mappings.)
    try:
        return _adapter(cls).validate_json(pydantic_core.to_json(merged), strict=True, extra="forbid")
    except pydantic.ValidationError as e:
        lines = [f"{name(_dotted(err['loc']))}: {_message(cls, err)}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def _defaults(cls: type, base: Any = None) -> dict[str, Any]:
    """Each field's value when not given: ``base``'s, else the field's default (required
    fields are left out)."""
    if base is not None:
        return {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def _merge(base: Any, given: Any) -> Any:
    """``given`` over ``base``, mappings merged key by key: a section or an entry of a
    dict-typed field (an ablation arm) given in part keeps its other default values."""
    if not (isinstance(base, dict) and isinstance(given, dict)):
        return given
    return {**base, **{k: _merge(base.get(k), v) for k, v in given.items()}}


def _dotted(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _message(cls: type, err: dict) -> str:
    if err["type"] == "unexpected_keyword_argument":  # extra="forbid" on a dataclass
        section = _section_at(cls, err["loc"][:-1])
        known = ", ".join(sorted(f.name for f in dataclasses.fields(section)))
        return f"unknown key for {section.__name__} (known: {known})"
    if err["type"] == "value_error":  # a __post_init__ check
        return str(err.get("ctx", {}).get("error", err["msg"]))
    expected = err["msg"].removeprefix("Input should be ")
    return f"expected {expected}, got {err['input']!r}" if expected != err["msg"] else err["msg"]


def _section_at(cls: type, loc: tuple) -> type:
    """The dataclass at ``loc`` (field names, mapping keys, list indices) inside ``cls``."""
    tp = cls
    for part in loc:
        tp = typing.get_type_hints(tp)[part] if dataclasses.is_dataclass(tp) else get_args(tp)[-1]
        if get_origin(tp) in (Union, types.UnionType):  # Optional[X] -> X
            tp = next(a for a in get_args(tp) if a is not type(None))
    return tp


# --------------------------------------------------------------------------- files and overrides


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


def _read_yaml(path: Path) -> dict:
    try:
        loaded = yaml_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    where = f"{path}: " if path is not None else ""
    keys = []
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
        keys.append(key)

    def name(key_path: str) -> str:
        # An error at, inside or just above (an unknown section) a key an override set
        # names the override; any other, the file.
        if key_path and any(_under(key_path, k) or _under(k, key_path) for k in keys):
            return f"override {key_path}"
        return where + (key_path or cls.__name__)

    return _build(cls, data, None, name)


def _under(path: str, key: str) -> bool:
    return path == key or path.startswith((key + ".", key + "["))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- help


def field_help(cls: type, base: Any = None) -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, help) for every leaf field, for ``--help``.

    The help text is the string literal following the field in the class source (the
    CleanRL convention of docstrings under fields). A nested section's defaults are those
    of the field's own default instance (``base``), e.g. PPO's ``generation.top_p`` 1.0,
    not ``GenerationConfig``'s class default.
    """
    out = []
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    defaults = _defaults(cls, base)
    for f in dataclasses.fields(cls):
        tp, default = hints[f.name], defaults.get(f.name, "<required>")
        if dataclasses.is_dataclass(tp):
            nested = field_help(tp, default if isinstance(default, tp) else None)
            out += [(f"{f.name}.{name}", t, d, h) for name, t, d, h in nested]
        else:
            out.append((f.name, _type_name(tp), default, docs.get(f.name, "")))
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of ``cls`` and of the config classes it extends (its own win)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    body = ast.parse(textwrap.dedent(source)).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
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
