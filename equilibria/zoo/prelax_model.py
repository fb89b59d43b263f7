"""Model, views and losses of the ``prelax`` recipe (:mod:`equilibria.zoo.prelax`).

Three self-supervised objectives on one small encoder, all in SimSiam's form (Chen & He, CVPR
2021): an encoder f (a small conv net, then a projection MLP) maps a view to z, a predictor MLP g
maps z to p, and D(p, z) = -cos(p, stopgrad(z)).

* ``simsiam``: two standard views x1, x2 of an image;
  L = ½ D(p1, z2) + ½ D(p2, z1).
* ``simsiam_rotation``: the same loss with the second view also rotated by k·90°, k uniform in
  {0, 1, 2, 3}: rotation as one more plain augmentation, aligned exactly.
* ``prelax`` (Pretext-aware Residual Relaxation; Wang, Geng, Jiang, Li, Wang, Yang & Lin,
  "Residual Relaxation for Multi-view Representation Learning", NeurIPS 2021, §3): a third view
  x3 = rot_k(x2) and the residual r = z3 − z2 between the representations of the rotated view
  and the view it was rotated from. The two standard views are aligned exactly (the similarity
  term); the original view is aligned with the rotated one only up to the residual (the relaxed
  alignment); the residual must predict the rotation (the pretext-aware term, a small classifier
  h over the 4 angles):

      L = ½ D(p1, z2) + ½ D(p2, z1)                       (similarity, standard views)
        + α (½ D(p1 + r, z3) + ½ D(p3 − r, z1))           (residual-relaxed alignment)
        + γ CE(h(r), k)                                    (pretext-aware residual)

  so the rotation's semantic shift is carried by r instead of being forced to zero. The three
  terms follow the structure of the paper's §3 (exact alignment of the standard views, alignment
  relaxed by the residual, the residual predicting the pretext); the symmetrised form is this
  recipe's choice, and the weights (the recipe's defaults α = 0.3, γ = 0.1) were chosen on a
  validation split carved from the training images (``docs/recipes/prelax.md``).

Every view goes through the network on its own, so batch normalisation takes its statistics per
view, as in SimSiam's reference code (with the three views in one batch the rotated images
entered the statistics of the standard views). A shifted view takes the background value in the
pixels shifted in (the digits are standardised, so the background is about −0.81, not 0).

Evaluation (:meth:`equilibria.zoo.prelax.PrelaxTask.evaluate`), on the encoder features of the
unaugmented images: a linear probe (multinomial logistic regression on standardised features)
with all training labels, with the first 10 labels per class, and with a few random labels per
class (mean over 10 labelled subsets); a cosine kNN classifier; how much orientation the features
keep (a probe telling the four rotations apart) and how invariant they are (the digit probe on
rotated images); for Prelax also the accuracy of h at predicting each of the four rotations of
every held-out image from r. On these digits a randomly initialised encoder already reaches
about 95% with the full probe and the kNN, so the few-label probe separates methods most.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_int
from .digits_model import shift_images

Method = Literal["simsiam", "simsiam_rotation", "prelax"]
METHODS = ("simsiam", "simsiam_rotation", "prelax")
ROTATIONS = 4  # multiples of 90 degrees


# ----------------------------------------------------------------------------------------------
# Views


def rotate(images: Tensor, k: Tensor) -> Tensor:
    """Rotates image i of (B, 1, H, W) by k[i]·90° counter-clockwise (H = W)."""
    out = images.clone()
    for quarter in range(1, ROTATIONS):
        mask = k == quarter
        if bool(mask.any()):
            out[mask] = torch.rot90(images[mask], quarter, dims=(-2, -1))
    return out


def standard_view(images: Tensor, gen: torch.Generator, *, noise: float, erase: float) -> Tensor:
    """A standard augmentation of (B, 1, 8, 8) standardised digits: a shift of up to one pixel
    (the pixels shifted in take the image's background value, its minimum), a random contrast in
    [0.7, 1.3] about the background, Gaussian noise of std ``noise`` and each pixel dropped (set
    to the background value) with probability ``erase``."""
    b = images.shape[0]
    shifts = torch.randint(0, 3, (b, 2), generator=gen)
    background = images.amin(dim=(1, 2, 3), keepdim=True)
    # shift_images pads with 0, which in standardised digits is a grey stroke (the background
    # is about -0.81): shift the image's offset from its background instead
    out = shift_images(images - background, shifts) + background
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.7, 1.3, generator=gen)
    out = background + contrast * (out - background)
    out = out + noise * torch.randn(out.shape, generator=gen)
    keep = torch.rand(out.shape, generator=gen) >= erase
    return torch.where(keep, out, background.expand_as(out))


# ----------------------------------------------------------------------------------------------
# Model


class Encoder(nn.Module):
    """A small conv net for 8×8 digits: (B, 1, 8, 8) → features (B, feat)."""

    def __init__(self, width: int, feat: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),  # 8×8 → 4×4
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(16 * width, feat, bias=False),
            nn.BatchNorm1d(feat),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _mlp(dims: tuple[int, ...], *, last_bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last or last_bn:
            layers.append(nn.BatchNorm1d(b))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PrelaxNet(nn.Module):
    """Encoder + projector (f), predictor (g) and the rotation head on the residual (h).

    Every method has the same modules (the baselines leave h untrained), so the compared models
    have the same size.
    """

    def __init__(self, width: int = 32, feat: int = 128, dim: int = 64, hidden: int = 32) -> None:
        super().__init__()
        self.encoder = Encoder(width, feat)
        self.projector = _mlp((feat, feat, dim), last_bn=True)
        self.predictor = _mlp((dim, hidden, dim), last_bn=False)
        self.rotation_head = _mlp((dim, dim, ROTATIONS), last_bn=False)

    def forward(self, x: Tensor) -> Tensor:
        """Encoder features (B, feat): what the linear probe sees."""
        return self.encoder(x)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, p) of a batch of views: projection (B, dim) and prediction (B, dim)."""
        z = self.projector(self.encoder(x))
        return z, self.predictor(z)


# ----------------------------------------------------------------------------------------------
# Losses


def neg_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = −cos(p, stopgrad(z)), averaged over the batch."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(net: PrelaxNet, x1: Tensor, x2: Tensor) -> Tensor:
    """½ D(p1, z2) + ½ D(p2, z1), each view through the network on its own (batch-norm
    statistics per view, as in SimSiam's reference code)."""
    (z1, p1), (z2, p2) = net.project(x1), net.project(x2)
    return 0.5 * (neg_cosine(p1, z2) + neg_cosine(p2, z1))


def prelax_loss(
    net: PrelaxNet, x1: Tensor, x2: Tensor, k: Tensor, *, alpha: float, gamma: float
) -> tuple[Tensor, dict[str, float]]:
    """The Prelax objective (see the module docstring) for x3 = rot_k(x2).

    Returns the loss and its terms (``sim``, ``pra``, ``pal``) and the training rotation accuracy.
    """
    x3 = rotate(x2, k)
    # each view on its own, as in simsiam_loss: the rotated images do not enter the batch-norm
    # statistics of the standard views
    (z1, p1), (z2, p2), (z3, p3) = net.project(x1), net.project(x2), net.project(x3)
    residual = z3 - z2  # (B, dim): the representation shift the rotation causes
    sim = 0.5 * (neg_cosine(p1, z2) + neg_cosine(p2, z1))
    pra = 0.5 * (neg_cosine(p1 + residual, z3) + neg_cosine(p3 - residual, z1))
    logits = net.rotation_head(residual)
    pal = F.cross_entropy(logits, k)
    terms = {
        "sim": float(sim.detach()),
        "pra": float(pra.detach()),
        "pal": float(pal.detach()),
        "rot_acc": float((logits.argmax(1) == k).double().mean()),
    }
    return sim + alpha * pra + gamma * pal, terms


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def features(net: PrelaxNet, images: Tensor, batch: int = 512) -> Tensor:
    """Encoder features of ``images`` in eval mode, (N, feat)."""
    net.eval()
    return torch.cat([net(images[i : i + batch]) for i in range(0, len(images), batch)])


def linear_probe(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor
) -> float:
    """Held-out accuracy of multinomial logistic regression (L2, C = 1) on features
    standardised with the training statistics."""
    from sklearn.linear_model import LogisticRegression

    a = train_feats.double().cpu().numpy()
    b = test_feats.double().cpu().numpy()
    mean, std = a.mean(0), a.std(0) + 1e-8
    clf = LogisticRegression(max_iter=2000)
    clf.fit((a - mean) / std, train_labels.cpu().numpy())
    return float(np.mean(clf.predict((b - mean) / std) == test_labels.cpu().numpy()))


def few_label_indices(labels: Tensor, per_class: int) -> Tensor:
    """Indices of the first ``per_class`` images of every class (a fixed labelled subset; a class
    with fewer images keeps all of its own).

    Raises:
        TypeError, ValueError: if ``per_class`` is not an int >= 1 (0 returned an empty index
            tensor, a probe on no labels; ``True`` was taken as 1).
    """
    check_int("per_class", per_class, minimum=1)
    picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique()]
    return torch.cat(picks)


def knn_accuracy(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, k: int = 10
) -> float:
    """Held-out accuracy of a k-nearest-neighbour classifier on cosine similarity: each test
    image takes the class with the largest summed similarity over its ``k`` most similar
    training images (no fitted parameters, so it reads the geometry of the features).

    Raises:
        TypeError, ValueError: if ``k`` is not an int >= 1 (``k=0`` left every vote at zero and
            returned the share of class 0 as an accuracy).
    """
    check_int("k", k, minimum=1)
    a = F.normalize(train_feats.double(), dim=1)
    b = F.normalize(test_feats.double(), dim=1)
    sim, idx = (b @ a.T).topk(min(k, a.shape[0]), dim=1)
    classes = int(train_labels.max()) + 1
    votes = torch.zeros(b.shape[0], classes, dtype=sim.dtype)
    votes.scatter_add_(1, train_labels[idx], sim)
    return float((votes.argmax(1) == test_labels).double().mean())


def random_label_subsets(labels: Tensor, per_class: int, draws: int, seed: int = 0) -> list[Tensor]:
    """``draws`` labelled subsets of ``per_class`` images of every class, drawn without
    replacement from a generator seeded by ``seed`` (the same subsets for every model).

    Raises:
        ValueError: if a class has fewer than ``per_class`` images (the subset would silently
            hold all of them, and the "few-label" probe become the full one for that class).
        TypeError, ValueError: if ``per_class`` or ``draws`` is not an int >= 1, or ``seed`` not
            an int in [0, 2**63 - 1].
    """
    check_int("per_class", per_class, minimum=1)
    check_int("draws", draws, minimum=1)
    check_int("seed", seed, minimum=0, maximum=2**63 - 1)
    classes, counts = labels.unique(return_counts=True)
    if per_class > int(counts.min()):
        smallest = int(counts.argmin())
        raise ValueError(
            f"per_class must be <= {int(counts.min())}, the images of the smallest class "
            f"({int(classes[smallest])}), got {per_class}"
        )
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        picks = []
        for c in labels.unique():
            members = torch.nonzero(labels == c).flatten()
            picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
        out.append(torch.cat(picks))
    return out


def few_label_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    per_class: int,
    draws: int,
) -> float:
    """Mean held-out accuracy of :func:`linear_probe` trained on ``draws`` random subsets of
    ``per_class`` labelled images per class (averaging the draws keeps the choice of the few
    labels from dominating the comparison)."""
    subsets = random_label_subsets(train_labels, per_class, draws)
    accs = [linear_probe(train_feats[s], train_labels[s], test_feats, test_labels) for s in subsets]
    return float(np.mean(accs))


@torch.no_grad()
def orientation_probe(net: PrelaxNet, train_images: Tensor, test_images: Tensor) -> float:
    """How much of the orientation the encoder features keep: a linear probe trained to tell
    k ∈ {0, 1, 2, 3} from the features of the training images rotated by k·90°, scored on the
    held-out images' four rotations (chance 25%; an encoder made rotation-invariant scores
    near chance, which is what exact alignment of rotated views asks for)."""

    def rotations(images: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.arange(ROTATIONS).repeat_interleave(images.shape[0])
        return features(net, rotate(images.repeat(ROTATIONS, 1, 1, 1), k)), k

    (a, ka), (b, kb) = rotations(train_images), rotations(test_images)
    return linear_probe(a, ka, b, kb)


@torch.no_grad()
def rotated_probe(
    net: PrelaxNet,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
) -> float:
    """Digit accuracy on rotated held-out images (each rotated by 90°, 180° and 270°) of a linear
    probe trained on the upright training images: how rotation-invariant the features are."""
    n = test_images.shape[0]
    k = torch.arange(1, ROTATIONS).repeat_interleave(n)
    rotated = rotate(test_images.repeat(ROTATIONS - 1, 1, 1, 1), k)
    return linear_probe(
        features(net, train_images),
        train_labels,
        features(net, rotated),
        test_labels.repeat(ROTATIONS - 1),
    )


@torch.no_grad()
def rotation_accuracy(net: PrelaxNet, images: Tensor) -> float:
    """Accuracy of h(z(rot_k x) − z(x)) at predicting k, over every image and k ∈ {0, 1, 2, 3}."""
    net.eval()
    n = images.shape[0]
    k = torch.arange(ROTATIONS).repeat_interleave(n)
    base = images.repeat(ROTATIONS, 1, 1, 1)
    z, _ = net.project(torch.cat([base, rotate(base, k)]))
    z_base, z_rot = z.chunk(2)
    pred = net.rotation_head(z_rot - z_base).argmax(1)
    return float((pred == k).double().mean())
