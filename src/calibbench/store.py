"""Hydra's ConfigStore registration, done once by the entry points (cli, tests, benchmarks).

It lives above the stages, not in config.py, because registering imports every strategy (each
``@register`` stores its schema): config.py stays the bottom layer and imports no calibbench
module (tests/test_layers.py)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from calibbench.config import _SCHEMAS, RunConfig


def register_configs() -> None:
    """Store the schemas; strategies store theirs via ``@register`` (strategies/base.py)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for group, schema in _SCHEMAS.items():
        # Under schema/<group>, not <group>: the schemas are not options a user picks, so they
        # stay out of Hydra's "Available options in 'strategy'" list. YAMLs extend them with
        # `- /schema/<group>/base_<name>@_here_`.
        cs.store(group=f"schema/{group}", name=f"base_{group}", node=schema)
    # Importing the packages registers every strategy and refiner with its schema (the generator
    # stage's strategies and refiners live in calibbench.generative).
    import calibbench.generative  # noqa: F401
    import calibbench.refine  # noqa: F401
    import calibbench.strategies  # noqa: F401
