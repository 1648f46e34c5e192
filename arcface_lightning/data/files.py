"""A user's image files: found (a folder per class, or a CSV list of `path,label` rows) and decoded to uint8 arrays
of the model's channels and size. NumPy and Pillow only: the serving commands (verify, search, embed with an export)
decode PNGs without importing torch; the datasets over these files live in images.py.

- `scan_folder(root)`: torchvision's ImageFolder layout, `<root>/<class>/**/<image>`. Class ids follow the sorted
  class-folder names; files are read in sorted order, so the same folder always gives the same ids and samples.
- `read_list(file)`: rows `path,label` (an optional `path,label` header), paths relative to the list's folder,
  integer labels. Class ids follow the sorted distinct labels (labels 0..K-1 keep their values).
- `decode`: encoded bytes → exactly `in_channels` channels, whatever the file holds (grayscale, grayscale + alpha,
  palette, RGB, RGBA, CMYK; 8 or 16 bits): alpha is dropped, grayscale is repeated for RGB, and colour becomes
  grayscale by Pillow's `convert("L")` rule (ITU-R 601-2 luma, rounded), except that a JPEG's own luma plane is
  decoded (faster; what Pillow gives with `draft("L")`). JPEG, GIF and WebP are decoded by torchvision.io (imported
  there: it brings torch and torchvision.models); PNG by Pillow, because torchvision.io's PNG decoder crashes the
  process (SIGSEGV, no exception) on a corrupt PNG (libpng's error jump, torchvision 0.29).
- `fit`: resized on the shorter side (bilinear, antialiased) and centre-cropped. The resize is ATen's uint8 kernel
  (the one torchvision's `resize` runs on x86 CPUs with AVX2 or AVX512) redone in integer NumPy: the same taps, the
  same 16-bit fixed-point weights and rounding, horizontal pass first. It gives the same pixels on every machine,
  where torchvision gives one grey level more or less here and there on CPUs that take its float32 path; a test
  holds it equal to torchvision's resize + center_crop where ATen has the kernel.

What is wrong with the data is said in one line (`DataError`): a missing root, a root with no class folders or no
images, a list row without two fields, a label that is not an integer, a list naming a missing file, an image that
does not decode. A class folder with no images is skipped and files that are not images (by suffix) are ignored;
both are counted in `ImageIndex.notes` for the log.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from arcface_lightning.core.checks import DataError, first_line

log = logging.getLogger(__name__)

# what decode reads; any other file in a class folder is not an image
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp"})
PNG_SIGNATURE, JPEG_SIGNATURE = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
# ITU-R 601-2 luma in 16-bit fixed point, rounded: Pillow's convert("L"), which PNGs get, so every format agrees;
# exact for grey pixels (r = g = b), where torchvision's rgb_to_grayscale truncates (white becomes 254)
LUMA = (19595, 38470, 7471)


@dataclass
class ImageIndex:
    """Which files, with which class ids; `classes[i]` is the name of class id i."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # what was skipped or ignored, for the log
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of each file that does not decode


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def scan_folder(root: Path, key: str = "data.root") -> ImageIndex:
    """Index `<root>/<class>/**/<image>`: classes in sorted name order, files in sorted path order."""
    if not root.is_dir():
        raise DataError(f"{key}={root} is not a folder; give a folder with one sub-folder of images per class")
    class_dirs = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not class_dirs:
        raise DataError(f"{key}={root} has no class sub-folders; expected {root}/<class>/<images> (ImageFolder)")
    paths: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    empty: list[str] = []
    ignored = 0
    for name in class_dirs:
        found = []
        for folder, _, files in os.walk(root / name, followlinks=True):
            images = [f for f in files if is_image(f)]
            ignored += len(files) - len(images)
            found += [os.path.join(folder, f) for f in images]
        if not found:
            empty.append(name)
            continue
        paths += sorted(found)
        labels += [len(classes)] * len(found)
        classes.append(name)
    if not classes:
        raise DataError(f"{key}={root} has no images in its class folders (read: {', '.join(sorted(IMAGE_SUFFIXES))})")
    notes = []
    if empty:
        notes.append(f"{len(empty)} class folder(s) with no images skipped (first: {empty[0]})")
    if ignored:
        notes.append(f"{ignored} file(s) that are not images ignored")
    return ImageIndex(paths, labels, classes, notes)


def read_list(path: Path, key: str = "data.root") -> ImageIndex:
    """Index a CSV list of `path,label` rows; paths relative to the list's folder, labels integers."""
    if not path.is_file():
        raise DataError(f"{key}={path} is not a file; give a CSV list of path,label rows")
    base = path.parent
    rows: list[tuple[str, int]] = []
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or (line == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{line}: expected path,label, got {len(row)} field(s): {','.join(row)!r}")
            try:
                label = int(row[1])
            except ValueError:
                raise DataError(f"{path}:{line}: label {row[1]!r} is not an integer") from None
            rows.append((os.path.join(base, row[0].strip()), label))
    if not rows:
        raise DataError(f"{key}={path} lists no images")
    missing = [p for p, _ in rows if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{key}={path} names {len(missing)} missing file(s), the first {missing[0]}")
    distinct = sorted({label for _, label in rows})
    ids = {label: i for i, label in enumerate(distinct)}
    return ImageIndex([p for p, _ in rows], [ids[label] for _, label in rows], [str(label) for label in distinct])


# data.dataset → the reader of data.root: a folder of class folders, or a CSV list
SOURCES = {"image_folder": scan_folder, "image_list": read_list}


def match_classes(index: ImageIndex, classes: list[str], where: str) -> ImageIndex:
    """A test set's index with the training pool's class ids, matched by class name."""
    ids = {name: i for i, name in enumerate(classes)}
    if unknown := [name for name in index.classes if name not in ids]:
        raise DataError(
            f"data.test_root={where} has {len(unknown)} class(es) the training data lacks (first: {unknown[0]}); "
            "a closed-set test needs the same classes"
        )
    labels = [ids[index.classes[label]] for label in index.labels]
    return ImageIndex(index.paths, labels, list(classes), index.notes, index.skipped)


def io_message(error: BaseException) -> str:
    """A decoder's error in one line: torchvision.io's without the C++ source location it starts with
    (`decode_image, <file>.cpp:37, `) and its advice to call its AVIF/HEIC decoders, Pillow's without the
    in-memory file object it names."""
    noise = r"^\w+, \S+\.cpp:\d+, | For avif and heic .*$| <_io\.BytesIO object at 0x[0-9a-f]+>"
    return re.sub(noise, "", first_line(error))


def read_image(path: str, in_channels: int, image_size: int) -> np.ndarray:
    """One file → uint8 (in_channels, image_size, image_size): decoded, converted, resized, centre-cropped."""
    return fit(pixels(read_bytes(path), in_channels, path), image_size)


def read_bytes(path: str) -> bytes:
    """A file's bytes; a missing or unreadable file is one line naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except Exception as error:
        if not os.path.isfile(path):
            raise DataError(f"no such image file: {path}") from None
        raise DataError(f"unreadable image {path}: {io_message(error)}") from error


def decode(data: bytes | np.ndarray, in_channels: int, image_size: int, name: str) -> np.ndarray:
    """Encoded image bytes (or a uint8 1-D array of them) → uint8 (in_channels, image_size, image_size). `name` is
    for the error."""
    return fit(pixels(data, in_channels, name), image_size)


def pixels(data: bytes | np.ndarray, in_channels: int, name: str) -> np.ndarray:
    """Encoded image bytes → uint8 (in_channels, H, W) at the file's own size; one line naming `name` if they do
    not decode."""
    data = data if isinstance(data, bytes) else np.asarray(data, dtype=np.uint8).tobytes()
    if not data:
        raise DataError(f"unreadable image {name}: the file is empty")
    try:
        if data.startswith(PNG_SIGNATURE):
            image = decode_png(data, in_channels)
        else:  # GIF and WebP ignore a grayscale mode (RGB it is, then luma); a JPEG's own luma plane is decoded alone
            import torch  # here: torchvision takes seconds to import, and PNGs need neither
            from torchvision.io import ImageReadMode, decode_image

            gray = in_channels == 1 and data.startswith(JPEG_SIGNATURE)
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            decoded = decode_image(encoded, mode=ImageReadMode.GRAY if gray else ImageReadMode.RGB)
            image = (decoded[0] if decoded.ndim == 4 else decoded).numpy()  # an animated GIF: its first frame
    except Exception as error:  # torchvision raises RuntimeError; Pillow OSError, SyntaxError, ValueError, ...
        raise DataError(f"unreadable image {name}: {io_message(error)}") from error
    return to_channels(image, in_channels)


def decode_png(data: bytes, in_channels: int) -> np.ndarray:
    """A PNG through Pillow, as uint8 (1 or 3, H, W): grayscale for a 1-channel model, else RGB."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        if image.mode.startswith("I"):  # 16-bit grayscale: its high byte (Pillow's convert("L") would clip)
            array = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        else:
            image.info.pop("transparency", None)  # alpha is dropped, as for RGBA; Pillow warns about it otherwise
            array = np.array(image.convert("L" if in_channels == 1 else "RGB"))
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def to_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """uint8 (1 or 3, H, W) → (in_channels, H, W): grayscale repeated for RGB, RGB reduced to luma."""
    if image.shape[0] == in_channels:
        return image
    if in_channels == 3:
        return np.repeat(image, 3, axis=0)
    luma = (image.astype(np.int32) * np.array(LUMA, dtype=np.int32).reshape(3, 1, 1)).sum(0, keepdims=True)
    return ((luma + (1 << 15)) >> 16).astype(np.uint8)


def fit(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resized on the shorter side, then centre-cropped to image_size × image_size (untouched at that size): uint8
    (C, H, W) in and out, torchvision's `center_crop(resize(image, image_size, antialias=True), image_size)`
    (bilinear; ATen's uint8 kernel, see the module's docstring)."""
    if image.shape[-2:] == (image_size, image_size):
        return image
    image = resize_shorter(image, image_size)
    top = round((image.shape[-2] - image_size) / 2.0)  # torchvision's crop anchor (round half to even)
    left = round((image.shape[-1] - image_size) / 2.0)
    return np.ascontiguousarray(image[..., top : top + image_size, left : left + image_size])


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (C, H, W) with its shorter side resized to `size` and the longer one to int(size · long / short),
    bilinear with antialiasing: torchvision's `resize(image, size)` output-size rule and ATen's uint8 kernel."""
    channels, height, width = image.shape
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_height, new_width = (new_long, new_short) if width <= height else (new_short, new_long)
    if image.size == 0:
        return np.zeros((channels, new_height, new_width), np.uint8)
    if new_width != width:  # ATen resizes the width first; the rounded uint8 in between makes the order matter
        rows = np.ascontiguousarray(image.transpose(2, 0, 1)).reshape(width, -1)
        image = resample_rows(rows, new_width).reshape(new_width, channels, height).transpose(1, 2, 0)
    if new_height != height:
        rows = np.ascontiguousarray(image.transpose(1, 0, 2)).reshape(height, -1)
        image = resample_rows(rows, new_height).reshape(new_height, channels, new_width).transpose(1, 0, 2)
    return np.ascontiguousarray(image)


def resample_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, m) → (size, m): each output row a fixed-point weighted sum of neighbouring input rows."""
    first, weights, precision = bilinear_taps(len(rows), size)
    total = np.full((size, rows.shape[1]), 1 << (precision - 1), dtype=np.int32)  # + ½ in fixed point: rounding
    for k in range(weights.shape[1]):  # taps past a row's count have weight 0; the index is only kept in range
        total += rows[np.minimum(first + k, len(rows) - 1)] * weights[:, k : k + 1]
    return np.clip(total >> precision, 0, 255).astype(np.uint8)


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Antialiased bilinear resampling from in_size to out_size as ATen computes it for uint8 images (float64 triangle
    filter widened by the down-scaling factor, normalised to sum 1, then scaled to 16-bit integers with as many
    fraction bits as the largest weight allows): (first input index (out,), int32 weights (out, taps), bits)."""
    scale = in_size / out_size
    support, inverse = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # truncation toward zero, as C++'s cast
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(int(count.max()))
    x = (taps + first[:, None] - center[:, None] + 0.5) * inverse
    weights = np.where(taps < count[:, None], np.maximum(0.0, 1.0 - np.abs(x)), 0.0)
    total = np.zeros(out_size)
    for k in taps:  # summed in tap order, as ATen does: the rounding below sees the same float64 values
        total += weights[:, k]
    weights = weights / np.where(total == 0, 1.0, total)[:, None]
    largest, precision = weights.max(), 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < 1 << 15:
        precision += 1
    return first, (0.5 + weights * (1 << precision)).astype(np.int32), precision
