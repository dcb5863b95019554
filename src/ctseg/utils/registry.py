"""One name → object registry for every "registered by name" table of ctseg.

Schedules, losses, backbones, models, transforms, preparers, protocols, decoders, non-finite policies
and CLI commands are all a :class:`Registry`: a read-only :class:`~collections.abc.Mapping` (so
``REG[name]``, ``name in REG``, ``sorted(REG)``, ``REG.get(name)`` work as on the dicts they replace)
filled through :meth:`Registry.register` (decorator) or :meth:`Registry.add`. What it adds over a dict:

* a name registered twice is a ``ValueError`` naming the registry and the name (two modules claiming
  one name is a programming error, and a silent overwrite would make the winner depend on import order);
* an unknown name is an :class:`UnknownNameError`, a :class:`~ctseg.errors.ConfigError` (the CLI prints
  it as one line) whose message lists the known names sorted.

Per-entry metadata (a model's description, a command's help text) lives in the registered object itself,
e.g. :class:`ctseg.models.ModelEntry`, so a registry holds one kind of value and nothing beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from ctseg.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """A name that is not in a registry.

    A :class:`ConfigError` for users (a bad name in a config or on the command line) and a
    :class:`KeyError` for the :class:`~collections.abc.Mapping` protocol, whose ``get`` and ``in`` rely
    on ``__getitem__`` raising ``KeyError``.
    """

    # KeyError's __str__ would print the message in quotes; keep the plain text of a CtsegError.
    __str__ = BaseException.__str__


class Registry(Mapping[str, T]):
    """A registry of ``T`` by name; iteration follows registration order, :meth:`names` is sorted.

    Args:
        kind: what an entry is, as users name it (``"scheduler"``, ``"seg_loss"``, ``"backbone"``): it
            starts the error messages, ``unknown scheduler 'x'; known: ...``.
        hint: appended to the unknown-name message after the list of names, for names that are
            accepted without being registered (``", or 'timm:<timm model name>'"``).
    """

    def __init__(self, kind: str, *, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name`` and return it; ``ValueError`` if the name is taken."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: a name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice (the name is taken)")
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@REG.register("name")`` above a function or class."""

        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def unknown(self, name: object) -> UnknownNameError:
        """The error for ``name`` not being registered (for callers with their own look-up rules)."""
        return UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}{self.hint}")

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable "name" from a config (a list, a dict)
            raise self.unknown(name) from None

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
