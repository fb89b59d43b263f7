"""``sample``: solve a sampler's joint fixed point with any registered solver (the driver loop).

The loop owns the sliding window, acceptance, counting, traces and stopping (see
``equilibria/sampling/_system.py`` for the system and the solver interface).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._errors import NonFiniteError
from .._validate import check_bool, check_float, check_int
from ._schedule import Schedule
from ._system import SOLVERS, Block, Model, SamplingSolver, System


@dataclass(frozen=True)
class SamplingSolution:
    """What :func:`sample` returns besides the sample.

    Attributes:
        sample: (N, *shape) the final state ``X[T]`` (the sample ``x_0``), as returned first.
        trajectory: (T+1, N, *shape) every state, ``trajectory[0] = x_T``; pass it as ``init=``
            to warm-start a related solve.
        rounds: sequential batched model evaluations (what costs wall-clock on parallel
            hardware); the sequential loop takes T.
        nfe: model evaluations of single samples at single timesteps, over all ranks (T·N for
            the sequential loop).
        calls: model invocations on this rank (``chunk=`` splits a round into several).
        converged: (N,) bool on the CPU, whether every step of the sample was accepted.
        residuals: (N, T) float64 on the CPU, each step's residual in the solver's rule when it
            was accepted (0 for steps set exactly from their accepted input, NaN for steps not
            accepted when ``max_rounds`` ran out).
        trace: (rounds,) float64 on the CPU, the largest residual over the evaluated pairs of
            each round.
        residual_history: (rounds, N, T) float64 on the CPU, every pair's residual per round
            (NaN where not evaluated), with ``trace=True``; else None.
        sample_history: (rounds, N, *shape) ``X[T]`` after each round, with ``trace=True``;
            else None.
        solver: the solver's name.
        tol: the tolerance (ignored by the sequential loop).
        window: the active window used.
    """

    sample: Tensor
    trajectory: Tensor
    rounds: int
    nfe: int
    calls: int
    converged: Tensor
    residuals: Tensor
    trace: Tensor
    residual_history: Tensor | None
    sample_history: Tensor | None
    solver: str
    tol: float
    window: int

    def __repr__(self) -> str:
        T = self.trajectory.shape[0] - 1
        return (
            f"SamplingSolution(solver={self.solver!r}, rounds={self.rounds}, nfe={self.nfe}, "
            f"converged={int(self.converged.sum())}/{self.converged.numel()}, T={T}, "
            f"window={self.window}, tol={self.tol:g})"
        )


def _resolve_solver(solver: Any, options: dict[str, Any]) -> SamplingSolver:
    if options:
        if not isinstance(solver, str):
            raise TypeError(
                f"solver options {sorted(options)} need a solver given by name; pass them to "
                f"the object instead (got {type(solver).__name__})"
            )
        cls = SOLVERS[solver] if solver in SOLVERS else None
        if cls is None:
            return SOLVERS.resolve(solver, "solver")  # raises, listing the names
        fields = (
            {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        )
        unknown = sorted(set(options) - fields)
        if unknown:
            allowed = ", ".join(sorted(fields)) or "none"
            raise TypeError(
                f"unknown option(s) {unknown} for solver {solver!r}: it takes {allowed}"
            )
        return cls(**options)
    return SOLVERS.resolve(solver, "solver")


def _check_tensor(name: str, value: Any, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor of shape {shape}, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"{name} contains NaN or infinity")
    return value.detach().to(like.device, like.dtype)


@torch.no_grad()
def sample(
    model: Model,
    x_T: Tensor,
    sched: Schedule,
    *,
    solver: str | SamplingSolver = "default",
    tol: float = 1e-3,
    max_rounds: int | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    window: int | None = None,
    chunk: int | None = None,
    init: Tensor | None = None,
    process_group: Any = None,
    trace: bool = False,
    **solver_options: Any,
) -> tuple[Tensor, SamplingSolution]:
    """Sample by solving the whole trajectory as one fixed point, in parallel over timesteps.

    Each *round* evaluates the model once, batched over every active (sample, timestep) pair;
    the solver proposes the next trajectory; per sample, the leading steps whose residual is at
    most ``tol`` are accepted and the first failing one is set exactly. The fixed point is the
    sequential trajectory (Pokle et al. 2022; Shih et al. 2023; Tang et al. 2024).

    Args:
        model: ``model(x, t)`` with x (M, *shape) and t (M,) int64, returning a tensor shaped
            like x (what ``sched.prediction_type`` says).
        x_T: (N, *shape) the initial noise, floating point.
        sched: the sampler, e.g. :class:`equilibria.sampling.DDIM`.
        solver: a registered name (``sampling.SOLVERS``) or a solver object; ``"default"`` is
            the benchmarked default.
        tol: the tolerance of the solver's residual rule, > 0 (ignored by ``"sequential"``).
        max_rounds: stop after this many rounds (the solution says which samples converged;
            not an error). None: no limit (every round accepts a step, so at most T).
        noise: (T, N, *shape) standard normal noise for stochastic samplers (``noise[k]`` is
            the noise of step ``k``); or draw it with ``generator``.
        generator: draws ``noise`` at once, shape (T, N, *shape), when it is not given.
        window: at most this many active steps per sample and round (ParaDiGMS' sliding
            window; bounds the model's batch at ``N * window``). None: the solver's default.
        chunk: at most this many rows per model call (rounds are unchanged).
        init: (T+1, N, *shape) a trajectory to start from (warm start; ``init[0]`` is ignored,
            ``x_T`` is used).
        process_group: a ``torch.distributed`` process group (or ``torch.distributed.group.WORLD``)
            over whose ranks each round's model calls are split; every rank passes the same
            ``x_T``, noise and options and gets the same result.
        trace: also record every round's residuals and final state (see
            :class:`SamplingSolution`).
        **solver_options: options of a solver given by name (``window`` of ``"paradigms"``...).

    Returns:
        ``(x_0, solution)``: the sample (N, *shape) and a :class:`SamplingSolution`.

    Example:
        >>> x0, sol = sampling.sample(model, torch.randn(8, 2), sched, solver="picard")
        >>> sol.rounds, sol.nfe, sol.converged.all()
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    if not isinstance(sched, Schedule):
        raise TypeError(
            "sched must be a sampling schedule such as sampling.DDIM(alphas_cumprod, timesteps), "
            f"got {type(sched).__name__}"
        )
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.ndim < 2:
        got = (
            f"shape {tuple(x_T.shape)} {x_T.dtype}"
            if isinstance(x_T, Tensor)
            else type(x_T).__name__
        )
        raise ValueError(f"x_T must be a floating-point tensor (N, *sample_shape), got {got}")
    if x_T.numel() == 0:
        raise ValueError(
            f"x_T must hold at least one sample of at least one element, got shape "
            f"{tuple(x_T.shape)}"
        )
    if not torch.isfinite(x_T).all():
        raise NonFiniteError("x_T contains NaN or infinity")
    sol_obj = _resolve_solver(solver, solver_options)
    tol = check_float("tol", tol, low=0.0)
    if max_rounds is not None:
        check_int("max_rounds", max_rounds, minimum=1)
    T, N, shape = len(sched), x_T.shape[0], tuple(x_T.shape[1:])
    if window is None:
        window = sol_obj.default_window(T)
    check_int("window", window, minimum=1)
    if sol_obj.exact and window != 1:
        raise ValueError(
            f"the {sol_obj.name!r} solver takes one step per round, got window={window}"
        )
    window = min(window, T)
    if chunk is not None:
        check_int("chunk", chunk, minimum=1)
    check_bool("trace", trace)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    full = (T, N, *shape)
    if sched.stochastic:
        if noise is not None and generator is not None:
            raise ValueError("pass noise or generator, not both")
        if noise is None:
            g_dev = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(full, generator=generator, dtype=x_T.dtype, device=g_dev)
        noise = _check_tensor("noise", noise, full, x_T)
    elif noise is not None or generator is not None:
        raise ValueError(
            "noise and generator are only used by stochastic samplers (eta > 0); this sampler "
            "is deterministic"
        )
    if process_group is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group needs an initialised torch.distributed")

    system = System(model, sched, noise, chunk, process_group, T, N, shape)
    X = x_T.detach().new_empty((T + 1, *full[1:]))  # (T+1, N, *shape)
    X[0] = x_T
    dev = x_T.device
    if init is not None:
        X[1:] = _check_tensor("init", init, (T + 1, *full[1:]), x_T)[1:]
        frontier = torch.full((N,), T, dtype=torch.long, device=dev)
    else:
        X[1:] = x_T.unsqueeze(0)
        frontier = torch.zeros(N, dtype=torch.long, device=dev)  # rows above are placeholders
    lo = torch.zeros(N, dtype=torch.long, device=dev)
    R = torch.full((T, N), float("nan"), dtype=torch.float64, device=dev)
    state = sol_obj.init(system)
    steps = torch.arange(T + 1, device=dev)
    cols = torch.arange(N, device=dev)
    traces: list[Tensor] = []
    res_hist: list[Tensor] = []
    smp_hist: list[Tensor] = []
    tol_eff = 0.0 if sol_obj.exact else tol
    while True:
        lo_min = int(lo.min())
        if lo_min >= T or (max_rounds is not None and system.rounds >= max_rounds):
            break
        hi = (lo + window).clamp(max=T)  # (N,)
        a, b = lo_min, int(hi.max())  # the block covers steps [a, b)
        rows = steps[a : b + 1, None]  # (L+1, 1) absolute row indices
        x = X[a : b + 1]  # (L+1, N, *shape), a view
        # rows entering a window for the first time start from the last row before them
        fresh = (rows > frontier) & (rows <= hi)  # (L+1, N)
        if bool(fresh.any()):
            src = torch.where(fresh, frontier.unsqueeze(0), rows) - a  # (L+1, N)
            x.copy_(x[src, cols])
            frontier = torch.maximum(frontier, hi)
        active = (rows[:-1] >= lo) & (rows[:-1] < hi)  # (L, N)
        f = system.evaluate(x, active, a)
        block = Block(a, x, f, f - x[1:], active, lo, None)
        r = sol_obj.residual(system, block).to(torch.float64)  # (L, N)
        block = block._replace(residual=r)
        proposal, state = sol_obj.update(system, block, state)
        # acceptance: leading active steps with r <= tol keep their state; the first failing
        # step k is exact (X[k+1] = f_k, its input being accepted); later ones take the proposal.
        # A state that entered this round as a copy of an earlier one was never computed: it is
        # not accepted whatever its residual (with tol >= 1 or a solver's own rule, the copies
        # X[k+1] = X[k] would pass and x_T would come back as the sample)
        bad = active & ((r > tol_eff) | fresh[1:])
        first = torch.where(bad.any(0), bad.double().argmax(0) + a, hi)  # (N,) absolute
        k_rows = rows[:-1]
        keep = active & (k_rows < first)
        exact = active & (k_rows == first)
        move = active & (k_rows > first)
        new = torch.where(move.reshape(active.shape + (1,) * len(shape)), proposal, x[1:])
        new = torch.where(exact.reshape(active.shape + (1,) * len(shape)), f, new)
        if not bool(torch.isfinite(new).all()):
            raise NonFiniteError(
                f"the {sol_obj.name!r} solver proposed non-finite states in round {system.rounds}"
            )
        x[1:] = new
        Rb = R[a:b]
        Rb.copy_(torch.where(keep, r, torch.where(exact, torch.zeros_like(r), Rb)))
        lo = torch.minimum(first + 1, hi)
        traces.append(r.max())  # some sample is active while the loop runs
        if trace:
            full_r = torch.full((T, N), float("nan"), dtype=torch.float64, device=dev)
            full_r[a:b] = torch.where(active, r, torch.full_like(r, float("nan")))
            res_hist.append(full_r.T.cpu())
            smp_hist.append(X[T].clone())
    x0 = X[T].clone()
    solution = SamplingSolution(
        sample=x0,
        trajectory=X,
        rounds=system.rounds,
        nfe=system.nfe,
        calls=system.calls,
        converged=(lo >= T).cpu(),
        residuals=R.T.cpu(),
        trace=torch.stack(traces).cpu() if traces else torch.zeros(0, dtype=torch.float64),
        residual_history=torch.stack(res_hist) if trace and res_hist else None,
        sample_history=torch.stack(smp_hist) if trace and smp_hist else None,
        solver=sol_obj.name,
        tol=tol,
        window=window,
    )
    return x0, solution
