"""Pair lists for verification (LFW, CFP-FP, AgeDB are all pair lists): which two images, same identity or not.

Two formats, paths relative to the list's folder:
- CSV rows `path_a,path_b,same` (an optional `path_a,path_b,same` header; same is 1/0 or true/false). Folds: the
  rows in file order cut into 10 contiguous parts, as LFW's own file is laid out.
- LFW's `pairs.txt`: a header `<folds> <pairs per fold>` (or one number: the pairs of a single set, then cut into
  10 parts), then per fold that many same-identity lines `name n1 n2` and as many different-identity lines
  `name1 n1 name2 n2`; image n of `name` is `<folder>/<name>/<name>_<n:04d>.jpg` (or .png/.jpeg).

A pair naming a file that does not exist, or a row that fits neither format, is a one-line error before any work.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from arcface_lightning.data.datasets import DataError
from arcface_lightning.data.files import ImageIndex

FOLDS = 10
TRUE, FALSE = {"1", "true", "same", "yes"}, {"0", "false", "different", "no"}


@dataclass
class PairList:
    """Pairs as indices into `paths` (each image once): pair k is (paths[a[k]], paths[b[k]]), same[k], fold[k]."""

    paths: list[str]
    a: torch.Tensor
    b: torch.Tensor
    same: torch.Tensor
    fold: torch.Tensor

    def index(self) -> ImageIndex:
        """The distinct images, for images.ImageFiles; label i is image i."""
        return ImageIndex(self.paths, list(range(len(self.paths))), [str(i) for i in range(len(self.paths))])


def read_pairs(path: Path, key: str = "evaluation.pairs") -> PairList:
    """Read a pair list (CSV or LFW pairs.txt, by its first line) and check that every image exists."""
    if not path.is_file():
        raise DataError(f"{key}={path} is not a file; give a CSV of path_a,path_b,same rows or LFW's pairs.txt")
    lines = path.read_text().splitlines()
    header = lines[0].split() if lines else []
    if header and all(field.isdigit() for field in header) and len(header) <= 2:
        rows, folds = lfw_rows(path, lines)
    else:
        rows = csv_rows(path, lines)
        folds = [k * FOLDS // len(rows) for k in range(len(rows))]
    if not rows:
        raise DataError(f"{key}={path} lists no pairs")
    paths = sorted({p for a, b, _ in rows for p in (a, b)})
    if missing := [p for p in paths if not os.path.isfile(p)]:
        raise DataError(f"{key}={path} names {len(missing)} missing image(s), the first {missing[0]}")
    place = {p: i for i, p in enumerate(paths)}
    return PairList(
        paths,
        torch.tensor([place[a] for a, _, _ in rows]),
        torch.tensor([place[b] for _, b, _ in rows]),
        torch.tensor([same for _, _, same in rows]),
        torch.tensor(folds),
    )


def csv_rows(path: Path, lines: list[str]) -> list[tuple[str, str, bool]]:
    rows = []
    for number, row in enumerate(csv.reader(lines), start=1):
        if not row or (number == 1 and [c.strip().lower() for c in row] == ["path_a", "path_b", "same"]):
            continue
        same = row[2].strip().lower() if len(row) == 3 else None
        if same not in TRUE | FALSE:
            raise DataError(f"{path}:{number}: expected path_a,path_b,same (same: 1/0 or true/false), got {row!r}")
        rows.append(
            (os.path.join(path.parent, row[0].strip()), os.path.join(path.parent, row[1].strip()), same in TRUE)
        )
    return rows


def lfw_rows(path: Path, lines: list[str]) -> tuple[list[tuple[str, str, bool]], list[int]]:
    header = [int(field) for field in lines[0].split()]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) == 3 and re.fullmatch(r"\d+", fields[1]) and re.fullmatch(r"\d+", fields[2]):
            rows.append((lfw_image(path, fields[0], fields[1]), lfw_image(path, fields[0], fields[2]), True))
        elif len(fields) == 4 and fields[1].isdigit() and fields[3].isdigit():
            rows.append((lfw_image(path, fields[0], fields[1]), lfw_image(path, fields[2], fields[3]), False))
        elif fields:
            raise DataError(f"{path}:{number}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {line.strip()!r}")
    if len(header) == 2:  # <folds> <n>: each fold is n same then n different pairs
        folds, per_fold = header
        if len(rows) != 2 * folds * per_fold:
            raise DataError(f"{path}: header says {folds} folds of 2×{per_fold} pairs, the file has {len(rows)}")
        return rows, [k // (2 * per_fold) for k in range(len(rows))]
    return rows, [k * FOLDS // len(rows) for k in range(len(rows))] if rows else []


def lfw_image(path: Path, name: str, number: str) -> str:
    """LFW's naming, `<name>/<name>_0001.jpg`; .png and .jpeg for sets re-encoded by the user."""
    stem = os.path.join(path.parent, name, f"{name}_{int(number):04d}")
    return next((stem + ext for ext in (".jpg", ".png", ".jpeg") if os.path.isfile(stem + ext)), stem + ".jpg")
