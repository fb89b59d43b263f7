"""Tests of stop-gradient attention (SGA)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _problems import DEVICE

from equilibria.layers import StopGradientAttention, attention_map, stop_gradient_attention

F64 = torch.float64


def _with_nan_value_weight(block: StopGradientAttention) -> StopGradientAttention:
    """A block whose value projection has gone non-finite (as after a diverged step)."""
    with torch.no_grad():
        block.value.weight[0, 0] = float("nan")
    return block


def tokens(batch, n, channels, requires_grad=False):
    return torch.randn(batch, n, channels, dtype=F64, requires_grad=requires_grad)


def reference_block(block, x, y, a, negative_slope=0.2):
    """Z = Norm(A σ(W_v Y) + σ(W_x X)) + X with a given, constant map A."""
    value = F.leaky_relu(block.value(y), negative_slope)
    return block.norm(a @ value + F.leaky_relu(block.skip(x), negative_slope)) + x


@pytest.mark.parametrize("column_norm", [True, False])
def test_map_normalisation_and_no_gradient(column_norm):
    x, y = tokens(2, 5, 4, True), tokens(2, 7, 4, True)
    value = tokens(2, 7, 3, True)
    out = stop_gradient_attention(x, y, value, column_norm=column_norm)
    grads = torch.autograd.grad(out.sum(), (x, y, value), allow_unused=True)
    assert grads[0] is None and grads[1] is None  # nothing flows through the map
    a = attention_map(x.detach(), y.detach(), scale=0.5, column_norm=column_norm)
    sums = a.sum(1) if column_norm else a.sum(2)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    # the default scale is 1/√C
    torch.testing.assert_close(out, a @ value)
    assert torch.autograd.gradcheck(
        lambda v: stop_gradient_attention(x.detach(), y.detach(), v, column_norm=column_norm),
        (value,),
    )


def test_map_equals_formula():
    x, y = tokens(2, 5, 4), tokens(2, 6, 4)
    a = torch.softmax(0.3 * x @ y.mT, dim=-1)
    a = a / a.sum(1, keepdim=True)
    torch.testing.assert_close(attention_map(x, y, scale=0.3), a)


# (block options, the scale, column_norm and negative_slope they must reach the computation as)
OPTIONS = [
    ({}, 1 / math.sqrt(4), True, 0.2),
    ({"scale": 0.7, "column_norm": False, "negative_slope": 0.05}, 0.7, False, 0.05),
    ({"scale": 2, "negative_slope": -0.5}, 2.0, True, -0.5),
]


@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("norm", ["layer", "none"])
@pytest.mark.parametrize(("options", "scale", "column_norm", "slope"), OPTIONS)
def test_sga_block_passes_no_gradient_through_the_map(
    cross, norm, options, scale, column_norm, slope
):
    block = StopGradientAttention(4, norm=norm, dtype=F64, **options)
    x = tokens(2, 5, 4, True)
    y = tokens(2, 6, 4, True) if cross else x
    out = block(x, y if cross else None)
    with torch.no_grad():
        a = attention_map(x, y, scale=scale, column_norm=column_norm)
    ref = reference_block(block, x, y, a, slope)
    torch.testing.assert_close(out, ref)
    weight = torch.randn_like(out)
    inputs = [x, y, *block.parameters()] if cross else [x, *block.parameters()]
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * weight).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize(("options", "scale", "column_norm", "slope"), OPTIONS)
def test_standard_attention_differentiates_the_map(options, scale, column_norm, slope):
    block = StopGradientAttention(4, attention="standard", dtype=F64, **options)
    x, y = tokens(1, 3, 4, True), tokens(1, 4, 4, True)
    out = block(x, y)
    with torch.no_grad():
        a = attention_map(block.query(x), block.key(y), scale=scale, column_norm=column_norm)
    ref = reference_block(block, x, y, a, slope)
    torch.testing.assert_close(out, ref)
    weight = torch.randn_like(out)
    (grad_y,) = torch.autograd.grad((out * weight).sum(), y)
    (grad_y_const_map,) = torch.autograd.grad((ref * weight).sum(), y)
    assert not torch.allclose(grad_y, grad_y_const_map)
    assert torch.autograd.gradcheck(block, (x, y))
    assert block.query.weight.requires_grad


def test_self_attention_default_and_dtype_device():
    block = StopGradientAttention(8, scale=1.0, column_norm=False, dtype=F64, device=DEVICE)
    x = tokens(2, 6, 8)
    torch.testing.assert_close(block(x), block(x, x))
    assert block.value.weight.dtype == F64 and block.query is None
    assert StopGradientAttention(8)(torch.randn(1, 3, 8)).dtype == torch.float32


X = torch.randn(2, 5, 4)

BAD_CALLS = [
    (lambda: StopGradientAttention(0), ValueError, "channels must be an int >= 1, got 0"),
    (lambda: StopGradientAttention(4.0), TypeError, "channels must be an int"),
    (
        lambda: StopGradientAttention(4, attention="flash"),
        ValueError,
        "attention must be one of 'stop_gradient', 'standard', got",
    ),
    (lambda: StopGradientAttention(4, column_norm=1), TypeError, "column_norm must be a bool"),
    (
        lambda: stop_gradient_attention(X, X, X, column_norm="no"),
        TypeError,
        "column_norm must be a bool, got str 'no'",
    ),
    (lambda: attention_map(X, X, scale=1.0, column_norm=None), TypeError, "column_norm must be"),
    (
        lambda: stop_gradient_attention(X, X.double(), X),
        ValueError,
        f"y must have the dtype and device of x, torch.float32 on {X.device}, got torch.float64 on "
        f"{X.device}",
    ),
    (
        lambda: stop_gradient_attention(X, X, X.double()),
        ValueError,
        "value must have the dtype and device of x",
    ),
    (
        lambda: attention_map(X, X.to("meta"), scale=1.0),
        ValueError,
        "key must have the dtype and device of query",
    ),
    (
        lambda: StopGradientAttention(4)(X.double()),
        ValueError,
        "x must have the dtype and device of the block's parameters, torch.float32",
    ),
    (
        lambda: StopGradientAttention(4, scale=0.0),
        ValueError,
        "scale must be None or in (0.0, inf), got 0.0",
    ),
    (
        lambda: StopGradientAttention(4, scale=float("nan")),
        ValueError,
        "scale must be None or in (0.0, inf), got nan",
    ),
    (
        lambda: StopGradientAttention(4, scale="1"),
        TypeError,
        "scale must be None or a real number in (0.0, inf), got str '1'",
    ),
    (
        lambda: StopGradientAttention(4, negative_slope="0.2"),
        TypeError,
        "negative_slope must be a real number in (-inf, inf), got str '0.2'",
    ),
    (
        lambda: StopGradientAttention(4, negative_slope=True),
        TypeError,
        "negative_slope must be a real number in (-inf, inf), got bool True",
    ),
    (
        lambda: StopGradientAttention(4, negative_slope=float("inf")),
        ValueError,
        "negative_slope must be in (-inf, inf), got inf",
    ),
    (
        lambda: stop_gradient_attention(X, X, X, scale=-1.0),
        ValueError,
        "scale must be None or in (0.0, inf), got -1.0",
    ),
    (
        lambda: stop_gradient_attention(X, X, X, scale=float("nan")),
        ValueError,
        "scale must be None or in (0.0, inf), got nan",
    ),
    (lambda: attention_map(X, X, scale=0), ValueError, "scale must be in (0.0, inf), got 0"),
    (
        lambda: attention_map(X, X, scale=10**400, eps=10**400),
        ValueError,
        "scale must be in (0.0, inf), got 1000",
    ),
    (
        lambda: attention_map(X, X, scale=1.0, eps=10**400),
        ValueError,
        "eps must be in [0.0, inf), got 1000",
    ),
    (
        lambda: StopGradientAttention(4, negative_slope=10**400),
        ValueError,
        "negative_slope must be in (-inf, inf), got 1000",
    ),
    (
        lambda: attention_map(X, X, scale=float("inf")),
        ValueError,
        "scale must be in (0.0, inf), got inf",
    ),
    (
        lambda: attention_map(X, X, scale=None),
        TypeError,
        "scale must be a real number in (0.0, inf), got NoneType None",
    ),
    (
        lambda: attention_map(X, X, scale=1.0, eps=-1e-9),
        ValueError,
        "eps must be in [0.0, inf), got -1e-09",
    ),
    (
        lambda: attention_map(X, X, scale=1.0, eps="0"),
        TypeError,
        "eps must be a real number in [0.0, inf), got str '0'",
    ),
    (
        lambda: attention_map(X, X.clone().fill_(float("nan")), scale=1.0),
        ValueError,
        "key must be finite (no NaN or Inf)",
    ),
    (
        lambda: stop_gradient_attention(X, X, torch.full((2, 5, 3), float("inf"))),
        ValueError,
        "value must be finite (no NaN or Inf)",
    ),
    (
        lambda: StopGradientAttention(4)(X.clone().fill_(float("nan"))),
        ValueError,
        "x must be finite (no NaN or Inf)",
    ),
    (
        lambda: StopGradientAttention(4)(X, X.clone().fill_(float("inf"))),
        ValueError,
        "y must be finite (no NaN or Inf)",
    ),
    (
        lambda: stop_gradient_attention(X, X, X, eps=-1.0),
        ValueError,
        "eps must be in [0.0, inf), got -1.0",
    ),
    (
        lambda: _with_nan_value_weight(StopGradientAttention(4))(X),
        ValueError,
        "value must be finite (no NaN or Inf)",
    ),
    (lambda: StopGradientAttention(4, norm="batch"), ValueError, "norm must be one of"),
    (
        lambda: StopGradientAttention(4)(torch.randn(2, 5)),
        ValueError,
        "x must have shape (B, N, C)",
    ),
    (lambda: StopGradientAttention(4)(torch.randn(2, 5, 3)), ValueError, "C=4 channels"),
    (
        lambda: StopGradientAttention(4)(torch.randn(2, 5, 4), torch.randn(2, 5, 3)),
        ValueError,
        "must share B and C",
    ),
    (
        lambda: StopGradientAttention(4)(torch.randn(2, 5, 4), torch.randn(3, 5, 4)),
        ValueError,
        "must share B and C",
    ),
    (
        lambda: StopGradientAttention(4)(torch.randn(2, 5, 4), "y"),
        TypeError,
        "y must be a torch.Tensor",
    ),
    (
        lambda: StopGradientAttention(4)(torch.ones(2, 5, 4, dtype=torch.long)),
        TypeError,
        "floating dtype",
    ),
    (
        lambda: stop_gradient_attention(
            torch.randn(2, 5, 4), torch.randn(2, 6, 4), torch.randn(2, 5, 4)
        ),
        ValueError,
        "value must have shape",
    ),
]


@pytest.mark.parametrize(("call", "error", "fragment"), BAD_CALLS)
def test_bad_inputs(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.parametrize("attention", ["stop_gradient", "standard"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_block_under_autocast_follows_float32(attention, x_dtype):
    """bfloat16 autocast (the value projection comes back in bfloat16; SGA refused it once):
    output and gradients follow the float32 block to bfloat16 accuracy."""
    torch.manual_seed(13)
    block = StopGradientAttention(8, attention=attention, device=DEVICE)
    x = torch.randn(2, 6, 8, device=DEVICE)

    def run(autocast):
        block.zero_grad()
        inp = (x.to(x_dtype) if autocast else x).detach().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            out = block(inp)
        out.float().square().sum().backward()
        return out.float(), [inp.grad.float(), *(p.grad.clone() for p in block.parameters())]

    out, grads = run(True)
    ref, grads_ref = run(False)
    assert torch.isfinite(out).all()
    assert (out - ref).norm() <= 0.03 * ref.norm()
    # against the whole gradient, not each tensor's own norm: the learned key's bias has an
    # exactly zero gradient (a row softmax ignores a shift common to the row), so it is pure
    # round-off, and small tensors carry round-off of ~10% of their own size
    total, total_ref = (torch.cat([g.flatten() for g in gs]) for gs in (grads, grads_ref))
    assert F.cosine_similarity(total, total_ref, dim=0) > 0.99
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert (g - g_ref).norm() <= 0.15 * total_ref.norm()


def test_the_block_checks_each_input_once(monkeypatch):
    """Each finiteness check is a device synchronisation; the block checked x up to four times
    (itself, then through the functional and the map it calls)."""
    import equilibria.layers._sga as sga

    seen = []
    real = sga._check_finite
    monkeypatch.setattr(sga, "_check_finite", lambda name, t: (seen.append(name), real(name, t)))
    StopGradientAttention(4)(X)
    assert seen == ["x", "value"]
    seen.clear()
    StopGradientAttention(4, attention="standard")(X, X + 1)
    assert seen == ["x", "y", "query", "key"]
