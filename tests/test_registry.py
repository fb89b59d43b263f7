"""The generic name registry and the shared options object of the core.

:class:`Registry` serves the solvers and the backward methods (and the samplers to come);
:class:`Options` is the one validated bundle of solve settings behind ``solve``, ``fixed_point``,
``fixed_point_states`` and ``DEQ``.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest

import equilibria as eq
from equilibria._options import Options
from equilibria._registry import Registry


class Shape:
    name: ClassVar[str] = ""


@dataclass(frozen=True)
class Square(Shape):
    side: float = 1.0
    name: ClassVar[str] = "square"


@dataclass(frozen=True)
class Circle(Shape):
    radius: float = 1.0
    name: ClassVar[str] = "circle"


def _shapes():
    shapes = Registry("shape", Shape, "Square(side=2.0)")
    shapes.register(Square)
    shapes.register(Circle)
    return shapes


def test_registry_resolves_names_and_passes_objects_through():
    shapes = _shapes()
    assert shapes.names() == ("square", "circle") and list(shapes) == ["square", "circle"]
    assert len(shapes) == 2 and shapes["circle"] is Circle and "square" in shapes
    assert shapes.resolve("circle") == Circle()
    obj = Square(side=3.0)
    assert shapes.resolve(obj) is obj
    assert repr(shapes) == "Registry('shape': 'square', 'circle')"


def _needs_k(self, k):
    self.k = k


REGISTRY_BAD = [
    (
        lambda s: s.resolve("triangle"),
        ValueError,
        "unknown shape 'triangle': valid names are 'square', 'circle', or pass an object such "
        "as Square(side=2.0)",
    ),
    (
        lambda s: s.resolve("triangle", "outline"),
        ValueError,
        "unknown outline 'triangle': valid names are",
    ),
    (
        lambda s: s.resolve(3),
        TypeError,
        "shape must be a name ('square', 'circle') or an object such as Square(side=2.0), got int",
    ),
    (lambda s: s.resolve(Square), TypeError, "got the class Square (an object is Square(...))"),
    (lambda s: s.register(int), TypeError, "a shape must be a subclass of Shape, got"),
    (lambda s: s.register(Shape), TypeError, "needs a non-empty string class attribute 'name'"),
    (
        lambda s: s.register(type("Needs", (Shape,), {"name": "needs", "__init__": _needs_k})),
        TypeError,
        "shape class Needs must be constructible without arguments to be used by name: "
        "Needs() raised",
    ),
    (
        lambda s: s.register(type("Other", (Shape,), {"name": "square"})),
        ValueError,
        "the shape name 'square' is taken by Square; pick another name or pass replace=True",
    ),
]


@pytest.mark.parametrize(("call", "exc", "fragment"), REGISTRY_BAD)
def test_registry_bad_input(call, exc, fragment):
    shapes = _shapes()
    with pytest.raises(exc) as info:
        call(shapes)
    assert fragment in str(info.value)
    assert shapes.names() == ("square", "circle")  # nothing registered on failure


def test_registry_refuses_a_class_with_abstract_methods():
    class Tool(abc.ABC):
        name: ClassVar[str] = ""

        @abc.abstractmethod
        def use(self): ...

        @abc.abstractmethod
        def clean(self): ...

    tools = Registry("tool", Tool, "Hammer()")
    with pytest.raises(TypeError, match="tool class Half does not implement clean, use"):
        tools.register(type("Half", (Tool,), {"name": "half"}))
    assert tools.names() == ()


def test_registry_replace_and_reregistering_the_same_class():
    shapes = _shapes()
    assert shapes.register(Square) is Square  # the same class again: a no-op
    other = type("Other", (Shape,), {"name": "square"})
    shapes.register(other, replace=True)
    assert shapes["square"] is other and shapes.names() == ("square", "circle")


def test_the_library_registries_are_registries():
    assert isinstance(eq.SOLVERS, Registry) and isinstance(eq.BACKWARDS, Registry)
    assert set(eq.BACKWARDS) >= {"implicit", "phantom", "neumann", "jfb", "unrolled"}
    assert set(eq.SOLVERS) >= {"picard", "anderson", "broyden"}


# --- Options ------------------------------------------------------------------------------------


def test_options_resolve_names_once_and_replace_validates():
    options = Options("broyden", "phantom", 1e-3, 20, "abs", True, False)
    assert isinstance(options.solver, eq.Broyden) and options.backward == eq.Phantom()
    assert options.replace() is options and options.replace(tol=None) is options
    tighter = options.replace(tol=1e-6, backward="jfb")
    assert (tighter.tol, tighter.backward, tighter.max_iter) == (1e-6, eq.JFB(), 20)
    assert options.tol == 1e-3  # frozen: replace makes a copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tol = 1.0  # type: ignore[misc]


OPTIONS_BAD = [
    (dict(tol=-1.0), ValueError, "tol must be in [0.0, inf), got -1.0"),
    (dict(max_iter=0), ValueError, "max_iter must be an int >= 1, got 0"),
    (dict(stop="max"), ValueError, "stop must be one of 'abs', 'rel', got 'max'"),
    (dict(warn_unconverged=1), TypeError, "warn_unconverged must be a bool"),
    (dict(compact="yes"), TypeError, "compact must be a bool"),
    (dict(solver="newton"), ValueError, "unknown solver 'newton'"),
    (dict(backward="ift"), ValueError, "unknown backward 'ift'"),
    (
        dict(backward="unrolled", compact=True),
        ValueError,
        "compact=True cannot be combined with backward='unrolled'",
    ),
]


@pytest.mark.parametrize(("kwargs", "exc", "fragment"), OPTIONS_BAD)
def test_options_bad_input_at_construction_and_in_replace(kwargs, exc, fragment):
    with pytest.raises(exc) as info:
        Options(**kwargs)
    assert fragment in str(info.value)
    # the same through replace (a DEQ's per-call overrides): compact=True stays on the base
    valid_compact = kwargs.get("compact") is True
    base = Options(compact=valid_compact)
    changes = {k: v for k, v in kwargs.items() if not (k == "compact" and valid_compact)}
    with pytest.raises(exc) as info:
        base.replace(**changes)
    assert fragment in str(info.value)
