"""``equilibria denoise`` and its parts: image files, tiling, the blind σ estimate, the classical
baselines. The command runs end to end with a small equilibrium denoiser defined here (and with the
shipped one where its weights are in the package)."""

from __future__ import annotations

import itertools
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equilibria as eq
from equilibria.zoo import denoise_cli
from equilibria.zoo.cli import main
from equilibria.zoo.denoise_classical import CLASSICAL, denoise_classical
from equilibria.zoo.denoise_color import OpponentColorDenoiser
from equilibria.zoo.denoise_io import ImageError, LoadedImage, read_image, write_image
from equilibria.zoo.denoise_nonlocal import SHIPPED_STAGE
from equilibria.zoo.denoise_sigma import estimate_sigma
from equilibria.zoo.denoise_tiling import tile_starts, tiled_apply, window_1d
from equilibria.zoo.denoise_weights import DEFAULT_COLOR_MODEL

pytestmark = pytest.mark.no_device_mode  # numpy images and CPU models built here

skimage_data = pytest.importorskip("skimage.data")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def _camera(size: int = 64) -> np.ndarray:
    return skimage_data.camera()[200 : 200 + size, 200 : 200 + size] / 255.0


# ---------------------------------------------------------------------------------- σ estimate


@pytest.mark.parametrize("name", ["camera", "coins", "moon", "astronaut", "text"])
@pytest.mark.parametrize("sigma255", [5, 15, 25, 50])
@pytest.mark.parametrize("clipped", [False, True])
def test_sigma_estimate_within_20_percent(name: str, sigma255: int, clipped: bool) -> None:
    clean = getattr(skimage_data, name)() / 255.0  # astronaut: colour, the mean over channels
    rng = np.random.default_rng(sigma255)
    noisy = clean + sigma255 / 255 * rng.standard_normal(clean.shape)
    if clipped:  # as saved to an 8-bit file: clipped to [0, 255] and rounded
        noisy = np.round(np.clip(noisy, 0, 1) * 255) / 255
    estimate = 255 * estimate_sigma(noisy)
    assert abs(estimate / sigma255 - 1) < 0.2, (name, sigma255, estimate)


def test_plain_mad_is_biased_up_by_texture_and_weak_texture_is_not() -> None:
    """Why the default leaves textured blocks out: on coins at σ = 5 plain MAD is > 30 % high."""
    clean = skimage_data.coins() / 255.0
    noisy = clean + 5 / 255 * np.random.default_rng(0).standard_normal(clean.shape)
    assert 255 * estimate_sigma(noisy, method="mad") > 6.5
    assert abs(255 * estimate_sigma(noisy) - 5) < 0.5


def test_sigma_of_a_clean_image_is_zero_and_of_pure_noise_is_sigma() -> None:
    assert estimate_sigma(np.full((32, 40), 0.3)) == 0.0
    noise = 0.2 * np.random.default_rng(1).standard_normal((256, 256))
    for method in ("weak-texture", "mad"):
        assert estimate_sigma(noise, method=method) == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize(
    ("image", "kwargs", "error", "match"),
    [
        (np.zeros((7, 30)), {}, ValueError, "at least 8 × 8"),
        (np.zeros((2, 16, 16, 1)), {}, ValueError, "2-D"),
        (np.full((16, 16), np.nan), {}, ValueError, "non-finite"),
        ([[0.0] * 16] * 16, {}, TypeError, "numpy array"),
        (np.zeros((16, 16)), {"method": "pca"}, ValueError, "'weak-texture' or 'mad'"),
    ],
)
def test_sigma_estimate_bad_inputs(image, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        estimate_sigma(image, **kwargs)


# ---------------------------------------------------------------------------- classical baselines


@pytest.mark.parametrize("name", CLASSICAL)
@pytest.mark.parametrize("shape", ["gray", "gray1", "rgb"])
def test_classical_denoisers_improve_psnr(name: str, shape: str) -> None:
    if name == "bm3d":
        pytest.importorskip("bm3d")
    clean = _camera(48)
    if shape == "rgb":
        clean = np.stack([clean, clean[::-1], clean[:, ::-1]], axis=2)
    elif shape == "gray1":
        clean = clean[..., None]
    sigma = 25 / 255
    noisy = clean + sigma * np.random.default_rng(0).standard_normal(clean.shape)
    out = denoise_classical(name, noisy, sigma)
    assert out.shape == clean.shape and out.dtype == np.float64
    assert np.isfinite(out).all()
    assert _psnr(out, clean) > _psnr(noisy, clean) + 2.0


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("median", np.zeros((16, 16)), 0.1), ValueError, "nlmeans, tv, wavelet, bm3d"),
        (("tv", np.zeros((16, 16), np.uint8), 0.1), TypeError, "float numpy array"),
        (("tv", np.zeros((16, 16, 4)), 0.1), ValueError, "C 1 or 3"),
        (("tv", np.zeros((4, 16)), 0.1), ValueError, "at least 8 × 8"),
        (("tv", np.full((16, 16), np.inf), 0.1), ValueError, "non-finite"),
        (("tv", np.zeros((16, 16)), 0.0), ValueError, r"sigma must be in \(0, 1\]"),
        (("tv", np.zeros((16, 16)), 25.0), ValueError, r"sigma must be in \(0, 1\]"),
        (("tv", np.zeros((16, 16)), "25"), TypeError, "sigma must be a number"),
    ],
)
def test_classical_bad_inputs(args, error, match) -> None:
    with pytest.raises(error, match=match):
        denoise_classical(*args)


def test_bm3d_missing_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bm3d", None)  # import bm3d raises ImportError
    with pytest.raises(ImportError, match="pip install bm3d"):
        denoise_classical("bm3d", np.zeros((16, 16)), 0.1)


# ------------------------------------------------------------------------------------------ tiling


def _conv_stack(layers: int, channels: int = 2) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Conv2d(channels, channels, 3, padding=1, dtype=torch.float64), nn.Tanh()]
    return nn.Sequential(*mods[:-1])  # receptive radius = layers


@pytest.mark.parametrize(("height", "width"), [(70, 90), (33, 100), (64, 64), (20, 15)])
def test_tiling_is_exact_for_a_receptive_radius_within_the_margin(height: int, width: int) -> None:
    net = _conv_stack(3)  # radius 3
    x = torch.rand(2, 2, height, width, dtype=torch.float64)
    with torch.no_grad():
        full = net(x)
        tiled = tiled_apply(net, x, tile=24, overlap=12, margin=3)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-12)


def test_tiling_is_not_exact_when_the_radius_exceeds_the_margin() -> None:
    """The exactness above is the margin's doing: a radius of 5 > margin 3 differs."""
    net = _conv_stack(5)
    x = torch.rand(1, 2, 70, 90, dtype=torch.float64)
    with torch.no_grad():
        diff = (tiled_apply(net, x, tile=24, overlap=12, margin=3) - net(x)).abs().max()
    assert diff > 1e-6


def test_tiles_are_processed_one_at_a_time_and_bounded() -> None:
    seen: list[tuple[int, ...]] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return t * 2

    x = torch.rand(1, 3, 300, 170)
    y = tiled_apply(record, x, tile=64, overlap=16)
    rows, cols = tile_starts(300, 64, 16), tile_starts(170, 64, 16)
    assert len(seen) == len(rows) * len(cols) == 6 * 4
    assert max(s[2] for s in seen) <= 64 and max(s[3] for s in seen) <= 64
    torch.testing.assert_close(y, 2 * x)


def test_an_image_smaller_than_a_tile_is_one_call() -> None:
    seen: list[tuple[int, ...]] = []
    x = torch.rand(1, 1, 9, 12)
    y = tiled_apply(lambda t: seen.append(tuple(t.shape)) or t + 1, x, tile=256, overlap=32)
    assert seen == [(1, 1, 9, 12)]
    assert torch.equal(y, x + 1)


def test_blending_has_no_seams() -> None:
    """A map that is a different constant on every tile (the worst case of a global map) blends
    into a smooth ramp: no step between neighbouring pixels exceeds the raised cosine's largest
    slope, π / (2 · ramp) of the jump, where a hard cut would step by the whole jump."""
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 1, 150, 200, dtype=torch.float64)
    overlap, margin = 24, 6
    ramp = overlap - 2 * margin

    def constant(t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, float(torch.rand((), generator=gen, dtype=torch.float64)))

    y = tiled_apply(constant, x, tile=64, overlap=overlap, margin=margin)[0, 0]
    step = max(y.diff(dim=0).abs().max(), y.diff(dim=1).abs().max())
    assert 0 < step <= np.pi / (2 * ramp) * 1.0001


@pytest.mark.parametrize(("size", "tile", "overlap"), [(100, 40, 10), (257, 64, 32), (65, 64, 8)])
def test_tile_starts_cover_the_axis_with_the_overlap(size: int, tile: int, overlap: int) -> None:
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - overlap and b > a for a, b in itertools.pairwise(starts))
    w = window_1d(tile, ramp_start=True, ramp_end=True, margin=overlap // 4, ramp=overlap // 2)
    assert w.min() == 0 and w.max() == 1 and w.numel() == tile


@pytest.mark.parametrize("align", [1, 2, 3])
def test_aligned_tile_starts_cover_the_axis_with_the_overlap(align: int) -> None:
    for size, tile, overlap in itertools.product(range(1, 90), (8, 9, 24, 25), (0, 1, 3, 4, 8)):
        if overlap > tile // 2:
            continue
        starts = tile_starts(size, tile, overlap, align)
        assert starts[0] == 0 and all(s % align == 0 for s in starts)
        last = size - starts[-1]  # the last tile's length: up to align - 1 short of tile
        assert last == size if size <= tile else tile - align < last <= tile
        assert all(a + tile - b >= overlap and b > a for a, b in itertools.pairwise(starts))
    assert tile_starts(53, 24, 8) == [0, 16, 29] and tile_starts(53, 24, 8, 2) == [0, 16, 30]


def test_aligned_tiling_is_exact_for_a_map_on_pixel_unshuffle_sub_images() -> None:
    """A map on the 2 × 2 sub-images of pixel_unshuffle (odd sides padded by replication, as the
    shipped denoisers do) with a receptive radius within the margin: tiles at even offsets give
    the whole-image result to round-off on odd-sized images; at odd offsets they do not."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)

    def fn(t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        low = F.pixel_unshuffle(F.pad(t, (0, w % 2, 0, h % 2), mode="replicate"), 2)
        return F.pixel_shuffle(conv(low), 2)[..., :h, :w]

    x = torch.rand(1, 1, 37, 53)
    with torch.no_grad():
        whole = fn(x)
        aligned = tiled_apply(fn, x, tile=24, overlap=12, align=2)
        odd = tiled_apply(fn, x, tile=24, overlap=12)
    torch.testing.assert_close(aligned, whole, atol=1e-6, rtol=0)
    assert float((odd - whole).abs().max()) > 1e-2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tile": 4}, ValueError, "tile must be at least 8"),
        ({"tile": 32, "overlap": 17}, ValueError, r"overlap must be in \[0, tile // 2\]"),
        ({"overlap": -1}, ValueError, "overlap must be in"),
        ({"overlap": 8, "margin": 5}, ValueError, "margin must be an int in"),
        ({"tile": 32.0}, TypeError, "tile must be an int"),
        (
            {"tile": 16, "overlap": 4, "align": 9},
            ValueError,
            r"align must be an int in \[1, tile // 2 = 8\]",
        ),
        ({"align": 0}, ValueError, "align must be an int in"),
        ({"align": True}, ValueError, "align must be an int in"),
    ],
)
def test_tiling_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        tiled_apply(lambda t: t, torch.zeros(1, 1, 40, 40), **kwargs)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        # an overlap above the tile used to return [60]: one 40-pixel tile for a 100-pixel axis
        ((100, 40, 45), ValueError, r"overlap must be in \[0, tile // 2\] = \[0, 20\], got 45"),
        ((100, 40, 21), ValueError, r"overlap must be in \[0, tile // 2\] = \[0, 20\], got 21"),
        ((53, 24, 8, 0), ValueError, r"align must be an int in \[1, tile // 2 = 12\], got 0"),
        ((53, 24, 8, 13), ValueError, r"align must be an int in \[1, tile // 2 = 12\], got 13"),
        ((53, 24, 8, True), ValueError, r"align must be an int in .* got True"),
        ((53, 24.0, 8), TypeError, "tile must be an int, got 24.0"),
        ((53, 4, 0), ValueError, "tile must be at least 8, got 4"),
        ((0, 24, 8), ValueError, "size must be an int of at least 1, got 0"),
    ],
)
def test_tile_starts_bad_arguments(args, error, match) -> None:
    # tile_starts is public: it checks its arguments as tiled_apply does (it used to return
    # tiles that leave part of the axis uncovered, or fail with ZeroDivisionError)
    with pytest.raises(error, match=match):
        tile_starts(*args)


def test_tiling_refuses_a_map_that_changes_the_size() -> None:
    with pytest.raises(ValueError, match="fn must map"):
        tiled_apply(lambda t: t[..., 1:], torch.zeros(1, 1, 40, 40), tile=16, overlap=4)
    with pytest.raises(ValueError, match=r"tensor \(N, C, H, W\)"):
        tiled_apply(lambda t: t, torch.zeros(40, 40))


# ------------------------------------------------------------------------------------ image files


def _array(channels: int, depth: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (19, 23) if channels == 0 else (19, 23, channels)
    if depth == 32:
        return rng.random(shape).astype(np.float32)
    top = 255 if depth == 8 else 65535
    return rng.integers(0, top + 1, shape).astype(np.uint8 if depth == 8 else np.uint16)


def _image(channels: int, depth: int) -> LoadedImage:
    """A LoadedImage equal to _array(channels, depth) as read_image would return it."""
    a = _array(channels, depth)
    scale = {8: 255.0, 16: 65535.0, 32: 1.0}[depth]
    values = a if channels in (0, 1, 3) else (a[..., 0] if channels == 2 else a[..., :3])
    values = values.reshape(a.shape[:2]) if channels in (0, 1) else values
    alpha = a[..., -1] if channels in (2, 4) else None
    return LoadedImage(values.astype(np.float64) / scale, alpha, depth, channels == 1)


CASES = [
    (suffix, depth, channels)
    for suffix, depths, chans in [
        (".png", (8, 16), (0, 2, 3, 4)),
        (".tif", (8, 16, 32), (0, 1, 2, 3, 4)),
        (".npy", (8, 16, 32), (0, 1, 2, 3, 4)),
    ]
    for depth in depths
    for channels in chans
]


@pytest.mark.parametrize(("suffix", "depth", "channels"), CASES)
def test_lossless_formats_round_trip_exactly(
    tmp_path: Path, suffix: str, depth: int, channels: int
) -> None:
    image = _image(channels, depth)
    path = tmp_path / f"x{suffix}"
    assert write_image(path, image) == depth
    back = read_image(path)
    assert back.bit_depth == depth and back.channel_axis == image.channel_axis
    np.testing.assert_array_equal(back.pixels, image.pixels)
    if image.alpha is None:
        assert back.alpha is None
    else:
        assert back.alpha.dtype == image.alpha.dtype
        np.testing.assert_array_equal(back.alpha, image.alpha)
    if suffix == ".npy":  # the file holds the original array
        np.testing.assert_array_equal(np.load(path), _array(channels, depth))


@pytest.mark.parametrize("channels", [0, 3])
def test_jpeg_round_trip_is_close(tmp_path: Path, channels: int) -> None:
    smooth = np.linspace(0, 1, 40 * 50).reshape(40, 50)
    pixels = smooth if channels == 0 else np.stack([smooth, smooth[::-1], 1 - smooth], 2)
    write_image(tmp_path / "x.jpeg", LoadedImage(pixels, None, 8))
    back = read_image(tmp_path / "x.jpeg")
    assert back.bit_depth == 8 and back.pixels.shape == pixels.shape
    assert np.abs(back.pixels - pixels).mean() < 2 / 255


def test_16_bit_png_grey_matches_pillow(tmp_path: Path) -> None:
    """Pillow reads 16-bit grey PNG (not colour): our writer's file decodes the same there."""
    from PIL import Image

    image = _image(0, 16)
    write_image(tmp_path / "g.png", image)
    with Image.open(tmp_path / "g.png") as im:
        pil = np.asarray(im).astype(np.int64)
    np.testing.assert_array_equal(pil, np.round(image.pixels * 65535).astype(np.int64))


def _reference_png16(a: np.ndarray, filters: list[int]) -> bytes:
    """A 16-bit PNG written byte by byte with the given row filters (PNG spec §6), to test the
    decoder on the filters our writer does not use."""
    height, width, channels = a.shape
    bpp = 2 * channels
    rows = [bytes(a[y].astype(">u2").tobytes()) for y in range(height)]
    out = bytearray()
    for y, row in enumerate(rows):
        prior = rows[y - 1] if y else bytes(len(row))
        kind = filters[y % len(filters)]
        out.append(kind)
        for i, v in enumerate(row):
            left = row[i - bpp] if i >= bpp else 0
            up, up_left = prior[i], (prior[i - bpp] if i >= bpp else 0)
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = left
            elif kind == 2:
                pred = up
            elif kind == 3:
                pred = (left + up) // 2
            else:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
            out.append((v - pred) % 256)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(out)))
        + chunk(b"IEND", b"")
    )  # fmt: skip


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_png_decoder_handles_every_row_filter(tmp_path: Path, channels: int) -> None:
    a = _array(channels, 16, seed=channels)
    a[3:9] = a[2]  # some repeated rows, where the Up/Paeth predictors matter
    path = tmp_path / "f.png"
    path.write_bytes(_reference_png16(a, filters=[0, 1, 2, 3, 4, 4, 3, 1]))
    back = read_image(path)
    stored = np.concatenate(
        [back.pixels.reshape(*a.shape[:2], -1) * 65535]
        + ([back.alpha[..., None].astype(np.float64)] if back.alpha is not None else []),
        axis=2,
    )
    np.testing.assert_array_equal(np.round(stored).astype(np.uint16), a)


def test_8_bit_palette_and_1_bit_png_are_read(tmp_path: Path) -> None:
    from PIL import Image

    a = _array(3, 8)
    Image.fromarray(a).convert("P").save(tmp_path / "p.png")
    Image.fromarray(a[..., 0] > 127).save(tmp_path / "b.png")
    p, b = read_image(tmp_path / "p.png"), read_image(tmp_path / "b.png")
    assert p.pixels.shape == (19, 23, 3) and p.bit_depth == 8
    np.testing.assert_array_equal(b.pixels, (a[..., 0] > 127).astype(np.float64))


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    def npy(name: str, a: np.ndarray) -> Path:
        np.save(tmp_path / name, a)
        return tmp_path / name

    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(_reference_png16(_array(3, 16), [2])[:60])
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "x.bmp").write_bytes(b"BM")
    (tmp_path / "folder.png").mkdir()
    return {
        "missing": (tmp_path / "missing.png", "no such file"),
        "extension": (tmp_path / "x.bmp", "unsupported extension '.bmp'"),
        "garbage": (tmp_path / "garbage.png", "cannot read it as PNG"),
        "empty tiff": (tmp_path / "empty.tif", "cannot read it as TIFF"),
        "truncated": (tmp_path / "cut.png", "cannot read it as PNG"),
        "pickled": (tmp_path / "obj.npy", "cannot read it as NPY"),
        "folder": (tmp_path / "folder.png", "not a file"),
        "small": (npy("small.npy", np.zeros((7, 30), np.uint8)), "too small, 7 × 30"),
        "4-D": (npy("4d.npy", np.zeros((2, 16, 16, 3), np.uint8)), "shape (H, W) or (H, W, C)"),
        "5 channels": (npy("c5.npy", np.zeros((16, 16, 5), np.uint8)), "C in 1–4"),
        "int32": (npy("i32.npy", np.zeros((16, 16), np.int32)), "unsupported sample type int32"),
        "nan": (npy("nan.npy", np.full((16, 16), np.nan)), "non-finite"),
    }


def test_planar_rgb_tiff_is_read_channels_last(tmp_path: Path) -> None:
    import tifffile

    a = _array(3, 16, seed=5)
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(a, 2, 0), photometric="rgb",
                     planarconfig="separate")  # fmt: skip
    image = read_image(tmp_path / "p.tif")
    np.testing.assert_array_equal(image.pixels, a / 65535.0)


def test_png_colour_key_transparency_becomes_alpha(tmp_path: Path) -> None:
    from PIL import Image

    a = _array(3, 8, seed=7)
    a[:4, :4] = (1, 2, 3)
    Image.fromarray(a).save(tmp_path / "rgb.png", transparency=(1, 2, 3))
    Image.fromarray(a[..., 0]).save(tmp_path / "l.png", transparency=1)
    for name, key in (("rgb.png", (a == (1, 2, 3)).all(axis=2)), ("l.png", a[..., 0] == 1)):
        image = read_image(tmp_path / name)
        assert image.alpha is not None, name
        np.testing.assert_array_equal(image.alpha, np.where(key, 0, 255).astype(np.uint8))


def test_big_endian_npy_is_read(tmp_path: Path) -> None:
    a = _array(3, 16, seed=6)
    np.save(tmp_path / "be.npy", a.astype(">u2"))
    image = read_image(tmp_path / "be.npy")
    assert image.bit_depth == 16
    np.testing.assert_array_equal(image.pixels, a / 65535.0)


def test_unreadable_files_raise_image_errors(tmp_path: Path) -> None:
    for case, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(ImageError, match=None) as info:
            read_image(path)
        assert message in str(info.value), case
        assert str(path) in str(info.value), case


def test_write_refuses_what_the_format_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="JPEG stores bit depths 8, not 16"):
        write_image(tmp_path / "x.jpg", _image(3, 16))
    with pytest.raises(ImageError, match="PNG stores bit depths 8, 16, not 32"):
        write_image(tmp_path / "x.png", _image(3, 32))
    with pytest.raises(ImageError, match="JPEG has no alpha"):
        write_image(tmp_path / "x.jpg", _image(4, 8))
    with pytest.raises(ImageError, match="unsupported extension"):
        write_image(tmp_path / "x.gif", _image(3, 8))
    assert not list(tmp_path.iterdir())


def test_alpha_changes_depth_exactly(tmp_path: Path) -> None:
    image = _image(4, 8)
    write_image(tmp_path / "x.png", image, bit_depth=16)
    back = read_image(tmp_path / "x.png")
    np.testing.assert_array_equal(back.alpha, image.alpha.astype(np.uint16) * 257)
    write_image(tmp_path / "y.png", back, bit_depth=8)
    np.testing.assert_array_equal(read_image(tmp_path / "y.png").alpha, image.alpha)
    floats = _image(4, 32)  # float alpha in [0, 1] to 8 bits and 8 bits to float
    write_image(tmp_path / "f.png", floats, bit_depth=8)
    expected = np.round(floats.alpha.astype(np.float64) * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "f.png").alpha, expected)
    write_image(tmp_path / "f.npy", image, bit_depth=32)
    np.testing.assert_allclose(np.load(tmp_path / "f.npy")[..., 3], image.alpha / 255, rtol=1e-6)


# ------------------------------------------------------------------------------- the command line


class _Cell(nn.Module):
    """z ↦ ½ · blur(z) + x: a contraction whose fixed point smooths the injection x."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * F.avg_pool2d(z, 3, 1, 1, count_include_pad=False) + x


class TinyDenoiser(nn.Module):
    """The shipped model's interface (``model(noisy, sigma, max_iter=)``, ``deq.last_solution``)
    on a small equilibrium: x̂ = z* with z* = ½ blur(z*) + ½ blur(y)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.deq = eq.DEQ(_Cell(), solver="anderson", tol=1e-6, max_iter=40)
        self.calls: list[tuple[tuple[int, ...], float, int | None]] = []

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor, *, max_iter: int | None = None):
        assert noisy.shape[1] == self.channels and sigma.shape == (noisy.shape[0],)
        self.calls.append((tuple(noisy.shape), float(sigma[0]), max_iter))
        x = 0.5 * F.avg_pool2d(noisy, 3, 1, 1, count_include_pad=False)
        return self.deq(x, max_iter=max_iter)


@pytest.fixture
def models(monkeypatch: pytest.MonkeyPatch) -> dict[bool, TinyDenoiser]:
    """The command's models replaced by tiny ones: ``made[color]`` is the TinyDenoiser that ran
    (with ``--color-model opponent`` the grey one inside the opponent-space wrapper)."""
    made: dict[bool, TinyDenoiser] = {}

    def load(color: bool, color_model: str, nonlocal_stage: bool) -> nn.Module:
        made["nonlocal_stage"] = nonlocal_stage  # type: ignore[index]
        if color and color_model == "opponent":
            made[color] = TinyDenoiser(1).eval()
            return OpponentColorDenoiser(made[color]).eval()
        made[color] = TinyDenoiser(3 if color else 1).eval()
        return made[color]

    monkeypatch.setattr(denoise_cli, "_load_model", load)
    return made


def _noisy(color: bool, size: tuple[int, int] = (40, 56), sigma255: float = 25) -> np.ndarray:
    clean = skimage_data.camera()[150 : 150 + size[0], 150 : 150 + size[1]] / 255.0
    if color:
        clean = np.stack([clean, 0.8 * clean, 1 - clean], axis=2)
    return clean + sigma255 / 255 * np.random.default_rng(0).standard_normal(clean.shape)


def _save(path: Path, pixels: np.ndarray, depth: int = 8, alpha: np.ndarray | None = None):
    write_image(path, LoadedImage(np.clip(pixels, 0, 1), alpha, depth))  # type: ignore[arg-type]
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["denoise", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    ("suffix", "depth", "color"),
    [(".png", 8, False), (".png", 16, True), (".jpg", 8, True), (".tif", 32, False),
     (".tif", 16, True), (".npy", 8, False)],
)  # fmt: skip
def test_cli_denoises_every_format(
    tmp_path: Path, capsys, models, suffix: str, depth: int, color: bool
) -> None:
    src = _save(tmp_path / f"in{suffix}", _noisy(color), depth)
    dst = tmp_path / f"out{suffix}"
    rgb = ["--color-model", "rgb"] if color else []  # the opponent model: the test below
    rc, out, err = _run(capsys, str(src), "--sigma", "25", "--output", str(dst), *rgb)
    assert rc == 0, err
    assert "sigma: 25.00 (0–255 units, given)" in out and "time:" in out
    assert ("colour model: rgb (the colour DEQ)" in out) == color
    assert "solver: 1 tile(s)" in out and "all converged" in out
    result, noisy = read_image(dst), read_image(src)
    assert result.bit_depth == depth and result.pixels.shape == noisy.pixels.shape
    assert models[color].calls[0][1] == pytest.approx(25 / 255)
    # untiled (the image is smaller than a tile): the file holds the model's output
    x = torch.from_numpy(noisy.pixels).float()
    x = x.permute(2, 0, 1)[None] if color else x[None, None]
    with torch.no_grad():
        y = TinyDenoiser(x.shape[1]).eval()(x, torch.full((1,), 25 / 255)).clamp(0, 1)[0]
    expected = (y.permute(1, 2, 0) if color else y[0]).double().numpy()
    error = np.abs(result.pixels - expected)
    if suffix == ".jpg":  # lossy (quality 95)
        assert error.mean() < 2 / 255 and error.max() < 16 / 255
    else:
        assert error.max() <= {8: 0.5 / 255, 16: 0.5 / 65535, 32: 1e-7}[depth] + 1e-9


@pytest.mark.parametrize("color_model", [None, "opponent", "rgb"])
def test_cli_color_models(tmp_path: Path, capsys, models, color_model: str | None) -> None:
    """``--color-model opponent`` runs the grey model on the opponent channels (one batch of 3,
    levels σ / (hi − lo)), ``rgb`` the colour model; without the option, the default of
    ``load_shipped``. The file holds that model's output; the solver line is the joint solve's."""
    src = _save(tmp_path / "in.png", _noisy(True), 16)
    argv = [str(src), "--sigma", "25", "-o", str(tmp_path / "o.png")]
    rc, out, err = _run(capsys, *argv, *(["--color-model", color_model] if color_model else []))
    assert rc == 0, err
    chosen = color_model or DEFAULT_COLOR_MODEL
    assert f"colour model: {chosen} (" in out and "solver: 1 tile(s)" in out
    ((shape, level, _),) = models[True].calls
    x = torch.from_numpy(read_image(src).pixels).float().permute(2, 0, 1)[None]
    sigma = torch.full((1,), 25 / 255)
    if chosen == "opponent":
        assert shape == (3, 1, 40, 56) and level == pytest.approx(25 / 255 / math.sqrt(3))
        reference = OpponentColorDenoiser(TinyDenoiser(1)).eval()
    else:
        assert shape == (1, 3, 40, 56) and level == pytest.approx(25 / 255)
        reference = TinyDenoiser(3).eval()
    with torch.no_grad():
        y = reference(x, sigma).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()
    assert np.abs(read_image(tmp_path / "o.png").pixels - y).max() <= 0.5 / 65535 + 1e-9


@pytest.mark.parametrize("flag", [[], ["--no-nonlocal"]])
def test_cli_nonlocal_stage_option(tmp_path: Path, capsys, models, flag: list[str]) -> None:
    """The non-local second stage runs by default; ``--no-nonlocal`` asks the loader for the
    network alone, and the summary says which ran."""
    src = _save(tmp_path / "in.png", _noisy(False), 16)
    rc, out, err = _run(capsys, str(src), "--sigma", "25", "-o", str(tmp_path / "o.png"), *flag)
    assert rc == 0, err
    assert models["nonlocal_stage"] is (not flag)  # type: ignore[index]
    line = "second stage: none (--no-nonlocal)" if flag else "second stage: non-local ("
    assert line in out


def test_cli_passes_the_stage_halo_to_the_tiling(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model with a ``tile_halo`` (the non-local stage) gets its tiles widened by it: the
    tiled file equals the whole-image output of a stage after a local pilot to round-off."""
    from equilibria.zoo.denoise_nonlocal import NonLocalStage

    class Local(nn.Module):  # a pilot of receptive radius 1 (≤ the blending margin, 2)
        channels, scale = 1, 1

        def forward(self, noisy, sigma, *, max_iter=None):  # type: ignore[no-untyped-def]
            return F.avg_pool2d(noisy, 3, 1, 1, count_include_pad=False)

    stage = NonLocalStage(Local(), search=4, patch=3).eval()
    monkeypatch.setattr(denoise_cli, "_load_model", lambda color, cm, nl: stage)
    src = _save(tmp_path / "in.npy", _noisy(False, size=(60, 70)), 32)
    argv = ["--sigma", "25", "-o", str(tmp_path / "o.npy"), "--tile", "24", "--overlap", "8"]
    rc, out, err = _run(capsys, str(src), *argv)
    assert "second stage: non-local" in out
    assert rc == 0, err
    x = torch.from_numpy(read_image(src).pixels).float()[None, None]
    with torch.no_grad():
        whole = stage(x, torch.full((1,), 25 / 255)).clamp(0, 1)[0, 0].double().numpy()
    assert np.abs(read_image(tmp_path / "o.npy").pixels - whole).max() < 1e-5


@pytest.mark.parametrize("color_model", ["opponent", "rgb"])
def test_cli_denoises_a_grey_image_stored_as_rgb_as_grey(
    tmp_path: Path, capsys, models, color_model: str
) -> None:
    """R = G = B in every pixel: the noise is the same in all three channels, not independent as
    the colour models assume (the opponent model then gives the luminance 1/√3 of its noise
    level, and its output lies far below the grey model's; commit 3032846), so the command
    runs the grey model on the one channel (with the same σ, given or estimated once) and
    writes three copies. Was: the colour model ran on it."""
    grey = np.clip(_noisy(False), 0, 1)
    src = _save(tmp_path / "in.png", np.repeat(grey[..., None], 3, axis=2), 16)
    argv = [str(src), "-o", str(tmp_path / "o.png"), "--color-model", color_model]
    rc, out, err = _run(capsys, *argv, "--sigma", "25")
    assert rc == 0, err
    assert "colour model: none (R = G = B in every pixel" in out and "RGB" in out
    assert True not in models
    ((shape, level, _),) = models[False].calls
    assert shape == (1, 1, 40, 56) and level == pytest.approx(25 / 255)
    x = torch.from_numpy(read_image(src).pixels[..., 0]).float()[None, None]
    with torch.no_grad():
        y = TinyDenoiser(1).eval()(x, torch.full((1,), 25 / 255)).clamp(0, 1)[0, 0].double()
    back = read_image(tmp_path / "o.png")
    assert back.color and back.pixels.shape == (40, 56, 3)
    for c in range(3):
        assert np.abs(back.pixels[..., c] - y.numpy()).max() <= 0.5 / 65535 + 1e-9
    # blind: σ estimated once on the image (three equal channels: the grey image's estimate)
    rc, out, err = _run(capsys, *argv[:2], str(tmp_path / "o2.png"), "--color-model", color_model)
    assert rc == 0, err
    line = next(li for li in out.splitlines() if li.startswith("sigma:"))
    expected = 255 * estimate_sigma(read_image(src).pixels[..., 0])
    assert f"sigma: {expected:.2f} " in line and "estimated" in line
    # one pixel different: a colour image, the colour model runs
    pixels = read_image(src).pixels.copy()
    pixels[3, 5, 1] = 0.5 if pixels[3, 5, 1] != 0.5 else 0.25
    src2 = _save(tmp_path / "in2.png", pixels, 16)
    rc, out, err = _run(capsys, str(src2), "-o", str(tmp_path / "o3.png"), "--sigma", "25",
                        "--color-model", color_model)  # fmt: skip
    assert rc == 0, err
    assert f"colour model: {color_model} (" in out and True in models


def test_cli_denoising_reduces_the_error(tmp_path: Path, capsys, models) -> None:
    clean = _noisy(False, sigma255=0)
    src = _save(tmp_path / "in.png", _noisy(False, sigma255=25), 16)
    rc, _, err = _run(capsys, str(src), "--output", str(tmp_path / "out.png"), "--sigma", "25")
    assert rc == 0, err
    assert _psnr(read_image(tmp_path / "out.png").pixels, clean) > _psnr(
        read_image(src).pixels, clean
    )


@pytest.mark.parametrize(
    ("suffix", "depth"), [(".png", 8), (".png", 16), (".tif", 16), (".npy", 32)]
)
def test_cli_keeps_alpha_bit_exact(tmp_path: Path, capsys, models, suffix: str, depth: int):
    a = _array(1, depth, seed=3)[..., 0]
    alpha = np.resize(a, (40, 56)) if depth != 32 else np.random.default_rng(3).random((40, 56))
    alpha = alpha.astype(a.dtype)
    src = _save(tmp_path / f"in{suffix}", _noisy(True), depth, alpha=alpha)
    rc, out, err = _run(capsys, str(src), "--sigma", "25", "-o", str(tmp_path / f"o{suffix}"))
    assert rc == 0, err
    back = read_image(tmp_path / f"o{suffix}")
    assert back.alpha is not None and back.alpha.dtype == alpha.dtype
    np.testing.assert_array_equal(back.alpha, alpha)
    assert "RGB+alpha" in out


def test_cli_blind_estimates_sigma_once(tmp_path: Path, capsys, models) -> None:
    src = _save(tmp_path / "in.png", _noisy(False, size=(96, 96), sigma255=30), 8)
    rc, out, err = _run(capsys, str(src), "--output", str(tmp_path / "o.png"), "--tile", "48")
    assert rc == 0, err
    line = next(li for li in out.splitlines() if li.startswith("sigma:"))
    assert "estimated" in line
    sigma = float(line.split()[1])
    assert abs(sigma / 30 - 1) < 0.2
    levels = [c[1] for c in models[False].calls]
    assert len(levels) == 9 and levels == pytest.approx([sigma / 255] * 9, rel=1e-3)
    rc, out, _ = _run(capsys, str(src), "--blind", "-o", str(tmp_path / "o2.png"))
    assert rc == 0 and f"sigma: {sigma:.2f}" in out


def test_cli_tiles_a_large_image_and_passes_iters(tmp_path: Path, capsys, models) -> None:
    src = _save(tmp_path / "in.npy", _noisy(False, size=(100, 130)), 8)
    argv = [str(src), "--sigma", "10", "-o", str(tmp_path / "o.npy"), "--tile", "48"]
    rc, out, err = _run(capsys, *argv, "--overlap", "16", "--iters", "2")
    assert rc == 0, err
    calls = models[False].calls
    assert len(calls) == len(tile_starts(100, 48, 16)) * len(tile_starts(130, 48, 16))
    assert all(c[0][2] <= 48 and c[0][3] <= 48 and c[2] == 2 for c in calls)
    assert "not converged" in out and "iterations max 2" in out


def test_cli_writes_the_bit_depth_asked(tmp_path: Path, capsys, models) -> None:
    src = _save(tmp_path / "in.png", _noisy(True), 8)
    rc, out, _ = _run(capsys, str(src), "--sigma", "5", "-o", str(tmp_path / "o.tif"),
                      "--bit-depth", "32")  # fmt: skip
    assert rc == 0 and read_image(tmp_path / "o.tif").bit_depth == 32
    src16 = _save(tmp_path / "in16.png", _noisy(True), 16)
    rc, out, _ = _run(capsys, str(src16), "--sigma", "5", "-o", str(tmp_path / "o.jpg"))
    assert rc == 0 and "note: JPEG has no 16-bit samples; writing 8-bit" in out
    assert read_image(tmp_path / "o.jpg").bit_depth == 8


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_cli_output_has_the_usual_file_mode(tmp_path: Path, capsys, models) -> None:
    # the temporary file (mkstemp: 0600) used to keep its mode after the rename
    src = _save(tmp_path / "in.png", _noisy(False), 8)
    umask = os.umask(0o022)
    try:
        assert _run(capsys, str(src), "--sigma", "25", "-o", str(tmp_path / "o.png"))[0] == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "o.png").stat().st_mode & 0o777 == 0o644


def test_cli_overwrites_only_when_asked(tmp_path: Path, capsys, models) -> None:
    src = _save(tmp_path / "in.png", _noisy(False), 8)
    before = src.read_bytes()
    rc, _, err = _run(capsys, str(src), "--sigma", "25", "-o", str(src))
    assert rc == 2 and "is the input; add --overwrite" in err and src.read_bytes() == before
    other = tmp_path / "sub" / ".." / "in.png"  # the same file by another name
    (tmp_path / "sub").mkdir()
    rc, _, err = _run(capsys, str(src), "--sigma", "25", "-o", str(other))
    assert rc == 2 and "is the input" in err and src.read_bytes() == before
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep me")
    rc, _, err = _run(capsys, str(src), "--sigma", "25", "-o", str(existing))
    assert rc == 2 and "exists; add --overwrite" in err and existing.read_bytes() == b"keep me"
    assert _run(capsys, str(src), "--sigma", "25", "-o", str(existing), "--overwrite")[0] == 0
    assert read_image(existing).pixels.shape == (40, 56)
    assert _run(capsys, str(src), "--sigma", "25", "-o", str(src), "--overwrite")[0] == 0
    assert src.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "old.png", "sub"]


def test_cli_errors_are_one_line_with_status_2(tmp_path: Path, capsys, models) -> None:
    good = _save(tmp_path / "good.png", _noisy(False), 8)
    rgba = _save(tmp_path / "rgba.png", _noisy(True), 8, alpha=np.full((40, 56), 7, np.uint8))
    out = str(tmp_path / "out.png")
    cases = [(str(path), message) for path, message in _bad_files(tmp_path).values()]
    cases = [([p, "--sigma", "25", "-o", out], m) for p, m in cases] + [
        ([str(good), "--sigma", "0", "-o", out], "--sigma must be in (0, 255]"),
        ([str(good), "--sigma", "-3", "-o", out], "--sigma must be in (0, 255]"),
        ([str(good), "--sigma", "300", "-o", out], "--sigma must be in (0, 255]"),
        ([str(good), "--sigma", "nan", "-o", out], "--sigma must be in (0, 255]"),
        ([str(good), "--sigma", "25", "--blind", "-o", out], "give either --sigma or --blind"),
        ([str(good), "-o", str(tmp_path / "out.gif")], "unsupported extension '.gif'"),
        ([str(good), "-o", str(tmp_path / "nowhere" / "o.png")], "does not exist"),
        ([str(rgba), "-o", str(tmp_path / "o.jpg")], "JPEG has none"),
        ([str(good), "-o", str(tmp_path / "o.png"), "--bit-depth", "32"], "PNG stores 8, 16"),
        ([str(good), "-o", out, "--tile", "4"], "--tile must be at least 8"),
        ([str(good), "-o", out, "--overlap", "200"], "--overlap must be in"),
        ([str(good), "-o", out, "--iters", "0"], "--iters must be at least 1"),
        ([str(good), "-o", out, "--device", "abacus"], "is not a torch device"),
        (
            [str(good), "-o", out, "--color-model", "yuv"],
            "--color-model must be opponent or rgb, got 'yuv'",
        ),
    ]
    for argv, message in cases:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("equilibria: error:"), err
        assert message in lines[0], (message, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".jpg")) == [
        "cut.png", "folder.png", "garbage.png", "good.png", "rgba.png"
    ]  # fmt: skip


def test_cli_with_the_shipped_model(tmp_path: Path, capsys) -> None:
    """``equilibria denoise IN --sigma 25 --output OUT`` right after install (shipped weights)."""
    from equilibria.zoo.denoise_weights import shipped_paths

    if not all(p.is_file() for p in shipped_paths(False)):
        pytest.fail("the shipped denoiser weights are not in equilibria/zoo/weights")
    clean = _noisy(False, size=(32, 40), sigma255=0)
    src = _save(tmp_path / "in.png", _noisy(False, size=(32, 40)), 8)
    rc, out, err = _run(capsys, str(src), "--sigma", "25", "--output", str(tmp_path / "o.png"))
    assert rc == 0, err
    assert "solver:" in out and "sigma: 25.00" in out
    result = read_image(tmp_path / "o.png").pixels
    assert _psnr(result, clean) > _psnr(read_image(src).pixels, clean) + 3


@pytest.mark.parametrize(
    ("color", "color_model"), [(False, "rgb"), (True, "rgb"), (True, "opponent")]
)
def test_cli_shipped_half_resolution_model_takes_odd_sizes(
    tmp_path: Path, capsys, color: bool, color_model: str
) -> None:
    """The shipped models run on the half-resolution sub-images (scale 2): a 37 × 53 image is
    padded by a replicated row and column and cropped back. Whole, the file holds the model's
    output. In 24² tiles overlapping by 8 the command starts the tiles at even offsets (rows 0,
    14; columns 0, 16, 30), so each tile groups its pixels into sub-images as the whole image
    does: the network's largest change from the whole-image result is then about 4 / 255 (the
    seams); the tiles the command used to cut (rows 0, 13; columns 0, 16, 29) changed it by up to
    20 / 255 (grey; colour DEQ 9 and 37; the grey model in opponent colour space,
    --color-model opponent, 4.0 and 9.2). With the non-local stage, the command's default, the
    tiled file differs from the whole one by about 0.1 / 255."""
    from equilibria.zoo.denoise_weights import load_shipped

    model = load_shipped(color, color_model=color_model)
    assert model.scale == 2
    if color:  # a natural image (the synthetic one of _noisy is beyond the colour model)
        clean = skimage_data.astronaut()[100:137, 200:253] / 255.0
        rng = np.random.default_rng(0)
        src = _save(tmp_path / "in.png", clean + 25 / 255 * rng.standard_normal(clean.shape), 16)
    else:
        clean = _noisy(color, size=(37, 53), sigma255=0)
        src = _save(tmp_path / "in.png", _noisy(color, size=(37, 53)), 16)
    noisy = read_image(src).pixels
    which = ["--color-model", color_model]
    rc, out, err = _run(
        capsys, str(src), "--sigma", "25", "-o", str(tmp_path / "whole.png"), *which
    )
    assert rc == 0, err
    assert "1 tile(s)" in out
    x = torch.from_numpy(noisy).float()
    x = x.permute(2, 0, 1)[None] if color else x[None, None]
    with torch.no_grad():
        y = model(x, torch.full((1,), 25 / 255)).clamp(0, 1)[0]
    expected = (y.permute(1, 2, 0) if color else y[0]).double().numpy()
    whole = read_image(tmp_path / "whole.png").pixels
    assert whole.shape == noisy.shape == expected.shape
    assert np.abs(whole - expected).max() <= 0.5 / 65535 + 1e-6
    assert _psnr(whole, clean) > _psnr(noisy, clean) + 3
    argv = ["--sigma", "25", "-o", str(tmp_path / "tiled.png"), "--tile", "24", "--overlap", "8"]
    argv += which
    rc, out, err = _run(capsys, str(src), *argv)
    assert rc == 0, err
    assert "6 tile(s)" in out
    tiled = read_image(tmp_path / "tiled.png").pixels
    assert tiled.shape == noisy.shape
    change = np.abs(tiled - whole).max()
    # the alignment matters: the network alone (the non-local stage after it blurs the effect)
    net = load_shipped(color, color_model=color_model, nonlocal_stage=False)
    s25 = torch.full((1,), 25 / 255)
    with torch.no_grad():
        plain = net(x, s25)
        even = tiled_apply(lambda t: net(t, s25), x, tile=24, overlap=8, align=2)
        odd = tiled_apply(lambda t: net(t, s25), x, tile=24, overlap=8)
    even_change = float((even - plain).abs().max())
    odd_change = float((odd - plain).abs().max())
    print(
        f"{color_model}: the command's tiles: {255 * change:.2f} / 255; the network alone, "
        f"tiles at even offsets {255 * even_change:.2f} / 255, odd {255 * odd_change:.2f} / 255"
    )
    assert change < (10 if color else 6) / 255
    assert odd_change > 2 * even_change
    assert abs(_psnr(tiled, clean) - _psnr(whole, clean)) < 0.1


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    from PIL import Image

    a = np.zeros((16, 24), np.uint8)
    a[:, :12] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    image = read_image(tmp_path / "r.jpg")
    assert image.pixels.shape == (24, 16)  # as displayed: the white half on top
    assert image.pixels[:12].mean() > 0.9 and image.pixels[12:].mean() < 0.1


@pytest.mark.parametrize(
    ("color", "color_model"), [(False, "rgb"), (True, "rgb"), (True, "opponent")]
)
def test_tiling_the_shipped_model_changes_at_most_a_few_8_bit_levels(
    color: bool, color_model: str
) -> None:
    """The shipped DEQ's receptive field exceeds the margin (every solver iteration widens it, by
    4 pixels at half resolution), so tiled and whole-image results differ near the seams. Measured
    here (tiles 48, overlap 16), the networks alone: 1.01 / 255 grey (the Jacobian-penalised DEQ),
    1.12 opponent, 2.05 colour DEQ; on the 512² camera with the command's tiles (256, overlap 32)
    0.22 / 255 at the same PSNR to 0.001 dB (without overlap the seams reach 42 / 255;
    benchmarks/denoise_tools.py). The grey DEQ shipped before measured 0.72 / 255 here and 1.54
    on camera, the full-resolution DEQ without the penalty (docs/recipes/denoise.md,
    "Convergence") 3.59 and 6.86. The non-local stage follows them by default (tiles widened by
    its ``tile_halo``, as the command does): 0.03 grey, 0.42 colour DEQ, 0.02 opponent / 255 here,
    and 0.19 / 255 on camera (denoise_tools.json)."""
    from equilibria.zoo.denoise_weights import load_shipped

    model = load_shipped(color=color, color_model=color_model)
    noisy = torch.from_numpy(_noisy(color, size=(96, 96))).float()
    x = noisy.permute(2, 0, 1)[None] if color else noisy[None, None]
    sigma = torch.full((1,), 25 / 255)
    halo = model.tile_halo  # the non-local stage's reach, as the command passes it
    assert halo == SHIPPED_STAGE["search"] + SHIPPED_STAGE["patch"] // 2
    with torch.inference_mode():
        whole = model(x, sigma)
        tiled = tiled_apply(
            lambda t: model(t, sigma), x, tile=48, overlap=16, halo=halo, align=model.scale
        )
        seams = tiled_apply(lambda t: model(t, sigma), x, tile=48, overlap=0)
    print(
        f"{color_model}: overlap 16: {255 * (tiled - whole).abs().max():.2f} / 255, "
        f"no overlap: {255 * (seams - whole).abs().max():.2f} / 255"
    )
    assert (tiled - whole).abs().max() < (2.5 if color else 1.0) / 255
    assert (seams - whole).abs().max() > 5 * (tiled - whole).abs().max()  # the blend matters


def test_the_tiling_benchmark_cuts_the_tiles_the_command_cuts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """benchmarks/denoise_tools.py measures the command's tiling of the shipped half-resolution
    model: tiles at even offsets (align = the model's scale), as ``equilibria denoise`` cuts them
    (it called tiled_apply without align: right on the 512² camera only because 224 and 256 are
    even)."""
    import importlib.util

    from equilibria.zoo import denoise_tiling, denoise_weights
    from equilibria.zoo.denoise import DenoiseConfig
    from equilibria.zoo.denoise_model import build_model

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(root))
    spec = importlib.util.spec_from_file_location("denoise_tools", root / "denoise_tools.py")
    tools = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(tools)  # type: ignore[union-attr]
    tiny = build_model(DenoiseConfig(width=2, eval_max_iter=1, scale=2)).eval()
    from equilibria.zoo.denoise_nonlocal import NonLocalStage

    def load(color: bool = False, nonlocal_stage: bool = True) -> torch.nn.Module:
        return NonLocalStage(tiny, search=3, patch=3) if nonlocal_stage else tiny

    monkeypatch.setattr(denoise_weights, "load_shipped", load)
    calls = []

    def record(fn, image, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((kwargs.get("align", 1), kwargs.get("halo", 0)))
        return fn(image)

    monkeypatch.setattr(denoise_tiling, "tiled_apply", record)
    table = tools.tiling_table()
    # the shipped default with the stage's halo, then the network alone, each at overlap 32 and 0
    assert calls == [(2, 4), (2, 4), (2, 0), (2, 0)]
    assert table["shipped"]["halo"] == 4 and table["network_alone"]["halo"] == 0


def test_the_tools_benchmark_records_its_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """benchmarks/denoise_tools.py records its command at the top of denoise_tools.json; with
    --tiling-only it keeps the file's command (that of the parts it keeps) and records its own
    beside the tiling part, and refuses a file without one (the committed file had none: it was
    written before the script recorded it, and --tiling-only kept it so)."""
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(root))
    spec = importlib.util.spec_from_file_location("denoise_tools", root / "denoise_tools.py")
    tools = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(tools)  # type: ignore[union-attr]
    for part in ("sigma_table", "classical_table", "tiling_table", "sweep_table"):
        monkeypatch.setattr(tools, part, lambda part=part: {"part": part})
    written: dict = {}

    def write(name: str, result: dict) -> Path:
        written.clear()
        written.update(result)
        return tmp_path / f"{name}.json"

    monkeypatch.setattr(tools, "write_result", write)
    monkeypatch.setattr(tools, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["benchmarks/denoise_tools.py", "--sweep"])
    tools.main()
    assert written["command"] == "python benchmarks/denoise_tools.py --sweep"
    assert written["sweep"] == {"part": "sweep_table"}
    (tmp_path / "denoise_tools.json").write_text(json.dumps({"machine": {}, **written}))
    monkeypatch.setattr(sys, "argv", ["benchmarks/denoise_tools.py", "--tiling-only"])
    tools.main()
    assert written["command"] == "python benchmarks/denoise_tools.py --sweep"
    tiling = {"command": "python benchmarks/denoise_tools.py --tiling-only", "part": "tiling_table"}
    assert written["tiling"] == tiling and "machine" not in written
    (tmp_path / "denoise_tools.json").write_text(json.dumps({"sweep": {}}))
    with pytest.raises(SystemExit):
        tools.main()
    committed = json.loads((root / "results" / "denoise_tools.json").read_text())
    assert committed["command"] == "python benchmarks/denoise_tools.py --sweep"


def test_cli_damaged_shipped_weights_are_one_line_with_status_1(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from equilibria.zoo import denoise_weights

    weights, config = denoise_weights.shipped_paths(False)
    damaged = tmp_path / "w.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    (tmp_path / "w.json").write_bytes(config.read_bytes())
    monkeypatch.setattr(
        denoise_weights, "shipped_paths", lambda color: (damaged, tmp_path / "w.json")
    )
    src = _save(tmp_path / "in.png", _noisy(False), 8)
    rc, _, err = _run(capsys, str(src), "--sigma", "25", "-o", str(tmp_path / "o.png"))
    assert rc == 1 and err.count("\n") == 1 and "SHA-256" in err
    assert not (tmp_path / "o.png").exists()
