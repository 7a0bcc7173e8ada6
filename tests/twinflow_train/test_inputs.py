"""The typed-input language (twinflow_train/inputs.py) on its own: a section that is no trainer config, read
the way every input file of the project is; and the names the trainer's code imports from config are its own."""

from __future__ import annotations

from typing import Literal

import pytest

import twinflow_train.config as config
import twinflow_train.inputs as inputs
from twinflow_train.inputs import ConfigError, Where, at_least, checked, from_dict, raise_problems, section

LANGUAGE = ("ConfigError", "SectionProblems", "Where", "at_least", "checked", "deep_merge", "from_dict",
            "literal_values", "parse_overrides", "raise_problems", "section", "set_dotted")


@section
class Plan:
    """A made-up input section: what a harness format declares."""

    name: str = checked(check=lambda v: None if v.strip() else "expected a non-empty name", missing="a name")
    waves: int = checked(3, check=at_least(1))
    mode: Literal["fast", "slow"] = "fast"
    limit: float | None = None

    def __post_init__(self) -> None:
        raise_problems([("limit", "needs mode 'slow'")] if self.limit is not None and self.mode != "slow" else [])


def test_a_section_of_another_file_reports_every_problem_at_once_naming_file_and_key():
    assert from_dict(Plan, {"name": "p", "waves": 2}, Where(file="plan.yaml")) == Plan(name="p", waves=2)
    with pytest.raises(ConfigError) as e:
        from_dict(Plan, {"waves": 0, "mode": "quick", "extra": 1}, Where(file="plan.yaml"))
    text = "\n".join(e.value.problems)
    assert "plan.yaml: unknown top-level key 'extra'" in text
    assert "plan.yaml, key 'waves': expected an integer >= 1, got 0" in text
    assert "plan.yaml, key 'mode': unknown value 'quick'" in text
    assert "plan.yaml: 'name' is missing (a name)" in text
    with pytest.raises(ConfigError, match="plan.yaml, key 'limit': needs mode 'slow'"):
        from_dict(Plan, {"name": "p", "limit": 1.0}, Where(file="plan.yaml"))
    with pytest.raises(ValueError, match="mode: unknown value 'quick'"):  # however the section is built
        Plan(name="p", mode="quick")


def test_config_gives_the_languages_own_names():
    """Every ``from twinflow_train.config import from_dict`` keeps working, and is the language's function."""
    for name in LANGUAGE:
        assert getattr(config, name) is getattr(inputs, name), name
    assert config.literal_values(config.RlConfig, "schedule") == inputs.literal_values(config.RlConfig, "schedule")
