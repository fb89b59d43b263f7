"""The mosaic recipe's data: canvases of scikit-learn digits whose labels need global context.

A canvas is a grid of 8×8 digits. In the ``key`` task one digit, the *key*, is marked in a second
input channel and each stroke pixel is labelled 1 if its digit has the key's class, 2 if not
(0: background); in the ``majority`` task the labels are the more and the less frequent class.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

TaskName = Literal["key", "majority"]
_DIGIT = 8  # side of a scikit-learn digit
_STROKE = 0.25  # intensity above which a pixel is a stroke
_SPLIT_SEED = 1234  # which digit images are used for training and which for testing


def _digit_pools() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits in [0, 1], split once into training and test images (2:1)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
    cut = 2 * len(images) // 3
    train, test = order[:cut], order[cut:]
    return images[train], digits.target[train], images[test], digits.target[test]


class Canvases(NamedTuple):
    """A batch of canvases.

    Attributes:
        inputs: (count, 2, H, W) float32: the digits and the key mask.
        targets: (count, H, W) int64 segmentation labels in {0, 1, 2}.
        digits: (count, H, W) int64 digit class (0–9) of each stroke pixel, -1 elsewhere; the
            target of the optional auxiliary head.
    """

    inputs: np.ndarray
    targets: np.ndarray
    digits: np.ndarray


def make_canvases(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    *,
    grid: int,
    occupancy: float,
    match_prob: float,
    task: TaskName = "key",
) -> Canvases:
    """Draws ``count`` canvases.

    Args:
        rng: numpy random generator.
        images: digit images (N, 8, 8) in [0, 1].
        labels: their classes (N,).
        count: number of canvases.
        grid: cells per side.
        occupancy: probability that a cell holds a digit (the key's cell always does).
        match_prob: probability that a non-key digit has the key's class.
        task: ``"key"``, or ``"majority"``: two classes per canvas, ``round(occupancy · cells)``
            digits split as unevenly as ⌊m/2⌋+1 or +2 vs the rest, the mask channel left empty,
            labels 1 for the majority class and 2 for the minority.

    Returns:
        :class:`Canvases` of side 8·grid.
    """
    cells = grid * grid
    if task == "majority":
        classes, occupied, cell_label, mask = _majority_cells(rng, count, cells, occupancy)
    else:
        classes, occupied, cell_label, mask = _key_cells(rng, count, cells, occupancy, match_prob)
    index = _sample_images(rng, labels, classes)
    return _render(images[index] * occupied[..., None, None], mask, cell_label, classes, grid)


_Cells = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Per cell (count, cells): digit class, occupied, label (1 or 2), mask channel value."""


def _key_cells(
    rng: np.random.Generator, count: int, cells: int, occupancy: float, match_prob: float
) -> _Cells:
    """A marked key digit per canvas; label 1 for the digits of its class, 2 otherwise."""
    key_class = rng.integers(0, 10, count)
    other = (key_class[:, None] + rng.integers(1, 10, (count, cells))) % 10
    classes = np.where(rng.random((count, cells)) < match_prob, key_class[:, None], other)
    occupied = rng.random((count, cells)) < occupancy
    key_cell = rng.integers(0, cells, count)
    rows = np.arange(count)
    occupied[rows, key_cell] = True
    classes[rows, key_cell] = key_class
    key_mask = np.zeros((count, cells), dtype=np.float32)
    key_mask[rows, key_cell] = 1.0
    return classes, occupied, np.where(classes == key_class[:, None], 1, 2), key_mask


def _majority_cells(rng: np.random.Generator, count: int, cells: int, occupancy: float) -> _Cells:
    """Two classes per canvas; label 1 for the digits of the more frequent class, 2 otherwise."""
    digits = max(3, round(occupancy * cells))
    major = np.minimum(digits // 2 + 1 + rng.integers(0, 2, count), digits - 1)  # (count,)
    first = rng.integers(0, 10, count)
    second = (first + rng.integers(1, 10, count)) % 10
    rank = rng.random((count, cells)).argsort(axis=1).argsort(axis=1)  # random order of cells
    is_major = rank < major[:, None]
    classes = np.where(is_major, first[:, None], second[:, None])
    empty_mask = np.zeros((count, cells), dtype=np.float32)
    return classes, rank < digits, np.where(is_major, 1, 2), empty_mask


def _sample_images(rng: np.random.Generator, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Index of a random image of each requested class, same shape as ``classes``."""
    index = np.empty(classes.shape, dtype=np.int64)
    for c in range(10):
        where = classes == c
        index[where] = rng.choice(np.flatnonzero(labels == c), int(where.sum()))
    return index


def _render(
    cell_images: np.ndarray,
    cell_mask: np.ndarray,
    cell_label: np.ndarray,
    cell_class: np.ndarray,
    grid: int,
) -> Canvases:
    """Tiles (count, cells, 8, 8) digits into canvases; strokes get their cell's labels."""
    count = cell_images.shape[0]
    side = grid * _DIGIT

    def tile(per_cell: np.ndarray) -> np.ndarray:  # (count, cells) → (count, H, W)
        per_pixel = np.broadcast_to(per_cell[..., None, None], cell_images.shape)
        blocks = per_pixel.reshape(count, grid, grid, _DIGIT, _DIGIT).transpose(0, 1, 3, 2, 4)
        return blocks.reshape(count, side, side)

    blocks = cell_images.reshape(count, grid, grid, _DIGIT, _DIGIT).transpose(0, 1, 3, 2, 4)
    canvas = blocks.reshape(count, side, side)
    stroke = canvas > _STROKE
    return Canvases(
        np.stack([canvas, tile(cell_mask)], axis=1).astype(np.float32),
        np.where(stroke, tile(cell_label), 0).astype(np.int64),
        np.where(stroke, tile(cell_class), -1).astype(np.int64),
    )
