"""The parts of a configuration message an operator acts on: where a setting's value came
from (the file, an environment variable, a command-line flag or the default) and, for a
setting with a fixed set of values, which values it takes.

``Origins`` is filled by ``proxy.config.load`` layer by layer, so the last layer to set a
key is its origin; errors and start-up messages name that origin instead of the file.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal

import msgspec

FLAG_FOR_KEY = {
    "server.listen": "--listen",
    "server.workers": "--workers",
    "log.level": "--log-level",
}
"""The ``switchboard run`` flags that override a config key."""

_INDEX = re.compile(r"\[\d+\]")


class Origins:
    """Config key (``section.key``) -> where its value came from."""

    def __init__(self) -> None:
        self._by_key: dict[str, str] = {}
        self.file: str | None = None
        """The config file read, if any."""

    def record(self, key: str, origin: str) -> None:
        self._by_key[key] = origin

    def origin_of(self, key: str) -> str | None:
        """The origin of ``key`` or of the setting it is part of (``server.listen`` for
        ``server.listen[1]``); None for a default."""
        candidate = key
        while candidate:
            found = self._by_key.get(candidate)
            if found is not None:
                return found
            cut = max(candidate.rfind("."), candidate.rfind("["))
            candidate = candidate[:cut] if cut > 0 else ""
        return None

    def describe(self, key: str) -> str:
        """``key`` and where it was set, for a message: ``server.listen in FILE``,
        ``server.listen from SWITCHBOARD_SERVER__LISTEN``, ``--listen``, or ``demo.listen,
        the default``."""
        origin = self.origin_of(key)
        if origin is None:
            return f"{key}, the default"
        if origin.startswith("--"):
            return origin
        if origin.startswith("environment variable "):
            return f"{key} from {origin.removeprefix('environment variable ')}"
        return f"{key} in {origin}"


def _literal_choices(kind: Any) -> tuple[str, ...] | None:
    if typing.get_origin(kind) is Literal:
        return tuple(str(v) for v in typing.get_args(kind))
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        for member in typing.get_args(kind):
            found = _literal_choices(member)
            if found is not None:
                return found
    return None


def _field_type(root: type[msgspec.Struct], key: str) -> Any:
    """The annotated type of the setting at ``key`` (``routes[0].kind``) under ``root``."""
    kind: Any = root
    for part in _INDEX.sub("", key).split("."):
        hints = typing.get_type_hints(kind) if isinstance(kind, type) else {}
        if part not in hints:
            return None
        kind = hints[part]
        if typing.get_origin(kind) is tuple:  # routes: tuple[RouteConfig, ...]
            kind = typing.get_args(kind)[0]
    return kind


def enum_choices(root: type[msgspec.Struct], key: str) -> tuple[str, ...] | None:
    """The values the setting at ``key`` may take, when it is a fixed set."""
    return _literal_choices(_field_type(root, key))
