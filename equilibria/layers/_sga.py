"""Stop-gradient attention (SGA): attention whose map passes no gradient.

In reference-based colourisation the gradient that flows through an attention map conflicts with
the gradients of the value and skip paths; SGA removes it. The map is computed from the features
themselves (no learned query/key projections) under ``torch.no_grad``:

    A = colnorm(softmax_row(s · X Yᵀ)),  Z = Norm(A σ(W_v Y) + σ(W_x X)) + X,  σ = LeakyReLU(0.2),

where colnorm rescales each column of A to sum to one over the queries.

Reference: Z. Li, Z. Geng, Z. Kang, W. Chen, Y. Yang, "Eliminating Gradient Conflict in
Reference-based Line-Art Colorization", ECCV 2022.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from .._validate import check_bool, check_choice, check_float, check_int
from ._common import _check_finite

__all__ = [
    "AttentionKind",
    "StopGradientAttention",
    "attention_map",
    "stop_gradient_attention",
]

AttentionKind = Literal["stop_gradient", "standard"]
_ATTENTIONS = ("stop_gradient", "standard")
_NORMS = ("layer", "none")


def _check_tokens(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, C), got {type(t).__name__}")
    if t.ndim != 3 or t.numel() == 0:
        raise ValueError(f"{name} must have shape (B, N, C) and not be empty, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    return t


def _check_pair(query: Tensor, key: Tensor, names: tuple[str, str] = ("query", "key")) -> None:
    if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(
            f"queries (B, N, C) and keys (B, M, C) must share B and C, got {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    _check_like(names[1], key, query, names[0])


def _check_like(
    name: str, t: Tensor, ref: Tensor, ref_name: str, *, under_autocast: bool = False
) -> None:
    """``t`` must have the dtype and device of ``ref``; with ``under_autocast``, only the device
    while autocast is on there (its matrix products hand back their own dtype)."""
    same_dtype = t.dtype == ref.dtype or (
        under_autocast and torch.is_autocast_enabled(t.device.type)
    )
    if not same_dtype or t.device != ref.device:
        raise ValueError(
            f"{name} must have the dtype and device of {ref_name}, {ref.dtype} on {ref.device}, "
            f"got {t.dtype} on {t.device}"
        )


def _check_scale(scale: object, allow_none: bool) -> None:
    if allow_none and scale is None:
        return
    try:
        check_float("scale", scale, low=0.0)
    except (TypeError, ValueError) as error:
        if not allow_none:
            raise
        # None is allowed too (the default: 1 / sqrt(channels))
        raise type(error)(str(error).replace("must be", "must be None or", 1)) from None


def attention_map(
    query: Tensor, key: Tensor, *, scale: float, column_norm: bool = True, eps: float = 1e-9
) -> Tensor:
    """Differentiable attention map softmax_row(scale · Q Kᵀ), optionally column-normalised.

    Args:
        query: (B, N, C).
        key: (B, M, C).
        scale: multiplies the logits, a finite number > 0.
        column_norm: rescale each column to sum to one over the N queries (after the row softmax).
        eps: added to the column sums, >= 0.

    Returns:
        A, shape (B, N, M).
    """
    _check_pair(_check_tokens("query", query), _check_tokens("key", key))
    _check_scale(scale, allow_none=False)
    check_bool("column_norm", column_norm)
    check_float("eps", eps, low=0.0, low_open=False)
    _check_finite("query", query)
    _check_finite("key", key)
    return _attention_map(query, key, scale, column_norm, eps)


def _attention_map(
    query: Tensor, key: Tensor, scale: float, column_norm: bool, eps: float
) -> Tensor:
    """:func:`attention_map` without the input checks (its callers have made them)."""
    a = torch.softmax(torch.bmm(query, key.mT) * scale, dim=-1)  # (B, N, M)
    if column_norm:
        a = a / (a.sum(dim=1, keepdim=True) + eps)
    return a


def stop_gradient_attention(
    x: Tensor,
    y: Tensor,
    value: Tensor,
    *,
    scale: float | None = None,
    column_norm: bool = True,
    eps: float = 1e-9,
) -> Tensor:
    """A · value with A = colnorm(softmax_row(scale · X Yᵀ)) computed without gradient.

    Gradients reach ``value`` only; ``x`` and ``y`` receive none through the map.

    Args:
        x: queries, shape (B, N, C).
        y: keys, shape (B, M, C) (``y = x`` for self-attention).
        value: values, shape (B, M, C_v).
        scale: logit scale; ``None`` means 1/√C.
        column_norm: L1-normalise the columns of A over the queries, as in SGA.
        eps: added to the column sums.

    Returns:
        Attended values, shape (B, N, C_v).

    Example:
        >>> x, y = torch.randn(2, 10, 8), torch.randn(2, 7, 8)
        >>> stop_gradient_attention(x, y, torch.randn(2, 7, 4)).shape
        torch.Size([2, 10, 4])

    Reference: Li et al., "Eliminating Gradient Conflict in Reference-based Line-Art
    Colorization", ECCV 2022.
    """
    x, y, value = _check_tokens("x", x), _check_tokens("y", y), _check_tokens("value", value)
    _check_pair(x, y, ("x", "y"))
    _check_scale(scale, allow_none=True)
    check_bool("column_norm", column_norm)
    if value.shape[:2] != y.shape[:2]:
        raise ValueError(
            f"value must have shape (B, M, C_v) matching y {tuple(y.shape)}, got "
            f"{tuple(value.shape)}"
        )
    _check_like("value", value, x, "x", under_autocast=True)
    check_float("eps", eps, low=0.0, low_open=False)
    for name, t in (("x", x), ("y", y), ("value", value)):
        _check_finite(name, t)
    scale = 1.0 / math.sqrt(x.shape[-1]) if scale is None else scale
    return _stop_gradient_attention(x, y, value, scale, column_norm, eps)


def _stop_gradient_attention(
    x: Tensor, y: Tensor, value: Tensor, scale: float, column_norm: bool, eps: float
) -> Tensor:
    """:func:`stop_gradient_attention` without the input checks (its callers have made them)."""
    with torch.no_grad():
        a = _attention_map(x, y, scale, column_norm, eps)
    return torch.bmm(a, value)


class StopGradientAttention(nn.Module):
    """Stop-gradient attention block on tokens, for self- and cross-attention.

    ``Z = Norm(A σ(W_v Y) + σ(W_x X)) + X`` with σ = LeakyReLU(negative_slope). With
    ``attention="stop_gradient"`` (SGA) A = colnorm(softmax_row(s X Yᵀ)) is computed from the
    features under ``torch.no_grad``; ``attention="standard"`` instead uses learned projections,
    A = colnorm(softmax_row(s (W_q X)(W_k Y)ᵀ)), with the gradient flowing through A, for
    comparisons. Queries X come from the input, keys and values from ``y`` (or X itself).

    Args:
        channels: C, channels of the queries and keys/values (the map needs X Yᵀ, so both share C).
        attention: ``"stop_gradient"`` or ``"standard"``.
        column_norm: L1-normalise the columns of A over the queries (SGA's double normalisation).
        scale: logit scale s; ``None`` means 1/√C (the paper writes the map without a scale;
            pass 1.0 for that, which saturates the softmax for large C).
        negative_slope: slope of the LeakyReLU σ.
        norm: ``"layer"`` (LayerNorm over channels) or ``"none"``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Example:
        >>> sga = StopGradientAttention(16)
        >>> sga(torch.randn(2, 50, 16), torch.randn(2, 30, 16)).shape
        torch.Size([2, 50, 16])

    Reference: Li et al., "Eliminating Gradient Conflict in Reference-based Line-Art
    Colorization", ECCV 2022.
    """

    def __init__(
        self,
        channels: int,
        *,
        attention: AttentionKind = "stop_gradient",
        column_norm: bool = True,
        scale: float | None = None,
        negative_slope: float = 0.2,
        norm: Literal["layer", "none"] = "layer",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("channels", channels, minimum=1)
        check_choice("attention", attention, _ATTENTIONS)
        check_bool("column_norm", column_norm)
        _check_scale(scale, allow_none=True)
        check_float("negative_slope", negative_slope)
        check_choice("norm", norm, _NORMS)
        self.channels, self.attention, self.column_norm = channels, attention, column_norm
        self.scale = 1.0 / math.sqrt(channels) if scale is None else float(scale)
        factory = {"device": device, "dtype": dtype}
        self.value = nn.Linear(channels, channels, **factory)  # W_v
        self.skip = nn.Linear(channels, channels, **factory)  # W_x
        if attention == "standard":
            self.query = nn.Linear(channels, channels, **factory)  # W_q
            self.key = nn.Linear(channels, channels, **factory)  # W_k
        else:
            self.query = self.key = None
        self.act = nn.LeakyReLU(float(negative_slope))
        self.norm = nn.LayerNorm(channels, **factory) if norm == "layer" else nn.Identity()

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, attention={self.attention!r}, column_norm={self.column_norm}, "
            f"scale={self.scale:.4g}"
        )

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """x: queries (B, N, C); y: keys/values (B, M, C), default x. Returns (B, N, C)."""
        x = _check_tokens("x", x)
        y = x if y is None else _check_tokens("y", y)
        if x.shape[-1] != self.channels:
            raise ValueError(f"x must have C={self.channels} channels, got {tuple(x.shape)}")
        _check_like("x", x, self.value.weight, "the block's parameters", under_autocast=True)
        _check_pair(x, y, ("x", "y"))
        _check_finite("x", x)
        if y is not x:
            _check_finite("y", y)
        value = self.act(self.value(y))  # σ(W_v Y), (B, M, C)
        if self.query is None:  # x and y are checked above; each input is checked once
            _check_finite("value", value)
            attended = _stop_gradient_attention(x, y, value, self.scale, self.column_norm, 1e-9)
        else:
            a = attention_map(
                self.query(x), self.key(y), scale=self.scale, column_norm=self.column_norm
            )
            attended = torch.bmm(a, value)
        return self.norm(attended + self.act(self.skip(x))) + x
