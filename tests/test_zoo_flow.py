"""The flow recipe: exact generated flow, correlation lookup against a direct computation,
convex upsampling, forward warping, both models training on the engine, and resume."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import equilibria as eq
from equilibria.zoo.checkpoint import load_checkpoint
from equilibria.zoo.config import ConfigError
from equilibria.zoo.flow import FlowConfig, build_model, evaluate_flow, sequence_reuse, train
from equilibria.zoo.flow_data import (
    TEST_IMAGES,
    TRAIN_IMAGES,
    make_sequences,
    pixel_grid,
    sample,
)
from equilibria.zoo.flow_model import (
    DEQFlow,
    FlowCell,
    convex_upsample,
    correlation_pyramid,
    forward_warp,
    lookup,
    sequence_loss,
)

pytest.importorskip("skimage")
pytestmark = pytest.mark.no_device_mode

TINY = {
    "size": 32, "width": 8, "hidden": 8, "context": 8, "motion_channels": 8, "levels": 2,
    "radius": 2, "iters": 3, "max_iter": 6, "correction_states": 2, "eval_iters": 4,
    "batch_size": 2, "test_pairs": 4, "steps": 4, "eval_every": 2, "quiet": True,
    "report": False, "measure_memory": False,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# data


def test_generated_flow_is_exact_away_from_occlusions() -> None:
    """frame_t(q) == sample(frame_{t+1}, q + flow_t(q)) on the valid pixels, with the sampler
    the generator renders with; occlusions and pixels leaving the view are marked invalid."""
    seq = make_sequences(np.random.default_rng(3), "train", 6, frames=4, size=32, max_objects=2)
    assert seq.frames.shape == (6, 4, 1, 32, 32)
    assert seq.flows.shape == (6, 3, 2, 32, 32) and seq.valid.shape == (6, 3, 32, 32)
    grid = pixel_grid(32, 32)
    for t in range(3):
        warped = sample(seq.frames[:, t + 1], grid + seq.flows[:, t])[:, 0]
        error = (warped - seq.frames[:, t, 0]).abs()
        valid = seq.valid[:, t]
        assert error[valid].max() < 1e-5
        # the invalid pixels are where the identity fails: occluded or leaving the view
        assert error[~valid].mean() > 1e-2
    assert 0.5 < seq.valid.float().mean() < 1.0
    assert seq.flows.norm(dim=2).mean() > 1.0  # real motion, not near-identity


def test_generated_data_is_reproducible_and_splits_are_disjoint() -> None:
    a = make_sequences(np.random.default_rng(0), "test", 2, size=16)
    b = make_sequences(np.random.default_rng(0), "test", 2, size=16)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.flows, b.flows)
    assert not set(TRAIN_IMAGES) & set(TEST_IMAGES)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"count": 0}, "count must be an int >= 1, got 0"),
        ({"frames": 1}, "frames must be an int in [2, 16], got 1"),
        ({"size": 30}, "size must be a multiple of 4 in [16, 128], got 30"),
        ({"max_objects": 5}, "max_objects must be an int in [0, 4], got 5"),
        ({"motion": 0.0}, "motion must be in (0, 4], got 0.0"),
    ],
)
def test_make_sequences_rejects_bad_arguments(kwargs: dict, fragment: str) -> None:
    args = {"count": 1, **kwargs}
    count = args.pop("count")
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        make_sequences(np.random.default_rng(0), "train", count, **args)


def test_large_frames_draw_only_from_images_that_hold_the_canvas() -> None:
    # size 128 at motion 2 needs a 184-pixel canvas: the 'text' test image (172 pixels high)
    # cannot hold it and is skipped (it crashed the draw before)
    seq = make_sequences(np.random.default_rng(0), "test", 12, size=128, motion=2.0)
    assert seq.frames.shape == (12, 2, 1, 128, 128)
    # a canvas larger than every image is refused, naming the arguments
    with pytest.raises(ValueError, match=r"size=128, frames=16 and motion=4\.0 need a 1576-pixel"):
        make_sequences(np.random.default_rng(0), "train", 1, size=128, frames=16, motion=4.0)


# ---------------------------------------------------------------------------------------------
# model parts


def _direct_lookup(f1: torch.Tensor, f2: torch.Tensor, coords: torch.Tensor, levels: int,
                   radius: int) -> torch.Tensor:  # fmt: skip
    """The window by hand: average-pool f2 (pooling the correlation over q is pooling f2),
    interpolate the pooled features bilinearly with zeros outside, dot with f1."""
    b, d, h, w = f1.shape
    out = torch.zeros(b, levels * (2 * radius + 1) ** 2, h, w, dtype=f1.dtype)
    for level in range(levels):
        g = F.avg_pool2d(f2, 2**level) if level else f2
        hl, wl = g.shape[-2:]
        k = 0
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                for bi in range(b):
                    for y in range(h):
                        for x in range(w):
                            px = float(coords[bi, 0, y, x]) / 2**level + dx
                            py = float(coords[bi, 1, y, x]) / 2**level + dy
                            x0, y0 = int(np.floor(px)), int(np.floor(py))
                            total = 0.0
                            for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                                wt = (1 - abs(px - xi)) * (1 - abs(py - yi))
                                if 0 <= xi < wl and 0 <= yi < hl:
                                    total += wt * float(f1[bi, :, y, x] @ g[bi, :, yi, xi])
                            out[bi, level * (2 * radius + 1) ** 2 + k, y, x] = total / d**0.5
                k += 1
    return out


@pytest.mark.parametrize("levels", [2, 3])
def test_correlation_lookup_matches_direct_computation(levels: int) -> None:
    # matches inside, between pixels and outside the map (zeros there); 4 x 4 features with
    # levels=3 reach a 1 x 1 last level (a size-16 frame), which reads zero outside its pixel
    gen = torch.Generator().manual_seed(0)
    f1 = torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64)
    f2 = torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64)
    coords = pixel_grid(4, 4, torch.float64) + 3 * torch.randn(2, 2, 4, 4, generator=gen,
                                                                 dtype=torch.float64)  # fmt: skip
    got = lookup(correlation_pyramid(f1, f2, levels), coords, 1)
    want = _direct_lookup(f1, f2, coords, levels, 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_lookup_and_upsampling_gradients_pass_gradcheck() -> None:
    gen = torch.Generator().manual_seed(1)
    f1 = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    coords = pixel_grid(4, 4, torch.float64) + 0.37

    def window(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lookup(correlation_pyramid(a, b, 2), coords, 1)

    assert torch.autograd.gradcheck(window, (f1, f2))
    flow = torch.randn(1, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(1, 9 * 16, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(convex_upsample, (flow, mask))


def test_convex_upsampling_of_a_constant_flow_is_the_scaled_constant() -> None:
    flow = torch.tensor([1.5, -0.25]).view(1, 2, 1, 1).expand(1, 2, 5, 6)
    mask = torch.randn(1, 9 * 16, 5, 6)
    up = convex_upsample(flow, mask)
    assert up.shape == (1, 2, 20, 24)
    # inside (the border's 3x3 window reads zero padding)
    torch.testing.assert_close(up[..., 4:-4, 4:-4], 4 * flow[:, :, :1, :1].expand(1, 2, 12, 16))


def test_forward_warp_carries_vectors_along_themselves() -> None:
    flow = torch.zeros(1, 2, 5, 5)
    flow[0, :, 1, 1] = torch.tensor([2.0, 1.0])  # moves from (x=1, y=1) to (x=3, y=2)
    warped = forward_warp(flow)
    # (3, 2) receives the moving vector and its own zero vector: their mean
    assert torch.equal(warped[0, :, 2, 3], torch.tensor([1.0, 0.5]))
    # nothing lands on (1, 1): it keeps its own vector
    assert torch.equal(warped[0, :, 1, 1], torch.tensor([2.0, 1.0]))
    flow[0, :, 1, 1] = torch.tensor([9.0, 0.0])  # lands outside the map: dropped
    warped = forward_warp(flow)
    assert torch.equal(warped[0, :, 1, 1], torch.tensor([9.0, 0.0]))
    others = torch.ones(5, 5, dtype=torch.bool)
    others[1, 1] = False
    assert torch.equal(warped[0][:, others], torch.zeros(2, 24))


def test_sequence_loss_weights_decay_towards_the_first_prediction() -> None:
    target = torch.zeros(1, 2, 4, 4)
    preds = [torch.full((1, 2, 4, 4), float(v)) for v in (1, 2, 3)]
    assert float(sequence_loss(preds, target, 0.8)) == pytest.approx(0.64 * 1 + 0.8 * 2 + 3)


# ---------------------------------------------------------------------------------------------
# models and the recipe


def test_deq_flow_solves_with_the_library_deq_on_the_tuple_state() -> None:
    torch.manual_seed(0)
    model = build_model(FlowConfig(**{**TINY, "model": "deq"}))
    assert isinstance(model, DEQFlow) and isinstance(model.deq, eq.DEQ)
    seq = make_sequences(np.random.default_rng(0), "train", 2, size=32)
    out = model(seq.frames[:, 0], seq.frames[:, 1])  # training: the correction states
    assert len(out.predictions) == 2
    assert all(p.shape == (2, 2, 32, 32) and p.requires_grad for p in out.predictions)
    sequence_loss(out.predictions, seq.flows[:, 0]).backward()
    assert all(p.grad is not None for p in model.cell.parameters())
    model.eval()
    with torch.no_grad():
        exact = model(seq.frames[:, 0], seq.frames[:, 1], iters=5, tol=0.0)
    assert len(exact.predictions) == 1 and exact.iterations == 5
    assert model.deq.last_solution is not None and model.deq.last_solution.nstep == 5


def test_deq_flow_map_has_a_contractive_flow_path_and_raft_keeps_its_update() -> None:
    # With flow' = flow + delta (decay 1) every flow is a fixed point of a map whose update
    # vanishes, so a bias in the update drifts the flow forever; with the recipe's decay 0.9
    # the flow of the fixed point is delta* / (1 - decay): 0 for a zero update, from any start.
    torch.manual_seed(0)
    deq = build_model(FlowConfig(**{**TINY, "model": "deq"}))
    raft = build_model(FlowConfig(**{**TINY, "model": "raft"}))
    assert isinstance(deq, DEQFlow) and deq.cell.decay == FlowConfig.flow_decay == 0.9
    assert raft.cell.decay == 1.0
    last = deq.cell.block.delta[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    seq = make_sequences(np.random.default_rng(0), "train", 2, size=32)
    deq.eval()
    with torch.no_grad():
        x, hidden = deq.prepare(seq.frames[:, 0], seq.frames[:, 1])
        z = (hidden, torch.full_like(x[1], 3.0))
        _, f1 = deq.cell(z, x)
        torch.testing.assert_close(f1, torch.full_like(f1, 2.7))
        out = deq(seq.frames[:, 0], seq.frames[:, 1], init=z, iters=200, tol=1e-5)
    assert out.residuals is not None and float(out.residuals[-1].max()) < 1e-5
    assert float(out.state[1].abs().max()) < 1e-3
    with pytest.raises(ValueError, match=r"flow_decay must be a float in \(0, 1\], got 0"):
        DEQFlow(flow_decay=0)
    with pytest.raises(ValueError, match=r"decay must be a float in \(0, 1\], got True"):
        FlowCell(deq.cell.block, 2, True)


@pytest.mark.parametrize(
    "overrides",
    [{"model": "raft"}, {"model": "deq"}, {"model": "deq", "backward": "implicit",
                                           "correction_states": 1}],
)  # fmt: skip
def test_each_model_trains_a_few_steps_on_the_engine(tmp_path: Path, overrides: dict) -> None:
    config = FlowConfig(**{**TINY, **overrides, "run_dir": str(tmp_path / "run")})
    summary = train(config)
    assert summary["epochs"] == 2 and summary["model"] == overrides["model"]
    for key in ("epe", "epe_valid", "zero_flow_epe", "train_loss"):
        assert np.isfinite(summary[key]), key
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = config.iters if config.model == "raft" else None
    if expected is not None:
        assert rows[-1]["fwd_iters_mean"] == expected
    else:
        assert 1 <= rows[-1]["fwd_iters_mean"] <= config.max_iter


class _Stop(BaseException):
    """An interruption (not an Exception: not recorded as a failure)."""


def test_resume_via_the_engine_is_bitwise_identical(tmp_path: Path) -> None:
    full = FlowConfig(**{**TINY, "model": "deq", "run_dir": str(tmp_path / "full")})
    train(full)

    def stop_after_first(epoch: int) -> None:
        if epoch == 1:
            raise _Stop

    part = dataclasses.replace(full, run_dir=str(tmp_path / "part"))
    with pytest.raises(_Stop):
        train(part, on_epoch_end=stop_after_first)
    assert load_checkpoint(part.run_dir).epoch == 1
    summary = train(dataclasses.replace(part, resume=True))
    assert summary["epochs"] == 2
    a, b = load_checkpoint(full.run_dir), load_checkpoint(part.run_dir)
    assert a.model.keys() == b.model.keys()
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    # and every recorded metric but the timings is the same, epoch by epoch
    rows = {
        run: [
            json.loads(line)
            for line in (tmp_path / run / "metrics.jsonl").read_text().split("\n")
            if line
        ]
        for run in ("full", "part")
    }
    for row in (*rows["full"], *rows["part"]):
        for key in ("epoch_time_s", "time_s", "step_ms"):
            row.pop(key, None)
    assert rows["full"] == rows["part"] and len(rows["full"]) == 2


def test_sequence_reuse_counts_iterations_cold_and_warm() -> None:
    torch.manual_seed(0)
    model = build_model(FlowConfig(**{**TINY, "model": "deq"}))
    assert isinstance(model, DEQFlow)
    seq = make_sequences(np.random.default_rng(1), "test", 2, frames=3, size=32)
    reuse = sequence_reuse(model, seq, tol=1e-2, max_iter=8)
    assert 1 <= reuse["warm_iters"] <= 8 and 1 <= reuse["cold_iters"] <= 8
    assert reuse["iter_saving"] == pytest.approx(1 - reuse["warm_iters"] / reuse["cold_iters"])
    metrics = evaluate_flow(model, seq, iters=3, tol=0.0)
    assert metrics["eval_iters"] == 3
    with pytest.raises(TypeError, match="model must be a DEQFlow, got RAFT"):
        sequence_reuse(build_model(FlowConfig(**{**TINY, "model": "raft"})), seq, tol=0.1,
                       max_iter=2)  # fmt: skip
    pairs = make_sequences(np.random.default_rng(1), "test", 2, frames=2, size=32)
    with pytest.raises(ValueError, match=r"sequences of >= 3 frames .* got 2 frames"):
        sequence_reuse(model, pairs, tol=1e-2, max_iter=8)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("size", 36, "size must be a multiple of 8"),
        ("model", "pwc", "model"),
        ("gamma", 0.0, "gamma"),
        ("correction_states", 9, "correction_states must be <= max_iter=6"),
        ("phantom_damping", 1.5, "phantom_damping"),
        ("flow_decay", 0.0, "flow_decay"),
        ("flow_decay", 1.5, "flow_decay"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FlowConfig(**{**TINY, field: value})


def test_task_evaluates_raft_with_eval_iters_not_its_training_iters() -> None:
    from equilibria.zoo.flow import FlowTask

    torch.manual_seed(0)
    task = FlowTask(FlowConfig(**{**TINY, "model": "raft", "iters": 3, "eval_iters": 5}))
    task.setup(torch.device("cpu"))
    assert task.evaluate(task.build_model())["eval_iters"] == 5


def test_training_clips_the_gradient_norm_as_raft() -> None:
    from equilibria.zoo.flow import ClippedAdamW, FlowTask

    torch.manual_seed(0)
    model = build_model(FlowConfig(**{**TINY, "model": "raft"}))
    reference = build_model(FlowConfig(**{**TINY, "model": "raft"}))
    reference.load_state_dict(model.state_dict())
    opt = FlowTask(FlowConfig(**{**TINY, "clip": 0.5})).make_optimizer(model)
    assert isinstance(opt, ClippedAdamW) and opt.max_norm == 0.5
    group = opt.param_groups[0]
    plain = torch.optim.AdamW(reference.parameters(), lr=group["lr"],
                              weight_decay=group["weight_decay"])  # fmt: skip
    for step in range(3):  # gradients of norm >> 0.5, unequal across steps
        grads = [torch.randn_like(p) * (10.0 + 40 * step) for p in model.parameters()]
        norm = torch.cat([g.flatten() for g in grads]).norm()
        for p, q, g in zip(model.parameters(), reference.parameters(), grads):
            p.grad, q.grad = g.clone(), g * (0.5 / norm)  # the reference: clipped by hand
        opt.step()
        plain.step()
        clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert float(clipped) == pytest.approx(0.5, rel=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    off = FlowTask(FlowConfig(**{**TINY, "clip": 0.0})).make_optimizer(model)
    assert type(off) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="clip"):
        FlowConfig(**{**TINY, "clip": -1.0})
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0, got 0"):
        ClippedAdamW(model.parameters(), max_norm=0)


def test_jacobian_penalty_is_weighted_into_the_deq_training_loss() -> None:
    from equilibria.zoo.flow import FlowTask

    seq = make_sequences(np.random.default_rng(0), "train", 2, size=32)
    off = FlowTask(FlowConfig(**{**TINY, "model": "deq"})).build_model()
    assert isinstance(off, DEQFlow) and off.jacobian_samples == 0
    assert off.train()(seq.frames[:, 0], seq.frames[:, 1]).jacobian is None
    task = FlowTask(FlowConfig(**{**TINY, "model": "deq", "jacobian_weight": 0.5}))
    torch.manual_seed(0)
    model = task.build_model()
    assert isinstance(model, DEQFlow) and model.jacobian_samples == 1
    model.train()
    torch.manual_seed(2)  # the probe (the forward solve draws nothing)
    loss = task.train_step(model, model, seq).loss
    torch.manual_seed(2)
    out = model(seq.frames[:, 0], seq.frames[:, 1])
    assert out.jacobian is not None and float(out.jacobian.detach()) > 0
    expected = sequence_loss(out.predictions, seq.flows[:, 0], task.config.gamma)
    torch.testing.assert_close(loss, expected + 0.5 * out.jacobian)
    # the penalty: Hutchinson's estimate at the solver's last iterate, by the library
    sol = model.deq.last_solution
    assert sol is not None
    x, _ = model.prepare(seq.frames[:, 0], seq.frames[:, 1])
    torch.manual_seed(2)
    torch.testing.assert_close(out.jacobian, eq.jacobian_penalty(lambda z: model.cell(z, x),
                                                                  sol.value))  # fmt: skip
    out.jacobian.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.cell.parameters())
    with pytest.raises(ConfigError, match="jacobian_weight"):
        FlowConfig(**{**TINY, "jacobian_weight": -0.1})
    with pytest.raises(ValueError, match="jacobian_samples must be an int >= 0, got -1"):
        DEQFlow(jacobian_samples=-1)


def test_raft_refuses_iteration_counts_below_one() -> None:
    from equilibria.zoo.flow_model import RAFT

    sizes = {"width": 8, "hidden": 8, "context": 8, "motion": 8, "levels": 2, "radius": 1}
    with pytest.raises(ValueError, match="iters must be an int >= 1, got 0"):
        RAFT(iters=0, **sizes)
    frames = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="iters must be an int >= 1, got -3"):
        RAFT(iters=2, **sizes).eval()(frames, frames, iters=-3)


_SIZES = {"width": 8, "hidden": 8, "context": 8, "motion": 8, "levels": 2, "radius": 1}


@pytest.mark.parametrize(
    ("model", "name", "value", "error", "message"),
    [
        # correction_states=True was taken as 1 (a bool is an int in Python)
        ("deq", "correction_states", True, TypeError, ">= 1, got bool True"),
        ("deq", "correction_states", 2.0, TypeError, ">= 1, got float 2.0"),
        ("deq", "correction_states", 0, ValueError, ">= 1, got 0"),
        # the sizes reached torch's own errors (no argument named) or built a model silently
        ("deq", "width", True, TypeError, ">= 2, got bool True"),
        ("raft", "width", 1, ValueError, ">= 2, got 1"),
        ("raft", "hidden", 0, ValueError, ">= 1, got 0"),
        ("deq", "context", 0, ValueError, ">= 1, got 0"),
        ("deq", "motion", 2, ValueError, ">= 3, got 2"),
        ("raft", "motion", True, TypeError, ">= 3, got bool True"),
        ("deq", "levels", True, TypeError, ">= 1, got bool True"),
        ("raft", "levels", 0, ValueError, ">= 1, got 0"),
        ("deq", "radius", True, TypeError, ">= 0, got bool True"),
        ("raft", "radius", -1, ValueError, ">= 0, got -1"),
        ("deq", "radius", 1.5, TypeError, ">= 0, got float 1.5"),
    ],
)
def test_flow_models_refuse_bad_integer_arguments_by_name(
    model: str, name: str, value: object, error: type, message: str
) -> None:
    from equilibria.zoo.flow_model import RAFT

    cls = DEQFlow if model == "deq" else RAFT
    with pytest.raises(error, match=re.escape(f"{name} must be an int {message}")):
        cls(**{**_SIZES, name: value})


def test_flow_cell_refuses_a_bad_radius_by_name() -> None:
    block = DEQFlow(**_SIZES).cell.block
    with pytest.raises(TypeError, match="radius must be an int >= 0, got bool True"):
        FlowCell(block, True)
    with pytest.raises(ValueError, match="radius must be an int >= 0, got -2"):
        FlowCell(block, -2)
    assert FlowCell(block, 0).radius == 0  # a 1 x 1 window: the smallest lookup


def test_deq_flow_names_a_bad_iters_as_its_own_argument() -> None:
    model, frames = DEQFlow(**_SIZES).eval(), torch.rand(1, 1, 32, 32)
    with pytest.raises(TypeError, match=r"^iters must be an int >= 1, got bool True"):
        model(frames, frames, iters=True)  # the DEQ's message named max_iter
    with pytest.raises(ValueError, match=r"^iters must be an int >= 1, got 0"):
        model(frames, frames, iters=0)


def test_clipped_adamw_refuses_a_bool_max_norm() -> None:
    from equilibria.zoo.flow import ClippedAdamW

    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(TypeError, match="max_norm must be a finite number > 0, got True"):
        ClippedAdamW(params, max_norm=True)
    with pytest.raises(TypeError, match="max_norm must be a finite number > 0, got '1'"):
        ClippedAdamW(params, max_norm="1")
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
            ClippedAdamW(params, max_norm=bad)


def test_clipped_adamw_clips_the_gradients_a_closure_computes() -> None:
    # AdamW.step(closure) recomputes the gradients: they must be clipped after the closure ran
    from equilibria.zoo.flow import ClippedAdamW

    target = torch.tensor([30.0, -40.0])  # the closure's gradient at 0 has norm 50
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    opt = ClippedAdamW([p], lr=0.1, weight_decay=0.0, max_norm=1.0)
    plain = torch.optim.AdamW([q], lr=0.1, weight_decay=0.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * ((p - target) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
        q.grad = (q.detach() - target) / (q.detach() - target).norm().clamp(min=1.0)  # by hand
        plain.step()
        torch.testing.assert_close(p.detach(), q.detach())
    assert loss is not None and float(loss.detach()) > 0


# --- the recipe page against the benchmark record ---------------------------------------------


def _signed_percent(ratio: float, decimals: int) -> str:
    """``ratio`` - 1 in percent with its sign, as the page writes it (−2.5%, +0.16%)."""
    return f"{100 * (ratio - 1):+.{decimals}f}%".replace("-", "−")


def _two_figures(x: float) -> str:
    """``x`` > 0 to two significant figures in fixed point (0.14, 0.029, 0.0020)."""
    import math

    return f"{x:.{max(0, 1 - math.floor(math.log10(x)))}f}"


def test_page_numbers_are_the_benchmark_record() -> None:
    """Every number docs/recipes/flow.md quotes from ``python benchmarks/flow.py`` is in
    benchmarks/results/flow.json, as are the README's and the site index's flow rows (the page
    quoted per-seed changes from 8 to 32 and 32 to 64 iterations, the memory with 3 and 4
    correction states, the parameter count and the run's CPU minutes, which the record lacked;
    the record lacked the command that wrote it too)."""
    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "benchmarks/results/flow.json").read_text())
    page = (root / "docs/recipes/flow.md").read_text()
    text = " ".join(page.split())  # the prose, line breaks as spaces
    raft, deq, ratios = record["raft"], record["deq"], record["ratios"]
    setup = record["setup"]
    assert record["command"].startswith("python benchmarks/flow.py")
    assert "--budget-cpu-s" not in record["command"] and "--seeds" not in record["command"]
    seeds = len(setup["seeds"])
    assert len(raft["epe_per_seed"]) == len(deq["epe_per_seed"]) == seeds == 3

    # the models and the run
    assert raft["params"] == deq["params"]
    assert f"{raft['params'] / 1000:.0f}k parameters" in text
    config = deq["config"]
    assert raft["config"]["iters"] == 12 and "unrolls it 12 times" in text
    assert config["gamma"] == raft["config"]["gamma"] == 0.8 and "(γ = 0.8)" in text
    assert config["max_iter"] == 12 and "(12 iterations in training)" in text
    assert config["correction_states"] == 2 and "correction on 2 states" in text
    assert config["flow_decay"] == 0.9 and "default 0.9" in text
    assert config["clip"] == raft["config"]["clip"] == 1.0 and "`--clip 1.0`" in text
    assert setup["size"] == config["size"] == 64 and "64×64 grey" in text
    assert config["eval_iters"] == raft["config"]["eval_iters"]
    run = (
        f"{record['cpu_s_total'] / 60:.0f} CPU minutes in the run below): {seeds} seeds, each "
        f"model trained for {setup['budget_cpu_s']:.0f} s of process CPU time (the CPU cost per "
        f"step is measured before training and gives {raft['train_steps']} RAFT / "
        f"{deq['train_steps']} DEQ steps of batch {setup['batch_size']}), "
        f"{setup['test_pairs']} held-out pairs, {config['eval_iters']} test-time iterations for "
        "both."
    )
    assert run in text

    # the results table, cell by cell
    rows = {}
    for line in page.split("| | RAFT | DEQ-Flow |")[1].split("\n\n")[0].splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[cells[0]] = cells[1:]
    iters = ("8", "16", "32", "64")

    def joined(values: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in values)

    residual0 = " / ".join(_two_figures(deq["residual_by_iters"][0][k]) for k in iters)
    mem = ratios["deq_mem_over_raft"]
    savings = [r["iter_saving"] for r in deq["reuse"]]
    expected = {
        "test EPE (px), mean ± std": [f"{m['epe']:.2f} ± {m['epe_std']:.2f}" for m in (raft, deq)],
        "test EPE per seed (0 / 1 / 2)": [joined(m["epe_per_seed"], ".2f") for m in (raft, deq)],
        "EPE at 8 / 16 / 32 / 64 test-time iterations": [
            joined([m["epe_by_iters"][k] for k in iters], ".2f") for m in (raft, deq)
        ],
        "median relative residual at 8 / 16 / 32 / 64 (seed 0)": ["–", residual0],
        "EPE on non-occluded pixels": [f"{m['epe_valid']:.2f}" for m in (raft, deq)],
        "peak training-step memory (tensor storages)": [
            f"{raft['peak_train_mb']:.1f} MB", f"{deq['peak_train_mb']:.1f} MB ({mem:.2f}×)"
        ],
        "CPU ms / training step (1 thread)": [f"{m['ms_per_step']:.0f}" for m in (raft, deq)],
        "training CPU s per seed (0 / 1 / 2)": [
            joined(m["train_cpu_s"], ".0f") for m in (raft, deq)
        ],
        "iterations saved by reuse at equal EPE (sequences, per seed)": [
            "–", " / ".join("none" if s is None else f"{100 * s:.0f}%" for s in savings)
        ],
    }  # fmt: skip
    assert rows == expected

    # the targets
    zero = record["zero_flow_epe"]
    below = f"RAFT is {100 * ratios['raft_epe_below_zero_flow']:.0f}% and DEQ-Flow "
    below += f"{100 * ratios['deq_epe_below_zero_flow']:.0f}% below it"
    assert f"Zero-flow EPE {zero:.2f}: {below}" in text
    per_seed = ratios["deq_epe_over_raft_per_seed"]
    assert per_seed == pytest.approx(
        [d / r for d, r in zip(deq["epe_per_seed"], raft["epe_per_seed"])]
    )
    if max(per_seed) <= 1:
        assert f"**met** ({ratios['deq_epe_over_raft']:.2f}×, every seed)" in text
    else:
        assert "DEQ EPE ≤ RAFT EPE at equal training CPU: **missed**" in text
    spent = raft["train_cpu_s"] + deq["train_cpu_s"]
    assert f"({min(spent):.0f}–{max(spent):.0f} s)" in text
    assert ("Training-step peak memory ≤ 1/3 of RAFT's: **met**" in text) == (mem <= 1 / 3)
    states = deq["peak_train_mb_by_correction_states"]
    assert states["2"] == deq["peak_train_mb"]
    by_states = ratios["deq_mem_by_correction_states_over_raft"]
    assert (
        f"{states['3']:.1f} / {states['4']:.1f} MB ({by_states['3']:.2f}× / {by_states['4']:.2f}×"
        in text
    )
    rise = [_signed_percent(x, 1) for x in ratios["deq_epe_32_over_8_per_seed"]]
    flat = [_signed_percent(x, 2) for x in ratios["deq_epe_64_over_32_per_seed"]]
    assert ratios["deq_epe_32_over_8_per_seed"] == pytest.approx(
        [r["32"] / r["8"] for r in deq["epe_by_iters_per_seed"]]
    )
    assert (
        f"({_signed_percent(ratios['deq_epe_32_over_8'], 1)} in the mean; per seed "
        f"{', '.join(rise)})" in text
    )
    assert (
        f"({_signed_percent(ratios['deq_epe_64_over_32'], 2)} in the mean; per seed "
        f"{', '.join(flat)})" in text
    )
    assert (
        f"against {_signed_percent(ratios['raft_epe_32_over_8'], 1)} and "
        f"{_signed_percent(ratios['raft_epe_64_over_32'], 0)} for RAFT" in text
    )
    met_8_32 = "EPE does not rise from 8 to 32 test-time iterations: **met**" in text
    assert met_8_32 == (ratios["deq_epe_32_over_8"] <= 1)
    residual64 = [r["64"] for r in deq["residual_by_iters"]]
    assert f"to {' / '.join(_two_figures(x) for x in residual64)} at 64 iterations" in text
    assert ("It is still above 1e-3 at 64" in text) == (min(residual64) > 1e-3)
    if None not in savings and min(savings) >= 0.3:
        assert f"**met** on every seed (mean {100 * deq['reuse_iter_saving']:.0f}%)" in text
    else:
        assert "Reuse saves ≥ 30% of iterations at equal EPE: **missed**" in text
    k_cold = " / ".join(str(r["k_cold"]) for r in deq["reuse"])
    k_warm = " / ".join(str(r["k_warm"]) for r in deq["reuse"])
    assert f"after {k_cold} iterations; warm solves reach that EPE after {k_warm}." in text
    warm12 = [r["warm_epe"]["12"] for r in deq["reuse"]]
    cold12 = [r["cold_epe"]["12"] for r in deq["reuse"]]
    assert (
        f"({min(warm12):.2f}–{max(warm12):.2f} vs {min(cold12):.2f}–{max(cold12):.2f} px at 12 "
        "iterations)" in text
    )
    rises = [100 * (r["warm_epe"]["32"] / min(r["warm_epe"].values()) - 1) for r in deq["reuse"]]
    assert f"rise by {min(rises):.1f}–{max(rises):.1f}% from their best to 32 iterations" in text
    assert (
        f"Both well below zero flow: {100 * ratios['raft_epe_below_zero_flow']:.0f}% (RAFT)" in text
    )

    # the README's and the site index's rows
    def m3(m: dict) -> str:
        return " / ".join(f"{m['epe_by_iters'][k]:.2f}" for k in ("8", "32", "64"))

    row = (
        f"| DEQ optical flow | EPE {deq['epe']:.2f} ± {deq['epe_std']:.2f} vs RAFT "
        f"{raft['epe']:.2f} ± {raft['epe_std']:.2f} at equal CPU budget (zero flow {zero:.2f}); "
        f"{mem:.2f}× RAFT's training memory; EPE {m3(deq)} at 8 / 32 / 64 iterations (RAFT "
        f"{m3(raft)}); "
    )
    if deq["reuse_iter_saving"] is not None:
        row += f"reuse saves {100 * deq['reuse_iter_saving']:.0f}% of iterations"
    for name in ("README.md", "docs/index.md"):
        (line,) = [x for x in (root / name).read_text().splitlines() if "| DEQ optical flow |" in x]
        assert line.startswith(row), name
        assert "`python benchmarks/flow.py`" in line
