"""Matrix decompositions solved by a few iterations: the "ham" of the Hamburger.

Each function factorises a batch of matrices X ∈ R^{d×n} (d features, n positions) as X ≈ D Cᵀ with
bases D ∈ R^{d×r} and coefficients C ∈ R^{n×r}, running ``steps`` alternating updates of C and D and
one final update of C. Three gradients (``grad=``), named like the core's backward methods:

* ``"one_step"`` (the paper's): the earlier updates run in place under ``torch.no_grad`` and only
  the final C update is differentiated, with D and the previous C held constant (memory
  independent of ``steps``). No gradient reaches x through the bases.
* ``"jfb"`` (Jacobian-free, like :class:`equilibria.JFB`): the first ``steps - 1`` updates run
  without gradient and the last full update of both factors (C, then D) and the final C update are
  differentiated from that detached iterate, so the gradient also flows through the bases; memory
  is still independent of ``steps``.
* ``"phantom"`` (like :class:`equilibria.Phantom` with ``damping=1``): the last ``grad_steps``
  full updates and the final C update are differentiated from the detached iterate before them;
  memory grows with ``grad_steps``, not with ``steps``. ``"jfb"`` is ``"phantom"`` with
  ``grad_steps=1``.
* ``"unrolled"`` (like :class:`equilibria.Unrolled`; ``"bptt"`` is an alias): autograd records
  every update, memory grows with ``steps``.

NMF's "detached" iterate can keep its dependence on the initialisation (``grad_init=True``). The
multiplicative updates make C_k = C_0 ⊙ R_k with R_k the product of the update ratios, so the
dependence of the initial C_0 = softmax(inv_t · XᵀD_0) on x survives every update; BPTT keeps
it. With ``grad_init`` the iterate the recorded updates start from is C_0 ⊙ sg(R) (its value
unchanged; sg: stop-gradient), i.e. the ratios of the no-grad updates are held constant, as the
paper's one-step gradient holds D constant. It costs one (B, n, r) product, and memory stays
independent of ``steps``.

Reference: Z. Geng, M.-H. Guo, H. Chen, X. Li, K. Wei, Z. Lin, "Is Attention Better Than Matrix
Decomposition?", ICLR 2021, §2.2 (NMF, VQ, CD) and §2.3 (one-step gradient); S. W. Fung et al.,
"JFB: Jacobian-Free Backpropagation for Implicit Networks", AAAI 2022.

The solvers live by idea: the shared setup (validation, bases, dtype helpers) in :mod:`._common`,
NMF in :mod:`._nmf`, VQ and CD in :mod:`._clusters`; this module gathers them and names them in
:data:`DECOMPOSITIONS`.
"""

from __future__ import annotations

from collections.abc import Callable

from ._clusters import cd, vq
from ._common import Decomposition, GradMode, moving_average_bases, random_bases
from ._common import _check_finite as _check_finite  # re-exported: _sga imports it from here
from ._common import _problem as _problem  # re-exported: the tests build problems from here
from ._nmf import nmf

__all__ = [
    "DECOMPOSITIONS",
    "Decomposition",
    "GradMode",
    "cd",
    "moving_average_bases",
    "nmf",
    "random_bases",
    "vq",
]


DECOMPOSITIONS: dict[str, Callable[..., Decomposition]] = {"nmf": nmf, "vq": vq, "cd": cd}
"""The decompositions by name, as accepted by ``Hamburger(ham=...)``."""
