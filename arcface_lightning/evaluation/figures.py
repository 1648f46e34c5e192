"""Figures of the embedding space (matplotlib): what the margin does to the angles.

- angle_figure: for each embedding, the angle to its own class centre against the angle to the nearest other centre
  (histograms, degrees), beside the angles between class centres. The margin's job is to push the first left and
  the second right.
- sphere_figure: 2-D or 3-D embeddings on the unit circle / sphere with the class centres (the ArcFace and
  SphereFace papers' MNIST pictures).

Figures are built with matplotlib's object API (`Figure`, no pyplot): no global backend is chosen or changed, no
figure is registered anywhere (nothing to close, no leak over a long run), and a notebook shows them inline.
"""

from __future__ import annotations

import math

import matplotlib
import torch
from matplotlib.figure import Figure

from arcface_lightning.models.heads import cosine_similarity, normalize


def class_angles(embeddings: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Degrees from each embedding to its own class centre and to the nearest other centre."""
    cos = cosine_similarity(embeddings, centres).clamp(-1, 1)
    own = cos.gather(1, labels[:, None]).squeeze(1)
    others = cos.scatter(1, labels[:, None], -2.0).max(1).values
    return torch.rad2deg(torch.acos(own)), torch.rad2deg(torch.acos(others))


def angle_figure(own: torch.Tensor, nearest_other: torch.Tensor, centres: torch.Tensor, title: str = "") -> Figure:
    """Histograms of `class_angles`' two outputs, beside the angles between the class centres."""
    between = torch.rad2deg(torch.acos(cosine_similarity(centres, centres).clamp(-1, 1)))
    fig = Figure(figsize=(11, 4), dpi=100)
    left, right = fig.subplots(1, 2)
    bins = torch.linspace(0, 180, 91).tolist()
    left.hist(own.tolist(), bins=bins, alpha=0.7, label="to own class centre")
    left.hist(nearest_other.tolist(), bins=bins, alpha=0.7, label="to nearest other centre")
    left.set_xlabel("angle (degrees)")
    left.set_ylabel("embeddings")
    left.legend()
    left.set_title(title or "angles of embeddings to class centres")
    image = right.imshow(between.numpy(), cmap="viridis", vmin=0, vmax=180)
    fig.colorbar(image, ax=right, label="degrees")
    right.set_title("angles between class centres")
    right.set_xlabel("class")
    right.set_ylabel("class")
    fig.tight_layout()
    return fig


def sphere_figure(embeddings: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, title: str = "") -> Figure:
    """Unit-normalised 2-D or 3-D embeddings coloured by class, class centres as arrows."""
    dim = embeddings.shape[1]
    if dim not in (2, 3):
        raise ValueError(f"sphere_figure needs embedding_size 2 or 3, got {dim}")
    x, w = normalize(embeddings.float()).numpy(), normalize(centres.float()).numpy()
    fig = Figure(figsize=(6, 6), dpi=100)
    ax = fig.add_subplot(projection="3d" if dim == 3 else None)
    colours = matplotlib.colormaps["tab10"]
    for c in range(len(w)):
        points = x[labels.numpy() == c]
        ax.scatter(*points.T, s=2, color=colours(c % 10), label=str(c), alpha=0.5)
        ax.plot(*zip([0.0] * dim, w[c] * 1.15, strict=True), color=colours(c % 10), linewidth=2)
    if dim == 2:
        t = torch.linspace(0, 2 * math.pi, 200)
        ax.plot(torch.cos(t).numpy(), torch.sin(t).numpy(), color="gray", linewidth=0.5)
        ax.set_aspect("equal")
    ax.legend(markerscale=5, fontsize=7, loc="upper right")
    ax.set_title(title or f"test embeddings on the unit {'circle' if dim == 2 else 'sphere'}")
    fig.tight_layout()
    return fig
