"""Optimisation layers: blocks whose forward pass solves a small optimisation problem.

* :class:`Hamburger` / :class:`HamburgerTokens`: global context from a matrix decomposition
  (:func:`nmf`, :func:`vq`, :func:`cd`) solved by a few iterations and trained with a one-step
  gradient, in place of self-attention (Geng et al., ICLR 2021).
* :class:`StopGradientAttention`: attention whose map passes no gradient (Li et al., ECCV 2022).

Only torch and numpy are imported here.
"""

from ._decompositions import (
    DECOMPOSITIONS,
    Decomposition,
    GradMode,
    cd,
    moving_average_bases,
    nmf,
    random_bases,
    vq,
)
from ._hamburger import Hamburger, HamburgerTokens, HamKind
from ._sga import AttentionKind, StopGradientAttention, attention_map, stop_gradient_attention

__all__ = [
    "DECOMPOSITIONS",
    "AttentionKind",
    "Decomposition",
    "GradMode",
    "HamKind",
    "Hamburger",
    "HamburgerTokens",
    "StopGradientAttention",
    "attention_map",
    "cd",
    "moving_average_bases",
    "nmf",
    "random_bases",
    "stop_gradient_attention",
    "vq",
]
