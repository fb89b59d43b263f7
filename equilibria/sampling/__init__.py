"""Equilibrium diffusion sampling: a sampler's whole trajectory as one fixed point.

DDIM over T steps is a lower-triangular fixed point over all T states at once (Pokle, Geng &
Kolter 2022, "Deep Equilibrium Approaches to Diffusion Models"); solving it with batched model
calls gives the sequential sample in fewer *rounds* of the model (Shih et al. 2023, ParaDiGMS;
Tang et al. 2024, ParaTAA). ``import equilibria.sampling`` needs only torch (diffusers is imported
by ``DDIM.from_diffusers`` only).

The pieces:

* :class:`DDIM` (a :class:`Schedule`): the sampler, diffusers' ``DDIMScheduler.step`` exactly;
* :func:`sample`: the driver loop (window, acceptance, counting, stopping) returning the sample
  and a :class:`SamplingSolution`;
* the solvers, registered in :data:`SOLVERS`: ``"sequential"`` (the reference loop),
  ``"picard"`` (cumulative Picard over all steps), ``"paradigms"`` (sliding-window Picard),
  ``"anderson"`` and ``"triangular"`` (``_anderson.py``), ``"secant"``, and ``"default"``, the
  benchmarked default (``_default.py``);
* the interface for writing a solver: :class:`SamplingSolver`, :class:`Block`, :class:`System`
  and :func:`register_solver` (see ``equilibria/sampling/_system.py``).

Example:
    >>> from equilibria import sampling
    >>> sched = sampling.DDIM(alphas_cumprod, timesteps)
    >>> x0, sol = sampling.sample(model, torch.randn(16, 2), sched, solver="picard", tol=1e-4)
    >>> sol.rounds, sol.nfe, bool(sol.converged.all())
"""

from ._anderson import Anderson, Triangular
from ._default import Default, Secant
from ._diffusers import UNetModel
from ._inversion import InversionResult, invert
from ._picard import Paradigms, Picard, Sequential, cumulative_picard
from ._sample import SamplingSolution, sample
from ._schedule import DDIM, Schedule, Thresholding
from ._system import SOLVERS, Block, SamplingSolver, System, register_solver

__all__ = [
    "DDIM",
    "SOLVERS",
    "Anderson",
    "Block",
    "Default",
    "InversionResult",
    "Paradigms",
    "Picard",
    "SamplingSolution",
    "SamplingSolver",
    "Schedule",
    "Secant",
    "Sequential",
    "System",
    "Thresholding",
    "Triangular",
    "UNetModel",
    "cumulative_picard",
    "invert",
    "register_solver",
    "sample",
]
