"""equilibria: implicit layers for PyTorch.

Fixed-point solvers with per-sample stopping, differentiable equilibria with exact and inexact
gradients, and the DEQ module. ``import equilibria`` needs only torch and numpy.

Example:
    >>> import equilibria as eq
    >>> z, sol = eq.fixed_point(f, z0, solver="anderson", backward="implicit")
"""

from ._backward import JFB, Backward, Implicit, Neumann, Phantom, Unrolled
from ._deq import DEQ
from ._errors import NonFiniteError
from ._fixed_point import correction_loss, fixed_point, fixed_point_states, solve
from ._solution import BackwardInfo, Solution, Status
from ._solvers import Anderson, Broyden, Picard, Solver

__version__ = "0.1.0"

SOLVERS = ("picard", "anderson", "broyden")
BACKWARDS = ("implicit", "phantom", "neumann", "jfb", "unrolled")

__all__ = [
    "BACKWARDS",
    "DEQ",
    "JFB",
    "SOLVERS",
    "Anderson",
    "Backward",
    "BackwardInfo",
    "Broyden",
    "Implicit",
    "Neumann",
    "NonFiniteError",
    "Phantom",
    "Picard",
    "Solution",
    "Solver",
    "Status",
    "Unrolled",
    "__version__",
    "correction_loss",
    "fixed_point",
    "fixed_point_states",
    "solve",
]
