"""Tests of the prelax recipe: views, losses (float64, against hand-written references), the probe,
the rotation accuracy, config validation and a tiny run of every method on the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from equilibria.zoo.config import ConfigError
from equilibria.zoo.digits_model import load_data
from equilibria.zoo.prelax import VARIANTS, PrelaxConfig, PrelaxTask, compare, train
from equilibria.zoo.prelax_model import (
    PrelaxNet,
    few_label_indices,
    few_label_probe,
    knn_accuracy,
    linear_probe,
    neg_cosine,
    orientation_probe,
    prelax_loss,
    random_label_subsets,
    rotate,
    rotated_probe,
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


def test_shifted_views_are_padded_with_the_background_not_zero():
    """The digits are standardised (background about -0.81): a pixel shifted in must take the
    background value, not 0, which is a grey stroke. With no noise, no erasing and contrast
    about the background, a view of a blank image stays blank, and every view of a digit keeps
    the background at the border it was shifted away from."""
    background = float(load_data()[0].min())
    assert background == pytest.approx(-0.8119, abs=1e-3)
    blank = torch.full((32, 1, 8, 8), background)
    view = standard_view(blank, torch.Generator().manual_seed(0), noise=0.0, erase=0.0)
    torch.testing.assert_close(view, blank)
    digits = load_data()[0][:64]
    views = standard_view(digits, torch.Generator().manual_seed(1), noise=0.0, erase=0.0)
    assert views.min() >= background - 1e-6  # nothing below the background: no 0 padding
    assert (views == 0).sum() <= (digits == 0).sum()


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


def test_views_take_batch_norm_statistics_of_their_own():
    """In training mode (batch statistics) each view goes through the network on its own, as in
    SimSiam's reference code: the loss equals the written-out reference that encodes the views
    one at a time, and the rotated view does not change the statistics of the standard ones."""
    net = tiny_net().train()
    gen = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(2, 12, 1, 8, 8, dtype=F64, generator=gen)
    k = torch.randint(0, 4, (12,), generator=gen)
    loss, _ = prelax_loss(net, x1, x2, k, alpha=0.7, gamma=1.3)
    torch.testing.assert_close(loss, _ref_prelax(net, x1, x2, k, 0.7, 1.3))
    z1, p1 = net.project(x1)
    z2, p2 = net.project(x2)
    ref = 0.5 * (_ref_d(p1, z2) + _ref_d(p2, z1))
    torch.testing.assert_close(simsiam_loss(net, x1, x2), ref)


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


@pytest.mark.parametrize(
    ("per_class", "error", "message"),
    [(0, ValueError, "per_class must be an int >= 1, got 0"), (-2, ValueError, "got -2"),
     (True, TypeError, "per_class must be an int >= 1, got bool True"),
     (2.0, TypeError, "per_class must be an int >= 1, got float 2.0")],
)  # fmt: skip
def test_few_label_indices_refuse_a_bad_per_class(per_class, error, message):
    """per_class = 0 returned an empty index tensor (a probe on no labels), True was taken as 1
    and a float reached slicing's error, which names no argument."""
    with pytest.raises(error, match=message):
        few_label_indices(torch.tensor([0, 1, 0, 1]), per_class)


def test_knn_accuracy_reads_neighbours():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 3
    centres = torch.eye(3, 5, dtype=F64) * 4
    feats = centres[labels] + 0.3 * torch.randn(120, 5, dtype=F64, generator=gen)
    assert knn_accuracy(feats[:60], labels[:60], feats[60:], labels[60:], k=5) == 1.0
    noise = torch.randn(400, 5, generator=gen)
    random_labels = torch.randint(0, 4, (400,), generator=gen)
    acc = knn_accuracy(noise[:200], random_labels[:200], noise[200:], random_labels[200:], k=5)
    assert acc < 0.45
    # k = 1 is the nearest training image's label
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert knn_accuracy(a, torch.tensor([0, 1]), torch.tensor([[0.9, 0.2]]), torch.tensor([0]), k=1)


@pytest.mark.parametrize(
    ("k", "error", "message"),
    [(0, ValueError, "k must be an int >= 1, got 0"), (-3, ValueError, "got -3"),
     (True, TypeError, "k must be an int >= 1, got bool True"), (2.0, TypeError, "got float 2.0")],
)  # fmt: skip
def test_knn_accuracy_refuses_a_bad_k(k, error, message):
    """k = 0 used to return the share of class 0 (every vote zero) as an accuracy."""
    feats, labels = torch.eye(4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(error, match=message):
        knn_accuracy(feats, labels, feats, labels, k=k)


def test_random_label_subsets_and_few_label_probe():
    labels = torch.arange(90) % 3
    subsets = random_label_subsets(labels, 4, draws=5, seed=1)
    assert len(subsets) == 5
    for s in subsets:
        assert s.unique().numel() == 12 and torch.bincount(labels[s]).tolist() == [4, 4, 4]
    again = random_label_subsets(labels, 4, draws=5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(subsets, again))
    assert not all(torch.equal(subsets[0], s) for s in subsets[1:])
    gen = torch.Generator().manual_seed(2)
    centres = 5 * torch.randn(3, 6, generator=gen)
    feats = centres[labels] + 0.1 * torch.randn(90, 6, generator=gen)
    acc = few_label_probe(feats, labels, feats, labels, per_class=2, draws=3)
    assert acc == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [({"seed": True}, TypeError, "seed must be an int in .*, got bool True"),
     ({"seed": 1.5}, TypeError, "seed must be an int in .*, got float 1.5"),
     ({"seed": -1}, ValueError, r"seed must be an int in \[0, 9223372036854775807\], got -1"),
     ({"draws": 0}, ValueError, "draws must be an int >= 1, got 0"),
     ({"per_class": True}, TypeError, "per_class must be an int >= 1, got bool True")],
)  # fmt: skip
def test_random_label_subsets_refuse_bad_arguments(kwargs, error, message):
    """A bool or float seed reached torch's manual_seed error (naming no argument); -1 was taken."""
    kwargs = {"per_class": 2, "draws": 1, "seed": 0, **kwargs}
    with pytest.raises(error, match=message):
        random_label_subsets(torch.arange(12) % 3, **kwargs)


def test_few_labels_beyond_the_smallest_class_are_refused():
    """More labels per class than the smallest class holds: the subsets silently took the whole
    class (the "few-label" probe became the full probe for it); now refused by name, by the
    function and, before training, by the task (the val split's smallest class has 111)."""
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 6)
    assert torch.bincount(labels[random_label_subsets(labels, 3, draws=1)[0]]).tolist() == [3] * 3
    with pytest.raises(ValueError, match=r"per_class must be <= 3, .* class \(1\), got 4"):
        random_label_subsets(labels, 4, draws=1)
    with pytest.raises(ValueError, match="per_class must be <= 3"):
        few_label_probe(torch.randn(14, 2), labels, torch.randn(4, 2), labels[:4], per_class=4,
                        draws=2)  # fmt: skip
    with pytest.raises(ConfigError, match=r"few_labels must be <= 111, .*'val', got 112"):
        PrelaxTask(PrelaxConfig(eval_split="val", few_labels=112)).setup(torch.device("cpu"))
    PrelaxTask(PrelaxConfig(eval_split="test", few_labels=112)).setup(torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"few_labels must be <= 139, .*'test', got 140"):
        PrelaxTask(PrelaxConfig(few_labels=140)).setup(torch.device("cpu"))


class _Pixels(torch.nn.Module):
    """Features = the raw pixels (keep the orientation)."""

    def forward(self, x):
        return x.flatten(1)


class _Invariant(torch.nn.Module):
    """Features = sorted pixel values (the same for every rotation of an image)."""

    def forward(self, x):
        return x.flatten(1).sort(dim=1).values


def test_orientation_and_rotated_probes_tell_invariant_from_oriented_features():
    x_train, y_train, x_test, y_test = load_data()
    x_train, y_train, x_test, y_test = x_train[:300], y_train[:300], x_test[:100], y_test[:100]
    pixels, invariant = _Pixels(), _Invariant()
    assert orientation_probe(pixels, x_train, x_test) > 0.6  # chance 0.25; 0.74 measured
    # identical features for the four rotations: the probe can only guess one of them
    assert orientation_probe(invariant, x_train, x_test) == pytest.approx(0.25)
    # the digit probe transfers to rotated images only for invariant features
    upright = linear_probe(invariant(x_train), y_train, invariant(x_test), y_test)
    assert rotated_probe(invariant, x_train, y_train, x_test, y_test) == pytest.approx(upright)
    assert rotated_probe(pixels, x_train, y_train, x_test, y_test) < 0.5


def test_validation_split_is_carved_from_the_training_images():
    task = PrelaxTask(PrelaxConfig(eval_split="val"))
    task.setup(torch.device("cpu"))
    fit_x, fit_y, val_x, val_y = task.probe_data
    x_train, _, x_test, _ = task.data
    assert (len(fit_y), len(val_y)) == (1150, 287)
    joined = torch.cat([fit_x, val_x]).flatten(1)
    # every probe image is a training image, each used once, and no test image is among them
    assert torch.equal(joined.unique(dim=0), x_train.flatten(1).unique(dim=0))
    test_rows = {tuple(r.tolist()) for r in x_test.flatten(1)}
    assert not any(tuple(r.tolist()) in test_rows for r in val_x.flatten(1))
    assert torch.bincount(val_y).min() >= 27  # stratified
    test_task = PrelaxTask(PrelaxConfig())
    test_task.setup(torch.device("cpu"))
    assert test_task.probe_data is test_task.data


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
        ({"few_labels": 0}, "few_labels must be in [1, 10000000], got 0"),
        ({"eval_split": "train"}, "eval_split must be one of"),
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
    for key in ("probe_acc", "probe10_acc", "few_acc", "knn_acc", "orientation_acc",
                "rotated_acc", "rotation_acc"):  # fmt: skip
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["train_pal"] > 0 and "train_pra" in metrics
    result = compare(tmp_path / "sweep", seeds=[0], overrides=tiny)
    assert [row["variant"] for row in result.rows] == list(VARIANTS)
    assert all(0.0 <= r["probe_acc"] <= 1.0 for r in result.runs)
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| SimSiam + rotation |" in table and "| Prelax |" in table


def _table_rows(text: str) -> dict[str, list[str]]:
    """The cells after the first of every markdown table row in ``text``, by the first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


def test_page_tables_are_the_benchmark_records() -> None:
    """docs/recipes/prelax.md's results table is benchmarks/results/prelax.json and its two
    validation tables are prelax_validation.json's blocks, cell by cell (mean ± sample std in
    percent; CPU seconds a run)."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs/recipes/prelax.md").read_text()
    record = json.loads((root / "benchmarks/results/prelax.json").read_text())
    results = _table_rows(page.split("## Results")[1].split("Percent, mean")[0])
    names = {"SimSiam": "simsiam", "SimSiam + rotation": "simsiam_rotation",
             "Prelax (α = 0.3, γ = 0.1)": "prelax", "Prelax, α = γ = 1": "prelax_equal_weights",
             "untrained encoder": "random_init"}  # fmt: skip
    for label, key in names.items():
        r = record[key]
        expected = [f"{100 * r[m + '_mean']:.2f} ± {100 * r[m + '_std']:.2f}"
                    for m in ("probe_acc", "few_acc", "knn_acc", "probe10_acc")]  # fmt: skip
        rotation = r.get("rotation_acc")
        expected.append("–" if rotation is None else
                        f"{100 * rotation:.2f} ± {100 * r['rotation_acc_std']:.2f}")  # fmt: skip
        cpu = r.get("cpu_s_mean")
        expected.append("–" if cpu is None else f"{cpu:.1f}")
        assert results[label] == expected, label
    validation = json.loads((root / "benchmarks/results/prelax_validation.json").read_text())
    section = page.split("## Choosing the budget")[1]
    texts = {"steps=1000": section.split("2000 steps, the chosen")[0],
             "steps=2000": section.split("2000 steps, the chosen")[1]}  # fmt: skip
    for budget, text in texts.items():
        table = _table_rows(text)
        block = validation["budgets"][budget]
        assert len(table) == len(block["rows"]) + 1, budget  # + the header
        for name, r in block["rows"].items():
            label = name.replace("alpha", "α").replace("gamma", "γ")
            cells = table[label]
            means = [f"{r[m + '_mean']:.2f} ± {r[m + '_std']:.2f}"
                     for m in ("probe_acc", "few_acc", "knn_acc")]  # fmt: skip
            assert cells[:3] == means, (budget, name)
            if name.startswith("Prelax"):
                rotation = f"{r['rotation_acc_mean']:.2f} ± {r['rotation_acc_std']:.2f}"
                assert cells[3] == rotation, (budget, name)
            else:
                assert cells[3] == "–", (budget, name)
            if r["cpu_s_mean"] is not None:
                assert cells[4] == f"{r['cpu_s_mean']:.1f}", (budget, name)


def test_prelax_json_is_the_rebuild_of_its_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """benchmarks/results/prelax.json records the command that wrote it, and rebuilding it from
    the committed prelax_runs.json (``prelax.py --from-runs``, no training) gives the same
    numbers."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "benchmarks/results/prelax.json").read_text())
    runs = "benchmarks/results/prelax_runs.json"
    assert record["command"] == f"python benchmarks/prelax.py --from-runs {runs}"
    assert record["runs_command"] == json.loads((root / runs).read_text())["command"]
    spec = importlib.util.spec_from_file_location("prelax_bench", root / "benchmarks/prelax.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        out = tmp_path / "results"
        module.main(["--from-runs", str(root / runs), "--out", str(out)])
    finally:
        sys.path.remove(str(root / "benchmarks"))
    rebuilt = json.loads((out / "prelax.json").read_text())
    drop = {"command", "machine"}
    assert {k: v for k, v in rebuilt.items() if k not in drop} == {
        k: v for k, v in record.items() if k not in drop
    }
