"""Names as a convenience, objects as the truth: one registry type for every pluggable kind.

Solvers, backward methods (and the samplers to come) are small classes with a ``name``; a
:class:`Registry` maps those names to the classes, turns a name or an object into an object, and
words the "valid names are ..." error once for all of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, type[T]], Generic[T]):
    """Name -> class table of one kind of object (a read-only mapping plus :meth:`register`).

    Args:
        kind: what the objects are, for messages (``"backward"``, ``"solver"``).
        base: the class every registered class and every resolved object derives from.
        example: an example object for messages (``"eq.Anderson(m=6)"``).

    Example:
        >>> BACKWARDS = Registry("backward", Backward, "eq.Phantom(steps=5, damping=0.5)")
        >>> BACKWARDS.register(Phantom)
        >>> BACKWARDS.resolve("phantom")  # Phantom()
    """

    def __init__(self, kind: str, base: type[T], example: str) -> None:
        self.kind = kind
        self.base = base
        self.example = example
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T], *, replace: bool = False) -> type[T]:
        """Add ``cls`` under ``cls.name`` (usable as a class decorator); returns ``cls``.

        The class must derive from the base, have a non-empty string ``name``, implement every
        abstract method and be constructible without arguments (a name stands for the class's
        defaults). A name already taken by another class is refused unless ``replace=True``.
        """
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(
                f"a {self.kind} must be a subclass of {self.base.__name__}, got {cls!r}"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"a {self.kind} class needs a non-empty string class attribute 'name', "
                f"{cls.__name__} has {name!r}"
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))  # type: ignore[attr-defined]
            raise TypeError(f"{self.kind} class {cls.__name__} does not implement {missing}")
        try:
            cls()
        except TypeError as err:
            raise TypeError(
                f"{self.kind} class {cls.__name__} must be constructible without arguments to "
                f"be used by name: {cls.__name__}() raised {err}"
            ) from None
        taken = self._classes.get(name)
        if taken is not None and taken is not cls and not replace:
            raise ValueError(
                f"the {self.kind} name {name!r} is taken by {taken.__name__}; pick another name "
                "or pass replace=True"
            )
        self._classes[name] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._classes)

    def _quoted(self) -> str:
        return ", ".join(repr(k) for k in self._classes)

    def resolve(self, value: Any, argument: str | None = None) -> T:
        """Turn a registered name (default options) or an object into an object.

        Args:
            value: a name or an instance of the base class.
            argument: the argument's name in messages (default: the kind).
        """
        argument = argument or self.kind
        if isinstance(value, self.base):
            return value
        if isinstance(value, str):
            cls = self._classes.get(value)
            if cls is None:
                raise ValueError(
                    f"unknown {argument} {value!r}: valid names are {self._quoted()}, "
                    f"or pass an object such as {self.example}"
                )
            return cls()
        got = (  # a class where an object is expected: say which, and how to make one
            f"the class {value.__name__} (an object is {value.__name__}(...))"
            if isinstance(value, type)
            else type(value).__name__
        )
        raise TypeError(
            f"{argument} must be a name ({self._quoted()}) or an object such as {self.example}, "
            f"got {got}"
        )

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {self._quoted()})"
