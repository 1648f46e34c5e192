"""Your own images: a folder per class, or a CSV list of `path,label` rows, decoded to the model's channels.

- `scan_folder(root)`: torchvision's ImageFolder layout, `<root>/<class>/**/<image>`. Class ids follow the sorted
  class-folder names; files are read in sorted order, so the same folder always gives the same ids and samples.
- `read_list(file)`: rows `path,label` (an optional `path,label` header), paths relative to the list's folder,
  integer labels. Class ids follow the sorted distinct labels (labels 0..K-1 keep their values).
- `ImageFiles`: the indexed files as a map-style dataset of uint8 (C, H, W) tensors, decoded in the DataLoader's
  workers, converted to `in_channels` and resized (shorter side) then centre-cropped to `image_size`.
  Normalisation and augmentation happen later, batched on the training device, as for every other source
  (datamodule.py).
- `decode`: encoded bytes → exactly `in_channels` channels, whatever the file holds (grayscale, grayscale + alpha,
  palette, RGB, RGBA, CMYK; 8 or 16 bits): alpha is dropped, grayscale is repeated for RGB, and colour becomes
  grayscale by Pillow's `convert("L")` rule (ITU-R 601-2 luma, rounded), except that a JPEG's own luma plane is
  decoded (faster; what Pillow gives with `draft("L")`). JPEG, GIF and WebP are decoded by torchvision.io; PNG by
  Pillow, because torchvision.io's PNG decoder crashes the process (SIGSEGV, no exception) on a corrupt PNG
  (libpng's error jump, torchvision 0.29).
- `fit`: resized on the shorter side (bilinear, antialiased) and centre-cropped with torch's own ops, pixel for pixel
  what torchvision's `resize` + `center_crop` give (a test holds them equal).

torchvision is imported only where a JPEG, GIF or WebP is decoded: importing any part of it imports
torchvision.models too (seconds), and PNG input (verify, search, embed with an export) needs none of it.

What is wrong with the data is said in one line (`DataError`) or, where skipping is the sensible thing, listed
once in the log:
- a missing root, a root with no class folders or no images, a list row without two fields, a label that is not an
  integer, a list naming a missing file: an error, before any training;
- a class folder with no images: skipped (no class id), reported; files that are not images (by suffix): ignored,
  counted in the same report;
- an image that cannot be decoded: skipped and listed before training. `load` decodes every indexed file once
  (in `workers` loader processes) before the split is drawn, so training, evaluation and `pack` index the same
  readable files and draw the same split; a class left with no readable image gets no class id. A file that
  breaks after that check is named in one line when the loader reads it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from arcface_lightning.checks import DataError, first_line

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


def read_image(path: str, in_channels: int, image_size: int) -> torch.Tensor:
    """One file → uint8 (in_channels, image_size, image_size): decoded, converted, resized, centre-cropped."""
    return fit(pixels(read_bytes(path), in_channels, path), image_size)


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as uint8 1-D; a missing or unreadable file is one line naming it."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    except Exception as error:
        if not os.path.isfile(path):
            raise DataError(f"no such image file: {path}") from None
        raise DataError(f"unreadable image {path}: {io_message(error)}") from error


def decode(data: torch.Tensor, in_channels: int, image_size: int, name: str) -> torch.Tensor:
    """Encoded image bytes (uint8 1-D) → uint8 (in_channels, image_size, image_size). `name` is for the error."""
    return fit(pixels(data, in_channels, name), image_size)


def pixels(data: torch.Tensor, in_channels: int, name: str) -> torch.Tensor:
    """Encoded image bytes → uint8 (in_channels, H, W) at the file's own size; one line naming `name` if they do
    not decode."""
    if data.numel() == 0:
        raise DataError(f"unreadable image {name}: the file is empty")
    head = bytes(data[: len(PNG_SIGNATURE)].tolist())
    try:
        if head == PNG_SIGNATURE:
            image = decode_png(data.numpy().tobytes(), in_channels)
        else:  # GIF and WebP ignore a grayscale mode (RGB it is, then luma); a JPEG's own luma plane is decoded alone
            from torchvision.io import ImageReadMode, decode_image  # here: torchvision takes seconds to import

            gray = in_channels == 1 and head.startswith(JPEG_SIGNATURE)
            image = decode_image(data, mode=ImageReadMode.GRAY if gray else ImageReadMode.RGB)
            image = image[0] if image.ndim == 4 else image  # an animated GIF: its first frame
    except Exception as error:  # torchvision raises RuntimeError; Pillow OSError, SyntaxError, ValueError, ...
        raise DataError(f"unreadable image {name}: {io_message(error)}") from error
    return to_channels(image, in_channels)


def decode_png(data: bytes, in_channels: int) -> torch.Tensor:
    """A PNG through Pillow, as uint8 (1 or 3, H, W): grayscale for a 1-channel model, else RGB."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        if image.mode.startswith("I"):  # 16-bit grayscale: its high byte (Pillow's convert("L") would clip)
            array = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        else:
            image.info.pop("transparency", None)  # alpha is dropped, as for RGBA; Pillow warns about it otherwise
            array = np.array(image.convert("L" if in_channels == 1 else "RGB"))
    tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def to_channels(image: torch.Tensor, in_channels: int) -> torch.Tensor:
    """uint8 (1 or 3, H, W) → (in_channels, H, W): grayscale repeated for RGB, RGB reduced to luma."""
    if image.shape[0] == in_channels:
        return image
    if in_channels == 3:
        return image.expand(3, -1, -1).contiguous()
    luma = (image.int() * torch.tensor(LUMA, dtype=torch.int32).view(3, 1, 1)).sum(0, keepdim=True)
    return ((luma + (1 << 15)) >> 16).to(torch.uint8)


def fit(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resized on the shorter side, then centre-cropped to image_size × image_size (untouched at that size): uint8
    (C, H, W) in and out, exactly torchvision's `center_crop(resize(image, image_size, antialias=True), image_size)`
    (transforms.v2.functional, bilinear) without importing torchvision."""
    if image.shape[-2:] == (image_size, image_size):
        return image
    image = resize_shorter(image, image_size)
    top = round((image.shape[-2] - image_size) / 2.0)  # torchvision's crop anchor (round half to even)
    left = round((image.shape[-1] - image_size) / 2.0)
    return image[..., top : top + image_size, left : left + image_size]


def native_uint8_resize() -> bool:
    """Whether torchvision resizes uint8 images on the CPU as uint8 (bilinear, where ATen has AVX2 or AVX512 kernels,
    or on ARM) or through float32 (then rounded): the two differ by one grey level here and there."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, H, W) with its shorter side resized to `size` and the longer one to int(size · long / short), bilinear
    with antialiasing: torchvision's `resize(image, size)`, step for step (its output-size rule, its uint8 path, and
    its handling of a channels-last image, which decode_image returns for a JPEG)."""
    channels, height, width = image.shape[-3:]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_height, new_width = (new_long, new_short) if width <= height else (new_short, new_long)
    if (new_height, new_width) == (height, width):
        return image
    shape, numel = image.shape, image.numel()
    if numel == 0:
        return image.reshape((*shape[:-2], new_height, new_width))
    batch = image.reshape(-1, channels, height, width)
    strides = batch.stride()
    if batch.is_contiguous(memory_format=torch.channels_last) and batch.shape[0] == 1 and numel != strides[0]:
        # one channels-last image: strided so that interpolate's output is channels-last too (torchvision does this)
        batch = batch.as_strided((1, channels, height, width), [numel, *strides[1:]])
    cast = not (image.dtype in (torch.float32, torch.float64) or (image.dtype == torch.uint8 and native_uint8_resize()))
    x = batch.float() if cast else batch
    x = F.interpolate(x, size=[new_height, new_width], mode="bilinear", align_corners=False, antialias=True)
    if cast:
        x = x.round_().to(image.dtype)
    return x.reshape((*shape[:-2], new_height, new_width))


class Probe(Dataset):
    """Each indexed file decoded once, for its outcome only: "" if it decodes, else the one line saying why not."""

    def __init__(self, paths: list[str], in_channels: int) -> None:
        self.paths = np.array([os.fsencode(p) for p in paths])
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        path = os.fsdecode(self.paths[i])
        try:
            pixels(read_bytes(path), self.in_channels, path)
        except DataError as error:
            return str(error)
        return ""


def readable(index: ImageIndex, in_channels: int, workers: int, renumber: bool) -> ImageIndex:
    """The index without the files that do not decode (each file decoded once, in `workers` loader processes);
    they are listed in `skipped`. `renumber`: class ids over the classes that still have images (a training pool);
    else the ids are kept (a test set with the training pool's ids)."""
    probe = Probe(index.paths, in_channels)
    # its own generator: a loader draws its workers' base seed from the global one, which seeds the model
    loader = DataLoader(probe, batch_size=64, num_workers=workers, collate_fn=list, generator=torch.Generator())
    outcomes = [outcome for batch in loader for outcome in batch]
    bad = [i for i, outcome in enumerate(outcomes) if outcome]
    if not bad:
        return index
    drop = set(bad)
    kept = [i for i in range(len(index.paths)) if i not in drop]
    labels, classes = [index.labels[i] for i in kept], list(index.classes)
    notes = [*index.notes, f"{len(bad)} image(s) that cannot be decoded skipped (first: {index.paths[bad[0]]})"]
    if renumber and len(used := sorted(set(labels))) < len(classes):
        emptied = [name for c, name in enumerate(classes) if c not in used]
        notes.append(f"{len(emptied)} class(es) with no readable image skipped (first: {emptied[0]})")
        ids = {old: new for new, old in enumerate(used)}
        labels, classes = [ids[label] for label in labels], [classes[c] for c in used]
    skipped = [(index.paths[i], outcomes[i]) for i in bad]
    return ImageIndex([index.paths[i] for i in kept], labels, classes, notes, [*index.skipped, *skipped])


def load(
    source: str,
    where: Path,
    key: str,
    in_channels: int,
    image_size: int,
    classes: list[str] | None = None,
    workers: int = 0,
) -> ImageFiles:
    """A folder or a CSV list (`source`: image_folder or image_list) as ImageFiles, what was skipped logged once.
    `classes`: give the samples these class ids, matched by name (a test set of the training classes). Every file
    is decoded once here, in `workers` loader processes; those that do not decode are skipped and listed."""
    index = SOURCES[source](where, key)
    if classes is not None:
        index = match_classes(index, classes, str(where))
    index = readable(index, in_channels, workers, renumber=classes is None)
    if not index.paths:
        raise DataError(f"{key}={where} has no image that can be decoded ({index.skipped[0][1]})")
    for note in index.notes:
        log.warning("%s: %s", where, note)
    for _, why in index.skipped:
        log.warning("skipped: %s", why)
    return ImageFiles(index, in_channels, image_size)


class ImageFiles(Dataset):
    """Indexed image files as (uint8 (C, H, W), label) samples.

    Paths are kept as one NumPy bytes array rather than a list of str: DataLoader workers forked from this process
    then share its pages instead of copying them as Python objects' reference counts change (a large index would
    otherwise be copied into every worker). `targets`, `classes` and `target_transform` follow torchvision's
    dataset attributes, so the class selection and label checks of datasets.py work unchanged.
    """

    def __init__(self, index: ImageIndex, in_channels: int, image_size: int) -> None:
        self.paths = np.array([os.fsencode(p) for p in index.paths])
        self.targets = torch.as_tensor(index.labels, dtype=torch.long)
        self.classes = list(index.classes)
        self.skipped = list(index.skipped)  # the files left out because they do not decode (pack lists them)
        self.in_channels, self.image_size = in_channels, image_size
        self.target_transform = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = read_image(os.fsdecode(self.paths[i]), self.in_channels, self.image_size)
        label = int(self.targets[i])
        return image, self.target_transform(label) if self.target_transform is not None else label
