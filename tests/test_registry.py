"""registry.Registry: the rules shared by strategies, refiners and loss terms."""

from __future__ import annotations

import pytest

from calibbench.config import ConfigError
from calibbench.registry import Registry


def test_register_names_the_class_and_lists_sorted():
    reg: Registry = Registry("widget")

    @reg.register("b")
    class B:
        pass

    @reg.register("a")
    class A:
        pass

    assert (A.name, B.name) == ("a", "b") and reg.available() == ["a", "b"] and "a" in reg
    assert reg.get("b") is B
    reg.register("a")(A)  # the same class again (a module imported twice) is fine


def test_a_second_class_under_one_name_and_an_unknown_name_are_errors():
    reg: Registry = Registry("widget")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(type("Other", (), {}))
    with pytest.raises(ConfigError, match=r"unknown widget 'z'; valid choices: a"):
        reg.get("z")


def test_every_project_registry_uses_it():
    from calibbench import refine, strategies
    from calibbench.generative.terms import GEN_TERMS
    from calibbench.refine.losses import TERMS

    assert {"dsg", "gdfq", "random", "selectq", "zeroq"} <= set(strategies.available())
    assert {"gdfq", "kd", "none", "plf"} <= set(refine.available())
    assert {"ce", "feature", "kd", "plf_high", "plf_low", "plf_mse"} <= set(TERMS.available())
    assert {"bns", "ce"} <= set(GEN_TERMS.available())
