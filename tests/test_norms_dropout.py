"""Weight and spectral norm computed once per forward call, and variational dropout.

The norm tests count the calls of the parametrisation modules themselves (a forward hook on
``layer.parametrizations.weight[0]``), so "once per forward" is measured, not assumed; the same
cell solved without the cache shows the count the cache saves. Gradients to the original
(unnormalised) parameters are checked in float64 against a dense implicit reference. The dropout
tests record every mask the cell uses through a forward hook.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _cells import backward_reference, dense_implicit
from _problems import BACKWARD_NAMES, DEVICE, F64, gen, loss, rel_err
from torch import nn
from torch.nn.utils import parametrize

import equilibria as eq
from equilibria._dropout import _BATCH_INDEX, batch_index

KINDS = ("weight", "spectral")
TIGHT = {"tol": 1e-11, "max_iter": 300}


class NormCell(nn.Module):
    """f(z, x) = tanh(0.7 lin(z) + inj(x)): a contraction in z under either norm."""

    def __init__(self, d=5, dx=3, seed=0):
        super().__init__()
        g = gen(seed)
        self.lin = nn.Linear(d, d, dtype=F64)
        self.inj = nn.Linear(dx, d, dtype=F64)
        with torch.no_grad():
            w = torch.randn(d, d, generator=g, dtype=F64)
            self.lin.weight.copy_(0.7 * w / torch.linalg.matrix_norm(w, ord=2))
            self.lin.bias.copy_(0.1 * torch.randn(d, generator=g, dtype=F64))
            self.inj.weight.copy_(torch.randn(d, dx, generator=g, dtype=F64))
            self.inj.bias.copy_(torch.randn(d, generator=g, dtype=F64))

    def forward(self, z, x):
        return torch.tanh(0.7 * self.lin(z) + self.inj(x))


def _x(batch=4, dx=3, seed=1):
    return torch.randn(batch, dx, generator=gen(seed), dtype=F64)


def _init(x):
    return x.new_zeros(x.shape[0], 5)


def count_norm_calls(module):
    """A dict {layer name: calls of its weight parametrisation}, updated by forward hooks."""
    counts = {}
    for name, layer in module.named_modules():
        if parametrize.is_parametrized(layer, "weight"):
            counts[name] = 0

            def hook(mod, inputs, output, name=name):
                counts[name] += 1

            layer.parametrizations.weight[0].register_forward_hook(hook)
    assert counts, "no parametrised layer"
    return counts


def dense_reference(cell, x, params):
    """Dense z* (long Picard loop) and dense implicit gradients of loss(z*) w.r.t. ``params``."""
    z0 = torch.zeros(x.shape[0], 5, dtype=F64)
    return dense_implicit(lambda z: cell(z, x), z0, params, loss, iters=300)


# --- norms: computed once per forward ----------------------------------------------------------


@pytest.mark.parametrize("backward", BACKWARD_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_norm_computed_once_per_forward(kind, backward):
    cell = eq.apply_norm(NormCell(), kind)
    counts = count_norm_calls(cell)
    assert set(counts) == {"lin", "inj"}
    layer = eq.DEQ(cell, init=_init, solver="picard", backward=backward, **TIGHT)
    x = _x()
    z = layer(x)
    loss(z).backward()
    sol = layer.last_solution
    assert sol.all_converged and sol.nfev > 10  # many cell calls ...
    assert counts == {"lin": 1, "inj": 1}  # ... one weight computation, backward included
    for name, p in cell.named_parameters():  # the originals (and biases) are trained
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
    with torch.no_grad():
        layer(x)
    assert counts == {"lin": 2, "inj": 2}  # once per forward call, also without grad


@pytest.mark.parametrize("kind", KINDS)
def test_without_the_cache_the_norm_is_recomputed_at_every_call(kind):
    # the measurement above is meaningful: the plain functional form pays once per cell call
    cell = eq.apply_norm(NormCell(), kind)
    counts = count_norm_calls(cell)
    x = _x()
    _, sol = eq.fixed_point(lambda z: cell(z, x), _init(x), backward="implicit", **TIGHT)
    assert counts["lin"] == sol.nfev + 1 > 10  # every solver call plus the recorded evaluation
    # eq.norm_cache gives the functional form the DEQ's behaviour
    with eq.norm_cache(cell):
        _, sol = eq.fixed_point(lambda z: cell(z, x), _init(x), backward="implicit", **TIGHT)
    assert counts["lin"] == sol.nfev + 2


@pytest.mark.parametrize("kind", KINDS)
def test_norm_gradients_reach_the_original_parameters(kind):
    cell = eq.apply_norm(NormCell(), kind)
    x = _x().requires_grad_()
    layer = eq.DEQ(cell, init=_init, backward=eq.Implicit(tol=1e-12, max_iter=200), **TIGHT)
    z = layer(x)
    names = [n for n, _ in cell.named_parameters()]
    originals = [n for n in names if "parametrizations.weight.original" in n]
    assert len(originals) == (4 if kind == "weight" else 2)
    assert "lin.weight" not in names
    params = [*cell.parameters(), x]
    got = torch.autograd.grad(loss(z), params)
    # dense reference; eval mode so that spectral norm reuses the power-iteration vectors of the
    # forward call above instead of advancing them again
    cell.eval()
    z_ref, want = dense_reference(cell, x, params)
    torch.testing.assert_close(z.detach(), z_ref, rtol=1e-9, atol=1e-9)
    for name, a, b in zip([*names, "x"], got, want):
        assert rel_err(a, b) < 1e-7, name
        assert float(b.abs().max()) > 0, name


def _reset_power_iteration(cell, seed=5):
    """Start every spectral norm's power iteration from random vectors (far from converged)."""
    g = gen(seed)
    with torch.no_grad():
        for layer in (cell.lin, cell.inj):
            sn = layer.parametrizations.weight[0]
            for buf in (sn._u, sn._v):
                buf.copy_(torch.nn.functional.normalize(torch.randn(buf.shape, generator=g), dim=0))


def test_spectral_norm_power_iteration_advances_once_per_forward():
    cell = eq.apply_norm(NormCell(), "spectral")
    _reset_power_iteration(cell)
    once, twice = copy.deepcopy(cell), copy.deepcopy(cell)
    layer = eq.DEQ(cell, init=_init, **TIGHT)
    layer(_x())
    assert layer.last_solution.nfev > 10
    with torch.no_grad():
        for reference, n in ((once, 1), (twice, 2)):
            for _ in range(n):
                reference.lin.weight, reference.inj.weight  # noqa: B018 - one power iteration each
    bufs = dict(cell.named_buffers())
    assert len(bufs) == 4
    for name, buf in once.named_buffers():
        assert torch.equal(bufs[name], buf), name
    assert not torch.equal(
        bufs["lin.parametrizations.weight.0._u"], twice.lin.parametrizations.weight[0]._u
    )
    # in eval mode the vectors stay put
    layer.eval()
    before = {k: v.clone() for k, v in bufs.items()}
    layer(_x())
    for name, buf in cell.named_buffers():
        assert torch.equal(before[name], buf), name


@pytest.mark.parametrize("kind", KINDS)
def test_remove_norm_keeps_the_function_with_plain_parameters(kind):
    cell = eq.apply_norm(NormCell(), kind)
    cell.eval()  # spectral norm: no power-iteration step while comparing
    x, z = _x(), torch.randn(4, 5, generator=gen(3), dtype=F64)
    with torch.no_grad():
        before = cell(z, x)
    assert eq.remove_norm(cell) is cell
    assert not any(parametrize.is_parametrized(m) for m in cell.modules())
    assert {n for n, _ in cell.named_parameters()} == {
        "lin.weight",
        "lin.bias",
        "inj.weight",
        "inj.bias",
    }
    assert isinstance(cell.lin.weight, nn.Parameter) and cell.lin.weight.requires_grad
    assert not list(cell.buffers())
    with torch.no_grad():
        torch.testing.assert_close(cell(z, x), before, rtol=1e-14, atol=1e-14)
    if kind == "spectral":  # the plain weight is the normalised one
        assert abs(float(torch.linalg.matrix_norm(cell.lin.weight.detach(), ord=2)) - 1) < 1e-6


@pytest.mark.parametrize(
    "kind",
    [
        "weight",
        "spectral",
    ],
)
def test_remove_norm_can_restore_the_unnormalised_weights(kind):
    # weight norm is exact (g v / ||v|| is the weight), so its layers keep the current weight, to
    # the round-off of torch's weight-norm kernel: 1e-16 on the CPU; its fused CUDA kernel was
    # measured at 5e-8 relative in float64 (H200, torch 2.11)
    tol = 1e-14 if DEVICE.type == "cpu" else 1e-7
    cell = NormCell()
    plain = {n: p.detach().clone() for n, p in cell.named_parameters()}
    eq.apply_norm(cell, kind)
    eq.remove_norm(cell, leave_parametrized=False)
    assert not any(parametrize.is_parametrized(m) for m in cell.modules())
    for name, p in cell.named_parameters():
        torch.testing.assert_close(p.detach(), plain[name], rtol=tol, atol=tol)


def test_apply_norm_selects_layers_and_is_idempotent():
    cell = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(2, 2, 3), nn.LayerNorm(4))
    eq.apply_norm(cell, "weight", types=(nn.Conv1d,))
    assert [parametrize.is_parametrized(m) for m in cell] == [False, True, False]
    eq.apply_norm(cell, "spectral")  # the conv layer keeps its weight norm
    assert [parametrize.is_parametrized(m) for m in cell] == [True, True, False]
    assert len(cell[1].parametrizations.weight) == 1
    assert type(cell[1].parametrizations.weight[0]).__name__ == "_WeightNorm"
    assert type(cell[0].parametrizations.weight[0]).__name__ == "_SpectralNorm"
    with eq.norm_cache(None), eq.norm_cache(nn.Tanh()):  # nothing to cache: a no-op
        pass


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 5, 2), nn.ConvTranspose2d(3, 5, 2),
                                   nn.ConvTranspose1d(4, 6, 3, groups=2)])  # fmt: skip
def test_weight_norm_is_per_output_channel_also_for_transposed_convolutions(layer):
    """A transposed convolution's weight is (in, out / groups, ...): weight norm along dim 0 gave
    one magnitude per input channel."""
    weight = layer.weight.detach().clone()
    eq.apply_norm(layer, "weight")
    g = layer.parametrizations.weight.original0
    out_dim = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
    assert g.numel() == weight.shape[out_dim]
    others = [d for d in range(weight.dim()) if d != out_dim]
    torch.testing.assert_close(g.flatten(), torch.linalg.vector_norm(weight, dim=others))
    torch.testing.assert_close(layer.weight, weight)


# --- TorchDEQ's options: which layers, fixed target norm, clipping ------------------------------

# (kind, options): the new parametrisations, run through the once-per-forward and gradient checks
SCALED = [
    ("weight", {"target_norm": 0.8}),
    ("weight", {"clip": 0.9}),  # learned g, factor capped
    ("weight", {"target_norm": 1.5, "clip": 1.0}),
    ("spectral", {"target_norm": 0.6}),
    ("spectral", {"target_norm": 0.9, "clip": 1.0}),
]
SCALED_IDS = [f"{k}-" + "-".join(f"{a}{v}" for a, v in o.items()) for k, o in SCALED]


@pytest.mark.parametrize(("kind", "options"), SCALED, ids=SCALED_IDS)
def test_scaled_norms_are_computed_once_per_forward_and_train(kind, options):
    cell = eq.apply_norm(NormCell(), kind, **options)
    counts = count_norm_calls(cell)
    x = _x().requires_grad_()
    layer = eq.DEQ(cell, init=_init, backward=eq.Implicit(tol=1e-12, max_iter=200), **TIGHT)
    z = layer(x)
    params = [*cell.parameters(), x]
    got = torch.autograd.grad(loss(z), params)
    assert counts == {"lin": 1, "inj": 1}
    learned = kind == "weight" and "target_norm" not in options
    originals = [n for n, _ in cell.named_parameters() if ".original" in n]
    assert len(originals) == (4 if learned else 2)  # g and v, or the one raw weight
    cell.eval()  # spectral: reuse the forward's power-iteration vectors
    z_ref, want = dense_reference(cell, x, params)
    torch.testing.assert_close(z.detach(), z_ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(got, want, strict=True):  # (a capped factor gives g no gradient: 0 = 0)
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def _rows(weight):
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


def test_weight_norm_with_a_fixed_target():
    layer = nn.Linear(6, 4, dtype=F64)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([[0.1], [1.0], [3.0], [10.0]], dtype=F64))
    raw = layer.weight.detach().clone()
    eq.apply_norm(layer, "weight", target_norm=2.0)
    torch.testing.assert_close(_rows(layer.weight), torch.full((4,), 2.0, dtype=F64))
    torch.testing.assert_close(layer.weight, 2.0 * raw / _rows(raw).unsqueeze(1))
    assert [n for n, _ in layer.named_parameters()] == [
        "bias",
        "parametrizations.weight.original",
    ]  # no learned magnitude
    # a gradient step changes the direction only: the norm stays fixed
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(3, 6, dtype=F64, generator=gen(0))).pow(2).sum().backward()
    opt.step()
    torch.testing.assert_close(_rows(layer.weight), torch.full((4,), 2.0, dtype=F64))


def test_weight_norm_clip_scales_only_rows_above_the_target():
    layer = nn.Linear(6, 4, dtype=F64)
    with torch.no_grad():
        layer.weight.mul_(2.0 / _rows(layer.weight).unsqueeze(1))  # every row of norm 2
        layer.weight.mul_(torch.tensor([[0.1], [0.5], [1.5], [10.0]], dtype=F64))
    raw = layer.weight.detach().clone()  # row norms 0.2, 1, 3, 20
    eq.apply_norm(layer, "weight", target_norm=1.0, clip=1.0)
    norms = _rows(layer.weight)
    torch.testing.assert_close(norms, torch.tensor([0.2, 1.0, 1.0, 1.0], dtype=F64))
    torch.testing.assert_close(layer.weight[:2], raw[:2])  # at most the target: unchanged


def test_weight_norm_clip_caps_the_learned_factor():
    # learned g: w = v * min(clip, g / ||v||); at creation g = ||v||, so clip < 1 scales every
    # row by clip, and a g grown past clip * ||v|| stops acting
    layer = nn.Conv2d(3, 5, 2, dtype=F64)
    raw = layer.weight.detach().clone()
    eq.apply_norm(layer, "weight", clip=0.5)
    torch.testing.assert_close(layer.weight, 0.5 * raw)
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    assert g.shape == (5, 1, 1, 1)
    with torch.no_grad():
        g[0] *= 0.25  # factor 0.25 < clip: used as is
        g[1] *= 4.0  # factor 4 > clip: capped
    torch.testing.assert_close(layer.weight[0], 0.25 * v[0])
    torch.testing.assert_close(layer.weight[1], 0.5 * v[1])


@pytest.mark.parametrize("clip", [None, 1.0])
def test_spectral_norm_target_and_clip(clip):
    layer = nn.Linear(5, 5, dtype=F64)
    small = nn.Linear(5, 5, dtype=F64)
    with torch.no_grad():
        layer.weight.mul_(3.0 / torch.linalg.matrix_norm(layer.weight, ord=2))  # sigma 3
        small.weight.mul_(0.4 / torch.linalg.matrix_norm(small.weight, ord=2))  # sigma 0.4
    raw_small = small.weight.detach().clone()
    for lin in (layer, small):
        eq.apply_norm(lin, "spectral", target_norm=0.8, clip=clip, n_power_iterations=30)
        lin(torch.zeros(1, 5, dtype=F64))  # one training-mode forward: 30 more power steps
    sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
    torch.testing.assert_close(sigma, torch.tensor(0.8, dtype=F64), rtol=1e-6, atol=0)
    sigma_small = torch.linalg.matrix_norm(small.weight.detach(), ord=2)
    if clip is None:  # always scaled to the target
        torch.testing.assert_close(sigma_small, torch.tensor(0.8, dtype=F64), rtol=1e-6, atol=0)
    else:  # below the target: untouched
        torch.testing.assert_close(small.weight, raw_small, rtol=1e-12, atol=0)


# (layer, kind, options, per-row factors g / ||v|| to give the learned g: on both sides of its
# clip, none at the kink)
GRADCHECK = [
    (lambda: nn.Linear(6, 4, dtype=F64), "weight", {"target_norm": 0.8}, None),
    (lambda: nn.ConvTranspose2d(3, 4, 2, dtype=F64), "weight", {"target_norm": 1.5}, None),
    (lambda: nn.Linear(6, 4, dtype=F64), "weight", {"target_norm": 1.0, "clip": 1.0}, None),
    (lambda: nn.Conv2d(3, 5, 2, dtype=F64), "weight", {"clip": 0.5}, [0.1, 0.25, 0.8, 2.0, 4.0]),
    (lambda: nn.Linear(5, 5, dtype=F64), "spectral", {"target_norm": 0.8}, None),
    (lambda: nn.Linear(5, 5, dtype=F64), "spectral", {"target_norm": 0.8, "clip": 1.0}, None),
]


@pytest.mark.parametrize(
    ("make", "kind", "options", "factors"),
    GRADCHECK,
    ids=[
        "weight-target",
        "weight-target-transposed",
        "weight-target-clip",
        "weight-clip",
        "spectral-target",
        "spectral-target-clip",
    ],
)
@pytest.mark.parametrize("scale", [0.1, 10.0], ids=["small", "large"])
def test_scaled_norm_gradients_match_finite_differences(make, kind, options, factors, scale):
    # the gradients of the target_norm / clip parametrisations with respect to their originals,
    # against central finite differences in float64 (torch.autograd.gradcheck); the weight is
    # scaled so that the clip acts on some rows (or on sigma) at one scale and not at the other
    layer = make()
    with torch.no_grad():
        rows = torch.linspace(0.2, 3.0, layer.weight.shape[0], dtype=F64)
        layer.weight.mul_(scale * rows.view(-1, *[1] * (layer.weight.dim() - 1)))
    eq.apply_norm(layer, kind, **options)
    layer.eval()  # spectral norm: the power-iteration vectors stay put between evaluations
    chain = layer.parametrizations.weight
    originals = (
        [chain.original0, chain.original1] if hasattr(chain, "original0") else [chain.original]
    )
    if factors is not None:  # learned g: g / ||v|| on both sides of the clip
        v = originals[1].detach()
        norms = torch.linalg.vector_norm(v.flatten(1), dim=1).view_as(originals[0])
        originals[0] = torch.tensor(factors, dtype=F64).view_as(norms) * norms
    inputs = tuple(o.detach().clone().requires_grad_() for o in originals)
    assert torch.autograd.gradcheck(chain[0], inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_apply_norm_exclude_and_filter():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(2, 2, 1))
            self.head = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)))
            self.header = nn.Linear(3, 3)

    def normed(net):
        return sorted(n for n, m in net.named_modules() if parametrize.is_parametrized(m))

    net = eq.apply_norm(Net(), exclude=["head"])
    assert normed(net) == ["body.0", "body.1", "header"]  # head and head.1.0 skipped
    net = eq.apply_norm(Net(), exclude=("head.1", "body.0"))
    assert normed(net) == ["body.1", "head.0", "header"]
    seen = []

    def only_linear_outside_body(name, layer):
        seen.append(name)
        return isinstance(layer, nn.Linear) and not name.startswith("body")

    net = eq.apply_norm(Net(), filter=only_linear_outside_body, exclude=["header"])
    assert normed(net) == ["head.0", "head.1.0"]
    assert seen == ["body.0", "body.1", "head.0", "head.1.0"]  # candidates only, in order


def test_apply_norm_filter_leaving_nothing_says_so():
    with pytest.raises(ValueError, match="with a parameter 'weight' left by exclude/filter"):
        eq.apply_norm(NormCell(), filter=lambda name, layer: False)
    with pytest.raises(ValueError, match="left by exclude/filter"):
        eq.apply_norm(NormCell(), exclude=["lin", "inj"])


def _plain_function(z, x):
    return z


NORM_BAD = [
    (lambda: eq.apply_norm(NormCell(), "batch"), ValueError, "kind must be one of 'weight'"),
    (lambda: eq.apply_norm(nn.Tanh()), ValueError, "module has no layer of the types"),
    (
        lambda: eq.apply_norm(NormCell(), types=(nn.Conv2d,)),
        ValueError,
        r"no layer of the types \(Conv2d\)",
    ),
    (lambda: eq.apply_norm(NormCell(), name="kernel"), ValueError, "parameter 'kernel'"),
    (
        lambda: eq.apply_norm(_plain_function),
        TypeError,
        "module must be an nn.Module, got function",
    ),
    (
        lambda: eq.apply_norm(NormCell(), "spectral", n_power_iterations=0),
        ValueError,
        "n_power_iterations must be an int >= 1",
    ),
    (lambda: eq.remove_norm("cell"), TypeError, "module must be an nn.Module, got str"),
    (
        lambda: eq.apply_norm(NormCell(), target_norm=0.0),
        ValueError,
        r"target_norm must be in \(0.0, inf\), got 0.0",
    ),
    (
        lambda: eq.apply_norm(NormCell(), target_norm=float("nan")),
        ValueError,
        "target_norm must be in",
    ),
    (
        lambda: eq.apply_norm(NormCell(), target_norm="1"),
        TypeError,
        "target_norm must be a real number in \\(0.0, inf\\), got str '1'",
    ),
    (
        lambda: eq.apply_norm(NormCell(), "spectral", clip=-1.0),
        ValueError,
        r"clip must be in \(0.0, inf\), got -1.0",
    ),
    (
        lambda: eq.apply_norm(NormCell(), exclude="lin"),
        TypeError,
        "exclude must be a list of module names, got the string 'lin'",
    ),
    (
        lambda: eq.apply_norm(NormCell(), exclude=[nn.Linear]),
        TypeError,
        "exclude must hold module names",
    ),
    (
        lambda: eq.apply_norm(NormCell(), filter=nn.Linear(2, 2).weight),
        TypeError,
        r"filter must be a callable \(name, module\) -> bool",
    ),
    (
        lambda: eq.apply_norm(NormCell(), filter=lambda name, layer: name),
        TypeError,
        "filter must return a bool, got 'lin' for 'lin'",
    ),
]


@pytest.mark.parametrize(("call", "exc", "fragment"), NORM_BAD)
def test_norm_bad_input(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


# --- variational dropout -----------------------------------------------------------------------


class DropCell(nn.Module):
    """f(z, x) = tanh(drop(z W^T) + x) with ||W||_2 = 0.5; records the batch sizes it sees."""

    def __init__(self, d=5, p=0.3, seed=0):
        super().__init__()
        w = torch.randn(d, d, generator=gen(seed), dtype=F64)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
        self.drop = eq.VariationalDropout(p)
        self.sizes = []

    def forward(self, z, x):
        self.sizes.append(z.shape[0])
        return torch.tanh(self.drop(z @ self.W.T) + x)


def _masked_reference(cell, mask, x, backward):
    """The gradient of loss(z*) w.r.t. W that ``backward`` computes for the map
    z -> tanh((z W^T) * mask + x), by the dense references of ``_cells`` (no library call)."""
    w = cell.W.detach().clone().requires_grad_()

    def f(z):
        return torch.tanh((z @ w.T) * mask.to(F64) + x)

    return backward_reference(f, torch.zeros(x.shape[0], 5, dtype=F64), [w], loss, backward)[0]


def record_masks(drop):
    """Every call of ``drop``: (its mask, input, output, compaction index, output is input)."""
    calls = []

    def hook(mod, inputs, output):
        calls.append(
            (mod.mask, inputs[0].detach(), output.detach(), _BATCH_INDEX.get(), output is inputs[0])
        )

    drop.register_forward_hook(hook)
    return calls


def _dx(batch=4, seed=1):
    return torch.randn(batch, 5, generator=gen(seed), dtype=F64)


@pytest.mark.parametrize("backward", BACKWARD_NAMES)
def test_dropout_mask_is_constant_within_a_solve_and_new_on_the_next(backward):
    cell = DropCell()
    calls = record_masks(cell.drop)
    layer = eq.DEQ(cell, backward=backward, **TIGHT)
    x = _dx()
    z = layer(x)
    loss(z).backward()
    sol = layer.last_solution
    assert sol.all_converged and len(calls) >= sol.nfev > 5
    mask = calls[0][0]
    assert mask.shape == (4, 5)
    assert 0 < int((mask == 0).sum()) < mask.numel()  # some dropped, some kept
    for m, inp, out, index, _ in calls:
        assert m is mask and index is None
        assert torch.equal(out, inp * mask.to(inp.dtype))
    # the returned state is the equilibrium of the masked map
    with torch.no_grad():
        fz = torch.tanh((z.detach() @ cell.W.T) * mask.to(F64) + x)
    assert float((fz - z.detach()).norm() / fz.norm()) < 1e-9
    # the gradient is that of the masked map, from an independent dense reference that applies the
    # recorded mask explicitly
    want = _masked_reference(cell, mask, x, backward)
    assert rel_err(cell.W.grad, want) < (1e-6 if backward == "unrolled" else 1e-7)
    first = len(calls)
    layer(x)
    new = calls[first][0]
    assert new is not mask and not torch.equal(new, mask)
    assert all(m is new for m, *_ in calls[first:])


def test_dropout_is_a_no_op_in_eval_mode():
    cell = DropCell()
    calls = record_masks(cell.drop)
    layer = eq.DEQ(cell, **TIGHT).eval()
    z = layer(_dx())
    assert calls and all(same for *_, same in calls)
    plain = eq.solve(
        lambda z: torch.tanh(z @ cell.W.T + _dx()), torch.zeros(4, 5, dtype=F64), **TIGHT
    )
    torch.testing.assert_close(z.detach(), plain.value, rtol=1e-9, atol=1e-9)


def test_dropout_any_batch_size():
    cell = DropCell()
    calls = record_masks(cell.drop)
    layer = eq.DEQ(cell, **TIGHT)
    for batch in (4, 7, 1):
        start = len(calls)
        layer(_dx(batch))
        masks = [m for m, *_ in calls[start:]]
        assert masks[0].shape == (batch, 5)
        assert all(m is masks[0] for m in masks)


def test_dropout_module_outside_a_deq():
    drop = eq.VariationalDropout(0.5)
    x = torch.randn(3, 4, dtype=F64)
    a = drop(x)
    assert torch.equal(drop(x), a)  # same mask until reset
    eq.reset_dropout(nn.Sequential(nn.Linear(4, 4), drop))
    assert drop.mask is None
    assert not torch.equal(drop(x), a)
    assert drop(torch.randn(6, 4)).shape == (6, 4) and drop.mask.shape == (6, 4)  # new batch size


def test_dropout_draws_a_new_mask_when_a_non_batch_size_changes():
    """One instance on sequences of different lengths: a (2, 1, 3) input came back (2, 4, 3)
    through the old mask, and a (2, 5, 3) one failed to broadcast."""
    drop = eq.VariationalDropout(0.5)
    assert drop(torch.ones(2, 4, 3)).shape == (2, 4, 3)
    for shape in [(2, 1, 3), (2, 5, 3), (2, 5, 7)]:
        assert drop(torch.ones(shape)).shape == shape and drop.mask.shape == shape
    shared = eq.VariationalDropout(0.5, shared_dims=(1,))
    shared(torch.ones(2, 4, 3))
    first = shared.mask
    shared(torch.ones(2, 9, 3))  # another length along the shared dimension: the same mask
    assert shared.mask is first


@pytest.mark.parametrize(
    ("shared_dims", "mask_shape"), [((), (6, 4, 9)), ((2,), (6, 4, 1)), ((1, 2), (6, 1, 1))]
)
def test_dropout_shared_dims(shared_dims, mask_shape):
    drop = eq.VariationalDropout(0.5, shared_dims=shared_dims)
    out = drop(torch.ones(6, 4, 9))
    assert drop.mask.shape == mask_shape
    torch.testing.assert_close(out, drop.mask.expand(6, 4, 9))


def test_dropout_rate_and_scale():
    p = 0.25
    drop = eq.VariationalDropout(p)
    out = drop(torch.ones(400, 50))
    dropped = float((out == 0).float().mean())
    assert abs(dropped - p) < 0.02
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))
    assert "p=0.25" in repr(drop)


def test_dropout_p_zero_is_the_identity():
    drop = eq.VariationalDropout(0.0)
    x = torch.randn(3, 4)
    assert drop(x) is x and drop.mask is None


@pytest.mark.parametrize("backward", ["implicit", "phantom", "neumann", "jfb"])
def test_dropout_under_compaction_uses_the_full_batch_mask(backward):
    x = _dx(8)
    x[:6] *= 30  # six saturated, easy samples leave the batch early
    results = {}
    for compact in (False, True):
        cell = DropCell()
        calls = record_masks(cell.drop)
        torch.manual_seed(3)  # the same mask in both runs
        layer = eq.DEQ(cell, backward=backward, compact=compact, **TIGHT)
        z = layer(x)
        grad = torch.autograd.grad(loss(z), cell.W)[0]
        results[compact] = (z.detach(), grad, calls, cell.sizes)
    (z_full, g_full, calls_full, _), (z_cmp, g_cmp, calls_cmp, sizes) = results.values()
    full_mask = calls_cmp[0][0]
    assert torch.equal(full_mask, calls_full[0][0]) and full_mask.shape == (8, 5)
    assert min(sizes) < 8  # compaction happened
    subsets = 0
    for m, inp, out, index, _ in calls_cmp:
        assert m is full_mask
        rows = full_mask if index is None else full_mask.index_select(0, index)
        assert torch.equal(out, inp * rows.to(inp.dtype))
        subsets += index is not None
    assert subsets > 0
    torch.testing.assert_close(z_cmp, z_full, rtol=1e-9, atol=1e-9)
    assert rel_err(g_cmp, g_full) < 1e-8
    # both are the gradient of the masked map, by a dense reference applying the mask explicitly
    want = _masked_reference(DropCell(), full_mask, x, backward)
    assert rel_err(g_cmp, want) < 1e-7 and rel_err(g_full, want) < 1e-7


DROP_BAD = [
    (lambda: eq.VariationalDropout(-0.1), ValueError, r"p must be in \[0.0, 1.0\)"),
    (lambda: eq.VariationalDropout(1.0), ValueError, r"p must be in \[0.0, 1.0\)"),
    (lambda: eq.VariationalDropout("0.1"), TypeError, "p must be a real number"),
    (lambda: eq.VariationalDropout(shared_dims=(0,)), ValueError, "shared_dims must be a tuple"),
    (lambda: eq.VariationalDropout(shared_dims=[1]), ValueError, "shared_dims must be a tuple"),
    (lambda: eq.VariationalDropout(shared_dims=(True,)), ValueError, "shared_dims must be a"),
    (
        lambda: eq.VariationalDropout(shared_dims=(3,))(torch.ones(2, 4)),
        ValueError,
        r"shared_dims \(3,\) do not fit an input of shape \(2, 4\)",
    ),
]


@pytest.mark.parametrize(("call", "exc", "fragment"), DROP_BAD)
def test_dropout_bad_input(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


def test_dropout_needs_the_full_batch_before_a_subset():
    drop = eq.VariationalDropout(0.5)
    with batch_index(torch.tensor([0, 2])), pytest.raises(RuntimeError, match="full batch"):
        drop(torch.ones(2, 3))


def test_dropout_scale_is_exact_in_float64():
    p = 0.1
    drop = eq.VariationalDropout(p)
    x = torch.ones(50, 20, dtype=F64)
    out = drop(x)
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-15, atol=0)
