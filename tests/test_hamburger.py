"""Tests of the matrix decompositions (nmf, vq, cd) and the Hamburger blocks."""

from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from _problems import DEVICE

from equilibria.layers import (
    DECOMPOSITIONS,
    Decomposition,
    Hamburger,
    HamburgerTokens,
    _decompositions,
    cd,
    moving_average_bases,
    nmf,
    random_bases,
    vq,
)
from equilibria.layers import _nmf as nmf_module
from equilibria.layers._decompositions import _check_finite
from equilibria.layers._hamburger import _fold_batch_norm
from equilibria.layers._nmf import _nmf_coef_update

F64 = torch.float64
HAMS = tuple(DECOMPOSITIONS)  # the registry drives the tables
GRADS = (
    "one_step",
    "jfb",
    "phantom",
    "unrolled",
    "bptt",
)  # "bptt": the documented alias of "unrolled"


# ---------------------------------------------------------------------------------------------
# Independent reference implementations: plain out-of-place loops written from the paper's
# equations. ``*_iterate`` runs the (C, D) steps; ``*_final`` is the last, differentiated step.


def ref_nmf_iterate(x, d, steps, inv_t=1.0, eps=1e-6):
    c = torch.softmax(inv_t * x.mT @ d, dim=-1)
    for _ in range(steps):
        c = c * (x.mT @ d) / (c @ (d.mT @ d) + eps)
        d = d * (x @ c) / (d @ (c.mT @ c) + eps)
    return d, c


def ref_nmf_final(x, d, c, eps=1e-6):
    return c * (x.mT @ d) / (c @ (d.mT @ d) + eps)


def ref_cosine_softmax(x, d, inv_t, eps=1e-6):
    cos = (x.mT @ (d / d.norm(dim=1, keepdim=True).clamp_min(eps))) / (
        x.norm(dim=1)[..., None] + eps
    )
    return torch.softmax(inv_t * cos, dim=-1)


def ref_cluster_iterate(x, d, steps, inv_t, unit, eps=1e-6):
    for _ in range(steps):
        c = ref_cosine_softmax(x, d, inv_t, eps)
        c = c / (c.sum(dim=1, keepdim=True) + eps)
        d = x @ c
        if unit:
            d = d / d.norm(dim=1, keepdim=True).clamp_min(eps)
    return d, None


def ref_ridge(x, d, beta):
    """argmin_c ‖x_i − D c‖² + β‖c‖² for every column x_i, via least squares on [D; √β I]."""
    batch, _, n = x.shape
    rank = d.shape[-1]
    eye = beta**0.5 * torch.eye(rank, dtype=x.dtype).expand(batch, rank, rank)
    lhs = torch.cat([d, eye], dim=1)  # (B, d + r, r)
    rhs = torch.cat([x, x.new_zeros(batch, rank, n)], dim=1)  # (B, d + r, n)
    return torch.linalg.lstsq(lhs, rhs).solution.mT  # (B, n, r)


REFERENCE = {
    "nmf": (
        lambda x, d, k, inv_t=1.0, eps=1e-6: ref_nmf_iterate(x, d, k, inv_t, eps),
        lambda x, d, c, inv_t=1.0, eps=1e-6, beta=None: ref_nmf_final(x, d, c, eps),
    ),
    "vq": (
        lambda x, d, k, inv_t=100.0, eps=1e-6: ref_cluster_iterate(x, d, k, inv_t, False, eps),
        lambda x, d, c, inv_t=100.0, eps=1e-6, beta=None: ref_cosine_softmax(x, d, inv_t, eps),
    ),
    "cd": (
        lambda x, d, k, inv_t=100.0, eps=1e-6: ref_cluster_iterate(x, d, k, inv_t, True, eps),
        lambda x, d, c, inv_t=100.0, eps=1e-6, beta=0.1: ref_ridge(x, d, beta),
    ),
}
# Non-default options for the reference tests: every option must reach the computation.
CUSTOM = {"nmf": {"inv_t": 3.0, "eps": 1e-3}, "vq": {"inv_t": 7.0, "eps": 1e-3},
          "cd": {"inv_t": 7.0, "eps": 1e-3, "beta": 0.7}}  # fmt: skip


def make_input(ham, batch=2, dim=6, n=9, dtype=F64, requires_grad=False):
    x = torch.rand(batch, dim, n, dtype=dtype) if ham == "nmf" else torch.randn(batch, dim, n)
    return x.to(dtype).requires_grad_(requires_grad)


def init_bases(ham, batch, dim, rank, dtype=F64):
    return random_bases(batch, dim, rank, nonnegative=ham == "nmf", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Functional decompositions.


@pytest.mark.parametrize("ham", HAMS)
@pytest.mark.parametrize("bases_ndim", [None, 2, 3])
def test_shapes_and_rank_from_bases(ham, bases_ndim):
    x = make_input(ham, batch=3, dim=5, n=7)
    bases = None if bases_ndim is None else init_bases(ham, 3, 5, 4)
    if bases_ndim == 2:
        bases = bases[0]
    given = None if bases is None else bases.clone()
    dec = DECOMPOSITIONS[ham](x, None if bases is not None else 4, bases=bases, steps=2)
    assert isinstance(dec, Decomposition)
    assert dec.bases.shape == (3, 5, 4) and dec.coef.shape == (3, 7, 4)
    assert dec.reconstruct().shape == (3, 5, 7)
    if bases is not None:  # the given bases are copied, not modified
        assert torch.equal(bases, given)


@pytest.mark.parametrize("ham", HAMS)
@pytest.mark.parametrize("steps", [0, 1, 5])
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("custom", [False, True])
def test_forward_matches_reference(ham, steps, grad, custom):
    x = make_input(ham, batch=2, dim=6, n=9)
    d0 = init_bases(ham, 2, 6, 3)
    d0_copy = d0.clone()
    options = CUSTOM[ham] if custom else {}
    dec = DECOMPOSITIONS[ham](x, bases=d0, steps=steps, grad=grad, **options)
    iterate, final = REFERENCE[ham]
    iterate_options = {k: v for k, v in options.items() if k != "beta"}
    d, c = iterate(x, d0, steps, **iterate_options)
    torch.testing.assert_close(dec.bases, d)
    torch.testing.assert_close(dec.coef, final(x, d, c, **options))
    assert torch.equal(d0, d0_copy)


def test_nmf_error_non_increasing():
    torch.manual_seed(1)
    x = torch.rand(2, 12, 20, dtype=F64)
    d0 = random_bases(2, 12, 4, dtype=F64)
    errors = [
        (x - nmf(x, bases=d0, steps=k, eps=1e-12).reconstruct()).norm().item() for k in range(40)
    ]
    for before, after in itertools.pairwise(errors):
        assert after <= before * (1 + 1e-12)
    assert errors[-1] < 0.9 * errors[0]


@pytest.mark.parametrize("rank", [3, 5])
def test_nmf_planted_low_rank_reaches_noise_floor(rank):
    torch.manual_seed(2)
    clean = torch.rand(2, 16, 3, dtype=F64) @ torch.rand(2, 3, 24, dtype=F64)  # true rank 3
    noise = 3e-2 * torch.rand_like(clean)
    x = clean + noise
    dec = nmf(x, bases=random_bases(2, 16, rank, dtype=F64), steps=1000)
    assert (x - dec.reconstruct()).norm() <= noise.norm()
    too_small = nmf(x, bases=random_bases(2, 16, 1, dtype=F64), steps=1000)
    assert (x - too_small.reconstruct()).norm() > 3 * noise.norm()


def hard_kmeans(x, d, steps):
    """Lloyd's k-means with cosine assignment; returns the bases before the final assignment."""
    xn = x / x.norm(dim=1, keepdim=True)
    for _ in range(steps):
        labels = (xn.mT @ (d / d.norm(dim=1, keepdim=True))).argmax(-1)  # (B, n)
        onehot = F.one_hot(labels, d.shape[-1]).to(x.dtype)  # (B, n, r)
        d = (x @ onehot) / onehot.sum(1, keepdim=True)
    labels = (xn.mT @ (d / d.norm(dim=1, keepdim=True))).argmax(-1)
    return d, F.one_hot(labels, d.shape[-1]).to(x.dtype)


def test_vq_high_inverse_temperature_is_hard_kmeans():
    torch.manual_seed(3)
    centres = F.normalize(torch.randn(2, 8, 4, dtype=F64), dim=1)
    labels = torch.arange(30) % 4
    x = 2.0 * centres[:, :, labels] + 0.05 * torch.randn(2, 8, 30, dtype=F64)
    d0 = x[:, :, :4] + 0.1 * torch.randn(2, 8, 4, dtype=F64)  # one point of each cluster, moved
    dec = vq(x, bases=d0, steps=5, inv_t=1e5)
    d_ref, onehot = hard_kmeans(x, d0, 5)
    torch.testing.assert_close(dec.coef, onehot, atol=1e-12, rtol=0)
    torch.testing.assert_close(dec.bases, d_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_cd_coefficients_are_the_ridge_solution(steps, beta):
    x = torch.randn(2, 7, 11, dtype=F64)
    dec = cd(x, bases=torch.randn(7, 4, dtype=F64), steps=steps, beta=beta)
    torch.testing.assert_close(dec.coef, ref_ridge(x, dec.bases, beta))
    if steps:
        torch.testing.assert_close(dec.bases.norm(dim=1), torch.ones(2, 4, dtype=F64))


@pytest.mark.parametrize("ham", HAMS)
def test_one_step_gradient_is_the_last_step_with_earlier_steps_constant(ham):
    x = make_input(ham, batch=2, dim=6, n=9, requires_grad=True)
    d0 = init_bases(ham, 2, 6, 3)
    weight = torch.randn(2, 6, 9, dtype=F64)
    dec = DECOMPOSITIONS[ham](x, bases=d0, steps=4, grad="one_step")
    (grad,) = torch.autograd.grad((dec.reconstruct() * weight).sum(), x)
    iterate, final = REFERENCE[ham]
    with torch.no_grad():
        d, c = iterate(x, d0, 4)
    (grad_ref,) = torch.autograd.grad((d @ final(x, d, c).mT * weight).sum(), x)
    torch.testing.assert_close(grad, grad_ref)
    assert not dec.bases.requires_grad
    # and it differs from the full gradient
    dec_full = DECOMPOSITIONS[ham](x, bases=d0, steps=4, grad="bptt")
    (grad_full,) = torch.autograd.grad((dec_full.reconstruct() * weight).sum(), x)
    assert not torch.allclose(grad, grad_full)


def ref_one_recorded_step(ham, x, d, c, inv_t, eps=1e-6):
    """One full (C, D) update written out from the paper's equations, recorded by autograd."""
    if ham == "nmf":
        c = c * (x.mT @ d) / (c @ (d.mT @ d) + eps)
        return d * (x @ c) / (d @ (c.mT @ c) + eps), c
    return ref_cluster_iterate(x, d, 1, inv_t, ham == "cd", eps)


@pytest.mark.parametrize("ham", HAMS)
@pytest.mark.parametrize("steps", [1, 3])
def test_jfb_gradient_is_one_recorded_step_from_the_detached_iterate(ham, steps):
    """grad="jfb": autograd through the last full update of both factors and the final C update,
    from the iterate after steps - 1 updates computed without gradient, by hand."""
    x = make_input(ham, batch=2, dim=6, n=9, requires_grad=True)
    d0 = init_bases(ham, 2, 6, 3).requires_grad_()
    inv_t = 1.0 if ham == "nmf" else 5.0  # a softer assignment: the bases' gradient is not tiny
    weight = torch.randn(2, 6, 9, dtype=F64)
    dec = DECOMPOSITIONS[ham](x, bases=d0, steps=steps, inv_t=inv_t, grad="jfb")
    assert dec.bases.requires_grad  # the bases carry the gradient of the last update
    loss = (dec.reconstruct() * weight).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert not torch.autograd.grad(loss, d0, allow_unused=True, materialize_grads=True)[0].any()
    iterate, final = REFERENCE[ham]
    with torch.no_grad():  # the detached iterate (C_{K-1}, D_{K-1})
        d, c = iterate(x, d0, steps - 1, inv_t=inv_t)
    d, c = ref_one_recorded_step(ham, x, d, c, inv_t)
    ref = d @ final(x, d, c, inv_t=inv_t).mT
    torch.testing.assert_close(dec.reconstruct(), ref)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), x)
    torch.testing.assert_close(grad, grad_ref)
    # and it is neither the paper's one-step gradient (bases constant) nor BPTT's
    others = {}
    for other in ("one_step", "unrolled"):
        dec_other = DECOMPOSITIONS[ham](x, bases=d0.detach(), steps=steps, inv_t=inv_t, grad=other)
        (others[other],) = torch.autograd.grad((dec_other.reconstruct() * weight).sum(), x)
    assert not torch.allclose(grad, others["one_step"])
    if steps > 1 or ham == "nmf":  # one VQ/CD step from constant bases is the whole unrolling
        assert not torch.allclose(grad, others["unrolled"])
    else:
        torch.testing.assert_close(grad, others["unrolled"])


@pytest.mark.parametrize("ham", HAMS)
def test_jfb_without_steps_is_the_one_step_gradient(ham):
    """steps=0 has no full update to differentiate: the final coefficients from the initial
    (detached) iterate, like "one_step"."""
    x = make_input(ham, batch=2, dim=6, n=9, requires_grad=True)
    d0 = init_bases(ham, 2, 6, 3)
    grads = []
    for grad in ("jfb", "one_step"):
        dec = DECOMPOSITIONS[ham](x, bases=d0, steps=0, inv_t=2.0, grad=grad)
        grads.append(torch.autograd.grad(dec.reconstruct().square().sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("ham", HAMS)
def test_bptt_gradient_matches_unrolled_reference_and_gradcheck(ham):
    x = make_input(ham, batch=1, dim=4, n=6, requires_grad=True)
    d0 = init_bases(ham, 1, 4, 2).requires_grad_()
    iterate, final = REFERENCE[ham]

    def loss_ref(x, d0):
        d, c = iterate(x, d0, 3)
        return (d @ final(x, d, c).mT).square().sum()

    def loss(x, d0):
        return DECOMPOSITIONS[ham](x, bases=d0, steps=3, grad="bptt").reconstruct().square().sum()

    grads = torch.autograd.grad(loss(x, d0), (x, d0))
    grads_ref = torch.autograd.grad(loss_ref(x, d0), (x, d0))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    if ham != "vq":  # VQ's inv_t = 100 softmax is too stiff for finite differences
        assert torch.autograd.gradcheck(
            lambda x, d0: DECOMPOSITIONS[ham](x, bases=d0, steps=2, grad="bptt").reconstruct(),
            (x, d0),
        )
    assert torch.autograd.gradcheck(
        lambda x: vq(x, bases=d0.detach(), steps=2, inv_t=2.0, grad="bptt").reconstruct(), (x,)
    )


@pytest.mark.parametrize("ham", HAMS)
def test_final_step_gradcheck(monkeypatch, ham):
    """The one-step path, whose only differentiated part is the last step, passes gradcheck."""
    x = make_input(ham, batch=1, dim=4, n=6, requires_grad=True)
    d0 = init_bases(ham, 1, 4, 2)
    if ham == "nmf":
        # Even with steps=0 the one-step NMF starts from C = softmax(XᵀD) computed without
        # gradient: freeze that no-grad part (D, W) at x so the last step is the whole function.
        c0 = torch.rand(1, 6, 2, dtype=F64)
        assert torch.autograd.gradcheck(lambda x: d0 @ _nmf_coef_update(x, d0, c0, 1e-6).mT, (x,))
        fn = lambda x: nmf(x, bases=d0, steps=3, inv_t=2.0).reconstruct()  # noqa: E731
        expected = fn(x)
        problem = _decompositions._problem("nmf", x, None, 3, d0, 2.0, "one_step", 1e-6, None, None)
        frozen = nmf_module._nmf_solve(problem)
        monkeypatch.setattr(nmf_module, "_nmf_solve", lambda p: frozen)
        torch.testing.assert_close(fn(x), expected)  # frozen at x: the same forward
    else:
        fn = lambda x: DECOMPOSITIONS[ham](x, bases=d0, steps=0, inv_t=2.0).reconstruct()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@contextlib.contextmanager
def count_saved_bytes():
    """Sums the bytes of the distinct tensors autograd saves for backward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


@pytest.mark.parametrize("ham", HAMS)
def test_one_step_memory_does_not_grow_with_steps(ham):
    x = make_input(ham, batch=2, dim=16, n=64, requires_grad=True)
    d0 = init_bases(ham, 2, 16, 8)
    saved = {}
    counts = {}
    for grad in ("one_step", "jfb", "unrolled"):
        for steps in (1, 4, 16):
            with count_saved_bytes() as seen:
                DECOMPOSITIONS[ham](x, bases=d0, steps=steps, grad=grad).reconstruct()
            saved[grad, steps], counts[grad, steps] = sum(seen.values()), len(seen)
    for grad in ("one_step", "jfb"):  # flat in the steps: bytes and number of saved tensors
        assert saved[grad, 1] == saved[grad, 4] == saved[grad, 16]
        assert counts[grad, 1] == counts[grad, 4] == counts[grad, 16]
    assert saved["unrolled", 1] < saved["unrolled", 4] < saved["unrolled", 16]
    assert saved["one_step", 16] < saved["jfb", 16] <= saved["unrolled", 1]


@pytest.mark.parametrize("ham", HAMS)
@pytest.mark.parametrize("steps, grad_steps", [(3, 2), (4, 3), (2, 5)])
def test_phantom_gradient_is_the_last_recorded_steps_from_the_detached_iterate(
    ham, steps, grad_steps
):
    """grad="phantom": autograd through the last grad_steps full updates and the final C update,
    from the iterate after steps - grad_steps updates computed without gradient, by hand; with
    grad_steps=1 it is "jfb"."""
    x = make_input(ham, batch=2, dim=6, n=9, requires_grad=True)
    d0 = init_bases(ham, 2, 6, 3)
    inv_t = 1.0 if ham == "nmf" else 5.0
    weight = torch.randn(2, 6, 9, dtype=F64)
    fn = DECOMPOSITIONS[ham]
    dec = fn(x, bases=d0, steps=steps, inv_t=inv_t, grad="phantom", grad_steps=grad_steps)
    (grad,) = torch.autograd.grad((dec.reconstruct() * weight).sum(), x)
    iterate, final = REFERENCE[ham]
    recorded = min(steps, grad_steps)
    with torch.no_grad():
        d, c = iterate(x, d0, steps - recorded, inv_t=inv_t)
    for _ in range(recorded):
        d, c = ref_one_recorded_step(ham, x, d, c, inv_t)
    ref = d @ final(x, d, c, inv_t=inv_t).mT
    torch.testing.assert_close(dec.reconstruct(), ref)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), x)
    torch.testing.assert_close(grad, grad_ref)
    jfb = fn(x, bases=d0, steps=steps, inv_t=inv_t, grad="jfb")
    (grad_jfb,) = torch.autograd.grad((jfb.reconstruct() * weight).sum(), x)
    assert not torch.allclose(grad, grad_jfb)
    one = fn(x, bases=d0, steps=steps, inv_t=inv_t, grad="phantom", grad_steps=1)
    (grad_one,) = torch.autograd.grad((one.reconstruct() * weight).sum(), x)
    torch.testing.assert_close(grad_one, grad_jfb)


@pytest.mark.parametrize("grad, grad_steps", [("jfb", 1), ("phantom", 2), ("phantom", 4)])
def test_nmf_grad_init_keeps_the_initialisation_gradient(grad, grad_steps):
    """grad_init: the iterate the recorded updates start from is C_0(x) ⊙ R with the ratio
    R = C / C_0 of the no-grad updates held constant (written out by hand); the forward value is
    unchanged, and recording every update this way is BPTT exactly."""
    steps = 4
    x = make_input("nmf", batch=2, dim=6, n=9, requires_grad=True)
    d0 = init_bases("nmf", 2, 6, 3)
    weight = torch.randn(2, 6, 9, dtype=F64)
    options = {"bases": d0, "steps": steps, "inv_t": 2.0, "grad": grad}
    if grad == "phantom":
        options["grad_steps"] = grad_steps
    dec = nmf(x, grad_init=True, **options)
    plain = nmf(x, **options)
    assert torch.equal(dec.coef, plain.coef) and torch.equal(dec.bases, plain.bases)
    (grad_x,) = torch.autograd.grad((dec.reconstruct() * weight).sum(), x)
    c0 = torch.softmax(2.0 * x.mT @ d0, dim=-1)  # recorded
    with torch.no_grad():
        d, c = ref_nmf_iterate(x, d0, steps - grad_steps, inv_t=2.0)
    c = c0 * (c / c0).detach()
    for _ in range(grad_steps):
        d, c = ref_one_recorded_step("nmf", x, d, c, 2.0)
    (grad_ref,) = torch.autograd.grad((d @ ref_nmf_final(x, d, c).mT * weight).sum(), x)
    torch.testing.assert_close(grad_x, grad_ref)
    (grad_plain,) = torch.autograd.grad((plain.reconstruct() * weight).sum(), x)
    assert not torch.allclose(grad_x, grad_plain)
    bptt = nmf(x, bases=d0, steps=steps, inv_t=2.0, grad="bptt")
    (grad_bptt,) = torch.autograd.grad((bptt.reconstruct() * weight).sum(), x)
    if grad_steps >= steps:
        torch.testing.assert_close(grad_x, grad_bptt)
    else:
        assert not torch.allclose(grad_x, grad_bptt)


@pytest.mark.parametrize("ham", HAMS)
def test_phantom_memory_does_not_grow_with_steps(ham):
    """Saved bytes and tensors of grad="phantom" (and NMF's grad_init) are the same for every
    steps >= grad_steps, and grow with grad_steps."""
    x = make_input(ham, batch=2, dim=16, n=64, requires_grad=True)
    d0 = init_bases(ham, 2, 16, 8)
    init = [False, True] if ham == "nmf" else [False]
    for grad_init, grad_steps in itertools.product(init, (2, 3)):
        saved = set()
        for steps in (grad_steps, 8, 32):
            with count_saved_bytes() as seen:
                DECOMPOSITIONS[ham](
                    x, bases=d0, steps=steps, grad="phantom", grad_steps=grad_steps,
                    **({"grad_init": True} if grad_init else {}),
                ).reconstruct()  # fmt: skip
            saved.add((sum(seen.values()), len(seen)))
        assert len(saved) == 1, (grad_init, grad_steps, saved)
    with count_saved_bytes() as two:
        DECOMPOSITIONS[ham](x, bases=d0, steps=8, grad="phantom", grad_steps=2).reconstruct()
    with count_saved_bytes() as three:
        DECOMPOSITIONS[ham](x, bases=d0, steps=8, grad="phantom", grad_steps=3).reconstruct()
    assert sum(two.values()) < sum(three.values())


def test_hamburger_phantom_with_grad_init_matches_the_functional_form():
    """The block passes grad_steps and grad_init to the decomposition: its input gradient is the
    one of the same block whose ham is the functional nmf with those options."""
    torch.manual_seed(4)
    block = Hamburger(8, ham="nmf", dim=8, rank=2, grad="phantom", grad_steps=2, grad_init=True)
    block = block.double()
    assert "grad_steps=2, grad_init=True" in repr(block)
    x = torch.randn(2, 8, 4, 4, dtype=F64, requires_grad=True)
    torch.manual_seed(1)
    (g,) = torch.autograd.grad(block(x).square().sum(), x)
    for grad_steps, grad_init in ((2, False), (1, True)):  # each option changes the gradient
        other = copy.deepcopy(block)
        other.grad = "phantom"
        other.grad_steps, other.grad_init = grad_steps, grad_init
        torch.manual_seed(1)
        (g_other,) = torch.autograd.grad(other(x).square().sum(), x)
        assert not torch.allclose(g, g_other)
    full = copy.deepcopy(block)
    full.grad_steps = block.train_steps  # every update recorded, with the init: BPTT
    bptt = copy.deepcopy(block)
    bptt.grad = "unrolled"
    grads = []
    for b in (full, bptt):
        torch.manual_seed(1)
        grads.append(torch.autograd.grad(b(x).square().sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: nmf(x, 2, grad="jfb", grad_steps=2), "grad_steps=2 applies to grad='phantom'"),
        (lambda x: nmf(x, 2, grad="phantom", grad_steps=0), "grad_steps"),
        (lambda x: nmf(x, 2, grad="one_step", grad_init=True), "grad_init=True applies to"),
        (lambda x: nmf(x, 2, grad="bptt", grad_init=True), "grad_init=True applies to"),
        # the grad as given, not its canonical name 'unrolled'
        (lambda x: nmf(x, 2, grad="bptt", grad_init=True), "got grad='bptt'"),
        (lambda x: Hamburger(6, dim=6, rank=2, grad="bptt", grad_steps=3), "got grad='bptt'"),
        (lambda x: nmf(x, 2, grad="jfb", grad_init=1), "grad_init"),
        (lambda x: Hamburger(6, ham="vq", dim=6, rank=2, grad="jfb", grad_init=True), "ham='nmf'"),
        (
            lambda x: Hamburger(6, dim=6, rank=2, grad="unrolled", grad_steps=3),
            "grad_steps=3 applies",
        ),
    ],
)
def test_grad_option_errors(call, message):
    x = make_input("nmf", batch=1, dim=6, n=9)
    with pytest.raises((ValueError, TypeError), match=message):
        call(x)


def test_mosaic_passes_and_checks_the_grad_options():
    """The mosaic recipe builds its Hamburger with grad_steps and grad_init, and refuses them by
    name where they do not apply."""
    from equilibria.zoo.config import ConfigError
    from equilibria.zoo.mosaic import VARIANTS, MosaicConfig, MosaicNet

    config = MosaicConfig(**VARIANTS["+ Ham NMF, phantom(2) + init"])
    block = MosaicNet(config).context
    assert (block.grad, block.grad_steps, block.grad_init) == ("phantom", 2, True)
    for bad, message in (
        ({"grad": "one_step", "grad_init": True}, "grad_init applies"),
        ({"ham": "vq", "grad": "jfb", "grad_init": True}, "grad_init applies"),
        ({"grad": "jfb", "grad_steps": 2}, "grad_steps applies"),
    ):
        with pytest.raises(ConfigError, match=message):
            MosaicConfig(block="ham", **bad)


def test_mosaic_page_one_step_rows_are_the_sweep_record():
    """docs/recipes/mosaic.md's one-step-gradient table: every row of the variants in
    benchmarks/results/mosaic_jfb.json has the record's mIoU mean ± std and per-seed mIoU (the
    page gave JFB + init's seed 1 as 92.1; the record has 92.05)."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "benchmarks/results/mosaic_jfb.json").read_text())
    page = (root / "docs/recipes/mosaic.md").read_text()
    for row in record["rows"]:
        name = row["variant"]
        cells = [
            line.split("|")[1:-1]
            for line in page.splitlines()
            if line.startswith(f"| {name} |") and line.count("|") > 6
        ]
        assert len(cells) == 1, name
        miou, seeds = cells[0][1].strip("* "), cells[0][2].strip()
        assert miou == f"{100 * row['miou_mean']:.2f} ± {100 * row['miou_std']:.2f}", name
        runs = sorted((r for r in record["runs"] if r["variant"] == name), key=lambda r: r["seed"])
        assert seeds == ", ".join(f"{100 * r['miou']:.1f}" for r in runs), name


@pytest.mark.parametrize(
    "ham, grad, inv_t, seed",
    [("vq", "unrolled", 100.0, 0), ("vq", "jfb", 100.0, 2), ("cd", "unrolled", 1.0, 2),
     ("cd", "unrolled", 100.0, 0), ("cd", "jfb", 1.0, 2), ("vq", "phantom", 100.0, 2)],
)  # fmt: skip
def test_vq_cd_recorded_updates_of_float16_input_have_finite_gradients(ham, grad, inv_t, seed):
    """float16 input with recorded updates: the derivatives of the assignments' column sums and
    softmax overflowed float16 and x's gradient came out non-finite (these seeds, at |x| ~ 100);
    the updates are now recorded in float32 and the gradient follows float32's."""
    torch.manual_seed(seed)
    x = 100 * torch.randn(2, 16, 64)
    weight = torch.randn(2, 16, 64)
    d0 = init_bases(ham, 2, 16, 4, dtype=torch.float32)
    grads = []
    for dtype in (torch.float16, torch.float32):
        xs = x.to(dtype).requires_grad_()
        dec = DECOMPOSITIONS[ham](
            xs, bases=d0.to(dtype), steps=6, grad=grad, inv_t=inv_t,
            **({"grad_steps": 2} if grad == "phantom" else {}),
        )  # fmt: skip
        assert dec.coef.dtype == dec.bases.dtype == dtype
        grads.append(torch.autograd.grad((dec.reconstruct().float() * weight).sum(), xs)[0])
    assert grads[0].dtype == torch.float16 and torch.isfinite(grads[0]).all()
    cos = F.cosine_similarity(grads[0].double().flatten(), grads[1].double().flatten(), dim=0)
    assert cos > 0.9, float(cos)


@pytest.mark.parametrize("ham, seed", [("vq", 0), ("cd", 4)])
def test_hamburger_under_float16_autocast_has_finite_gradients(ham, seed):
    """float16 autocast, VQ/CD at inv_t = 1 (near-uniform assignments, so near-constant output
    channels): the folded batch norm's products ran in float16 under autocast and the gradient of
    rsqrt(var + eps) overflowed there (these seeds); it now runs with autocast off."""
    torch.manual_seed(seed)
    block = Hamburger(8, ham=ham, dim=8, rank=2, grad="unrolled", inv_t=1.0)
    x = torch.randn(2, 8, 4, 4)
    _, grads = _forward_backward(copy.deepcopy(block), x, autocast=True, dtype=torch.float16)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("ham", HAMS)
def test_random_init_uses_generator(ham):
    x = make_input(ham, batch=2, dim=5, n=8)
    fn = DECOMPOSITIONS[ham]
    a = fn(x, 3, generator=torch.Generator().manual_seed(7))
    b = fn(x, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.coef, b.coef)


def test_inference_mode_and_float32():
    x = torch.rand(2, 8, 16)
    with torch.inference_mode():
        for fn in DECOMPOSITIONS.values():
            dec = fn(x, 4)
            assert dec.coef.dtype == torch.float32 and torch.isfinite(dec.reconstruct()).all()


def test_moving_average_bases():
    buffer = random_bases(1, 6, 3, dtype=F64)[0]
    new = random_bases(4, 6, 3, dtype=F64)
    out = moving_average_bases(buffer, new, momentum=0.75)
    expected = 0.75 * buffer + 0.25 * new.mean(0)
    torch.testing.assert_close(out, expected / expected.norm(dim=0))
    torch.testing.assert_close(moving_average_bases(buffer, new, momentum=0.0).norm(dim=0),
                               torch.ones(3, dtype=F64))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Hamburger blocks: fused implementation vs an unfused reference.


def reference_block(block, x, bases, steps, state):
    """ReLU(x + Norm(W_u · ham(bread(x)))) computed the straightforward way."""
    batch, channels = x.shape[:2]
    z = x.reshape(batch, channels, -1)
    feats = torch.einsum("dc,bcn->bdn", block.lower_weight, z) + block.lower_bias[:, None]
    if block.ham == "nmf":
        feats = feats.relu()
    kwargs = {"inv_t": block.inv_t, "eps": block.eps}
    if block.ham == "cd":
        kwargs["beta"] = block.beta
    dec = DECOMPOSITIONS[block.ham](feats, bases=bases, steps=steps, grad=block.grad, **kwargs)
    y = torch.einsum("cd,bdn->bcn", block.upper_weight, dec.reconstruct()).reshape(x.shape)
    if block.norm == "batch":
        y = F.batch_norm(y, state["running_mean"], state["running_var"], block.norm_weight,
                         block.norm_bias, block.training, 0.1, 1e-5)  # fmt: skip
    else:
        y = y + block.upper_bias[:, None, None]
    return F.relu(x + y)


@pytest.mark.parametrize("ham", HAMS)
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("custom", [False, True])
def test_hamburger_matches_unfused_reference(ham, norm, training, grad, tokens, custom):
    cls = HamburgerTokens if tokens else Hamburger
    options = CUSTOM[ham] if custom else {}
    block = cls(5, ham=ham, dim=4, rank=3, train_steps=2, eval_steps=3, norm=norm, init="online",
                grad=grad, dtype=F64, **options).train(training)  # fmt: skip
    if norm == "batch":
        with torch.no_grad():
            block.running_mean.uniform_(-1, 1)
            block.running_var.uniform_(0.5, 2)
            block.norm_weight.uniform_(0.5, 2)
            block.norm_bias.uniform_(-1, 1)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(3, 5, 3, 4, dtype=F64, requires_grad=True)
    if tokens:  # the same positions as tokens (B, N, C); gradients flow through the transpose
        out = block(x.flatten(2).mT).mT.reshape(x.shape)
    else:
        out = block(x)
    ref = reference_block(block, x, state["bases"], 2 if training else 3, state)
    torch.testing.assert_close(out, ref)
    weight = torch.randn_like(out)
    inputs = [x, *block.parameters()]
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * weight).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    if norm == "batch":  # running statistics updated exactly like nn.BatchNorm
        torch.testing.assert_close(block.running_mean, state["running_mean"])
        torch.testing.assert_close(block.running_var, state["running_var"])


@pytest.mark.parametrize("ham", ["nmf", "cd"])  # the hams with a fused one-step backward
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_block_gradcheck_with_frozen_solve(monkeypatch, ham, norm, tokens, training, batch):
    """The fused backward (_BreadAndLastStep) vs finite differences, in float64, first and second
    derivatives (gradient penalties differentiate it with create_graph=True).

    The no-grad solve (D, P, W) is frozen to its value at the first call, so the block becomes the
    differentiable last step that the one-step gradient is exact for.
    """
    torch.manual_seed(7)
    cls = HamburgerTokens if tokens else Hamburger
    init = "random" if training else "online"
    block = cls(5, ham=ham, dim=4, rank=2, init=init, norm=norm, dtype=F64).train(training)
    if ham == "nmf":  # keep the ReLU away from its kink
        with torch.no_grad():
            block.lower_bias.add_(1.0)
    solve, cache = block._solve, []

    def frozen(x):
        if not cache:
            cache.append(solve(x))
        return cache[0]

    monkeypatch.setattr(block, "_solve", frozen)
    shape = (batch, 9, 5) if tokens else (batch, 5, 3, 3)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    params = (block.lower_weight, block.lower_bias, block.upper_weight)
    assert torch.autograd.gradcheck(lambda x, *p: block(x), (x, *params))
    assert torch.autograd.gradgradcheck(lambda x, *p: block(x), (x, *params))
    assert cache  # the fused path was taken


@pytest.mark.parametrize("ham", HAMS)
def test_tokens_match_feature_maps(ham):
    maps = Hamburger(6, ham=ham, dim=5, rank=2, init="online", dtype=F64)
    tokens = HamburgerTokens(6, ham=ham, dim=5, rank=2, init="online", dtype=F64)
    tokens.load_state_dict(maps.state_dict())
    x = torch.randn(2, 6, 4, 5, dtype=F64)
    out_maps = maps(x)
    out_tokens = tokens(x.flatten(2).mT)
    torch.testing.assert_close(out_tokens, out_maps.flatten(2).mT)
    torch.testing.assert_close(tokens.running_var, maps.running_var)
    torch.testing.assert_close(tokens.bases, maps.bases)


@pytest.mark.parametrize("ham", HAMS)
def test_online_bases_update(ham):
    block = Hamburger(6, ham=ham, dim=5, rank=2, init="online", momentum=0.8, dtype=F64)
    x = torch.randn(3, 6, 4, 4, dtype=F64)
    before = block.bases.clone()
    feats = torch.einsum("dc,bcn->bdn", block.lower_weight, x.flatten(2))
    feats = feats + block.lower_bias[:, None]
    feats = feats.relu() if ham == "nmf" else feats
    kwargs = {} if ham == "nmf" else {"inv_t": 100.0}
    with torch.no_grad():
        solved = DECOMPOSITIONS[ham](feats, bases=before, steps=block.train_steps, **kwargs)
    block(x)
    torch.testing.assert_close(
        block.bases, moving_average_bases(before, solved.bases, momentum=0.8)
    )
    if ham == "nmf":
        assert (block.bases >= 0).all()
    # evaluation uses the buffer without changing it, so it is deterministic
    block.eval()
    after = block.bases.clone()
    torch.testing.assert_close(block(x), block(x))
    assert torch.equal(block.bases, after)


def test_random_init_draws_new_bases_at_each_call():
    x = torch.randn(2, 4, 5, 5)
    random_block = Hamburger(4, dim=4, rank=2, eval_steps=1).eval()
    assert not torch.equal(random_block(x), random_block(x))


@pytest.mark.parametrize("ham", HAMS)
def test_hamburger_grad_modes_same_forward_and_memory(ham):
    torch.manual_seed(4)
    blocks = {grad: Hamburger(8, ham=ham, dim=8, rank=4, grad=grad, init="online", dtype=F64)
              for grad in ("one_step", "jfb", "bptt")}  # fmt: skip
    blocks["jfb"].load_state_dict(blocks["one_step"].state_dict())
    blocks["bptt"].load_state_dict(blocks["one_step"].state_dict())
    x = torch.randn(2, 8, 6, 6, dtype=F64, requires_grad=True)
    saved = {}
    for steps in (2, 8):
        outs = {}
        for grad, block in blocks.items():
            block.train_steps = steps
            with count_saved_bytes() as seen:
                outs[grad] = block(x)
            saved[grad, steps] = sum(seen.values())
            outs[grad].sum().backward()
        for grad in ("jfb", "bptt"):
            torch.testing.assert_close(outs["one_step"], outs[grad])
            torch.testing.assert_close(blocks["one_step"].bases, blocks[grad].bases)
    assert saved["one_step", 2] == saved["one_step", 8]
    assert saved["jfb", 2] == saved["jfb", 8] < saved["bptt", 8]
    assert saved["bptt", 2] < saved["bptt", 8]
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for block in blocks.values():
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_hamburger_without_lower_bread_and_dtypes():
    block = Hamburger(4, dim=4, rank=2, lower_bread=False, dtype=F64)
    assert block.lower_weight is None
    out = block(torch.rand(2, 4, 3, 3, dtype=F64))
    assert out.dtype == F64
    bf16 = Hamburger(8, dim=8, rank=2, dtype=torch.bfloat16)
    assert bf16(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    meta = Hamburger(8, dim=8, rank=2, init="online", device="meta")
    assert meta.upper_weight.device.type == meta.bases.device.type == "meta"


@pytest.mark.parametrize("ham", HAMS)
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("init", ["random", "online"])
@pytest.mark.parametrize("tokens", [False, True])
def test_hamburger_under_autocast(ham, grad, init, tokens):
    """bfloat16 autocast: dtypes kept, and the output and gradients follow a float32 copy of the
    block (same bases draw) to bfloat16 accuracy."""
    torch.manual_seed(8)
    cls = HamburgerTokens if tokens else Hamburger
    block = cls(8, ham=ham, dim=8, rank=2, init=init, grad=grad, **_smooth(ham))
    x = torch.randn(*((2, 16, 8) if tokens else (2, 8, 4, 4)))
    reference = copy.deepcopy(block)
    out, grads = _forward_backward(block, x, autocast=True)
    ref, grads_ref = _forward_backward(reference, x, autocast=False)
    assert out.shape == x.shape and torch.isfinite(out).all()
    _assert_low_precision_close(ham, out, ref, grads, grads_ref, block)


@pytest.mark.parametrize("seed", [7, 9])
def test_nmf_bptt_under_float16_autocast_has_finite_gradients(seed):
    """float16 autocast: BPTT through NMF's divisions overflows float16, so its updates are
    recorded in float32 with autocast off (with it on, the products were float16 again and these
    seeds gave non-finite input and weight gradients); gradients follow the float32 block."""
    torch.manual_seed(seed)
    block = Hamburger(8, ham="nmf", dim=8, rank=2, grad="bptt")
    x = torch.randn(2, 8, 4, 4)
    reference = copy.deepcopy(block)
    _, grads = _forward_backward(block, x, autocast=True, dtype=torch.float16)
    _, grads_ref = _forward_backward(reference, x, autocast=False)
    total, total_ref = (torch.cat([g.double().flatten() for g in gs]) for gs in (grads, grads_ref))
    assert torch.isfinite(total).all()
    assert F.cosine_similarity(total, total_ref, dim=0) > 0.99


def test_nmf_bptt_of_a_float32_input_under_float16_autocast():
    """The functional form fed float32 (not an autocast lower bread's float16): the updates are
    still recorded in float32, so the result keeps float32 and the gradient follows the one
    without autocast (without that branch the coefficients came out float16 and
    reconstruct() failed on the mixed dtypes)."""
    torch.manual_seed(3)
    x = torch.rand(2, 8, 16).requires_grad_()
    weight, d0 = torch.randn(2, 8, 16), torch.rand(2, 8, 2)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        low = nmf(x, 2, bases=d0, steps=6, grad="bptt")
    assert low.coef.dtype == low.bases.dtype == torch.float32
    (g,) = torch.autograd.grad((low.reconstruct() * weight).sum(), x)
    (g_ref,) = torch.autograd.grad(
        (nmf(x, 2, bases=d0, steps=6, grad="bptt").reconstruct() * weight).sum(), x
    )
    assert torch.isfinite(g).all()
    assert F.cosine_similarity(g.flatten(), g_ref.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grad", ["one_step", "jfb", "phantom", "unrolled"])
@pytest.mark.parametrize("ham", HAMS)
def test_functional_forms_keep_a_float32_input_under_autocast(ham, grad, autocast_dtype):
    """nmf / vq / cd of a float32 x under autocast give what they give without it, in float32
    (one-step NMF failed in place on the mixed dtypes, bfloat16 JFB NMF too, and CD and bfloat16
    BPTT NMF returned float16/bfloat16 coefficients next to float32 bases, which reconstruct()
    refused)."""
    torch.manual_seed(0)
    x = make_input(ham, batch=2, dim=8, n=16, dtype=torch.float32).to(DEVICE).requires_grad_()
    d0 = init_bases(ham, 2, 8, 3, dtype=torch.float32).to(DEVICE)
    weight = torch.randn(2, 8, 16, device=DEVICE)
    options = {"bases": d0, "steps": 4, "grad": grad}
    if grad == "phantom":
        options["grad_steps"] = 2
    with torch.autocast(DEVICE.type, dtype=autocast_dtype):
        low = DECOMPOSITIONS[ham](x, **options)
    ref = DECOMPOSITIONS[ham](x, **options)
    assert low.coef.dtype == low.bases.dtype == torch.float32
    torch.testing.assert_close(low.reconstruct(), ref.reconstruct(), rtol=0, atol=0)
    (g,) = torch.autograd.grad((low.reconstruct() * weight).sum(), x)
    (g_ref,) = torch.autograd.grad((ref.reconstruct() * weight).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def _forward_backward(block, x, autocast, dtype=torch.bfloat16):
    """Output and gradients (input, then every parameter) of one forward/backward; the seed is
    fixed so that random bases are the same draw on every call."""
    torch.manual_seed(1)
    x = x.detach().clone().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=autocast):
        out = block(x)
    out.float().square().sum().backward()
    return out, [x.grad, *(p.grad for p in block.parameters())]


def _smooth(ham):
    """Options of the low-precision comparisons: VQ and CD at inv_t = 1 (see below)."""
    return {} if ham == "nmf" else {"inv_t": 1.0}


def _assert_low_precision_close(ham, out, ref, grads, grads_ref, block):
    """Low-precision run vs float32: output within a few bfloat16 ulps of relative error and
    gradients in the same direction, in the dtypes of their tensors.

    VQ and CD assign positions to bases by a softmax at inverse temperature inv_t; at the default
    100 the assignments, hence outputs and gradients, are near-discontinuous in the round-off
    (over 8 seeds the output differed by up to 60%), so they run at inv_t = 1 (output errors at
    most 0.045 over 8 seeds x 8 configurations on the CPU), and only their outputs are compared:
    their lower-bread gradients are small differences that the upper bread's batch norm leaves
    after cancelling most of the signal, which bfloat16 round-off dominates."""
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err <= (0.05 if ham == "nmf" else 0.1), float(err)
    params = list(block.parameters())
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert g is not None and torch.isfinite(g).all(), i
        if i:  # parameters keep their own dtype
            assert g.dtype == params[i - 1].dtype, i
        if ham == "nmf":
            cos = F.cosine_similarity(g.double().flatten(), g_ref.double().flatten(), dim=0)
            assert cos > 0.98, (i, float(cos))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ham", HAMS)
@pytest.mark.parametrize("grad", ["one_step", "jfb", "unrolled"])
def test_half_precision_blocks(dtype, ham, grad):
    # (float16 NMF with bptt records its updates in float32: in float16 the backward overflows)
    torch.manual_seed(9)
    block = Hamburger(8, ham=ham, dim=8, rank=2, grad=grad, **_smooth(ham))
    x = torch.randn(2, 8, 4, 4)
    low = copy.deepcopy(block).to(dtype)
    ref, grads_ref = _forward_backward(block, x, autocast=False)
    out, grads = _forward_backward(low, x.to(dtype), autocast=False)
    assert out.dtype == grads[0].dtype == dtype and torch.isfinite(out).all()
    _assert_low_precision_close(ham, out, ref, grads, grads_ref, low)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finiteness_check_is_exact(dtype):
    """The check sums first: finite values whose sum overflows pass (value by value), and every
    NaN or Inf, alone or with its opposite (a NaN sum), is found."""
    big = torch.finfo(dtype).max
    torch.manual_seed(12)
    # the sum overflows (accumulated in float32 for half types; float16's range is too small for
    # that, so for float16 only the NaN/Inf cases below reach the value-by-value check)
    _check_finite("x", torch.full((3, 40), big / 2, dtype=dtype))
    _check_finite("x", torch.full((3, 40), -big / 2, dtype=dtype).requires_grad_())
    _check_finite("x", torch.randn(2, 5, dtype=dtype))
    for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
        x = torch.randn(3, 40, dtype=dtype)
        x.view(-1)[torch.randperm(120)[: len(bad)]] = torch.tensor(bad, dtype=dtype)
        with pytest.raises(ValueError, match=f"got {len(bad)} non-finite value"):
            _check_finite("x", x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folded_batch_norm_of_a_constant_channel_in_half_precision(dtype):
    """A channel whose output is constant over batch and positions (variance 0): the folded batch
    norm's gradient (of order var^-1.5 = eps^-1.5) overflowed float16 to NaN before it computed
    in float32; now it is the float32 computation on the same (rounded) values, rounded."""
    torch.manual_seed(11)
    a = torch.randn(2, 3, 2)
    coef = torch.rand(2, 5, 2)
    coef[..., 1] = coef[..., 0]  # equal columns: channels with a[..., 0] = -a[..., 1] are constant
    a[:, 0, 1] = -a[:, 0, 0]
    coef[1] = coef[0]  # and the same in both samples
    a[1, 0] = a[0, 0]
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)

    def folded(dt):
        leaves = [t.to(dtype).to(dt).requires_grad_() for t in (a, coef, weight, bias)]
        buffers = torch.zeros(3, dtype=dt), torch.ones(3, dtype=dt)
        out = _fold_batch_norm(*leaves, *buffers, training=True)
        assert out[0].dtype == out[1].dtype == dt
        ((out[0].float() * up_a).sum() + (out[1].float() * up_s).sum()).backward()
        return [t.grad for t in leaves]

    up_a, up_s = torch.randn(2, 3, 2), torch.randn(3)  # upstream gradients, exact in any dtype

    grads, grads_ref = folded(dtype), folded(torch.float32)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref.to(dtype), rtol=1e-2, atol=1e-2 * g_ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", ["one_step", "jfb", "unrolled"])
def test_cd_half_precision_matches_float32(dtype, grad):
    """CD's ridge solve runs in float32 for half-precision inputs and is cast back."""
    torch.manual_seed(10)
    x = torch.randn(2, 16, 40)
    d0 = random_bases(1, 16, 4, nonnegative=False)[0]
    full = cd(x, bases=d0, steps=3, grad=grad)
    half = cd(x.to(dtype), bases=d0.to(dtype), steps=3, grad=grad)
    assert half.coef.dtype == half.bases.dtype == dtype
    err_full = (x - full.reconstruct()).norm()
    err_half = (x - half.reconstruct().float()).norm()
    assert abs(err_half - err_full) <= 0.02 * err_full
    assert (half.coef.float() - full.coef).norm() <= 0.05 * full.coef.norm()


@pytest.mark.parametrize("ham", HAMS)
@pytest.mark.parametrize("grad", ["one_step", "jfb"])
def test_bfloat16_iterations_stay_close_to_full_precision(ham, grad):
    torch.manual_seed(5)
    x = make_input(ham, batch=2, dim=32, n=200, dtype=torch.float32, requires_grad=True)
    d0 = init_bases(ham, 2, 32, 8, dtype=torch.float32)
    fn = DECOMPOSITIONS[ham]
    # jfb differentiates a cluster step of VQ/CD, whose inv_t = 100 assignments make the gradient
    # near-discontinuous in the iterate (CD's cosine is 0.94 at 100, 0.99994 at 10)
    options = {"inv_t": 10.0} if grad == "jfb" and ham != "nmf" else {}
    full = fn(x, bases=d0, steps=6, grad=grad, **options)
    fast = fn(x, bases=d0, steps=6, grad=grad, iter_dtype=torch.bfloat16, **options)
    assert fast.coef.dtype == torch.float32
    assert not torch.equal(fast.bases, full.bases)  # the bfloat16 products were used
    err_full = (x - full.reconstruct()).norm()
    err_fast = (x - fast.reconstruct()).norm()
    assert abs(err_fast - err_full) <= 0.02 * err_full
    if ham == "vq":  # inv_t = 100 makes the assignments, hence the gradient, near-discontinuous
        return
    weight = torch.randn(2, 32, 200)
    (g_full,) = torch.autograd.grad((full.reconstruct() * weight).sum(), x)
    (g_fast,) = torch.autograd.grad((fast.reconstruct() * weight).sum(), x)
    assert F.cosine_similarity(g_full.flatten(), g_fast.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("ham", HAMS)
def test_hamburger_bfloat16_iterations(ham):
    torch.manual_seed(6)
    inv_t = 10.0 if ham == "vq" else None  # VQ's default 100 makes the assignments too stiff
    full = Hamburger(16, ham=ham, dim=32, rank=8, init="online", inv_t=inv_t)
    fast = Hamburger(16, ham=ham, dim=32, rank=8, init="online", inv_t=inv_t,
                     iter_dtype=torch.bfloat16)  # fmt: skip
    fast.load_state_dict(full.state_dict())
    x = torch.randn(2, 16, 12, 12)
    out_full, out_fast = full(x), fast(x)
    assert not torch.equal(out_full, out_fast)  # the bfloat16 path was taken
    assert (out_full - out_fast).norm() <= 0.05 * out_full.norm()
    assert "iter_dtype=torch.bfloat16" in repr(fast)


# ---------------------------------------------------------------------------------------------
# Bad inputs: exception type and a fragment of the message.

X = torch.rand(2, 6, 9)
X_NAN = X.clone().index_put_(
    (torch.tensor(1), torch.tensor(2), torch.tensor(3)), torch.tensor(float("nan"))
)
X_INF = X.clone().index_put_(
    (torch.tensor(0), torch.tensor(0), torch.tensor(0)), torch.tensor(float("inf"))
)
MAP = torch.randn(2, 8, 4, 4)
MAP_NAN = MAP.clone().index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan")))

BAD_CALLS = [
    (lambda: nmf([[1.0]], 2), TypeError, "x must be a torch.Tensor"),
    (lambda: nmf(torch.ones(2, 6, 9, dtype=torch.long), 2), TypeError, "floating dtype"),
    (lambda: nmf(X[0], 2), ValueError, "shape (B, d, n)"),
    (lambda: nmf(X[:, :, :0], 2), ValueError, "no empty dimension"),
    (lambda: nmf(X), ValueError, "give rank or initial bases"),
    (lambda: nmf(X, 0), ValueError, "nmf: rank must be an int in [1, 6], got 0"),
    (lambda: nmf(X, 7), ValueError, "nmf: rank must be an int in [1, 6], got 7"),
    (lambda: vq(X[:, :, :3], 4), ValueError, "vq: rank must be an int in [1, 3], got 4"),
    (  # a rank taken from the bases
        lambda: nmf(X, bases=torch.rand(6, 7)),
        ValueError,
        "rank must be in [1, min(d, n)] = [1, 6] for x of shape (2, 6, 9), got 7",
    ),
    (lambda: nmf(X, 2.0), TypeError, "rank must be an int"),
    (
        lambda: nmf(X, 2.0, bases=torch.rand(6, 2)),
        TypeError,
        "rank must be an int in [1, 6], got float 2.0",
    ),
    (lambda: nmf(X, 2, generator="abc"), TypeError, "generator must be a torch.Generator or None"),
    (lambda: random_bases(1, 6, 2, dtype=torch.int32), TypeError, "dtype must be None or a"),
    (lambda: Hamburger(8, dtype=torch.int32), TypeError, "dtype must be None or a floating"),
    (lambda: nmf(X - 1, 2), ValueError, "x must be non-negative"),
    (lambda: nmf(X, bases=-torch.rand(6, 2)), ValueError, "bases must be non-negative"),
    (lambda: nmf(X, 2, steps=-1), ValueError, "steps must be an int >= 0, got -1"),
    (lambda: nmf(X, 2, steps=1.5), TypeError, "steps must be an int"),
    (
        lambda: nmf(X, 2, grad="full"),
        ValueError,
        "grad must be one of 'one_step', 'jfb', 'phantom', 'unrolled', 'bptt', got 'full'",
    ),
    (lambda: nmf(X, 2, eps=0.0), ValueError, "eps must be in (0.0, inf), got 0.0"),
    (lambda: vq(X, 2, inv_t=0.0), ValueError, "inv_t must be in (0.0, inf), got 0.0"),
    (lambda: cd(X, 2, beta=-1.0), ValueError, "beta must be in (0.0, inf), got -1.0"),
    (lambda: cd(X, 2, beta=float("nan")), ValueError, "beta must be in (0.0, inf), got nan"),
    (lambda: nmf(X, 2, eps=10**400), ValueError, "eps must be in (0.0, inf), got 1000"),
    (lambda: nmf(X, bases=torch.rand(5, 2)), ValueError, "bases must have shape (d, r)"),
    (lambda: nmf(X, bases=torch.rand(3, 6, 2)), ValueError, "bases has batch size 3"),
    (lambda: nmf(X, 3, bases=torch.rand(6, 2)), ValueError, "rank=3 disagrees"),
    (lambda: nmf(X, bases=torch.rand(6, 2, dtype=F64)), ValueError, "must match x"),
    (lambda: nmf(X, bases=[[1.0]]), TypeError, "bases must be a torch.Tensor"),
    (lambda: nmf(X, 2, iter_dtype=torch.int8), TypeError, "iter_dtype must be None or a floating"),
    (lambda: vq(X, 2, iter_dtype="bf16"), TypeError, "iter_dtype must be None or a floating"),
    (
        lambda: cd(X, 2, grad="bptt", iter_dtype=torch.bfloat16),
        ValueError,
        "applies to the no-grad iterations of grad='one_step', 'jfb' or 'phantom', got grad='bptt'",
    ),
    (
        lambda: Hamburger(8, grad="bptt", iter_dtype=torch.bfloat16),
        ValueError,
        "iter_dtype=torch.bfloat16 applies to grad='one_step', 'jfb' or 'phantom' only (or must "
        "equal the parameter dtype torch.float32), got grad='bptt'",
    ),
    (lambda: nmf(X_NAN, 2), ValueError, "nmf: x must be finite (no NaN or Inf), got 1 non-finite"),
    (lambda: nmf(X_NAN, 2), ValueError, "the first nan at index (1, 2, 3)"),
    (lambda: vq(X_INF, 2), ValueError, "vq: x must be finite (no NaN or Inf), got 1 non-finite"),
    (lambda: cd(X_NAN - 1, 2), ValueError, "cd: x must be finite"),
    (lambda: cd(X_INF, 2, grad="bptt"), ValueError, "the first inf at index (0, 0, 0)"),
    (lambda: vq(X, bases=torch.full((6, 2), float("nan"))), ValueError, "vq: bases must be finite"),
    (lambda: random_bases(1, 6, 0), ValueError, "rank must be an int >= 1, got 0"),
    (lambda: random_bases(-1, 6, 2), ValueError, "batch must be an int >= 1, got -1"),
    (lambda: random_bases(1, -6, 2), ValueError, "dim must be an int >= 1, got -6"),
    (lambda: random_bases(1, 6, 2.0), TypeError, "rank must be an int >= 1, got float 2.0"),
    (lambda: random_bases(1, 6, 2, generator=1), TypeError, "generator must be a torch.Generator"),
    (
        lambda: moving_average_bases(torch.rand(6, 2), [[1.0]], momentum=0.5),
        TypeError,
        "bases must be a torch.Tensor, got list [[1.0]]",
    ),
    (
        lambda: moving_average_bases(
            torch.rand(6, 2), torch.rand(2, 6, 2, device="meta"), momentum=0
        ),
        ValueError,
        "bases must be on the buffer's device",
    ),
    (
        lambda: moving_average_bases(None, torch.rand(2, 6, 2), momentum=0.5),
        TypeError,
        "buffer must be a torch.Tensor, got NoneType None",
    ),
    (
        lambda: moving_average_bases(torch.rand(6, 2), torch.rand(2, 6, 2), momentum="0.5"),
        TypeError,
        "momentum must be a real number in [0.0, 1.0), got str '0.5'",
    ),
    (lambda: Hamburger(8, iter_dtype=torch.int32), TypeError, "iter_dtype must be None"),
    (
        lambda: moving_average_bases(torch.rand(6, 2), torch.rand(2, 6, 2), momentum=1.0),
        ValueError,
        "momentum must be in [0.0, 1.0)",
    ),
    (
        lambda: moving_average_bases(torch.rand(6, 2), torch.rand(6, 2), momentum=0.5),
        ValueError,
        "buffer must have shape (d, r)",
    ),
    (lambda: Hamburger(0), ValueError, "channels must be an int >= 1, got 0"),
    (lambda: Hamburger(8.0), TypeError, "channels must be an int"),
    (
        lambda: Hamburger(8, ham="svd"),
        ValueError,
        "ham must be one of 'nmf', 'vq', 'cd', got 'svd'",
    ),
    (lambda: Hamburger(8, dim=8, rank=9), ValueError, "rank must be in [1, dim] = [1, 8], got 9"),
    (lambda: Hamburger(8, dim=8, rank=0), ValueError, "rank must be an int >= 1, got 0"),
    (lambda: Hamburger(8, train_steps=-1), ValueError, "train_steps must be an int >= 0, got -1"),
    (lambda: Hamburger(8, eval_steps=True), TypeError, "eval_steps must be an int"),
    (lambda: Hamburger(8, grad="implicit"), ValueError, "grad must be one of"),
    (
        lambda: Hamburger(8, init="zeros"),
        ValueError,
        "init must be one of 'random', 'online', got 'zeros'",
    ),
    (lambda: Hamburger(8, momentum=1.0), ValueError, "momentum must be in [0.0, 1.0)"),
    (
        lambda: Hamburger(8, momentum=-(10**400)),
        ValueError,
        "momentum must be in [0.0, 1.0), got -1000",
    ),
    (
        lambda: Hamburger(8, momentum=float("nan")),
        ValueError,
        "momentum must be in [0.0, 1.0), got nan",
    ),
    (
        lambda: Hamburger(8, momentum=None),
        TypeError,
        "momentum must be a real number in [0.0, 1.0), got NoneType None",
    ),
    (
        lambda: Hamburger(8, norm="layer"),
        ValueError,
        "norm must be one of 'batch', 'none', got 'layer'",
    ),
    (lambda: Hamburger(8, inv_t=-1.0), ValueError, "inv_t must be in (0.0, inf), got -1.0"),
    (lambda: Hamburger(8, lower_bread=False), ValueError, "dim must equal channels=8"),
    (lambda: Hamburger(8, lower_bread=1), TypeError, "lower_bread must be a bool"),
    (lambda: Hamburger(8, rnak=4), TypeError, "rnak"),
    (lambda: Hamburger(8, dim=8, rank=4)(torch.randn(2, 7, 4, 4)), ValueError, "C=8"),
    (lambda: Hamburger(8, dim=8, rank=4)(torch.randn(2, 8, 16)), ValueError, "(B, C, H, W)"),
    (lambda: Hamburger(8, dim=8, rank=4)("x"), TypeError, "x must be a torch.Tensor"),
    (
        lambda: Hamburger(8, dim=8, rank=4)(torch.ones(2, 8, 4, 4, dtype=torch.int32)),
        TypeError,
        "floating dtype",
    ),
    (
        lambda: Hamburger(8, dim=8, rank=5)(torch.randn(2, 8, 2, 2)),
        ValueError,
        "rank=5 exceeds the number of positions n=4",
    ),
    (
        lambda: Hamburger(4, dim=4, rank=2, lower_bread=False)(-torch.rand(2, 4, 3, 3)),
        ValueError,
        "needs a non-negative input",
    ),
    (
        lambda: Hamburger(4, dim=4, rank=2)(torch.randn(1, 4, 1, 1)),
        ValueError,
        "rank=2 exceeds",
    ),
    (
        lambda: Hamburger(4, dim=4, rank=1)(torch.randn(1, 4, 1, 1)),
        ValueError,
        "more than one value per channel",
    ),
    (lambda: HamburgerTokens(8, dim=8, rank=4)(torch.randn(2, 16, 7)), ValueError, "(B, N, C)"),
    (lambda: Hamburger(8, dim=8, rank=4)(MAP_NAN), ValueError, "x must be finite (no NaN or Inf)"),
    (
        lambda: HamburgerTokens(8, ham="cd", dim=8, rank=4)(MAP_NAN.flatten(2).mT),
        ValueError,
        "x must be finite (no NaN or Inf), got 16 non-finite value(s)",
    ),
    (
        lambda: Hamburger(4, dim=4, rank=2, lower_bread=False)(
            torch.full((2, 4, 3, 3), float("inf"))
        ),
        ValueError,
        "x must be finite",
    ),
    (
        lambda: Hamburger(8, dim=8, rank=4)(MAP.double()),
        ValueError,
        "x must have the block's parameter dtype torch.float32 (or run under torch.autocast), got "
        "x of dtype torch.float64",
    ),
    (
        lambda: HamburgerTokens(8, dim=8, rank=4, dtype=torch.float64)(torch.randn(2, 16, 8)),
        ValueError,
        "parameter dtype torch.float64",
    ),
    (
        lambda: Hamburger(8, dim=8, rank=4, device="meta")(MAP),
        ValueError,
        f"x must be on the block's device meta, got x on {DEVICE.type}",
    ),
]


@pytest.mark.parametrize(("call", "error", "fragment"), BAD_CALLS)
def test_bad_inputs(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.parametrize("ham", HAMS)
def test_iter_dtype_equal_to_the_working_dtype_is_allowed_with_bptt(ham):
    """Like the functional rule: iter_dtype equal to the working dtype is a no-op for any grad."""
    x = make_input(ham, batch=2, dim=6, n=9)
    d0 = init_bases(ham, 2, 6, 3)
    fn = DECOMPOSITIONS[ham]
    torch.testing.assert_close(fn(x, bases=d0, grad="bptt", iter_dtype=F64).coef,
                               fn(x, bases=d0, grad="bptt").coef)  # fmt: skip
    for dtype in (None, F64):
        plain = Hamburger(6, ham=ham, dim=5, rank=2, init="online", grad="bptt", dtype=dtype)
        same = Hamburger(6, ham=ham, dim=5, rank=2, init="online", grad="bptt", dtype=dtype,
                         iter_dtype=dtype or torch.get_default_dtype())  # fmt: skip
        same.load_state_dict(plain.state_dict())
        maps = torch.randn(2, 6, 3, 3, dtype=dtype)
        torch.testing.assert_close(same(maps), plain(maps))


@pytest.mark.parametrize("ham", HAMS)
def test_bptt_is_a_documented_alias_of_unrolled(ham):
    """The grad names follow the core's backward methods (eq.JFB, eq.Unrolled); "bptt", the name
    before, keeps working (no warning: saved configs and run folders use it) and means the
    same computation."""
    x = make_input(ham, batch=2, dim=6, n=9, requires_grad=True)
    d0 = init_bases(ham, 2, 6, 3)
    grads = []
    for grad in ("bptt", "unrolled"):
        dec = DECOMPOSITIONS[ham](x, bases=d0, steps=3, grad=grad)
        grads.append(torch.autograd.grad(dec.reconstruct().square().sum(), x)[0])
    assert torch.equal(grads[0], grads[1])
    block = Hamburger(6, ham=ham, dim=6, rank=2, grad="bptt")
    assert block.grad == "unrolled" and "grad='unrolled'" in repr(block)


# ---------------------------------------------------------------------------------------------
# The mosaic recipe (needs the zoo extra): data, config validation and a tiny training run.


@pytest.mark.parametrize("task", ["key", "majority"])
def test_mosaic_canvases(task):
    pytest.importorskip("sklearn")
    import numpy as np

    from equilibria.zoo.mosaic import _digit_pools, make_canvases

    images, labels, _, _ = _digit_pools()
    kwargs = {"grid": 3, "occupancy": 0.7, "match_prob": 0.5, "task": task}
    x, y, digits = make_canvases(np.random.default_rng(0), images, labels, 20, **kwargs)
    x2, y2, _ = make_canvases(np.random.default_rng(0), images, labels, 20, **kwargs)
    assert x.shape == (20, 2, 24, 24) and y.shape == (20, 24, 24)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)  # seeded
    assert set(np.unique(y)) == {0, 1, 2}
    assert np.array_equal(y > 0, x[:, 0] > 0.25)  # strokes are labelled, background is not
    assert np.array_equal(digits >= 0, y > 0) and digits.max() <= 9
    if task == "key":
        assert (x[:, 1].reshape(20, -1).sum(1) == 64).all()  # one marked 8×8 cell per canvas
        assert set(np.unique(y[x[:, 1] > 0])) <= {0, 1}  # the key matches itself
    else:
        assert (x[:, 1] == 0).all()
        assert ((y == 1).sum((1, 2)) > 0).all()


@pytest.mark.no_device_mode  # the recipe builds its data and model on the CPU
def test_mosaic_config_validation_and_tiny_run(tmp_path):
    # the recipe on the shared engine (its CLI: tests/test_zoo_train.py)
    pytest.importorskip("sklearn")
    from equilibria.zoo.mosaic import MosaicConfig, compare, train

    with pytest.raises(ValueError, match=r"block must be one of \('conv', 'attention', 'ham'\)"):
        MosaicConfig(block="mlp")
    with pytest.raises(TypeError, match="steps must be int"):
        MosaicConfig(steps=2.5)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\]"):
        MosaicConfig(channels=8, rank=9)
    with pytest.raises(ValueError, match=r"unknown variant\(s\)"):
        compare(tmp_path, variants=["transformer"])
    # refused before the folder or any run exists: options the variants or seeds set, no seeds,
    # and a bad seed after a good one
    out = tmp_path / "cmp"
    with pytest.raises(ValueError, match=r"overrides \['block', 'seed'\] are set by the compared"):
        compare(out, variants=["conv only"], overrides={"block": "attention", "seed": 7})
    with pytest.raises(ValueError, match="seeds must name at least one seed"):
        compare(out, seeds=())
    with pytest.raises(ValueError, match=r"seed must be in \[0, 4294967295\], got -1"):
        compare(out, seeds=[0, -1], variants=["conv only"])
    assert not out.exists()
    tiny = {"grid": 2, "channels": 8, "rank": 2, "steps": 2, "batch_size": 4, "test_canvases": 4}
    metrics = train(MosaicConfig(**tiny, aux_weight=0.4, run_dir=str(tmp_path / "run")))
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["step_ms"] > 0
    assert {"iou_background", "iou_match", "iou_other"} <= set(metrics)
    compare(tmp_path / "sweep", seeds=[0], variants=["conv only"], overrides=tiny)
    assert (tmp_path / "sweep" / "sweep.md").read_text().count("| conv only |") == 1


@pytest.mark.parametrize("ham", HAMS)
def test_reset_parameters_redraws_the_online_bases(ham):
    torch.manual_seed(3)
    block = Hamburger(8, ham=ham, dim=8, rank=3, init="online")
    initial = block.bases.clone()
    block(torch.randn(2, 8, 4, 4))  # training: the buffer moves towards the solved bases
    assert not torch.equal(block.bases, initial)
    torch.manual_seed(3)
    block.reset_parameters()
    torch.testing.assert_close(block.bases, initial, rtol=0, atol=0)  # the construction draw
    torch.testing.assert_close(block.running_var, torch.ones(8), rtol=0, atol=0)


def test_a_generator_on_another_device_draws_there_and_moves(monkeypatch):
    # ("meta" stands in for a GPU: CPU CI has none; tests/test_cuda.py compares the values.)
    # torch accepts a CPU generator for a meta draw, so the result's device alone cannot tell:
    # record where the draw itself happened.
    devices = []
    for name in ("rand", "randn"):
        real = getattr(torch, name)

        def spy(*args, real=real, **kwargs):
            devices.append(torch.device(kwargs.get("device") or "cpu").type)
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    bases = random_bases(2, 6, 3, generator=torch.Generator().manual_seed(1), device="meta")
    assert bases.device.type == "meta" and bases.shape == (2, 6, 3)
    assert devices == ["cpu"]  # drawn where the generator lives, then moved


@pytest.mark.parametrize("ham", HAMS)
def test_torch_func_jacobian_matches_autograd(ham):
    """torch.func.jacrev on the default one-step block: the fused autograd.Function cannot run
    under functorch transforms (it raised); the block falls back to the unfused path, whose
    Jacobian must equal the fused one that plain autograd computes."""
    torch.manual_seed(0)
    block = Hamburger(6, ham=ham, dim=6, rank=3, init="online", dtype=torch.float64).eval()
    x = torch.rand(1, 6, 3, 3, dtype=torch.float64)
    got = torch.func.jacrev(block)(x)
    want = torch.autograd.functional.jacobian(block, x)
    torch.testing.assert_close(got, want)
    params = dict(block.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(block, p, (x,)).sum())(params)
    block(x).sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
