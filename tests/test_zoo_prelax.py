"""Tests of the prelax recipe: views, losses (float64, against hand-written references), the probe,
the rotation accuracy, config validation and a tiny run of every method on the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from equilibria.zoo.config import ConfigError
from equilibria.zoo.prelax import VARIANTS, PrelaxConfig, compare, train
from equilibria.zoo.prelax_model import (
    PrelaxNet,
    few_label_indices,
    linear_probe,
    neg_cosine,
    prelax_loss,
    rotate,
    rotation_accuracy,
    simsiam_loss,
    standard_view,
)

F64 = torch.float64
pytestmark = pytest.mark.no_device_mode  # the recipe builds its data and model on the CPU


def tiny_net(seed: int = 0) -> PrelaxNet:
    torch.manual_seed(seed)
    return PrelaxNet(width=4, feat=16, dim=8, hidden=6).to(F64)


def test_rotate_is_rot90_per_sample():
    x = torch.randn(8, 1, 8, 8)
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = rotate(x, k)
    for i in range(8):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))
    assert torch.equal(rotate(rotate(out, k), (4 - k) % 4), rotate(out, torch.zeros_like(k)))
    assert torch.equal(rotate(x, torch.zeros_like(k)), x)


def test_standard_view_is_reproducible_and_keeps_shape():
    x = torch.randn(16, 1, 8, 8)
    a = standard_view(x, torch.Generator().manual_seed(3), noise=0.2, erase=0.1)
    b = standard_view(x, torch.Generator().manual_seed(3), noise=0.2, erase=0.1)
    c = standard_view(x, torch.Generator().manual_seed(4), noise=0.2, erase=0.1)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


def _ref_d(p, z):
    """-cos(p, z) with z a constant, written out."""
    z = z.detach()
    return -((p * z).sum(-1) / (p.norm(dim=-1) * z.norm(dim=-1))).mean()


def _ref_prelax(net, x1, x2, k, alpha, gamma):
    """The Prelax objective written out from its definition, one view at a time (eval mode, so
    batch composition does not matter)."""
    x3 = torch.stack([torch.rot90(x2[i], int(k[i]), dims=(-2, -1)) for i in range(len(k))])
    z1, z2, z3 = (net.projector(net.encoder(x)) for x in (x1, x2, x3))
    p1, p2, p3 = (net.predictor(z) for z in (z1, z2, z3))
    r = z3 - z2
    sim = 0.5 * _ref_d(p1, z2) + 0.5 * _ref_d(p2, z1)
    pra = 0.5 * _ref_d(p1 + r, z3) + 0.5 * _ref_d(p3 - r, z1)
    logits = net.rotation_head(r)
    pal = -logits.log_softmax(-1)[torch.arange(len(k)), k].mean()
    return sim + alpha * pra + gamma * pal


def test_prelax_loss_and_gradients_match_a_written_out_reference():
    net = tiny_net().eval()  # batch norm with running statistics: each view on its own
    x1, x2 = torch.randn(2, 6, 1, 8, 8, dtype=F64)
    k = torch.tensor([0, 1, 2, 3, 1, 2])
    loss, terms = prelax_loss(net, x1, x2, k, alpha=0.7, gamma=1.3)
    ref = _ref_prelax(net, x1, x2, k, 0.7, 1.3)
    torch.testing.assert_close(loss, ref)
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, params)
    grads_ref = torch.autograd.grad(ref, params)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    assert set(terms) == {"sim", "pra", "pal", "rot_acc"}
    # the rotation head is trained by the residual's cross-entropy only
    head = list(net.rotation_head.parameters())
    no_pal = prelax_loss(net, x1, x2, k, alpha=0.7, gamma=0.0)[0]
    assert not any(g.any() for g in torch.autograd.grad(no_pal, head))


def test_stop_gradient_and_reductions():
    p = torch.randn(4, 5, dtype=F64, requires_grad=True)
    z = torch.randn(4, 5, dtype=F64, requires_grad=True)
    loss = neg_cosine(p, z)
    assert torch.autograd.grad(loss, z, allow_unused=True)[0] is None
    torch.testing.assert_close(loss, -F.cosine_similarity(p, z, dim=-1).mean())
    net = tiny_net().eval()
    x1, x2 = torch.randn(2, 5, 1, 8, 8, dtype=F64)
    # without the relaxation and the pretext terms Prelax is SimSiam on the standard views
    k = torch.tensor([1, 2, 3, 0, 1])
    torch.testing.assert_close(
        prelax_loss(net, x1, x2, k, alpha=0.0, gamma=0.0)[0], simsiam_loss(net, x1, x2)
    )
    # no rotation: the residual is zero and the relaxed alignment is the similarity term
    _, terms = prelax_loss(net, x1, x2, torch.zeros(5, dtype=torch.long), alpha=1.0, gamma=1.0)
    assert terms["pra"] == pytest.approx(terms["sim"], rel=1e-12)


def test_linear_probe_separable_and_chance():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centres = 5 * torch.randn(4, 6, generator=gen)
    feats = centres[labels] + 0.1 * torch.randn(200, 6, generator=gen)
    assert linear_probe(feats[:100], labels[:100], feats[100:], labels[100:]) == 1.0
    noise = torch.randn(400, 6, generator=gen)
    random_labels = torch.randint(0, 4, (400,), generator=gen)
    acc = linear_probe(noise[:200], random_labels[:200], noise[200:], random_labels[200:])
    assert acc < 0.45


def test_few_label_indices_pick_the_first_of_each_class():
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 1])
    idx = few_label_indices(labels, 2)
    assert idx.tolist() == [1, 3, 2, 6, 0, 4]
    assert few_label_indices(labels, 5).numel() == 9  # a class with fewer keeps all of its own


def test_rotation_accuracy_reads_the_residual():
    """A head that reads the rotation off a residual built to encode it scores 1; an
    untrained head scores near chance."""

    class Oracle(PrelaxNet):
        def project(self, x):
            # z = the four rotations' agreement with a fixed asymmetric template
            template = torch.zeros(8, 8, dtype=x.dtype)
            template[0, :3] = 1.0
            template[:5, 0] = 2.0
            z = torch.stack(
                [(x[:, 0] * torch.rot90(template, q)).sum((-2, -1)) for q in range(4)], dim=1
            )
            return z, z

    net = Oracle(dim=4).to(F64)
    net.rotation_head = torch.nn.Identity()  # h(r) = r: the largest change is at q = k
    images = torch.zeros(3, 1, 8, 8, dtype=F64)
    images[:, 0, 0, :3] = 1.0
    images[:, 0, :5, 0] = 2.0
    assert rotation_accuracy(net, images) == 1.0
    untrained = tiny_net()
    acc = rotation_accuracy(untrained, torch.randn(50, 1, 8, 8, dtype=F64))
    assert acc < 0.6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "byol"}, "method must be one of"),
        ({"steps": 0}, "steps must be in [1, 10000000], got 0"),
        ({"batch_size": 1}, "batch_size must be in [2, 1437], got 1"),
        ({"erase": 1.0}, "erase must be in [0, 0.9], got 1"),
        ({"gamma": -1.0}, "gamma must be in [0, inf), got -1"),
        ({"lr": 0}, "lr must be in (0, inf), got 0"),
    ],
)
def test_config_errors_name_option_value_and_allowed(options, message):
    with pytest.raises((ConfigError, ValueError, TypeError)) as info:
        PrelaxConfig(**options)
    assert message in str(info.value)


def test_tiny_runs_of_every_method(tmp_path):
    tiny = {"steps": 3, "batch_size": 16, "width": 4, "feat": 8, "dim": 6, "hidden": 4,
            "eval_every": 3}  # fmt: skip
    metrics = train(PrelaxConfig(**tiny, method="prelax", run_dir=str(tmp_path / "run")))
    for key in ("probe_acc", "probe10_acc", "rotation_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["train_pal"] > 0 and "train_pra" in metrics
    result = compare(tmp_path / "sweep", seeds=[0], overrides=tiny)
    assert [row["variant"] for row in result.rows] == list(VARIANTS)
    assert all(0.0 <= r["probe_acc"] <= 1.0 for r in result.runs)
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| SimSiam + rotation |" in table and "| Prelax |" in table
