"""Align a user's face images by their five landmarks, as ArcFace models expect their input: each face moved by a
least-squares similarity onto insightface's reference points and cropped square (data/landmarks.py).

    python -m arcface_lightning.align faces.csv aligned/ [--size 112] [--channels 3]

`faces.csv` has one row per image, `path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5` (an optional header row of those names):
the left eye, right eye, nose tip, left and right mouth corners as a detector gives them (RetinaFace, MTCNN, SCRFD),
in the image's pixels; paths relative to the CSV's folder. Each crop is written as PNG under `aligned/` at the same
relative path (`alice/001.jpg` → `aligned/alice/001.png`), so a folder of class folders stays one:
`data=image_folder data.root=aligned/` trains on it. The whole CSV and every image path are checked before any image
is read; the output folder must not exist, and is written beside its name and renamed when complete.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from arcface_lightning.core.checks import DataError, OneLineParser, Terminated, first_line
from arcface_lightning.core.writing import sigterm_raises
from arcface_lightning.data.files import pixels, read_bytes
from arcface_lightning.data.landmarks import align_channels_first

COLUMNS = ["path", *(f"{axis}{i}" for i in range(1, 6) for axis in "xy")]


def read_faces(path: Path) -> list[tuple[str, np.ndarray]]:
    """(image path, (5, 2) landmarks) per row; one line naming the row of the first problem."""
    if not path.is_file():
        raise DataError(f"{path} is not a file; allowed: a CSV of {','.join(COLUMNS)} rows")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows and [cell.strip() for cell in rows[0]] == COLUMNS:
        rows = rows[1:]
        first = 2
    else:
        first = 1
    faces = []
    for number, row in enumerate(rows, first):
        if not any(cell.strip() for cell in row):
            continue
        try:
            if len(row) != len(COLUMNS):
                raise ValueError
            points = np.array([float(cell) for cell in row[1:]]).reshape(5, 2)
            if not np.isfinite(points).all():
                raise ValueError
        except ValueError:
            raise DataError(f"{path} line {number} is {','.join(row)[:80]!r}; allowed: {','.join(COLUMNS)} with "
                            "finite numbers") from None  # fmt: skip
        image = row[0].strip()
        faces.append((image if os.path.isabs(image) else str(path.parent / image), points))
    if not faces:
        raise DataError(f"{path} lists no faces")
    if missing := [image for image, _ in faces if not os.path.isfile(image)]:
        raise DataError(f"{path} names {len(missing)} missing image(s), the first {missing[0]}")
    return faces


def align_all(source: Path, output: Path, size: int = 112, channels: int = 3) -> int:
    """Align every face of `source` into `output` (written as `<output>.partial`, renamed when whole)."""
    if output.exists():
        raise DataError(f"{output} exists; allowed: a folder that does not exist yet")
    faces = read_faces(source)
    partial = output.with_name(f"{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    root = source.parent.resolve()
    try:
        with sigterm_raises():
            for image_path, points in faces:
                image = pixels(read_bytes(image_path), channels, image_path)
                crop = align_channels_first(image, points, size)
                crop = crop[0] if channels == 1 else crop.transpose(1, 2, 0)  # what Pillow writes
                resolved = Path(image_path).resolve()
                relative = resolved.relative_to(root) if resolved.is_relative_to(root) else Path(resolved.name)
                target = (partial / relative).with_suffix(".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(crop).save(target)
            os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return len(faces)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: an integer ≥ 1")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(
        prog="python -m arcface_lightning.align",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("faces", type=Path, help="CSV of path,x1,y1,...,x5,y5 rows (five landmarks per image)")
    parser.add_argument("output", type=Path, help="the folder of aligned PNG crops (must not exist)")
    parser.add_argument("--size", type=positive, default=112, help="the square crop's side (default 112)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="grey (1) or RGB (3) crops")
    args = parser.parse_args(argv)
    try:
        count = align_all(args.faces, args.output, args.size, args.channels)
    except DataError as error:
        raise SystemExit(f"error: {first_line(error)}") from None
    except (KeyboardInterrupt, Terminated):  # SIGTERM: writing.sigterm_raises; the partial folder is gone
        print(f"error: interrupted; nothing written to {args.output}", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"aligned {count} faces into {args.output}")


if __name__ == "__main__":
    main()
