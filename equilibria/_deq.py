"""The DEQ module: a thin nn.Module around :func:`equilibria.fixed_point`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._backward import Backward, resolve_backward
from ._cache import SampleCache
from ._dropout import batch_index, own_batch, reset_dropout
from ._fixed_point import StopNorm, check_path, refuse_transforms, solve_flat, states_flat
from ._norms import norm_cache
from ._options import Options
from ._solution import Solution
from ._solvers import Solver
from ._tree import StateSpec, index_batch
from ._validate import check_float, check_int

Cell = Callable[[Any, Any], Any]


def _option(name: str, doc: str) -> property:
    """A DEQ attribute backed by its :class:`Options`; assigning it validates the new value."""

    def get(self: DEQ) -> Any:
        return getattr(self.options, name)

    def set_(self: DEQ, value: Any) -> None:
        if value is None:
            raise TypeError(f"{name} cannot be set to None")
        self.options = self.options.replace(**{name: value})

    return property(get, set_, doc=doc)


def _eval_option(name: str, check: Callable[[Any], None], doc: str) -> property:
    """An eval-mode setting that follows the training option ``name`` unless one is assigned
    (assigning None restores following); assigning validates with ``check``."""
    private = f"_eval_{name}"

    def get(self: DEQ) -> Any:
        value = getattr(self, private)
        return getattr(self.options, name) if value is None else value

    def set_(self: DEQ, value: Any) -> None:
        if value is not None:
            check(value)
        setattr(self, private, value)

    return property(
        get, set_, doc=f"{doc} (default: the training ``{name}``, also after it is assigned)."
    )


class DEQ(nn.Module):
    """Deep equilibrium layer: returns z* with z* = cell(z*, x).

    Holds the cell (whose parameters it registers) and the solve's :class:`Options`; the maths lives
    in :func:`equilibria.fixed_point`. Training and evaluation have separate budgets, since
    evaluation often affords more iterations.

    Args:
        cell: ``cell(z, x) -> z``, usually an ``nn.Module``. ``z`` may be a tensor, or a tuple,
            list or dict of tensors.
        solver: forward solver, name or object (``eq.Anderson(m=6)``).
        backward: backward method, name or object (``eq.Phantom(steps=5, damping=0.5)``). The
            implicit method's tol and max_iter, when not given, follow the forward solve of the
            current mode (``eq.DEQ(cell, tol=1e-2, max_iter=25)`` solves its adjoint to 1e-2
            within 25 iterations); its stop norm is ``"rel"`` unless given; see :class:`Implicit`.
        tol: forward tolerance in training.
        max_iter: forward budget in training.
        stop: stop norm, ``"rel"`` or ``"abs"``.
        eval_tol: tolerance in eval mode (default: ``tol``, also after ``layer.tol`` is assigned).
        eval_max_iter: budget in eval mode (default: ``max_iter``, also after it is assigned).
        init: ``init(x) -> z0`` used when no ``z0`` is passed; default ``torch.zeros_like(x)``,
            which assumes the state has the shape of the input.
        warn_unconverged: warn when a forward solve does not converge.
        compact: per-sample compaction in the forward solve: samples that have converged are
            removed from the batch passed to the cell, and the input ``x`` (every tensor in it
            whose first dimension is the batch size) is indexed to match, so a batch with a few
            hard samples costs far fewer cell evaluations. Results equal the uncompacted solve to
            solver tolerance. Trade-offs: the cell must treat samples independently (batch
            statistics, as in BatchNorm in training mode, would change with the batch), each
            compaction copies the solver's history, and very cheap cells gain less than they pay.
            Not with ``backward="unrolled"``.
        correction: the phantom path (``eq.Phantom(...)`` or ``eq.JFB()``) of the states before
            the last in ``layer(x, states=n)``, whatever the backward method (see
            :func:`equilibria.fixed_point_states`); default: the backward method itself when it is
            Phantom or JFB, else ``eq.Phantom(steps=1, damping=1.0)``.

    Each forward call resets the cell's :class:`VariationalDropout` masks (in training mode) and
    computes its normalised weights (:func:`apply_norm`) once, reused by every solver iteration and
    by the backward pass.

    Eval mode: the returned state is the solver's equilibrium z* for every backward method, with
    or without grad mode, so outputs do not depend on ``torch.no_grad``. With grad mode on, each
    method still gives its own gradient: the implicit and Neumann methods as in training; Phantom
    and JFB run their differentiable steps for the gradient only (z* with the derivative of the
    steps); Unrolled records the iterations. Under ``torch.no_grad`` nothing but the solve runs.

    Precision: the state is kept in the dtype of ``z0`` (``init(x)``). Under ``torch.autocast``
    the cell runs in the autocast dtype (e.g. bfloat16) and its output is cast back to the state's
    dtype; the solver's own arithmetic (norms, Anderson's least-squares system) runs with autocast
    off, in float32 or better.

    Attributes:
        options: the training :class:`Options` (solver, backward, tol, max_iter, stop,
            warn_unconverged, compact); ``solver``, ``backward``, ``tol``, ``max_iter``, ``stop``,
            ``warn_unconverged`` and ``compact`` read them.
        last_solution: the :class:`Solution` of the latest forward call (its ``backward`` field is
            filled in when gradients are computed). Not saved: ``torch.save(layer)`` and pickling
            leave it (and the ``cache_key`` warm-start caches) out, so a checkpoint holds the
            model only; ``copy.deepcopy`` keeps its statistics.

    Example:
        >>> cell = MyCell()  # cell(z, x) -> z
        >>> layer = eq.DEQ(cell, solver="anderson", backward=eq.Phantom(steps=5), max_iter=30)
        >>> z = layer(x)
        >>> z = layer(x, max_iter=100, solver="broyden")  # one call with other settings
        >>> layer.last_solution.nstep

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    def __init__(
        self,
        cell: Cell,
        *,
        solver: str | Solver = "anderson",
        backward: str | Backward = "implicit",
        tol: float = 1e-4,
        max_iter: int = 50,
        stop: StopNorm = "rel",
        eval_tol: float | None = None,
        eval_max_iter: int | None = None,
        init: Callable[[Any], Any] | None = None,
        warn_unconverged: bool = False,
        compact: bool = False,
        correction: str | Backward | None = None,
    ) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be callable as cell(z, x), got {type(cell).__name__}")
        if init is not None and not callable(init):
            raise TypeError(f"init must be callable as init(x) -> z0, got {type(init).__name__}")
        self.options = Options(solver, backward, tol, max_iter, stop, warn_unconverged, compact)
        self.eval_tol = eval_tol  # None: follow tol (validated by the property's setter)
        self.eval_max_iter = eval_max_iter
        self.correction = None if correction is None else check_path(correction)
        self.cell = cell
        self.init = init
        self.last_solution: Solution | None = None
        self._using: Backward | None = None
        self._state_cache = SampleCache()
        self._adjoint_cache = SampleCache()

    # the options: assigning one (``layer.max_iter = 30``, as training schedules do) validates it
    # and replaces the options object; per call, use layer(x, max_iter=...) or using()
    solver = _option("solver", "The forward solver (assign a name or a solver object).")
    tol = _option("tol", "The training tolerance.")
    max_iter = _option("max_iter", "The training budget.")
    stop = _option("stop", "The stop norm.")
    compact = _option("compact", "Per-sample compaction.")
    warn_unconverged = _option("warn_unconverged", "Whether unconverged solves warn.")

    eval_tol = _eval_option(
        "tol", lambda v: check_float("eval_tol", v, low=0.0, low_open=False), "The eval tolerance."
    )
    eval_max_iter = _eval_option(
        "max_iter", lambda v: check_int("eval_max_iter", v, minimum=1), "The eval budget."
    )

    @property
    def backward(self) -> Backward:
        """The backward method (the one set by :meth:`using` inside its block)."""
        return self.options.backward if self._using is None else self._using

    @backward.setter
    def backward(self, value: str | Backward) -> None:
        self.options = self.options.replace(backward=value)

    def _z0(self, x: Any, z0: Any) -> Any:
        if z0 is not None:
            return z0
        if self.init is not None:
            return self.init(x)
        if isinstance(x, torch.Tensor):
            return torch.zeros_like(x)
        raise TypeError(
            "z0 is required when x is not a tensor: pass z0=... or give the DEQ an init(x) -> z0"
        )

    def _call_options(self, **overrides: Any) -> Options:
        """The options of this call: the mode's budget, :meth:`using`'s backward, the overrides."""
        options = self.options
        if not self.training:
            options = options.replace(tol=self.eval_tol, max_iter=self.eval_max_iter)
        return options.replace(backward=self._using).replace(**overrides)

    def forward(
        self,
        x: Any,
        z0: Any = None,
        *,
        states: int | None = None,
        cache_key: Sequence[int] | torch.Tensor | None = None,
        solver: str | Solver | None = None,
        backward: str | Backward | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
    ) -> Any:
        """Solve for the equilibrium of ``cell(., x)``.

        Args:
            x: the input injection, passed unchanged to the cell.
            z0: initial state (e.g. a previous equilibrium for a warm start); default ``init(x)``.
            states: if given, return that many states along the trajectory for fixed-point
                correction (see :func:`equilibria.fixed_point_states`): the last with the
                backward method's gradient (implicit, Neumann, Phantom or JFB), the earlier ones
                with a phantom path (``correction``, or the phantom backward itself).
            cache_key: one integer id per sample (e.g. dataset indices). The equilibria of these
                samples are cached and used as the starting point the next time the same ids
                come (samples without a cached state start from ``init(x)``); with the implicit
                backward, the adjoint solutions are cached too (in training mode) and warm-start
                the next adjoint solve of the same ids. The cache lives on the module
                (``clear_cache()`` empties it) and holds one detached state per id.
            solver: this call's solver instead of the module's (name or object).
            backward: this call's backward method instead of the module's.
            tol: this call's tolerance instead of the mode's (``tol`` or ``eval_tol``).
            max_iter: this call's budget instead of the mode's.

        The overrides are validated like the constructor's arguments and change nothing on the
        module.

        Returns:
            The equilibrium state, or a list of ``states`` states (earliest first).
        """
        options = self._call_options(solver=solver, backward=backward, tol=tol, max_iter=max_iter)
        refuse_transforms()
        path = None  # the phantom path of the earlier states, with states=
        if states is not None:
            check_int("states", states, minimum=1)
            path = options.backward.correction()  # raises for backward="unrolled"
            path = self.correction or path
            if options.compact:
                raise ValueError(
                    f"states={states} (fixed-point correction) cannot be combined with "
                    "compact=True: the trajectory it samples needs every sample at every "
                    "iteration; use a DEQ with compact=False"
                )
        keys = None if cache_key is None else _keys(cache_key)
        if keys is not None and z0 is not None:
            raise ValueError("pass either z0 or cache_key, not both")
        z0 = self._z0(x, z0)
        spec = StateSpec.of(z0)
        flat = spec.flatten(z0)
        if keys is not None:
            if len(keys) != spec.batch:
                raise ValueError(
                    f"cache_key must have one id per sample ({spec.batch}), got {len(keys)} ids"
                )
            flat = flat.detach().clone()
            self._state_cache.fill(keys, flat)
        cell = self.cell if isinstance(self.cell, nn.Module) else None
        if self.training and cell is not None:
            reset_dropout(cell)

        def f(z: Any) -> Any:
            return self.cell(z, x)

        def f_indexed(z: Any, index: torch.Tensor | None) -> Any:
            if index is None:
                return self.cell(z, x)
            with batch_index(index):
                return self.cell(z, index_batch(x, index, spec.batch))

        fn = spec.flat_map(f_indexed if options.compact else f)
        adjoint = self._adjoint_cache if keys is not None and self.training else None
        at = options.attachment(keep_value=not self.training, cache=adjoint, keys=keys)
        # this DEQ inside another DEQ's compacting cell: its cell sees this DEQ's own batch,
        # not the outer batch index (its dropout would take its rows from the wrong mask)
        with own_batch(), norm_cache(cell):
            if states is not None:
                zs, sol = states_flat(fn, spec, flat, states, options, path, at)
                if options.warn_unconverged:
                    sol.warn_if_unconverged("the forward solve")
                out: Any = [spec.unflatten(z) for z in zs]
            else:
                z, sol = solve_flat(fn, spec, flat, options, at)
                out = spec.unflatten(z)
        self.last_solution = sol
        if keys is not None:
            self._state_cache.store(keys, spec.flatten(sol.value))
        return out

    @contextmanager
    def using(self, backward: str | Backward) -> Iterator[DEQ]:
        """Temporarily use another backward method (e.g. for :func:`gradient_agreement`)."""
        saved = self._using
        self._using = resolve_backward(backward)
        try:
            yield self
        finally:
            self._using = saved

    def clear_cache(self) -> None:
        """Forget the cached equilibria and adjoints of ``cache_key``."""
        self._state_cache.clear()
        self._adjoint_cache.clear()

    # -- pickling: the model, not the last call ----------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """``torch.save`` / pickle: leave out the last solve (its value, residuals and recorded
        map call) and the warm-start caches, which are per-call data, not the model."""
        state = self.__dict__.copy()
        state["last_solution"] = None
        state["_state_cache"] = SampleCache()
        state["_adjoint_cache"] = SampleCache()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "options" not in state:  # pickled by equilibria 0.1.0 before the Options object
            state = _from_options_attributes(state)
        super().__setstate__(state)

    def __deepcopy__(self, memo: dict[int, Any]) -> DEQ:
        # a deep copy (snapshots, EMA models) keeps everything, last_solution's statistics
        # included (BackwardInfo drops its recorded graph, which torch cannot deep-copy)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver}, backward={self.backward}, tol={self.tol:g}, "
            f"max_iter={self.max_iter}, eval_tol={self.eval_tol:g}, "
            f"eval_max_iter={self.eval_max_iter}, stop={self.stop!r}, compact={self.compact}"
        )


def _from_options_attributes(state: dict[str, Any]) -> dict[str, Any]:
    """The state of a DEQ pickled when its options were plain attributes (``solver``, ``tol``,
    ..., the eval budget copied at construction, the caches dicts of id -> row), as this
    version keeps it; the unpickled layer solves as it did."""
    state = dict(state)
    names = ("solver", "backward", "tol", "max_iter", "stop", "warn_unconverged", "compact")
    state["options"] = Options(**{name: state.pop(name) for name in names})
    # given or copied from tol / max_iter at construction: either way the value it solved with
    state["_eval_tol"] = state.pop("eval_tol")
    state["_eval_max_iter"] = state.pop("eval_max_iter")
    state.setdefault("correction", None)
    state["_using"] = None
    state.pop("_pending", None)
    for name in ("_state_cache", "_adjoint_cache"):
        cache = SampleCache()
        cache.rows.update(state.get(name) or {})
        state[name] = cache
    return state


def _keys(cache_key: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(cache_key, torch.Tensor):
        if (
            cache_key.dim() != 1
            or cache_key.dtype.is_floating_point
            or cache_key.is_complex()
            or cache_key.dtype == torch.bool
        ):
            raise TypeError(
                f"cache_key must be a 1-D integer tensor or a sequence of ints, got a tensor of "
                f"shape {tuple(cache_key.shape)} and dtype {cache_key.dtype}"
            )
        keys = [int(k) for k in cache_key.tolist()]
    elif isinstance(cache_key, Sequence) and all(
        isinstance(k, int) and not isinstance(k, bool) for k in cache_key
    ):
        keys = list(cache_key)
    else:
        raise TypeError(
            f"cache_key must be a 1-D integer tensor or a sequence of ints, got {cache_key!r}"
        )
    if len(set(keys)) != len(keys):
        raise ValueError("cache_key must not repeat an id within a batch")
    return keys
