"""States as batch-first tensors, tuples, lists or dicts, viewed as one (B, D) matrix.

Solvers work on a flat (B, D) tensor: every sample is an independent problem of size D. A state made
of several tensors is concatenated along the feature axis; a single tensor is only reshaped (a view,
no copy). An entry point builds the :class:`StateSpec` of its state once, flattens the state once on
the way in and unflattens the result once on the way out; the solver and the backward methods see
only (B, D) tensors and the flat map of :meth:`StateSpec.flat_map`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor


def _describe(z: Any) -> str:
    if isinstance(z, Tensor):
        return f"a tensor of shape {tuple(z.shape)}"
    if isinstance(z, (tuple, list)):
        return f"a {type(z).__name__} of {len(z)} items"
    if isinstance(z, Mapping):
        return f"a dict with keys {sorted(map(str, z.keys()))}"
    return f"an object of type {type(z).__name__}"


@dataclass(frozen=True)
class StateSpec:
    """The structure, shapes, dtype and device of a state, and the maps to and from (B, D)."""

    kind: Literal["tensor", "tuple", "list", "dict"]
    keys: tuple[Any, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    # the tuple's own class for a NamedTuple state (rebuilt as one, so f sees its fields)
    tuple_type: type | None = None

    @property
    def batch(self) -> int:
        return self.shapes[0][0]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def of(z: Any, name: str = "z0") -> StateSpec:
        """Build the spec of ``z`` and validate it (batch-first floating tensors, one dtype)."""
        if isinstance(z, Tensor):
            kind, keys, leaves = "tensor", (), (z,)
        elif isinstance(z, (tuple, list)):  # MDEQ-style code passes lists of resolutions
            kind = "tuple" if isinstance(z, tuple) else "list"
            keys, leaves = tuple(range(len(z))), tuple(z)
        elif isinstance(z, Mapping):
            kind, keys = "dict", tuple(z.keys())
            leaves = tuple(z[k] for k in keys)
        else:
            raise TypeError(
                f"{name} must be a tensor, a tuple, list or dict of tensors, got {_describe(z)}"
            )
        if not leaves:
            raise ValueError(f"{name} must contain at least one tensor, got {_describe(z)}")
        for key, leaf in zip(keys or (None,), leaves):
            where = name if key is None else f"{name}[{key!r}]"
            if not isinstance(leaf, Tensor):
                raise TypeError(f"{where} must be a tensor, got {type(leaf).__name__}")
            if not leaf.is_floating_point():
                raise TypeError(f"{where} must have a floating dtype, got {leaf.dtype}")
            if leaf.dim() < 1:
                raise ValueError(
                    f"{where} must be batch-first (at least one dimension, the batch), "
                    f"got shape {tuple(leaf.shape)}"
                )
        first = leaves[0]
        for key, leaf in zip(keys, leaves):
            if leaf.shape[0] != first.shape[0]:
                raise ValueError(
                    f"every tensor in {name} must have the same batch size: {name}[{key!r}] has "
                    f"{leaf.shape[0]}, the first has {first.shape[0]}"
                )
            if leaf.dtype != first.dtype or leaf.device != first.device:
                raise ValueError(
                    f"every tensor in {name} must share one dtype and device: {name}[{key!r}] is "
                    f"{leaf.dtype} on {leaf.device}, the first is {first.dtype} on {first.device}"
                )
        return StateSpec(
            kind=kind,
            keys=keys,
            shapes=tuple(leaf.shape for leaf in leaves),
            sizes=tuple(leaf.shape[1:].numel() for leaf in leaves),
            dtype=first.dtype,
            device=first.device,
            tuple_type=type(z) if kind == "tuple" and hasattr(z, "_fields") else None,
        )

    def leaves(self, z: Any) -> tuple[Tensor, ...]:
        if self.kind == "tensor":
            return (z,)
        if self.kind in ("tuple", "list"):
            return tuple(z)
        return tuple(z[k] for k in self.keys)

    def flatten(self, z: Any) -> Tensor:
        """(B, D) view (single tensor) or concatenation (several tensors) of ``z``."""
        if self.kind == "tensor":
            return z.reshape(z.shape[0], self.sizes[0])  # not -1: ambiguous for an empty batch
        leaves = zip(self.leaves(z), self.sizes)
        return torch.cat([leaf.reshape(leaf.shape[0], size) for leaf, size in leaves], dim=1)

    def unflatten(self, flat: Tensor) -> Any:
        """Inverse of :meth:`flatten`; the batch size is taken from ``flat``."""
        b = flat.shape[0]
        if self.kind == "tensor":
            return flat.view((b, *self.shapes[0][1:]))
        # one narrow per leaf, not torch.split: split's outputs are views of a multi-output op,
        # which autograd forbids modifying in place (nn.ReLU(inplace=True), h += skip)
        leaves, start = [], 0
        for size, shape in zip(self.sizes, self.shapes):
            leaves.append(flat.narrow(1, start, size).reshape((b, *shape[1:])))
            start += size
        return self._pack(leaves)

    def _pack(self, leaves: list[Tensor]) -> Any:
        """The state's structure around ``leaves`` (in the order of :attr:`keys`)."""
        if self.kind == "tensor":
            return leaves[0]
        if self.kind == "tuple":
            return tuple(leaves) if self.tuple_type is None else self.tuple_type(*leaves)
        if self.kind == "list":
            return list(leaves)
        return dict(zip(self.keys, leaves))

    def check_output(self, out: Any, batch: int, name: str = "f") -> Any:
        """Raise unless ``out`` has this structure; under autocast, cast to the state's dtype."""
        if self.kind == "tensor":
            if (
                isinstance(out, Tensor)
                and out.shape[1:] == self.shapes[0][1:]
                and out.shape[:1] == (batch,)
                and out.dtype == self.dtype
                and out.device == self.device
            ):
                return out
        leaves = self._match_structure(out, name)
        fixed = []
        for key, leaf, shape in zip(self.keys or (None,), leaves, self.shapes):
            where = f"{name}(z)" if key is None else f"{name}(z)[{key!r}]"
            if leaf.dim() == 0:  # batch-first: a scalar has no batch dimension to match
                raise ValueError(
                    f"{where} must have the shape of the state, {(batch, *shape[1:])} "
                    "(batch-first), got a 0-d tensor (shape ()); return one value per sample"
                )
            if leaf.shape[0] != batch or leaf.shape[1:] != shape[1:]:
                raise ValueError(
                    f"{where} must have the shape of the state, "
                    f"{(batch, *shape[1:])}, got {tuple(leaf.shape)}"
                )
            if leaf.dtype != self.dtype:
                # autocast picks each op's dtype: a cell may end in bfloat16 (a matmul) over a
                # float32 state, or in float32 (a norm, a pooling) over a bfloat16 state
                if leaf.is_floating_point() and torch.is_autocast_enabled(leaf.device.type):
                    leaf = leaf.to(self.dtype)
                else:
                    raise TypeError(
                        f"{where} must have the dtype of the state, {self.dtype}, got {leaf.dtype}"
                    )
            if leaf.device != self.device:
                raise ValueError(
                    f"{where} must be on the device of the state, {self.device}, got {leaf.device}"
                )
            fixed.append(leaf)
        return self._pack(fixed)

    def _match_structure(self, out: Any, name: str) -> tuple[Tensor, ...]:
        expected = {
            "tensor": "a tensor",
            "tuple": f"a tuple of {len(self.shapes)} tensors",
            "list": f"a list of {len(self.shapes)} tensors",
            "dict": f"a dict with keys {sorted(map(str, self.keys))}",
        }[self.kind]
        ok = (
            (self.kind == "tensor" and isinstance(out, Tensor))
            or (
                self.kind in ("tuple", "list")  # either sequence: the output is flattened anyway
                and isinstance(out, (tuple, list))
                and len(out) == len(self.shapes)
            )
            or (
                self.kind == "dict"
                and isinstance(out, Mapping)
                and set(out.keys()) == set(self.keys)
            )
        )
        if not ok:
            raise TypeError(
                f"{name} must return the same structure as the state ({expected}), "
                f"got {_describe(out)}"
            )
        leaves = self.leaves(out)
        for key, leaf in zip(self.keys or (None,), leaves):
            if not isinstance(leaf, Tensor):
                raise TypeError(f"{name}(z)[{key!r}] must be a tensor, got {type(leaf).__name__}")
        return leaves

    def flat_map(self, f: Callable[..., Any], name: str = "f") -> Callable[..., Tensor]:
        """Wrap ``f`` (structured state -> structured state) as a map (B, D) -> (B, D).

        Extra positional arguments (the sample index under compaction) are passed through to ``f``.

        A map that edits its input in place (``z.mul_(0.5)``) would overwrite the caller's ``z0``
        and the iterates the solver keeps (Anderson's history), and the solve would report
        convergence at a wrong point. The first call therefore gets a copy, and if that copy's
        version counter moved, every later call gets a copy too; a pure map costs one copy.
        """
        inner = self._flat_map(f, name)
        copies: list[bool | None] = [None]  # None: not probed yet

        # not traced: a one-off check, and inference tensors have no version counter to read
        @torch.compiler.disable
        def probe(x: Tensor, *extra: Any) -> Tensor:
            mine = x.clone()
            version = None if mine.is_inference() else mine._version
            out = inner(mine, *extra)
            if version is None:
                copies[0] = not torch.equal(mine, x)
            else:
                copies[0] = mine._version != version
            return out

        def guarded(x: Tensor, *extra: Any) -> Tensor:
            if copies[0] is None:
                return probe(x, *extra)
            return inner(x.clone() if copies[0] else x, *extra)

        return guarded

    def _flat_map(self, f: Callable[..., Any], name: str) -> Callable[..., Tensor]:
        if self.kind == "tensor":
            tail, size = self.shapes[0][1:], self.sizes[0]
            dtype, device = self.dtype, self.device

            def flat_tensor(x: Tensor, *extra: Any) -> Tensor:
                b = x.shape[0]
                out = f(x.view((b, *tail)), *extra)
                if not (
                    isinstance(out, Tensor)
                    and out.shape[:1] == (b,)
                    and out.shape[1:] == tail
                    and out.dtype == dtype
                    and out.device == device
                ):
                    out = self.check_output(out, b, name)
                return out.reshape(b, size)

            return flat_tensor

        def flat_tree(x: Tensor, *extra: Any) -> Tensor:
            out = self.check_output(f(self.unflatten(x), *extra), x.shape[0], name)
            return self.flatten(out)

        return flat_tree


def index_batch(x: Any, index: Tensor, batch: int) -> Any:
    """Rows ``index`` of every batch-first tensor in ``x`` (a tensor, tuple, list or dict).

    A tensor is batch-first when its first dimension has the full batch size ``batch``; other
    tensors (scalars, shared vectors) and non-tensor leaves are passed through unchanged.
    NamedTuples keep their class; other mappings come back as plain dicts.
    """
    if isinstance(x, Tensor):
        return x.index_select(0, index) if x.dim() and x.shape[0] == batch else x
    if isinstance(x, tuple):
        rows = [index_batch(v, index, batch) for v in x]
        return type(x)(*rows) if hasattr(x, "_fields") else tuple(rows)  # NamedTuples stay
    if isinstance(x, list):
        return [index_batch(v, index, batch) for v in x]
    if isinstance(x, Mapping):
        return {k: index_batch(v, index, batch) for k, v in x.items()}
    return x
