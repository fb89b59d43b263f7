"""Weight and spectral normalisation of a cell's layers, computed once per forward call.

A DEQ calls its cell tens of times per forward pass. A reparametrised weight (w = g v / ||v||, or
w / sigma(w)) recomputed at every call wastes that work and, for spectral norm, advances the power
iteration once per solver iteration instead of once per training step. Here the layers are
reparametrised with ``torch.nn.utils.parametrize`` and :func:`norm_cache` computes every weight once
(with its graph, when gradients are on) and serves the cached value to every call of the solve and
of the backward pass. :class:`equilibria.DEQ` enters :func:`norm_cache` around each forward call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._validate import check_choice, check_int

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
) -> nn.Module:
    """Reparametrise the ``name`` parameter of every layer of the given ``types`` in ``module``.

    Args:
        module: the module (e.g. a DEQ cell); changed in place and returned.
        kind: ``"weight"`` (w = g v / ||v|| per output channel; Salimans & Kingma 2016; a
            transposed convolution with ``groups > 1`` gets one g per output channel of a group,
            shared by the groups, since its weight is laid out (in, out / groups, ...)) or
            ``"spectral"`` (w / sigma(w) with sigma from power iteration; Miyato et al. 2018).
        types: layer classes to reparametrise (default: linear and convolution layers).
        name: the parameter to reparametrise.
        n_power_iterations: power iterations per weight computation for spectral norm.

    Returns:
        ``module``. Layers already reparametrised are left as they are.

    Example:
        >>> cell = eq.apply_norm(MyCell(), "weight")
        >>> layer = eq.DEQ(cell)   # weights computed once per forward call
        >>> eq.remove_norm(cell)   # bake the normalised weights back into plain parameters
    """
    check_choice("kind", kind, ("weight", "spectral"))
    check_int("n_power_iterations", n_power_iterations, minimum=1)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    found = False
    for layer in module.modules():
        if not isinstance(layer, types) or not isinstance(getattr(layer, name, None), torch.Tensor):
            continue
        found = True
        if parametrize.is_parametrized(layer, name):
            continue
        if kind == "weight":
            # per output channel: dim 0 of a (out, in, ...) weight, dim 1 of a transposed
            # convolution's (in, out / groups, ...) weight (torch's spectral norm does the same)
            transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
            nn.utils.parametrizations.weight_norm(layer, name=name, dim=1 if transposed else 0)
        else:
            nn.utils.parametrizations.spectral_norm(
                layer, name=name, n_power_iterations=n_power_iterations
            )
    if not found:
        names = ", ".join(t.__name__ for t in types)
        raise ValueError(f"module has no layer of the types ({names}) with a parameter {name!r}")
    return module


def remove_norm(module: nn.Module, *, leave_parametrized: bool = True) -> nn.Module:
    """Remove every parametrisation from ``module``'s layers.

    Args:
        module: changed in place and returned.
        leave_parametrized: keep the current normalised weights as plain parameters (True) or
            restore the unnormalised originals (False). Weight norm is an exact reparametrisation
            (g v / ||v|| is the weight itself), so its layers always keep the current weight (to
            the round-off of torch's weight-norm kernel: ~1e-16 relative in float64 on the CPU,
            ~5e-8 measured for the fused CUDA kernel).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for layer in module.modules():
        if parametrize.is_parametrized(layer):
            for tensor_name in list(layer.parametrizations.keys()):
                chain = layer.parametrizations[tensor_name]
                # torch's weight-norm parametrisation (a private class, recognised by name)
                exact = len(chain) == 1 and type(chain[0]).__name__ == "_WeightNorm"
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
