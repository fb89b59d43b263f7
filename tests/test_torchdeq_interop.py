"""Checkpoints across equilibria's ``apply_norm`` and TorchDEQ's ``torchdeq.norm.apply_norm``.

The key mapping (``torchdeq_state_dict`` / ``from_torchdeq_state_dict``) is tested on its own,
without TorchDEQ; where TorchDEQ 0.1.0 is installed (the ``bench`` extra), both directions are
loaded strictly into the other library's normalised module and must give the same weights, for
every option that has a counterpart in both (fixed target norm, clipping, spectral norm).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import equilibria as eq
from equilibria._norms import from_torchdeq_state_dict, torchdeq_state_dict

F64 = torch.float64


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Conv2d(3, 5, 2), nn.ConvTranspose2d(3, 4, 2), nn.LayerNorm(4)
    ).double()


def _normed(kind, **options):
    net = _net()
    eq.apply_norm(net, kind, **options)
    return net


# --- the mapping on its own ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "options", "suffixes"),
    [
        ("weight", {}, {"weight_g", "weight_v"}),
        ("weight", {"target_norm": 2.0}, {"weight_v"}),
        ("weight", {"clip": 0.5}, {"weight_g", "weight_v"}),
        ("spectral", {}, {"weight_orig", "weight_u", "weight_v"}),
        ("spectral", {"target_norm": 0.5, "clip": 1.0}, {"weight_orig", "weight_u", "weight_v"}),
    ],
)
def test_keys_map_both_ways(kind, options, suffixes):
    net = _normed(kind, **options)
    ours = net.state_dict()
    theirs = torchdeq_state_dict(ours)
    for i in range(3):  # the three normalised layers
        assert {k.split(".", 1)[1] for k in theirs if k.startswith(f"{i}.")} == suffixes | {"bias"}
    assert {k for k in theirs if k.startswith("3.")} == {"3.weight", "3.bias"}  # untouched
    assert all(any(t is v for v in ours.values()) for t in theirs.values())  # shared, not copied
    back = from_torchdeq_state_dict(theirs)
    assert back.keys() == ours.keys()
    assert all(back[k] is ours[k] for k in ours)
    net.load_state_dict(back, strict=True)


def _torchdeq_weight(sd, prefix, dim, kind, target=1.0, clip=None):
    """TorchDEQ 0.1.0's weight of one layer from its state_dict, written out here (its
    ``compute_weight``: ``factor = g / ||v||`` or ``target / ||v||`` per output channel, or
    ``target / (u^T W v)`` for spectral norm, then ``min(clip_value, factor)``)."""
    if kind == "spectral":
        w = sd[prefix + "weight_orig"]
        factor = target / torch.dot(
            sd[prefix + "weight_u"], w.movedim(dim, 0).flatten(1) @ sd[prefix + "weight_v"]
        )
    else:
        w = sd[prefix + "weight_v"]
        others = [d for d in range(w.dim()) if d != dim]
        norm = torch.linalg.vector_norm(w, dim=others, keepdim=True)
        factor = sd.get(prefix + "weight_g", target) / norm
    if clip is not None:
        factor = torch.clamp(factor, max=clip)
    return w * factor


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("weight", {}),
        ("weight", {"target_norm": 2.0}),
        ("weight", {"clip": 0.5}),
        ("weight", {"target_norm": 2.0, "clip": 1.0}),
        ("spectral", {}),
        ("spectral", {"target_norm": 0.5, "clip": 1.0}),
    ],
)
def test_mapped_keys_give_torchdeq_the_same_weights(kind, options):
    # without TorchDEQ: the mapped state_dict, read with TorchDEQ's formulas, gives each layer's
    # weight (the key test above would not notice g and v, or u and v, swapped both ways)
    net = _normed(kind, **options)
    with torch.no_grad():  # away from the initial values, where g = ||v||
        for p in net.parameters():
            p.mul_(1.5).add_(0.1)
    net.eval()
    theirs = torchdeq_state_dict(net.state_dict())
    target, clip = options.get("target_norm", 1.0), options.get("clip")
    for i, dim in ((0, 0), (1, 0), (2, 1)):  # a transposed convolution: per dim 1
        want = _torchdeq_weight(theirs, f"{i}.", dim, kind, target, clip)
        torch.testing.assert_close(net[i].weight, want, rtol=1e-12, atol=1e-15)


def test_a_torchdeq_layout_loads_into_an_apply_norm_module():
    # a TorchDEQ checkpoint written out by hand: weight norm on layer 0 (learned scale) and 1
    # (fixed norm), spectral norm on layer 2 (learn_scale=False); loaded strictly
    net = _net()
    eq.apply_norm(net, "weight", types=(nn.Linear,))
    eq.apply_norm(net, "weight", types=(nn.Conv2d,), target_norm=3.0)
    eq.apply_norm(net, "spectral", types=(nn.ConvTranspose2d,))
    g = torch.Generator().manual_seed(1)
    v0, v1, w2 = (
        torch.randn(s, generator=g, dtype=F64) for s in [(6, 4), (5, 3, 2, 2), (3, 4, 2, 2)]
    )
    g0 = torch.rand(6, 1, generator=g, dtype=F64) + 0.5
    u2, v2 = torch.randn(4, generator=g, dtype=F64), torch.randn(12, generator=g, dtype=F64)
    u2, v2 = u2 / u2.norm(), v2 / v2.norm()
    zeros = [torch.zeros(n, dtype=F64) for n in (6, 5, 4, 4)]
    theirs = {
        "0.weight_g": g0, "0.weight_v": v0, "0.bias": zeros[0],
        "1.weight_v": v1, "1.bias": zeros[1],
        "2.weight_orig": w2, "2.weight_u": u2, "2.weight_v": v2, "2.bias": zeros[2],
        "3.weight": torch.ones(4, dtype=F64), "3.bias": zeros[3],
    }  # fmt: skip
    net.load_state_dict(from_torchdeq_state_dict(theirs), strict=True)
    net.eval()
    torch.testing.assert_close(net[0].weight, g0 * v0 / v0.norm(dim=1, keepdim=True))
    norms1 = v1.flatten(1).norm(dim=1).view(5, 1, 1, 1)
    torch.testing.assert_close(net[1].weight, 3.0 * v1 / norms1)
    sigma = torch.dot(u2, w2.movedim(1, 0).flatten(1) @ v2)  # from the stored vectors
    torch.testing.assert_close(net[2].weight, w2 / sigma)


BAD_MAPPINGS = [
    pytest.param(
        lambda: from_torchdeq_state_dict(
            {
                "w.weight_orig": torch.ones(2, 2),
                "w.weight_u": torch.ones(2),
                "w.weight_v": torch.ones(2),
                "w.weight_g": torch.ones(2, 1),
            }
        ),
        ValueError,
        "'w.weight_g': TorchDEQ's spectral norm with a learned scale (learn_scale=True) has no "
        "counterpart",
        id="spectral-learned-scale",
    ),
    pytest.param(
        lambda: from_torchdeq_state_dict({"w.weight_u": torch.ones(2)}),
        ValueError,
        "state_dict key 'w.weight_u': _u without 'w.weight_orig'",
        id="u-alone",
    ),
    pytest.param(
        lambda: torchdeq_state_dict({"w.parametrizations.weight.1.scale": torch.ones(2)}),
        ValueError,
        "state_dict key 'w.parametrizations.weight.1.scale' has no TorchDEQ counterpart",
        id="chained-parametrization",
    ),
    pytest.param(
        lambda: torchdeq_state_dict({}, names="weight"),
        TypeError,
        "names must be a list of module names, got the string 'weight'",
        id="names-string",
    ),
]


@pytest.mark.parametrize(("call", "exc", "fragment"), BAD_MAPPINGS)
def test_bad_mappings(call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


def test_other_parameter_names_are_left_alone():
    # only the normalised parameters' names are mapped: a parameter that merely ends in _v or _g
    # (an attention block's "proj_v") keeps its key
    sd = {"attn.proj_v": torch.ones(2), "attn.weight_v": torch.ones(2), "lin.gate_g": torch.ones(1)}
    out = from_torchdeq_state_dict(sd)
    assert set(out) == {"attn.proj_v", "attn.parametrizations.weight.original", "lin.gate_g"}
    out = from_torchdeq_state_dict(
        {"kernel_g": torch.ones(1), "kernel_v": torch.ones(2)}, ["kernel"]
    )
    assert set(out) == {"parametrizations.kernel.original0", "parametrizations.kernel.original1"}


# --- against TorchDEQ itself ----------------------------------------------------------------------

# (our kind, our options, TorchDEQ's norm_type, its options)
PAIRS = [
    ("weight", {}, "weight_norm", {}),
    ("weight", {"target_norm": 2.0}, "weight_norm", {"learn_scale": False, "target_norm": 2.0}),
    (
        "weight",
        {"target_norm": 2.0, "clip": 1.0},
        "weight_norm",
        {"learn_scale": False, "target_norm": 2.0, "clip": True, "clip_value": 1.0},
    ),
    ("weight", {"clip": 0.5}, "weight_norm", {"clip": True, "clip_value": 0.5}),
    ("spectral", {}, "spectral_norm", {"learn_scale": False}),
    (
        "spectral",
        {"target_norm": 0.5, "clip": 1.0},
        "spectral_norm",
        {"learn_scale": False, "target_norm": 0.5, "clip": True, "clip_value": 1.0},
    ),
]


@pytest.mark.parametrize(("kind", "options", "td_kind", "td_options"), PAIRS)
def test_checkpoints_load_both_ways_with_torchdeq(kind, options, td_kind, td_options):
    torchdeq_norm = pytest.importorskip("torchdeq.norm")
    ours = _normed(kind, **options)
    with torch.no_grad():  # move the weights away from their initial values
        for p in ours.parameters():
            p.mul_(1.5).add_(0.1)
    theirs = copy.deepcopy(_net())
    torchdeq_norm.apply_norm(theirs, td_kind, **td_options)
    ours.eval()
    theirs.eval()
    theirs.load_state_dict(torchdeq_state_dict(ours.state_dict()), strict=True)
    torchdeq_norm.reset_norm(theirs)  # TorchDEQ computes its weights on request
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-12, atol=1e-15)
    fresh = _normed(kind, **options)
    fresh.load_state_dict(from_torchdeq_state_dict(theirs.state_dict()), strict=True)
    fresh.eval()
    for a, b in zip(fresh, theirs, strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-12, atol=1e-15)
