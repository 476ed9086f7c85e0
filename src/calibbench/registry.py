"""Name → class registries filled by class decorators (strategies, refiners, loss terms).

One place for the rules every registry follows: a name is registered once, the class learns its
name, and an unknown name is a ConfigError listing the valid ones.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, Optional, Protocol, TypeVar

from calibbench.config import check_choice


class Named(Protocol):
    """A registrable class: it has a ``name`` (set on registration)."""

    name: str


T = TypeVar("T", bound=type[Named])


class Registry(Generic[T]):
    """``@registry.register("name")`` on a class; ``registry.get("name")`` to look it up."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # how error messages name an entry, e.g. "strategy"
        self._classes: dict[str, T] = {}

    def register(self, name: str, on_add: Optional[Callable[[T], None]] = None) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cls.name = name
            self._classes[name] = cls
            if on_add is not None:
                on_add(cls)
            return cls

        return wrap

    def available(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> T:
        check_choice(self.kind, name, self.available())
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())
