"""Variational dropout for equilibrium cells: one mask per forward solve.

Ordinary dropout draws a new mask at every call of the cell, so the map changes at every solver
iteration and has no fixed point. Variational dropout draws one mask per forward solve and reuses it
in every iteration (and in the backward pass); :class:`equilibria.DEQ` resets the masks of its cell
at the start of each forward call, in training mode.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from ._validate import check_float

# The positions in the full batch of the rows the cell is called with, set by the DEQ module while
# per-sample compaction has dropped converged samples (None: the whole batch).
_BATCH_INDEX: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "equilibria_batch_index", default=None
)


@contextmanager
def batch_index(index: Tensor | None) -> Iterator[None]:
    """Tell batch-aware layers (variational dropout) which samples the cell sees.

    :class:`equilibria.DEQ` does this under compaction. With the functional
    ``fixed_point(f, z0, compact=True)`` and a cell containing :class:`VariationalDropout`, wrap the
    cell call (``index`` is None for the whole batch): ``def f(z, index): with
    eq.batch_index(index): return cell(z, x if index is None else x[index])``.
    """
    token = _BATCH_INDEX.set(index)
    try:
        yield
    finally:
        _BATCH_INDEX.reset(token)


def own_batch() -> AbstractContextManager[None]:
    """Clear an enclosing :func:`batch_index` (a DEQ running inside another DEQ's cell); a no-op
    context, cheap under ``torch.compile``, when none is set."""
    return batch_index(None) if _BATCH_INDEX.get() is not None else nullcontext()


class VariationalDropout(nn.Module):
    """Dropout whose mask is fixed for a whole forward solve.

    Drop each element (or each slice along the ``shared_dims``) with probability ``p`` and scale the
    rest by 1 / (1 - p), with the same mask at every iteration until :meth:`reset` (called by
    :class:`equilibria.DEQ` at each forward call in training mode). A no-op in eval mode. The mask
    is drawn for the shape of its first use after a reset; a call with another batch size, or
    another size along a dimension outside ``shared_dims``, starts a new mask, except under
    per-sample compaction, where the DEQ passes the positions of the remaining samples and their
    rows of the mask are used.

    Args:
        p: drop probability in [0, 1).
        shared_dims: dimensions (>= 1) along which one mask value is shared, e.g. ``(2, 3)`` for
            one mask per channel of a (B, C, H, W) feature map.
        device: device of the (parameter-free) module; masks follow the input.
        dtype: unused (no parameters); accepted for the layer convention.

    Example:
        >>> cell = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), eq.VariationalDropout(0.1))

    Reference: Gal & Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent
    Neural Networks", NeurIPS 2016; used for DEQs by Bai et al. 2019.
    """

    def __init__(
        self,
        p: float = 0.1,
        *,
        shared_dims: tuple[int, ...] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.p = check_float("p", p, low=0.0, high=1.0, low_open=False, high_open=True)
        if not isinstance(shared_dims, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shared_dims
        ):
            raise ValueError(f"shared_dims must be a tuple of ints >= 1, got {shared_dims!r}")
        self.shared_dims = shared_dims
        self.mask: Tensor | None = None

    def reset(self) -> None:
        """Forget the mask; the next call draws a new one."""
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        index = _BATCH_INDEX.get()
        mask = self.mask
        full_batch = x.shape[0] if index is None else None
        if (
            mask is None
            or mask.dim() != x.dim()
            or (full_batch is not None and mask.shape[0] != full_batch)
            or mask.device != x.device
            or not self._fits(mask, x)
        ):
            if index is not None:
                raise RuntimeError(
                    "VariationalDropout has no mask for the full batch of this shape; it must "
                    "first be called on the whole batch (the DEQ module does this on its first "
                    f"iteration), got an input of shape {tuple(x.shape)}"
                )
            mask = self._draw(x)
            self.mask = mask
        if index is not None:
            if x.shape[0] != index.numel():  # shapes only: no device synchronisation
                raise RuntimeError(
                    "VariationalDropout under per-sample compaction needs one row per sample: "
                    f"the DEQ passes {index.numel()} samples, but the input has shape "
                    f"{tuple(x.shape)} (mask drawn for {mask.shape[0]} rows); apply it before "
                    "folding other dimensions into the batch dimension, or use compact=False"
                )
            mask = mask.index_select(0, index)
        return x * mask.to(x.dtype)

    def _fits(self, mask: Tensor, x: Tensor) -> bool:
        """Whether ``mask`` has ``x``'s size along every dimension but the batch and shared ones."""
        return all(
            mask.shape[d] == x.shape[d] for d in range(1, x.dim()) if d not in self.shared_dims
        )

    def _draw(self, x: Tensor) -> Tensor:
        for d in self.shared_dims:
            if d >= x.dim():
                raise ValueError(
                    f"shared_dims {self.shared_dims} do not fit an input of shape {tuple(x.shape)}"
                )
        shape = [1 if d in self.shared_dims else s for d, s in enumerate(x.shape)]
        keep = 1.0 - self.p
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        return torch.empty(shape, device=x.device, dtype=dtype).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"


def reset_dropout(module: nn.Module) -> None:
    """Draw new masks at the next call of every :class:`VariationalDropout` in ``module``."""
    for layer in module.modules():
        if isinstance(layer, VariationalDropout):
            layer.reset()
