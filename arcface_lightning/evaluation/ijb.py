"""The IJB-B / IJB-C 1:1 verification protocol (Whitelam et al. 2017; Maze et al. 2018), as insightface evaluates it
(recognition/_evaluation_/ijb): faces are pooled into templates, and template pairs are scored. NumPy only.

The official layout under `root` (`t` is `ijbb` or `ijbc`):
- `meta/<t>_face_tid_mid.txt`: `<image> <template id> <media id>` per face;
- `meta/<t>_name_5pts_score.txt`: `<image> x1 y1 … x5 y5 <detector score>` per face, in the same order;
- `meta/<t>_template_pair_label.txt`: `<template> <template> <1 same | 0 different>` per pair;
- `loose_crop/<image>`: the faces, to be aligned by their five landmarks.

Pooling: the faces of one media (a video's frames) are averaged, the media of a template summed, and the template
normalised. A pair's score is the cosine of its two templates. TAR at FAR f is the largest true accept rate of a
threshold t (accept: score > t) whose false accept rate is at most f; where there are fewer than 1/f negative pairs
the rate cannot be measured and is left out (null).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arcface_lightning.core.checks import DataError

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ("IJBB", "IJBC")


@dataclass
class IJBProtocol:
    """The faces (image names, their template and media ids, landmarks (N, 5, 2), detector scores) and the pairs."""

    root: Path
    names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    pairs: np.ndarray  # (P, 2) template ids
    same: np.ndarray  # (P,) bool

    def image(self, i: int) -> Path:
        return self.root / "loose_crop" / self.names[i]


def read_rows(path: Path, columns: int, key: str = "root") -> list[list[str]]:
    if not path.is_file():
        raise DataError(f"{key}: {path} is missing; allowed: the official IJB layout (meta/, loose_crop/)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise DataError(f"{key}: {path} line {number} has {len(fields)} fields; allowed: {columns}")
        rows.append(fields)
    if not rows:
        raise DataError(f"{key}: {path} is empty")
    return rows


def read_protocol(root: str | Path, target: str) -> IJBProtocol:
    """The protocol's files, checked against each other; one line naming the file and line of the first problem."""
    if target not in TARGETS:
        raise DataError(f"target={target!r} is invalid; allowed: {', '.join(TARGETS)}")
    root, t = Path(root).expanduser(), target.lower()
    meta = root / "meta"
    faces = read_rows(meta / f"{t}_face_tid_mid.txt", 3)
    points = read_rows(meta / f"{t}_name_5pts_score.txt", 12)
    pairs = read_rows(meta / f"{t}_template_pair_label.txt", 3)
    try:
        templates = np.array([int(row[1]) for row in faces])
        medias = np.array([int(row[2]) for row in faces])
        landmarks = np.array([[float(v) for v in row[1:11]] for row in points]).reshape(-1, 5, 2)
        detector = np.array([float(row[11]) for row in points])
        pair_ids = np.array([[int(row[0]), int(row[1])] for row in pairs])
        same = np.array([int(row[2]) for row in pairs])
    except ValueError as error:
        raise DataError(f"root: {meta} holds a value that is not a number ({error})") from None
    names = [row[0] for row in faces]
    if [row[0] for row in points] != names:
        listed = [row[0] for row in points]
        line = next((i for i, (a, b) in enumerate(zip(listed, names, strict=False)) if a != b), None)
        line = min(len(listed), len(names)) if line is None else line  # one list ends early
        raise DataError(f"root: {t}_name_5pts_score.txt and {t}_face_tid_mid.txt differ at line {line + 1}; "
                        "allowed: the same faces in the same order")  # fmt: skip
    if not np.isin(same, (0, 1)).all():
        raise DataError(f"root: {t}_template_pair_label.txt labels must be 0 or 1")
    unknown = np.setdiff1d(pair_ids, templates)
    if len(unknown):
        raise DataError(f"root: {t}_template_pair_label.txt names template {unknown[0]}, which has no face")
    missing = next((n for n in names if not (root / "loose_crop" / n).is_file()), None)
    if missing is not None:
        raise DataError(f"root: {root / 'loose_crop' / missing} is missing (named in {t}_face_tid_mid.txt)")
    return IJBProtocol(root, names, templates, medias, landmarks, detector, pair_ids, same.astype(bool))


def pool_templates(features: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, their unit features): per template, each media's faces averaged, the media summed, then
    normalised (float64)."""
    ids = np.unique(templates)
    pooled = np.zeros((len(ids), features.shape[1]))
    for row, template in enumerate(ids):
        mine = templates == template
        for media in np.unique(medias[mine]):
            pooled[row] += features[mine & (medias == media)].astype(np.float64).mean(0)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return ids, pooled / np.maximum(norms, 1e-12)


def pair_scores(ids: np.ndarray, pooled: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine of each pair's two templates."""
    row = {int(t): i for i, t in enumerate(ids)}
    a = pooled[[row[int(t)] for t in pairs[:, 0]]]
    b = pooled[[row[int(t)] for t in pairs[:, 1]]]
    return (a * b).sum(1)


def tar_at_far(scores: np.ndarray, same: np.ndarray, fars: tuple[float, ...] = FARS) -> dict[str, float | None]:
    """TAR at each FAR (module doc): the threshold is the k-th highest negative score, k = ⌊f · negatives⌋, and a
    pair is accepted above it. None where there are fewer than 1/f negatives."""
    negatives = np.sort(scores[~same])[::-1]
    positives = scores[same]
    out: dict[str, float | None] = {}
    for far in fars:
        k = int(np.floor(far * len(negatives) + 1e-9))  # at most k negatives may be accepted
        out[f"{far:.0e}"] = float((positives > negatives[k]).mean()) if k >= 1 and len(positives) else None
    return out


def roc_points(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR) at every distinct threshold, for the ROC figure."""
    order = np.argsort(-scores, kind="stable")
    accepted_same = np.cumsum(same[order])
    accepted_different = np.cumsum(~same[order])
    return accepted_different / max(1, (~same).sum()), accepted_same / max(1, same.sum())
