"""A tiny registry: one per concept (datasets, teachers, methods, experiments).

An unknown name raises an error that lists the valid ones, so a typo on the command line
teaches the user what exists instead of failing deep inside a factory."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, flag: str | None = None):
        self.kind = kind
        self.flag = flag
        self._items: Dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or obj.__name__
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            where = f"{self.flag}: " if self.flag else ""
            raise ConfigError(f"{where}unknown {self.kind} {name!r}; valid: {valid}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
