"""One registry helper for everything chosen by name in a config: backbones, pretext methods,
miners, mining spaces, data sets, stages.

    BACKBONES = Registry("model.backbone")
    @BACKBONES.register("resnet_small")
    def resnet_small(...): ...
    BACKBONES.get("resnet_smal")   # ConfigError: model.backbone 'resnet_smal' is unknown (did you mean 'resnet_small'?) ...
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from scan.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects, for the config setting `setting` (named in every error)."""

    def __init__(self, setting: str):
        self.setting = setting
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.setting} '{name}' is registered twice")
            self._items[name] = obj
            return obj
        return add

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def names(self) -> list[str]:
        return sorted(self._items)

    def in_order(self) -> list[str]:
        """Names in registration order (stages run in this order)."""
        return list(self._items)

    def check(self, name: str) -> None:
        """A ConfigError naming the setting, a close match and every choice, if `name` is unknown."""
        if name not in self._items:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{self.setting} '{name}' is unknown{hint}; choose one of {', '.join(self.names())}")

    def get(self, name: str) -> T:
        self.check(name)
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
