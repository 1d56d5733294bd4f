"""Typed configs: YAML + dotted overrides, unknown keys and wrong types rejected by name."""

import dataclasses
import re
from typing import Literal, Optional

import pytest
import yaml

from stable_rlhf.config import (
    ConfigError,
    GenerationConfig,
    ModelConfig,
    build_config,
    field_help,
    load_config,
    parse_override,
    save_config,
)


@dataclasses.dataclass
class Inner:
    lr: float = 1e-5
    """learning rate"""
    steps: int = 10
    """number of steps"""


@dataclasses.dataclass
class Outer:
    name: str = "run"
    """run name"""
    mode: Literal["a", "b"] = "a"
    """mode"""
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["x"])
    """task names"""
    seed: Optional[int] = None
    """seed"""
    inner: Inner = dataclasses.field(default_factory=Inner)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

    def __post_init__(self):
        if self.inner.steps < 1:
            raise ValueError("inner.steps must be >= 1")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "name: exp\ninner:\n  lr: 3\nmodel:\n  name_or_path: tiny-random\n")
    cfg = load_config(Outer, p, ["inner.steps=5", "tasks=[a, b]", "seed=3", "mode=b"])
    assert cfg.name == "exp" and cfg.mode == "b"
    assert cfg.inner.lr == 3.0 and isinstance(cfg.inner.lr, float)  # ints widen to float
    assert cfg.inner.steps == 5 and cfg.tasks == ["a", "b"] and cfg.seed == 3
    assert cfg.model.name_or_path == "tiny-random" and cfg.model.dtype == "auto"


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = write(tmp_path, "inner:\n  lrr: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: inner\.lrr: unknown key"):
        load_config(Outer, p)


def test_unknown_override_key_named():
    with pytest.raises(ConfigError, match=r"override inner\.nope: unknown key"):
        load_config(Outer, None, ["inner.nope=1"])
    with pytest.raises(ConfigError, match=r"override modle: unknown key"):
        load_config(Outer, None, ["modle.dtype=float32"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("inner.steps=1.5", "inner.steps"),
        ("inner.steps=true", "inner.steps"),
        ("inner.lr=fast", "inner.lr"),
        ("mode=c", "mode"),
        ("tasks=3", "tasks"),
        ("name=[1]", "name"),
        ("model.trust_remote_code=yes please", "model.trust_remote_code"),
        ("model.dtype=float64", "model.dtype"),
        # strict where YAML would slip: numbers are not strings, 1 is not true, 2.0 not an int
        ("name=3", "name"),
        ("model.trust_remote_code=1", "model.trust_remote_code"),
        ("seed=2.0", "seed"),
        ("inner.lr=true", "inner.lr"),
        ("tasks=[a, 1]", r"tasks\[1\]"),
        ("inner=3", "inner"),
    ],
)
def test_wrong_types_named(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: expected"):
        load_config(Outer, None, [override])


def test_cross_field_check_names_section():
    with pytest.raises(ConfigError, match="inner.steps must be >= 1"):
        load_config(Outer, None, ["inner.steps=0"])
    with pytest.raises(ConfigError, match="model: tiny_hidden"):
        load_config(Outer, None, ["model.tiny_hidden=30", "model.tiny_heads=4"])
    with pytest.raises(ConfigError, match="top_p"):
        load_config(GenerationConfig, None, ["top_p=0"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Outer, write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, write(tmp_path, "- 1\n- 2\n"))


def test_override_parsing():
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a=1e-3") == ("a", 1e-3)
    assert parse_override("a=hello world") == ("a", "hello world")
    assert parse_override("a=3") == ("a", 3) and parse_override("a=-2.5E+2") == ("a", -250.0)
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["inner.steps=7", "model.name_or_path=tiny-random"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Outer, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["inner"]["steps"] == 7


def test_field_help_reads_docstrings():
    rows = {name: (tp, default, doc) for name, tp, default, doc in field_help(Outer)}
    assert rows["inner.lr"] == ("float", 1e-5, "learning rate")
    assert "packaged SmolLM2" in rows["model.name_or_path"][2]


@dataclasses.dataclass
class WithCustomDefault:
    inner: Inner = dataclasses.field(default_factory=lambda: Inner(lr=0.5, steps=7))
    gen: GenerationConfig = dataclasses.field(default_factory=lambda: GenerationConfig(max_new_tokens=48, top_p=1.0))


def test_partial_section_keeps_the_fields_own_default(tmp_path):
    # Overriding one key of a section must not reset its other keys to the section class's
    # defaults (PPO's `rehearsal.data=...` used to drop rehearsal.coef from 0.01 to 0).
    cfg = load_config(WithCustomDefault, None, ["inner.steps=3", "gen.batch_size=4"])
    assert (cfg.inner.lr, cfg.inner.steps) == (0.5, 3)
    assert (cfg.gen.max_new_tokens, cfg.gen.top_p, cfg.gen.batch_size) == (48, 1.0, 4)
    cfg = load_config(WithCustomDefault, write(tmp_path, "gen:\n  temperature: 0.3\n"))
    assert (cfg.gen.max_new_tokens, cfg.gen.top_p, cfg.gen.temperature) == (48, 1.0, 0.3)
    assert load_config(WithCustomDefault).inner == Inner(lr=0.5, steps=7)


def test_field_help_shows_the_fields_own_section_defaults():
    rows = {name: default for name, _, default, _ in field_help(WithCustomDefault)}
    assert rows["inner.lr"] == 0.5 and rows["inner.steps"] == 7
    assert rows["gen.max_new_tokens"] == 48 and rows["gen.top_p"] == 1.0


def test_optional_fields_take_null(tmp_path):
    assert load_config(Outer, write(tmp_path, "seed: 3\n"), ["seed=null"]).seed is None
    assert load_config(Outer, None, ["model.revision=null"]).model.revision is None


def test_every_error_names_file_key_path_and_value(tmp_path):
    p = write(tmp_path, "inner:\n  steps: 1.5\ntasks: [a, 2]\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    lines = str(e.value).splitlines()  # all of them, not only the first
    assert len(lines) == 2
    assert re.fullmatch(rf"{re.escape(str(p))}: tasks\[1\]: expected .*, got 2", lines[0])
    assert re.fullmatch(rf"{re.escape(str(p))}: inner\.steps: expected .*, got 1\.5", lines[1])
    # a bad value an override gave names the override, not the file
    with pytest.raises(ConfigError, match=r"^override inner\.lr: expected .*, got 'fast'$"):
        load_config(Outer, p, ["inner.steps=2", "tasks=[a]", "inner.lr=fast"])


@dataclasses.dataclass
class WithArms:
    arms: dict[str, Inner] = dataclasses.field(default_factory=lambda: {"a": Inner(lr=0.5, steps=7)})
    """sections by name (like the ablation's arms)"""
    sizes: dict[str, int] = dataclasses.field(default_factory=lambda: {"x": 1})
    """plain values by name"""


def test_dict_field_entries_update_the_default_mapping():
    # an entry given in part keeps its other default settings; new names are added
    cfg = load_config(WithArms, None, ["arms.a.steps=3", "arms.b-new.lr=2", "sizes.y=2"])
    assert cfg.arms == {"a": Inner(lr=0.5, steps=3), "b-new": Inner(lr=2.0, steps=10)}
    assert cfg.sizes == {"x": 1, "y": 2}
    with pytest.raises(ConfigError, match=r"override sizes\.y: expected"):
        load_config(WithArms, None, ["sizes.y=true"])


def test_unknown_key_inside_a_dict_of_sections_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^override arms\.a\.lrr: unknown key for Inner \(known: lr, steps\)$"):
        load_config(WithArms, None, ["arms.a.lrr=1"])
    with pytest.raises(ConfigError, match=r"c\.yaml: arms\.b\.lrr: unknown key for Inner"):
        load_config(WithArms, write(tmp_path, "arms:\n  b:\n    lrr: 1\n"))


def test_build_config_prefixes_paths_and_starts_from_base():
    # ablation.py builds each arm's trainer config this way
    with pytest.raises(ConfigError, match=r"^arms\.x: inner\.nope: unknown key for Inner"):
        build_config(Outer, {"inner": {"nope": 1}}, "arms.x: ")
    with pytest.raises(ConfigError, match=r"^arms\.x: inner\.steps must be >= 1$"):  # Outer.__post_init__
        build_config(Outer, {"inner": {"steps": 0}}, "arms.x: ")
    with pytest.raises(ConfigError, match=r"^score\.inner: expected"):
        build_config(Outer, {"inner": [1]}, "score.")
    assert build_config(Inner, {"steps": 2}, base=Inner(lr=0.25)) == Inner(lr=0.25, steps=2)
