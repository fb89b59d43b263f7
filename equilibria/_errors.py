"""Exceptions raised by equilibria."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """NaN or infinity in the initial state or appearing while solving.

    Raised instead of returning silently wrong values. The message says where the values appeared
    (the initial state, the map's output, or the solver's own update) and in which samples.
    """
