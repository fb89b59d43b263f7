"""Per-sample warm starts: one detached (D,) row per sample id.

:class:`equilibria.DEQ` keeps two of these for ``cache_key``: the equilibria (the next forward
solve of an id starts from its last equilibrium) and, with the implicit backward, the adjoint
solutions u = J^T u + g (the next adjoint solve of an id starts from its last u; see
:class:`equilibria.Implicit`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class SampleCache:
    """Rows of flat (B, D) states stored by sample id."""

    def __init__(self) -> None:
        self.rows: dict[int, Tensor] = {}

    def fill(self, keys: Sequence[int], out: Tensor) -> bool:
        """Write the cached row of ``keys[i]`` into ``out[i]`` (in place) where one of the right
        size is cached; other rows are left as they are. Returns whether any row was written."""
        hit = False
        for row, key in enumerate(keys):
            cached = self.rows.get(key)
            if cached is not None and cached.shape == out.shape[1:]:
                out[row] = cached.to(out.device, out.dtype)
                hit = True
        return hit

    def start(self, keys: Sequence[int], like: Tensor) -> Tensor | None:
        """A (B, D) warm start shaped like ``like``: the cached rows, NaN rows for ids without
        one; None when no id has a row."""
        if not any(key in self.rows for key in keys):
            return None
        out = torch.full_like(like, float("nan"))
        return out if self.fill(keys, out) else None

    def store(self, keys: Sequence[int], values: Tensor) -> None:
        """Cache row ``i`` of ``values`` (B, D) under ``keys[i]``."""
        for key, row in zip(keys, values.detach().unbind(0)):
            self.rows[key] = row.clone()  # its own storage: a view would keep the whole batch

    def clear(self) -> None:
        self.rows.clear()

    def __len__(self) -> int:
        return len(self.rows)
