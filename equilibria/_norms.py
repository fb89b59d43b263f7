"""Weight and spectral normalisation of a cell's layers, computed once per forward call.

A DEQ calls its cell tens of times per forward pass. A reparametrised weight (w = g v / ||v||, or
w / sigma(w)) recomputed at every call wastes that work and, for spectral norm, advances the power
iteration once per solver iteration instead of once per training step. Here the layers are
reparametrised with ``torch.nn.utils.parametrize`` and :func:`norm_cache` computes every weight once
(with its graph, when gradients are on) and serves the cached value to every call of the solve and
of the backward pass. :class:`equilibria.DEQ` enters :func:`norm_cache` around each forward call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._validate import check_choice, check_float, check_int

NormKind = Literal["weight", "spectral"]
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def apply_norm(
    module: nn.Module,
    kind: NormKind = "weight",
    *,
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
    name: str = "weight",
    n_power_iterations: int = 1,
    exclude: Iterable[str] = (),
    filter: Callable[[str, nn.Module], bool] | None = None,
    target_norm: float | None = None,
    clip: float | None = None,
) -> nn.Module:
    """Reparametrise the ``name`` parameter of every layer of the given ``types`` in ``module``.

    The weight becomes ``w = v * s`` with a factor ``s`` per output channel (weight norm) or per
    layer (spectral norm): by default ``s = g / ||v||`` with a learned magnitude ``g`` (weight
    norm) or ``s = 1 / sigma(v)`` (spectral norm); ``target_norm`` fixes the magnitude and ``clip``
    caps the factor, as TorchDEQ's ``learn_scale=False`` / ``target_norm`` and ``norm_clip`` /
    ``norm_clip_value`` do.

    Args:
        module: the module (e.g. a DEQ cell); changed in place and returned.
        kind: ``"weight"`` (w = g v / ||v|| per output channel; Salimans & Kingma 2016; a
            transposed convolution with ``groups > 1`` gets one g per output channel of a group,
            shared by the groups, since its weight is laid out (in, out / groups, ...)) or
            ``"spectral"`` (w / sigma(w) with sigma from power iteration; Miyato et al. 2018).
        types: layer classes to reparametrise (default: linear and convolution layers).
        name: the parameter to reparametrise.
        n_power_iterations: power iterations per weight computation for spectral norm, >= 1.
        exclude: qualified module names (as ``module.named_modules()`` gives them) whose layers
            are left alone, with everything below them: ``"head"`` skips ``head`` and
            ``head.0`` but not ``header``.
        filter: ``filter(qualified_name, layer) -> bool``, called for each candidate layer (of
            the ``types``, not excluded): normalise only where it returns True.
        target_norm: a fixed magnitude > 0 instead of a learned one: w = t v / ||v|| per output
            channel (weight norm, no ``g`` parameter) or t w / sigma(w) (spectral norm).
        clip: cap > 0 on the factor ``s`` (``w = v * min(clip, s)``): with ``clip=1`` and
            ``target_norm=t``, a weight whose norm (per output channel for weight norm, sigma for
            spectral norm) is at most ``t`` is left unchanged and a larger one is scaled down to
            ``t``.

    Returns:
        ``module``. Layers already reparametrised are left as they are.

    Raises:
        ValueError: no layer was selected, or an option is out of range.

    Example:
        >>> cell = eq.apply_norm(MyCell(), "weight")
        >>> layer = eq.DEQ(cell)   # weights computed once per forward call
        >>> eq.remove_norm(cell)   # bake the normalised weights back into plain parameters
        >>> # spectral norm capped at 1, only on the layers outside ``cell.readout``
        >>> eq.apply_norm(other, "spectral", target_norm=1.0, clip=1.0, exclude=["readout"])
    """
    check_choice("kind", kind, ("weight", "spectral"))
    check_int("n_power_iterations", n_power_iterations, minimum=1)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    exclude = _check_names("exclude", exclude)
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be a callable (name, module) -> bool, got {filter!r}")
    if target_norm is not None:
        target_norm = check_float("target_norm", target_norm, low=0.0)
    if clip is not None:
        clip = check_float("clip", clip, low=0.0)
    found = False
    for qualified, layer in module.named_modules():
        if not isinstance(layer, types) or not isinstance(getattr(layer, name, None), torch.Tensor):
            continue
        if any(qualified == e or qualified.startswith(e + ".") for e in exclude):
            continue
        if filter is not None:
            keep = filter(qualified, layer)
            if not isinstance(keep, bool):
                raise TypeError(f"filter must return a bool, got {keep!r} for {qualified!r}")
            if not keep:
                continue
        found = True
        if parametrize.is_parametrized(layer, name):
            continue
        # per output channel: dim 0 of a (out, in, ...) weight, dim 1 of a transposed
        # convolution's (in, out / groups, ...) weight (torch's spectral norm does the same)
        dim = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
        if target_norm is not None or clip is not None:
            weight = getattr(layer, name)
            scaled: nn.Module
            if kind == "weight":
                scaled = _ScaledWeightNorm(dim, target_norm, clip)
            else:
                scaled = _ScaledSpectralNorm(weight, dim, target_norm, clip, n_power_iterations)
            parametrize.register_parametrization(layer, name, scaled)
        elif kind == "weight":
            nn.utils.parametrizations.weight_norm(layer, name=name, dim=dim)
        else:
            nn.utils.parametrizations.spectral_norm(
                layer, name=name, n_power_iterations=n_power_iterations
            )
    if not found:
        names = ", ".join(t.__name__ for t in types)
        raise ValueError(
            f"module has no layer of the types ({names}) with a parameter {name!r}"
            + (" left by exclude/filter" if exclude or filter is not None else "")
        )
    return module


def _check_names(argument: str, names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError(f"{argument} must be a list of module names, got the string {names!r}")
    names = tuple(names)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"{argument} must hold module names (str), got {n!r}")
    return names


def _other_dims(weight: Tensor, dim: int) -> list[int]:
    return [d for d in range(weight.dim()) if d != dim]


class _ScaledWeightNorm(nn.Module):
    """w = v * min(clip, s / ||v||) per output channel (dim ``dim``), s the learned magnitude
    ``g`` (originals g, v) or the fixed ``target`` (original v); no clip: the factor as is."""

    def __init__(self, dim: int, target: float | None, clip: float | None) -> None:
        super().__init__()
        self.dim, self.target, self.clip = dim, target, clip

    def forward(self, *originals: Tensor) -> Tensor:
        v = originals[-1]
        norm = torch.linalg.vector_norm(v, dim=_other_dims(v, self.dim), keepdim=True)
        factor = (self.target if self.target is not None else originals[0]) / norm
        if self.clip is not None:
            factor = factor.clamp_max(self.clip)
        return v * factor

    def right_inverse(self, w: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.target is not None:  # w itself serves as v: only its direction matters
            return w
        return torch.linalg.vector_norm(w, dim=_other_dims(w, self.dim), keepdim=True), w


class _ScaledSpectralNorm(nn.Module):
    """w = W * min(clip, target / sigma(W)) (target 1 when None; no clip: the factor as is), with
    sigma from power iteration on W as a (out, -1) matrix: ``n`` steps per computation in
    training mode, the vectors ``_u`` (out,) and ``_v`` (in,) kept as buffers (Miyato et al.,
    "Spectral Normalization for Generative Adversarial Networks", ICLR 2018)."""

    def __init__(
        self, weight: Tensor, dim: int, target: float | None, clip: float | None, n: int
    ) -> None:
        super().__init__()
        self.dim, self.target, self.clip, self.n = dim, 1.0 if target is None else target, clip, n
        matrix = self._matrix(weight.detach())
        u = nn.functional.normalize(matrix.new_empty(matrix.shape[0]).normal_(), dim=0)
        v = nn.functional.normalize(matrix.new_empty(matrix.shape[1]).normal_(), dim=0)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        self._power_iteration(matrix, 15)  # start from near the top singular pair

    def _matrix(self, w: Tensor) -> Tensor:
        return w.movedim(self.dim, 0).flatten(1)

    @torch.no_grad()
    def _power_iteration(self, matrix: Tensor, steps: int) -> None:
        for _ in range(steps):  # in place: the buffers keep their identity (and DDP's sync)
            self._v.copy_(nn.functional.normalize(matrix.mT @ self._u, dim=0))
            self._u.copy_(nn.functional.normalize(matrix @ self._v, dim=0))

    def forward(self, w: Tensor) -> Tensor:
        matrix = self._matrix(w)
        if self.training:
            self._power_iteration(matrix.detach(), self.n)
        u, v = self._u.clone(), self._v.clone()  # the graph must not see later in-place updates
        sigma = torch.dot(u, matrix @ v)
        factor = self.target / sigma
        if self.clip is not None:
            factor = factor.clamp_max(self.clip)
        return w * factor


def remove_norm(module: nn.Module, *, leave_parametrized: bool = True) -> nn.Module:
    """Remove every parametrisation from ``module``'s layers.

    Args:
        module: changed in place and returned.
        leave_parametrized: keep the current normalised weights as plain parameters (True) or
            restore the unnormalised originals (False). Weight norm with a learned magnitude is
            an exact reparametrisation (g v / ||v|| is the weight itself), so its layers always
            keep the current weight (to the round-off of torch's weight-norm kernel: ~1e-16
            relative in float64 on the CPU, ~5e-8 measured for the fused CUDA kernel); so do
            its clipped variant's, whose weight is made of two tensors (g, v).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for layer in module.modules():
        if parametrize.is_parametrized(layer):
            for tensor_name in list(layer.parametrizations.keys()):
                chain = layer.parametrizations[tensor_name]
                # a weight made of (g, v), torch's weight norm or ours with a learned magnitude
                exact = hasattr(chain, "original0")
                parametrize.remove_parametrizations(
                    layer, tensor_name, leave_parametrized=leave_parametrized or exact
                )
    return module


@contextmanager
def norm_cache(module: nn.Module | None) -> Iterator[None]:
    """Compute every parametrised weight of ``module`` once and reuse it inside the block.

    The weights are computed on entry in the caller's grad mode, so the cached values carry their
    graph into the differentiable part of a solve while the no-grad solver iterations reuse them.
    Without parametrised layers this is free.
    """
    modules = [] if module is None else module.modules()
    layers = [m for m in modules if parametrize.is_parametrized(m)]
    if not layers:
        yield
        return
    with parametrize.cached():
        for layer in layers:
            for tensor_name in layer.parametrizations:
                getattr(layer, tensor_name)
        yield


# --- TorchDEQ checkpoints -------------------------------------------------------------------------
#
# TorchDEQ (torchdeq.norm, 0.1.0) stores a normalised parameter ``weight`` of a layer at prefix P
# as plain entries beside the layer's others; torch's parametrisations (which apply_norm uses)
# store it under P + "parametrizations.weight.". The two layouts hold the same tensors:
#
#   TorchDEQ                                   apply_norm
#   weight norm, learned scale: P weight_g     P parametrizations.weight.original0   (g)
#                               P weight_v     P parametrizations.weight.original1   (v)
#   weight norm, fixed norm:    P weight_v     P parametrizations.weight.original    (v)
#   spectral norm:              P weight_orig  P parametrizations.weight.original    (W)
#     (learn_scale=False)       P weight_u     P parametrizations.weight.0._u
#                               P weight_v     P parametrizations.weight.0._v
#
# (g has the shape of TorchDEQ's: keepdim norms per output channel.) TorchDEQ's spectral norm
# with a learned scale adds a per-row ``weight_g`` that apply_norm has no counterpart for.


def torchdeq_state_dict(
    state_dict: dict[str, Tensor], names: Iterable[str] = ("weight",)
) -> dict[str, Tensor]:
    """The state_dict of an :func:`apply_norm` module with TorchDEQ's keys for its normalised
    parameters, to load into the same architecture normalised by ``torchdeq.norm.apply_norm``.

    Weight norm maps to TorchDEQ's ``weight_norm`` (``learn_scale=True``, or ``False`` for a
    module made with ``target_norm``); spectral norm to its ``spectral_norm`` with
    ``learn_scale=False`` (apply_norm's spectral norm learns no scale). The TorchDEQ module must
    use the same target norm and clip, which are options, not state. Other keys pass unchanged.

    Args:
        state_dict: e.g. ``cell.state_dict()``.
        names: the normalised parameters' names (``apply_norm``'s ``name``).

    Returns:
        A new dict (the tensors are shared, not copied).

    Example:
        >>> td_cell.load_state_dict(eq.torchdeq_state_dict(cell.state_dict()))
    """
    names = _check_names("names", names)
    spectral = {k[: -len(".0._u")] for k in state_dict if k.endswith(".0._u")}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix, name, rest = _split_parametrized(key, names)
        if name is None:
            out[key] = value
            continue
        base = prefix + "parametrizations." + name
        suffix = {"original0": "_g", "original1": "_v", "0._u": "_u", "0._v": "_v"}.get(rest)
        if rest == "original":
            suffix = "_orig" if base in spectral else "_v"
        if suffix is None:
            raise ValueError(f"state_dict key {key!r} has no TorchDEQ counterpart")
        out[prefix + name + suffix] = value
    return out


def from_torchdeq_state_dict(
    state_dict: dict[str, Tensor], names: Iterable[str] = ("weight",)
) -> dict[str, Tensor]:
    """A TorchDEQ state_dict with the keys of :func:`apply_norm`'s parametrisations, to load a
    checkpoint of a ``torchdeq.norm``-normalised module into the same architecture normalised by
    ``eq.apply_norm`` (the same kind, and ``target_norm`` for TorchDEQ's ``learn_scale=False``).

    Args:
        state_dict: the TorchDEQ module's state_dict.
        names: the normalised parameters' names (TorchDEQ's ``names``, ``"weight"`` by default).

    Returns:
        A new dict (the tensors are shared, not copied).

    Raises:
        ValueError: a spectral-norm layer with a learned scale (``weight_g`` beside
            ``weight_orig``), which apply_norm's spectral norm has no parameter for.

    Example:
        >>> cell = eq.apply_norm(Cell(), "weight")
        >>> cell.load_state_dict(eq.from_torchdeq_state_dict(torch.load("torchdeq.pt")))
    """
    names = _check_names("names", names)
    suffixes = ("_g", "_v", "_u", "_orig")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix, name, suffix = _split_torchdeq(key, names, suffixes)
        if name is None:
            out[key] = value
            continue
        stem = prefix + name
        base = prefix + "parametrizations." + name
        if stem + "_orig" in state_dict:  # spectral norm
            if suffix == "_g":
                raise ValueError(
                    f"{key!r}: TorchDEQ's spectral norm with a learned scale (learn_scale=True) "
                    "has no counterpart in apply_norm, whose spectral norm learns no scale; save "
                    "the TorchDEQ module with learn_scale=False (norm_no_scale=True)"
                )
            out[base + {"_orig": ".original", "_u": ".0._u", "_v": ".0._v"}[suffix]] = value
        elif suffix == "_g":
            out[base + ".original0"] = value
        elif suffix == "_v":
            out[base + (".original1" if stem + "_g" in state_dict else ".original")] = value
        else:
            raise ValueError(f"state_dict key {key!r}: {suffix} without {stem + '_orig'!r}")
    return out


def _split_parametrized(key: str, names: tuple[str, ...]) -> tuple[str, str | None, str]:
    """``P parametrizations.N.rest`` -> (P, N, rest) for N in names; (key, None, "") otherwise."""
    head, sep, tail = key.partition("parametrizations.")
    if not sep or (head and not head.endswith(".")):
        return key, None, ""
    name, _, rest = tail.partition(".")
    return (head, name, rest) if name in names and rest else (key, None, "")


def _split_torchdeq(
    key: str, names: tuple[str, ...], suffixes: tuple[str, ...]
) -> tuple[str, str | None, str]:
    """``P N_suffix`` -> (P, N, _suffix) for N in names; (key, None, "") otherwise."""
    prefix, _, last = key.rpartition(".")
    prefix = prefix + "." if prefix else ""
    for name in names:
        for suffix in suffixes:
            if last == name + suffix:
                return prefix, name, suffix
    return key, None, ""
