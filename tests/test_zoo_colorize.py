"""The colorize recipe: data, fusion blocks, conflict probe, metrics, engine run and resume."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from equilibria.layers import StopGradientAttention
from equilibria.zoo.checkpoint import load_checkpoint
from equilibria.zoo.cli import main
from equilibria.zoo.colorize import ColorizeConfig, ColorizeTask, evaluate_samples, train
from equilibria.zoo.colorize_data import (
    TEST_IMAGES,
    TRAIN_IMAGES,
    VALIDATION_IMAGES,
    Samples,
    hue_rotation,
    load_images,
    make_samples,
    xdog,
)
from equilibria.zoo.colorize_model import (
    Colorizer,
    SCFTFusion,
    SGAFusion,
    conflict_cosines,
    probed_fusion,
    psnr,
    ssim,
    token_cosine,
)
from equilibria.zoo.config import ConfigError, to_dict
from equilibria.zoo.registry import get_recipe

pytestmark = pytest.mark.no_device_mode  # builds its own CPU data

TINY = {
    "size": 16, "channels": 8, "width": 4, "steps": 4, "batch_size": 4, "test_samples": 8,
    "eval_every": 2, "quiet": True, "report": False, "measure_memory": False,
}  # fmt: skip


# --- data ------------------------------------------------------------------------------------


def test_samples_are_deterministic_by_seed_with_the_right_shapes() -> None:
    images = load_images(TRAIN_IMAGES)
    a = make_samples(np.random.default_rng(3), images, 5, size=24)
    b = make_samples(np.random.default_rng(3), images, 5, size=24)
    c = make_samples(np.random.default_rng(4), images, 5, size=24)
    assert a.line.shape == (5, 1, 24, 24)
    assert a.reference.shape == a.target.shape == (5, 3, 24, 24)
    for t in a:
        assert t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.target, c.target)
    # the reference is the target moved and recoloured, not the target itself
    assert not torch.allclose(a.reference, a.target, atol=0.05)


def test_reference_without_warp_or_jitter_is_the_target() -> None:
    """With every warp and jitter draw at the middle of its range (angle 0, scale 1, no
    shift, no flip, gains 1) the reference is the target: the crop geometry is right."""

    class Middle:
        def __init__(self, rng: np.random.Generator) -> None:
            self.rng = rng

        def uniform(self, low: float, high: float, size: object) -> np.ndarray:
            return np.full(size, (low + high) / 2)

        def random(self, size: int) -> np.ndarray:
            return np.ones(size)  # no flip

        def integers(self, *args: int) -> np.ndarray:
            return self.rng.integers(*args)

    rng = Middle(np.random.default_rng(0))
    s = make_samples(rng, load_images(TRAIN_IMAGES), 3, size=16)  # type: ignore[arg-type]
    torch.testing.assert_close(s.reference, s.target, atol=1e-5, rtol=0)
    # recolouring rotates the hue of target and reference alike (here by the middle angle, π)
    rng = Middle(np.random.default_rng(0))
    r = make_samples(rng, load_images(TRAIN_IMAGES), 3, size=16, recolour=True)  # type: ignore[arg-type]
    torch.testing.assert_close(r.reference, r.target, atol=1e-5, rtol=0)
    assert torch.equal(r.line, s.line)  # the same crops
    rotation = torch.from_numpy(hue_rotation(np.array([np.pi]))[0]).float()
    expected = torch.einsum("ij,kjhw->kihw", rotation, s.target).clamp(0, 1)
    torch.testing.assert_close(r.target, expected, atol=1e-6, rtol=0)
    assert (r.target - s.target).abs().max() > 0.1


def test_hue_rotation_keeps_grey_and_a_third_of_a_turn_cycles_the_channels() -> None:
    r = hue_rotation(np.array([0.0, 2 * np.pi / 3, 1.234]))
    np.testing.assert_allclose(r[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(r[1], np.roll(np.eye(3), 1, axis=0), atol=1e-12)  # G<-R, B<-G
    np.testing.assert_allclose(r[2] @ r[2].T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(r[2] @ np.ones(3), np.ones(3), atol=1e-12)  # grey is kept


@pytest.mark.parametrize("angle", [np.array([0.5, np.nan]), np.array([np.inf]), np.array(0.5)])
def test_hue_rotation_refuses_non_finite_or_non_vector_angles(angle: np.ndarray) -> None:
    """A NaN or infinite angle returned a matrix of NaNs (no error); a 0-d angle an IndexError."""
    with pytest.raises(ValueError, match="angle must be a 1-D array of finite angles"):
        hue_rotation(angle)


def test_make_samples_refuses_no_images() -> None:
    """No photographs raised min()'s "arg is an empty sequence", naming no argument."""
    with pytest.raises(ValueError, match="images must hold at least one photograph"):
        make_samples(np.random.default_rng(0), (), 2, size=16)


def test_recolouring_makes_the_colours_unpredictable_from_the_line_art() -> None:
    """The same crop (same line art) gets different colours in different draws, and the
    test draws (``recolour=False``) keep each photograph's colours."""
    images = load_images(TRAIN_IMAGES)
    a = make_samples(np.random.default_rng(5), images, 64, size=16, recolour=True)
    b = make_samples(np.random.default_rng(5), images, 64, size=16)
    assert torch.equal(a.line, b.line)
    mean_a, mean_b = a.target.mean((2, 3)), b.target.mean((2, 3))
    torch.testing.assert_close(mean_a.mean(1), mean_b.mean(1), atol=0.02, rtol=0)  # brightness
    assert (mean_a - mean_b).abs().amax(1).median() > 0.03  # the hue moved


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"size": 84}, "size must be <= 80 .* got 84"),
        ({"size": 32, "jitter": -0.2}, r"jitter must be in \[0.0, 0.5\], got -0.2"),
        ({"size": 32, "jitter": 2.0}, r"jitter must be in \[0.0, 0.5\], got 2.0"),
        ({"size": 32, "count": 0}, "count must be an int >= 1, got 0"),
    ],
)
def test_make_samples_refuses_bad_arguments(kwargs: dict, fragment: str) -> None:
    kwargs = {"count": 2, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        make_samples(np.random.default_rng(0), load_images(TEST_IMAGES), **kwargs)


def test_train_and_test_photographs_are_disjoint_and_line_art_is_in_range() -> None:
    assert not set(TRAIN_IMAGES) & set(TEST_IMAGES)
    for image, line in load_images(TEST_IMAGES):
        assert image.shape[:2] == line.shape and min(line.shape) == 160
        assert 0.0 <= line.min() and line.max() == 1.0 and line.min() < 0.5  # has ink
    flat = xdog(np.full((20, 20), 0.5))
    assert np.all(flat == 1.0)  # no edges, no ink


# --- metrics ---------------------------------------------------------------------------------


def test_ssim_and_psnr_match_scikit_image() -> None:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 20, 20, generator=gen, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(3, 3, 20, 20, generator=gen, dtype=torch.float64)).clamp(0, 1)
    ours_s, ours_p = ssim(a, b), psnr(a, b)
    for i in range(3):
        x, y = a[i].permute(1, 2, 0).numpy(), b[i].permute(1, 2, 0).numpy()
        ref = structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0,
                                    channel_axis=-1)  # fmt: skip
        assert float(ours_s[i]) == pytest.approx(ref, abs=1e-10)
        assert float(ours_p[i]) == pytest.approx(peak_signal_noise_ratio(y, x, data_range=1.0))
    assert float(ssim(a, a).min()) == pytest.approx(1.0)


def test_token_cosine_against_a_hand_computation() -> None:
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])  # (1, 3, 2)
    b = torch.tensor([[[-1.0, 0.0], [1.0, 0.0], [3.0, 4.0]]])
    # cosines -1, 1/sqrt(2) and 0 (a zero vector)
    assert token_cosine(a, b) == pytest.approx((-1 + 2**-0.5 + 0) / 3)


# --- fusion blocks and the conflict probe ----------------------------------------------------


@pytest.mark.parametrize("attention", ["stop_gradient", "standard"])
def test_sga_fusion_reproduces_the_layer(attention: str) -> None:
    torch.manual_seed(0)
    fusion = SGAFusion(6, attention)  # type: ignore[arg-type]
    x, y = torch.randn(2, 5, 6), torch.randn(2, 7, 6)
    assert isinstance(fusion.block, StopGradientAttention)
    assert isinstance(fusion.self_block, StopGradientAttention)
    expected = fusion.self_block(fusion.block(x, y))  # cross-SGA, then self-SGA
    assert torch.equal(fusion(x, y), expected)
    assert torch.equal(fusion.branches(x, x, y, y), expected)


def _paper_sga(block: StopGradientAttention, src: torch.Tensor, msg: torch.Tensor) -> torch.Tensor:
    """One block of SGA's released code (``GNN.build_graph`` + ``Gconv`` + the residual),
    written out: A = l1-normalise over the queries(softmax over the keys(X Yᵀ)), no scaling."""
    a = torch.softmax(src @ msg.mT, dim=-1)
    a = a / a.sum(dim=-2, keepdim=True)
    act = torch.nn.functional.leaky_relu
    msg_v = act(msg @ block.value.weight.T + block.value.bias, 0.2)
    src_x = act(src @ block.skip.weight.T + block.skip.bias, 0.2)
    return block.norm(a @ msg_v + src_x) + src


def test_sga_fusion_is_the_papers_cross_then_self_block_with_an_unscaled_map() -> None:
    """SGA's code applies a cross block (sketch, reference) and then a self block (Z, Z), each
    with the map softmax(X Yᵀ) unscaled; one block with a 1/√C map is not the paper's SGA."""
    torch.manual_seed(3)
    fusion = SGAFusion(8, "stop_gradient").double()
    for block in (fusion.block, fusion.self_block):  # a non-trivial LayerNorm
        block.norm.weight.data.uniform_(0.5, 1.5), block.norm.bias.data.normal_()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y = torch.randn(2, 9, 8, dtype=torch.float64)
    z = _paper_sga(fusion.block, x, y)
    expected = _paper_sga(fusion.self_block, z, z)
    # up to the layer's 1e-9 added to the column sums (a 1/√C map or no self block: O(0.1))
    torch.testing.assert_close(fusion(x, y), expected, rtol=1e-6, atol=1e-6)


def _hand_scft_map_gradient(block: SCFTFusion, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
    """∂<W, Z>/∂X through the map of Z = softmax(s QKᵀ) V + X, by the chain rule by hand."""
    q = x @ block.query.weight.T + block.query.bias  # (B, N, C)
    k = y @ block.key.weight.T + block.key.bias  # (B, M, C)
    v = y @ block.value.weight.T + block.value.bias  # (B, M, C)
    a = torch.softmax(block.scale * q @ k.mT, -1)  # (B, N, M)
    d_a = w @ v.mT  # ∂L/∂A
    d_logits = a * (d_a - (a * d_a).sum(-1, keepdim=True))  # softmax backward, row by row
    return block.scale * d_logits @ k @ block.query.weight  # ∂L/∂Q · ∂Q/∂X


def test_conflict_of_scft_against_a_hand_computation() -> None:
    torch.manual_seed(0)
    block = SCFTFusion(4).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64)  # L = <W, Z>
    grads: dict[str, torch.Tensor] = {}
    z = probed_fusion(block, x, y, grads, probe_map=False)
    (z * w).sum().backward()
    with torch.no_grad():
        g_map = _hand_scft_map_gradient(block, x, y, w)
    torch.testing.assert_close(grads["x_map"], g_map)
    torch.testing.assert_close(grads["x_skip"], w)  # the residual passes W unchanged
    got = conflict_cosines(grads)
    cos = torch.nn.functional.cosine_similarity(g_map, w, dim=-1).mean()
    assert got["conflict_x"] == pytest.approx(float(cos), abs=1e-12)
    assert got["probe_conflict_x"] == got["conflict_x"]  # the map's gradient is applied


def test_sga_passes_no_map_gradient_and_its_probe_is_the_unstopped_one() -> None:
    torch.manual_seed(1)
    fusion = SGAFusion(4, "stop_gradient").double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64)
    grads: dict[str, torch.Tensor] = {}
    z = probed_fusion(fusion, x, y, grads, probe_map=True)
    assert torch.equal(z, fusion(x, y))  # the probe adds an exact zero
    (z * w).sum().backward()
    assert "x_map" not in grads and "y_map" not in grads
    got = conflict_cosines(grads)
    assert got["conflict_x"] == 0.0 and got["conflict_y"] == 0.0
    # the probe: the same blocks with the cross map differentiated (an independent
    # re-implementation); the self block after it is part of the path
    b = fusion.block
    xm, ym = x.detach().requires_grad_(), y.detach().requires_grad_()
    a = torch.softmax(xm @ ym.mT, -1)  # unscaled, as SGA's code
    a = a / (a.sum(1, keepdim=True) + 1e-9)
    value = b.act(b.value(y.detach()))
    out = fusion.self_block(b.norm(a @ value + b.act(b.skip(x.detach()))) + x.detach())
    gx, gy = torch.autograd.grad((out * w).sum(), (xm, ym))
    torch.testing.assert_close(grads["x_probe"], gx)
    torch.testing.assert_close(grads["y_probe"], gy)
    assert got["probe_conflict_x"] == pytest.approx(token_cosine(gx, grads["x_skip"]))
    # the parts add up to the gradient of the unprobed block
    x.grad = None
    (fusion(x, y) * w).sum().backward()
    torch.testing.assert_close(grads["x_skip"], x.grad)


@pytest.mark.parametrize("fusion", ["standard", "sga", "learned_map"])
def test_probing_leaves_the_training_gradients_unchanged(fusion: str) -> None:
    torch.manual_seed(2)
    model = Colorizer(fusion, channels=8, width=4)  # type: ignore[arg-type]
    s = make_samples(np.random.default_rng(0), load_images(TRAIN_IMAGES), 3, size=16)

    def grads(probe: bool) -> list[torch.Tensor]:
        model.zero_grad()
        out = model(s.line, s.reference, probe=probe)
        torch.nn.functional.l1_loss(out, s.target).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert torch.equal(a, b)
    conflict = model.conflict()
    assert set(conflict) == {"conflict_x", "conflict_y", "probe_conflict_x", "probe_conflict_y"}
    if fusion == "sga":
        assert conflict["conflict_x"] == 0.0 and conflict["probe_conflict_x"] != 0.0
    else:
        assert conflict["conflict_x"] != 0.0
        assert conflict["conflict_x"] == conflict["probe_conflict_x"]
    with pytest.raises(RuntimeError, match="probed forward"):
        model.conflict()  # cleared
    with torch.no_grad(), pytest.raises(ValueError, match="require grad"):
        model(s.line, s.reference, probe=True)


def test_equal_size_up_to_the_fusion_blocks() -> None:
    sizes = {f: sum(p.numel() for p in Colorizer(f, 32, 16).parameters())
             for f in ("standard", "sga", "learned_map")}  # type: ignore[arg-type]  # fmt: skip
    # SCFT has one block (W_q, W_k, W_v); SGA two, each W_v, W_x and a LayerNorm; the learned
    # map adds W_q, W_k to both
    assert sizes["sga"] - sizes["standard"] == 2 * (2 * 32 * 33 + 64) - 3 * 32 * 33
    assert sizes["learned_map"] - sizes["sga"] == 2 * 2 * 32 * 33


def test_map_entropy_against_hand_computations() -> None:
    torch.manual_seed(4)
    model = Colorizer("standard", channels=8, width=4).eval()
    s = make_samples(np.random.default_rng(0), load_images(TRAIN_IMAGES), 3, size=16)
    model.fusion.query.weight.data.zero_(), model.fusion.query.bias.data.zero_()
    torch.testing.assert_close(model.map_entropy(s.line, s.reference), torch.ones(3))  # uniform
    sga = Colorizer("sga", channels=8, width=4).eval()
    with torch.no_grad():
        x = sga.line3(sga.line2(sga.line1(s.line))).flatten(2).mT
        y = sga.ref(s.reference).flatten(2).mT
        a = torch.softmax(x @ y.mT, -1)  # SGA's row softmax, unscaled
        expected = -(a * a.log()).sum(-1).mean(-1) / np.log(16)
        torch.testing.assert_close(sga.map_entropy(s.line, s.reference), expected)


def test_the_sga_map_is_not_uniform_at_initialisation() -> None:
    """The encoders end in BatchNorm + LeakyReLU (as SCFT's and SGA's) and SGA's map is
    unscaled, so the parameter-free map can select at the start of training: with a bare last
    convolution and a 1/√C map the trained models' maps were uniform (row entropy 4.16 of
    log 64 = 4.16 on the test crops) and SGA read only the reference's mean."""
    s = make_samples(np.random.default_rng(0), load_images(TRAIN_IMAGES), 16, size=32)
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():  # training mode: the batch's BatchNorm statistics
            assert float(Colorizer("sga").map_entropy(s.line, s.reference).mean()) < 0.9


def _decode(model: Colorizer, z: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """The decoder after the mid convolution, written out."""
    up = torch.nn.functional.interpolate
    h = up(z, size=f2.shape[-2:], mode="bilinear", align_corners=False)
    h = model.up2(torch.cat([h, f2], 1))
    h = up(h, size=f1.shape[-2:], mode="bilinear", align_corners=False)
    return torch.sigmoid(model.out(model.up1(torch.cat([h, f1], 1))))


def test_default_model_is_the_committed_design() -> None:
    """post_blocks=0 and multi_level=False keep the design of the committed results: the sizes
    of docs/recipes/colorize.md's table, no post blocks, the fusion on the last stage's C."""
    sizes = {f: sum(p.numel() for p in Colorizer(f).parameters()) for f in ("standard", "sga")}
    assert sizes == {"standard": 85_731, "sga": 86_915}
    model = Colorizer("sga")
    assert model.post is None and model.fusion.block.value.in_features == 32
    task = ColorizeTask(ColorizeConfig(attention="sga"))
    assert sum(p.numel() for p in task.build_model().parameters()) == sizes["sga"]


@pytest.mark.parametrize("fusion", ["standard", "sga"])
def test_post_blocks_are_the_codes_residual_blocks_concatenated_with_the_fusion(
    fusion: str,
) -> None:
    """SGA's code: decoder(cat(ResBlockNet(Z), Z)), ResBlockNet(Z) = ResBlocks(Z) + Z, each
    ResBlock x + BN(conv(ReLU(BN(conv(x)))))."""
    torch.manual_seed(5)
    model = Colorizer(fusion, channels=8, width=4, post_blocks=2).eval()  # type: ignore[arg-type]
    for m in model.modules():  # non-trivial BatchNorm statistics and affine maps
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_()
    s = make_samples(np.random.default_rng(1), load_images(TRAIN_IMAGES), 3, size=16)
    conv, bn = torch.nn.functional.conv2d, torch.nn.functional.batch_norm
    with torch.no_grad():
        f1 = model.line1(s.line)
        f2 = model.line2(f1)
        grid = model.line3(f2)
        x, y = grid.flatten(2).mT, model.ref(s.reference).flatten(2).mT
        z = model.fusion(x, y).mT.reshape(grid.shape)
        h = z
        for block in model.post:
            c1, n1, _, c2, n2 = block.main
            t = conv(h, c1.weight, c1.bias, padding=1)
            t = torch.relu(bn(t, n1.running_mean, n1.running_var, n1.weight, n1.bias, eps=n1.eps))
            t = conv(t, c2.weight, c2.bias, padding=1)
            h = h + bn(t, n2.running_mean, n2.running_var, n2.weight, n2.bias, eps=n2.eps)
        expected = _decode(model, model.mid(torch.cat([h + z, z], 1)), f1, f2)
        torch.testing.assert_close(model(s.line, s.reference), expected)
    base = sum(p.numel() for p in Colorizer(fusion, 8, 4).parameters())  # type: ignore[arg-type]
    per_block = 2 * (8 * 8 * 9 + 8) + 2 * 2 * 8  # two convs, two BatchNorms
    extra_mid = 8 * 8 * 9  # mid reads 2C channels
    assert sum(p.numel() for p in model.parameters()) == base + 2 * per_block + extra_mid


@pytest.mark.parametrize("fusion", ["standard", "sga"])
def test_multi_level_tokens_are_every_stage_pooled_and_concatenated(fusion: str) -> None:
    """SGA's code fuses the encoders' stages average-pooled to the last grid and concatenated
    (992 channels there; w + 2w + 2C here)."""
    torch.manual_seed(6)
    model = Colorizer(fusion, channels=8, width=4, multi_level=True).eval()  # type: ignore[arg-type]
    s = make_samples(np.random.default_rng(2), load_images(TRAIN_IMAGES), 3, size=16)
    pool = torch.nn.functional.avg_pool2d
    with torch.no_grad():
        f1 = model.line1(s.line)  # (3, 4, 16, 16)
        f2 = model.line2(f1)  # (3, 8, 8, 8)
        g3 = model.line3[0](f2)
        g4 = model.line3[1](g3)  # (3, 8, 4, 4)
        x = torch.cat([pool(f1, 4), pool(f2, 2), g3, g4], 1).flatten(2).mT
        r1 = model.ref[0](s.reference)
        r2 = model.ref[1](r1)
        r3 = model.ref[2](r2)
        r4 = model.ref[3](r3)
        y = torch.cat([pool(r1, 4), pool(r2, 2), r3, r4], 1).flatten(2).mT
        assert x.shape == (3, 16, 4 + 8 + 8 + 8) and y.shape == x.shape
        z = model.fusion(x, y).mT.reshape(3, 28, 4, 4)
        expected = _decode(model, model.mid(z), f1, f2)
        torch.testing.assert_close(model(s.line, s.reference), expected)
        a = model.fusion.row_map(x, y)
        entropy = -(a * a.log()).sum(-1).mean(-1) / np.log(16)
        torch.testing.assert_close(model.map_entropy(s.line, s.reference), entropy)
    model.train()
    out = model(s.line, s.reference, probe=True)  # the probe works on the wider tokens
    out.mean().backward()
    assert set(model.conflict()) == {"conflict_x", "conflict_y", "probe_conflict_x",
                                     "probe_conflict_y"}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"post_blocks": -1}, ValueError, "post_blocks must be an int >= 0, got -1"),
        ({"post_blocks": True}, TypeError, "post_blocks must be an int >= 0, got bool True"),
        ({"multi_level": 1}, TypeError, "multi_level must be a bool, got 1"),
    ],
)
def test_colorizer_refuses_bad_design_options_by_name(
    kwargs: dict, error: type, fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        Colorizer("sga", **kwargs)


# --- the recipe on the engine ----------------------------------------------------------------


@pytest.mark.parametrize("attention", ["standard", "sga", "learned_map"])
def test_a_few_steps_of_each_variant_on_the_engine(
    tmp_path: Path, attention: str, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = train(ColorizeConfig(**TINY, attention=attention, run_dir=str(tmp_path)))
    assert summary["epochs"] == 2 and summary["attention"] == attention
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for key in ("train_loss", "psnr", "ssim", "test_l1", "reference_psnr", "conflict_x",
                    "conflict_y", "probe_conflict_x", "probe_conflict_y",
                    "map_entropy"):  # fmt: skip
            assert np.isfinite(row[key]), key
        assert -1 <= row["conflict_x"] <= 1 and 0 < row["ssim"] <= 1
        assert 0 <= row["map_entropy"] <= 1 + 1e-6
        assert (row["conflict_x"] == 0.0) == (attention == "sga")
    if attention == "sga":  # equilibria eval rebuilds the model and scores the same
        assert main(["eval", str(tmp_path), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["psnr"] == rows[-1]["psnr"] and result["ssim"] == rows[-1]["ssim"]


def test_resume_after_interruption_is_bitwise_identical(tmp_path: Path) -> None:
    full = ColorizeConfig(**TINY, run_dir=str(tmp_path / "full"))
    train(full)

    class Stop(BaseException):
        pass

    def stop(epoch: int) -> None:
        if epoch == 1:
            raise Stop

    part = dataclasses.replace(full, run_dir=str(tmp_path / "part"))
    with pytest.raises(Stop):
        train(part, on_epoch_end=stop)
    assert load_checkpoint(part.run_dir).epoch == 1
    train(dataclasses.replace(part, resume=True))
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a.model.keys() == b.model.keys()
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    timing = ("step_ms", "epoch_time_s", "time_s")

    def rows(d: str) -> list[dict[str, object]]:
        lines = (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in timing} for x in lines]

    assert rows("full") == rows("part")


@pytest.mark.parametrize(
    ("batch_size", "error", "fragment"),
    [
        (0, ValueError, "batch_size must be an int >= 1, got 0"),  # was range()'s own error
        (-2, ValueError, "batch_size must be an int >= 1, got -2"),  # was torch.cat()'s
        (True, TypeError, "batch_size must be an int >= 1, got bool True"),  # was taken as 1
        (2.0, TypeError, "batch_size must be an int >= 1, got float 2.0"),
    ],
)
def test_evaluate_samples_refuses_a_bad_batch_size_by_name(
    batch_size: object, error: type, fragment: str
) -> None:
    samples = make_samples(np.random.default_rng(0), load_images(TEST_IMAGES), 3, size=16)
    model = Colorizer("sga", channels=8, width=4)
    with pytest.raises(error, match=fragment):
        evaluate_samples(model, samples, batch_size=batch_size)  # type: ignore[arg-type]
    empty = Samples(*(t[:0] for t in samples))
    with pytest.raises(ValueError, match="samples must hold at least one sample, got 0"):
        evaluate_samples(model, empty)  # was torch.cat()'s error on an empty list
    # the batching does not change the scores (batch 2 splits the 3 samples unevenly)
    whole, split = evaluate_samples(model, samples), evaluate_samples(model, samples, 2)
    assert whole.keys() == split.keys()
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-5), key


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("size", 18, "size must be a multiple of 4, got 18"),
        ("size", 84, "size"),
        ("attention", "scft", "attention"),
        ("jitter", 0.6, "jitter"),
        ("lr", 0.0, "lr"),
        ("batch_size", 0, "batch_size"),
        ("test_samples", 4097, "test_samples must be <= 4096 for size=32"),
        ("post_blocks", -1, "post_blocks must be in \\[0, 16\\], got -1"),
        ("post_blocks", True, "post_blocks must be int, got True"),
        ("multi_level", "yes", "multi_level must be true or false, got 'yes'"),
    ],
)
def test_bad_options_are_refused(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ColorizeConfig(**{field: value})


def test_validation_split_holds_a_training_photograph_out_of_training() -> None:
    assert set(VALIDATION_IMAGES) < set(TRAIN_IMAGES)
    held_out = load_images(VALIDATION_IMAGES)
    task = ColorizeTask(ColorizeConfig(**TINY, validation=True))
    task.setup(torch.device("cpu"))
    assert len(task.train_images) == len(TRAIN_IMAGES) - len(VALIDATION_IMAGES)
    for image, _ in task.train_images:
        assert all(image.shape != v.shape or not np.array_equal(image, v) for v, _ in held_out)
    test = ColorizeTask(ColorizeConfig(**TINY))
    test.setup(torch.device("cpu"))
    assert len(test.train_images) == len(TRAIN_IMAGES)
    assert not torch.equal(task.test.target, test.test.target)  # scored on other crops
    # the validation crops are crops of the held-out photograph
    line = torch.from_numpy(np.array(held_out[0][1]))
    windows = line.unfold(0, 16, 1).unfold(1, 16, 1)  # (H', W', 16, 16)
    for crop in task.test.line[:2, 0]:
        assert (windows - crop).abs().amax(dim=(2, 3)).min() == 0


def test_registered() -> None:
    assert get_recipe("colorize").task_class() is ColorizeTask


def test_page_results_table_is_the_benchmark_record() -> None:
    """docs/recipes/colorize.md's held-out table and the per-seed PSNR gap are
    colorization-details.json's (the page said SGA's map entropy 0.859, the record 0.8585, and a
    gap of 0.64-0.87 dB, the record 0.634-0.867)."""
    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "benchmarks/results/colorization-details.json").read_text())
    page = (root / "docs/recipes/colorize.md").read_text()
    for label, block in (("standard (SCFT)", "standard"), ("SGA (cross + self)", "sga")):
        s = record["summary"][block]
        (line,) = [row for row in page.splitlines() if row.startswith(f"| {label} |")]
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1] == f"{s['psnr_mean']:.2f} ± {s['psnr_std']:.2f}"
        assert cells[2] == f"{s['ssim_mean']:.4f} ± {s['ssim_std']:.4f}"
        assert cells[4] == f"{s['map_entropy_mean']:.3f}"
        assert cells[5] == f"{s['params']:,}" and cells[6] == f"{s['cpu_s_mean']:.1f}"
    gaps = [
        a["psnr"] - b["psnr"] for a, b in zip(record["runs"]["standard"], record["runs"]["sga"])
    ]
    assert f"by {min(gaps):.2f}–{max(gaps):.2f} dB on the same seed's crops" in page


def test_page_validation_table_is_the_validation_record() -> None:
    """docs/recipes/colorize.md's table of the design changes tried on the validation split is
    colorize_validation.json's, row by row, and the verdict matches the record's."""
    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "benchmarks/results/colorize_validation.json").read_text())
    page = (root / "docs/recipes/colorize.md").read_text()
    runs = {(r["variant"], r["attention"], r["seed"]): r for r in record["rows"]}
    assert all(r["options"] == record["variants"][r["variant"]] for r in record["rows"])
    checked = 0
    for variant, entry in record["summary"].items():
        assert entry["seeds"][:2] == [0, 1]
        for attention, label in (("standard", "standard"), ("sga", "SGA")):
            (line,) = [x for x in page.splitlines() if x.startswith(f"| {variant} | {label} |")]
            cells = [c.strip() for c in line.split("|")[1:-1]]
            seeds = [runs[variant, attention, seed] for seed in entry["seeds"]]
            mean = entry[attention]
            assert cells[2] == " / ".join(f"{r['psnr']:.2f}" for r in seeds)
            assert cells[3] == f"{mean['psnr_mean']:.2f}"
            assert cells[4] == " / ".join(f"{r['ssim']:.4f}" for r in seeds)
            assert cells[5] == f"{mean['ssim_mean']:.4f}"
            assert cells[6] == f"{mean['map_entropy_mean']:.3f}"
            conflict = mean["conflict_x_mean"]  # SGA's map branch gets no gradient: exactly 0
            assert cells[7] == ("0" if conflict == 0 else f"{conflict:+.3f}")
            assert cells[8] == f"{mean['cpu_s_mean']:.0f}"
            checked += 1
        # the page adopts no variant: none has SGA >= standard in PSNR and SSIM on both seeds
        assert not (entry["sga_ge_standard_psnr"] and entry["sga_ge_standard_ssim"])
    assert checked == 2 * len(record["variants"])


# --- the benchmark script ---------------------------------------------------------------------


def _benchmark():  # type: ignore[no-untyped-def]
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "colorize.py"
    spec = importlib.util.spec_from_file_location("colorize_benchmark", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _fake_finished_run(root: Path, options: dict[str, object]) -> Path:
    """A run folder as benchmarks/colorize.py leaves it, without training: config.json as the
    trainer writes it, summary.json, metrics.jsonl and the script's cpu.json."""
    run_dir = root / "sga-seed0"
    run_dir.mkdir(parents=True)
    config = ColorizeConfig(attention="sga", seed=0, run_dir=str(run_dir), **options)
    config_json = {"recipe": "colorize", "config": to_dict(config)}
    (run_dir / "config.json").write_text(json.dumps(config_json))
    summary = {"psnr": 17.5, "ssim": 0.6, "test_l1": 0.1, "map_entropy": 0.9,
               "reference_psnr": 12.0, "params": 1000}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    conflict = {"conflict_x": 0.0, "probe_conflict_x": 0.1, "conflict_y": 0.2,
                "probe_conflict_y": 0.3}  # fmt: skip
    rows = [{"epoch": e, "step": 2 * e, **conflict} for e in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "cpu.json").write_text(json.dumps({"cpu_s": 12.5}))
    return run_dir


def test_benchmark_reuses_a_finished_run_only_with_the_requested_options(tmp_path: Path) -> None:
    """run_one reused any folder holding cpu.json: a run trained with other steps (or lr, ...)
    entered the results silently. Now only a run with the requested options is reused (run
    control such as threads may differ); any other is refused, naming the folder and keys."""
    bench = _benchmark()
    requested = {"steps": 4, "lr": 1e-3, "threads": 1}
    fixed = {"quiet": True, "report": False, "measure_memory": False}
    run_dir = _fake_finished_run(tmp_path / "same", {**requested, **fixed, "threads": 2})
    result = bench.run_one("sga", 0, run_dir.parent, requested)  # reused: no training
    assert result["psnr"] == 17.5 and result["cpu_s"] == 12.5
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.json", "cpu.json", "metrics.jsonl", "summary.json"
    ]  # fmt: skip

    stale = _fake_finished_run(tmp_path / "stale", {**requested, **fixed, "steps": 1200})
    before = {p.name: p.read_bytes() for p in stale.iterdir()}
    with pytest.raises(ConfigError) as info:
        bench.run_one("sga", 0, stale.parent, {**requested, "lr": 2e-3})
    message = str(info.value)
    assert str(stale) in message
    assert (
        "steps: saved 1200, requested 4" in message
        and "lr: saved 0.001, requested 0.002" in message
    )
    assert "threads" not in message
    assert {p.name: p.read_bytes() for p in stale.iterdir()} == before  # nothing retrained

    (stale / "config.json").unlink()  # a finished run whose options cannot be checked
    with pytest.raises(ConfigError, match=r"but no config\.json, so its options cannot be checked"):
        bench.run_one("sga", 0, stale.parent, requested)


def test_benchmark_reuses_a_run_trained_before_the_design_options(tmp_path: Path) -> None:
    """The committed run folders were trained before post_blocks and multi_level existed (their
    config.json lacks them): they count as the defaults, the design those runs had, so the
    folders are reused for the default options and refused for any other."""
    bench = _benchmark()
    requested = {"steps": 4, "lr": 1e-3, "threads": 1}
    fixed = {"quiet": True, "report": False, "measure_memory": False}
    run_dir = _fake_finished_run(tmp_path / "old", {**requested, **fixed})
    path = run_dir / "config.json"
    saved = json.loads(path.read_text())
    del saved["config"]["post_blocks"], saved["config"]["multi_level"]
    path.write_text(json.dumps(saved))
    assert bench.run_one("sga", 0, run_dir.parent, requested)["psnr"] == 17.5
    for option, value in (("post_blocks", 4), ("multi_level", True)):
        with pytest.raises(ConfigError, match=f"{option}: saved .*, requested {value}"):
            bench.run_one("sga", 0, run_dir.parent, {**requested, option: value})


def test_validation_summary_needs_sga_at_least_standard_on_every_seed() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "colorize_validation.py"
    spec = importlib.util.spec_from_file_location("colorize_validation", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    keys = dict.fromkeys(module.KEYS, 0.0)

    def row(variant: str, attention: str, seed: int, psnr: float, ssim: float) -> dict:
        return {**keys, "variant": variant, "attention": attention, "seed": seed,
                "psnr": psnr, "ssim": ssim}  # fmt: skip

    rows = [row("a", "standard", 0, 18.0, 0.70), row("a", "sga", 0, 19.0, 0.71),
            row("a", "standard", 1, 18.0, 0.70), row("a", "sga", 1, 17.9, 0.72),
            row("b", "standard", 0, 18.0, 0.70), row("b", "sga", 0, 18.0, 0.70),
            row("b", "sga", 1, 30.0, 0.90),  # no standard run of seed 1: not compared
            row("c", "sga", 0, 18.0, 0.70)]  # fmt: skip
    summary = module.summarise(rows)
    assert set(summary) == {"a", "b"}  # c has no standard run
    assert summary["a"]["seeds"] == [0, 1]
    assert summary["a"]["sga_ge_standard_psnr"] is False  # seed 1: 17.9 < 18.0
    assert summary["a"]["sga_ge_standard_ssim"] is True
    assert summary["a"]["sga"]["psnr_mean"] == pytest.approx(18.45)
    assert summary["b"]["seeds"] == [0] and summary["b"]["sga"]["psnr_mean"] == 18.0
    assert summary["b"]["sga_ge_standard_psnr"] and summary["b"]["sga_ge_standard_ssim"]


def test_validation_quick_run_refuses_the_committed_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--quick`` (20 steps) without ``--out`` wrote its rows into the committed
    colorize_validation.json, replacing the full runs of the same variant, fusion and seed under
    the same options (the 20 steps were not recorded); it is refused before any training."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "colorize_validation.py"
    spec = importlib.util.spec_from_file_location("colorize_validation", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]

    def no_training(*args: object, **kwargs: object) -> dict:
        raise AssertionError("trained before refusing --quick")

    monkeypatch.setattr(module, "run_one", no_training)
    monkeypatch.setattr(sys, "argv", ["colorize_validation.py", "--quick"])
    with pytest.raises(SystemExit) as info:
        module.main()
    assert info.value.code == 2


def test_resume_of_a_run_saved_before_the_design_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run folder whose config.json and checkpoint predate post_blocks and multi_level (every
    colorize run before 98b8648) resumes with the same options: the missing keys take
    ``ColorizeTask.record_defaults``, the design those runs had. Before, ``--resume`` refused it
    ('post_blocks: saved <missing>, now 0') even with identical options."""
    from typing import Any

    from equilibria.zoo import trainer

    real = trainer.to_dict
    added = ("post_blocks", "multi_level")

    def without_new_options(config: Any) -> dict[str, Any]:
        return {k: v for k, v in real(config).items() if k not in added}

    class Stop(BaseException):
        pass

    def stop(epoch: int) -> None:
        if epoch == 1:
            raise Stop

    assert ColorizeTask.record_defaults == {"post_blocks": 0, "multi_level": False}
    part = ColorizeConfig(**TINY, run_dir=str(tmp_path / "part"))
    monkeypatch.setattr(trainer, "to_dict", without_new_options)
    with pytest.raises(Stop):
        train(part, on_epoch_end=stop)
    monkeypatch.setattr(trainer, "to_dict", real)
    saved = json.loads((tmp_path / "part" / "config.json").read_text())["config"]
    assert not set(added) & set(saved) and not set(added) & set(
        load_checkpoint(part.run_dir).config
    )
    with pytest.raises(ConfigError, match="post_blocks: saved 0, now 4"):
        train(dataclasses.replace(part, resume=True, post_blocks=4))
    train(dataclasses.replace(part, resume=True))
    assert load_checkpoint(part.run_dir).epoch == 2
