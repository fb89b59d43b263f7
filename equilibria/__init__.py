"""equilibria: implicit layers for PyTorch.

Fixed-point solvers with per-sample stopping, differentiable equilibria with exact and inexact
gradients, and the DEQ module. ``import equilibria`` needs only torch and numpy.

Example:
    >>> import equilibria as eq
    >>> z, sol = eq.fixed_point(f, z0, solver="anderson", backward="implicit")
"""

from . import layers, sampling
from ._backward import (
    BACKWARDS,
    JFB,
    Backward,
    Implicit,
    Neumann,
    Phantom,
    Unrolled,
    register_backward,
)
from ._deq import DEQ
from ._diagnostics import GradientAgreement, gradient_agreement, plot_convergence
from ._dropout import VariationalDropout, batch_index, reset_dropout
from ._errors import NonFiniteError
from ._fixed_point import correction_loss, fixed_point, fixed_point_states, solve
from ._norms import (
    apply_norm,
    from_torchdeq_state_dict,
    norm_cache,
    remove_norm,
    torchdeq_state_dict,
)
from ._solution import BackwardInfo, Solution, Status
from ._solvers import SOLVERS, Anderson, Broyden, Picard, Solver, Step, register_solver
from ._stabilisers import jacobian_penalty, spectral_radius

__version__ = "0.1.0"

# SOLVERS and BACKWARDS are the registries (iterating gives the names, in registration order);
# register_solver and register_backward add a class to them

__all__ = [
    "BACKWARDS",
    "DEQ",
    "JFB",
    "SOLVERS",
    "Anderson",
    "Backward",
    "BackwardInfo",
    "Broyden",
    "GradientAgreement",
    "Implicit",
    "Neumann",
    "NonFiniteError",
    "Phantom",
    "Picard",
    "Solution",
    "Solver",
    "Status",
    "Step",
    "Unrolled",
    "VariationalDropout",
    "__version__",
    "apply_norm",
    "batch_index",
    "correction_loss",
    "fixed_point",
    "fixed_point_states",
    "from_torchdeq_state_dict",
    "gradient_agreement",
    "jacobian_penalty",
    "layers",
    "norm_cache",
    "plot_convergence",
    "register_backward",
    "register_solver",
    "remove_norm",
    "reset_dropout",
    "sampling",
    "solve",
    "spectral_radius",
    "torchdeq_state_dict",
]
