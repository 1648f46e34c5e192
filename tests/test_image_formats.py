"""Every image format a user may have, converted to the model's channels on every path that reads images; files
that do not decode skipped and listed before training, on every path that trains.

The files are written by Pillow from MNIST digits (real ones where ARCFACE_DATA_DIR holds MNIST, see test_images),
given colour so that the RGB → grayscale conversion is exercised. The expected pixels come from what was written
(lossless formats) or from Pillow's own decoder (JPEG), not from the code under test.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import digits

from arcface_lightning.core.checks import first_line
from arcface_lightning.core.runs import run
from arcface_lightning.data import DataError, ImageDataModule, files
from arcface_lightning.data.files import scan_folder
from arcface_lightning.data.images import ImageFiles
from arcface_lightning.data.streaming import StreamingDataModule
from arcface_lightning.pack import pack
from arcface_lightning.train import train
from conftest import tiny_config


def read_image(path: str, in_channels: int, image_size: int) -> torch.Tensor:
    """files.read_image (a NumPy uint8 array) as the tensor the datasets serve."""
    return torch.from_numpy(files.read_image(path, in_channels, image_size))


def coloured(gray: np.ndarray) -> np.ndarray:
    """A digit in colour: three different channels (H, W, 3)."""
    return np.stack([gray, 255 - gray, gray // 2 + 64], axis=-1)


def write(path: Path, kind: str, gray: np.ndarray) -> np.ndarray | None:
    """`path` + the kind's suffix written by Pillow; returns the RGB pixels the file holds (None: lossy JPEG)."""
    rgb = coloured(gray)
    grays = np.repeat(gray[..., None], 3, axis=-1)
    palette = Image.fromarray(rgb).quantize(32)
    path = path.with_suffix(SUFFIX[kind])
    if kind == "gif_gray":
        Image.fromarray(gray).save(path)
        return grays
    if kind == "gif_palette":
        palette.save(path)
        return np.asarray(palette.convert("RGB"))
    if kind == "gif_animated":  # the first frame is the image
        Image.fromarray(gray).save(path, save_all=True, append_images=[Image.fromarray(255 - gray)])
        return grays
    if kind == "webp_gray":
        Image.fromarray(gray).save(path, lossless=True)
        return grays
    if kind == "png_gray":
        Image.fromarray(gray).save(path)
        return grays
    if kind == "png_gray_alpha":
        Image.fromarray(np.stack([gray, 255 - gray], axis=-1), mode="LA").save(path)
        return grays
    if kind == "png_rgb":
        Image.fromarray(rgb).save(path)
        return rgb
    if kind == "png_rgba":
        Image.fromarray(np.concatenate([rgb, gray[..., None]], axis=-1), mode="RGBA").save(path)
        return rgb
    if kind == "png_palette":
        palette.save(path, transparency=bytes(range(0, 256, 8)))  # per-entry alpha (tRNS), dropped like any alpha
        return np.asarray(palette.convert("RGB"))
    if kind == "png_16bit":
        Image.fromarray(gray.astype(np.uint16) * 256 + 7).save(path)  # 16-bit values whose high byte is `gray`
        return grays
    image = {"jpeg_gray": Image.fromarray(gray), "jpeg_rgb": Image.fromarray(rgb)}.get(kind)
    (image or Image.fromarray(rgb).convert("CMYK")).save(path, quality=95)
    return None


SUFFIX = {
    "gif_gray": ".gif",
    "gif_palette": ".gif",
    "gif_animated": ".gif",
    "webp_gray": ".webp",
    "png_gray": ".png",
    "png_gray_alpha": ".png",
    "png_rgb": ".png",
    "png_rgba": ".png",
    "png_palette": ".png",
    "png_16bit": ".png",
    "jpeg_gray": ".jpg",
    "jpeg_rgb": ".jpg",
    "jpeg_cmyk": ".jpeg",
}
KINDS = list(SUFFIX)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, in floating point (the code under test uses fixed point)."""
    return np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))


def chw(array: np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array, dtype=np.uint8).copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_every_format_becomes_exactly_the_models_channels(tmp_path: Path, kind: str, channels: int) -> None:
    gray = digits(1)[0][7]
    written = write(tmp_path / "image", kind, gray)
    path = str((tmp_path / "image").with_suffix(SUFFIX[kind]))
    image = read_image(path, channels, 28)
    assert image.shape == (channels, 28, 28) and image.dtype == torch.uint8
    if written is None:  # JPEG: what Pillow's decoder (another build of libjpeg) makes of the same file
        with Image.open(path) as reference:
            if channels == 1:
                reference.draft("L", reference.size)  # the file's own luma plane
            expected = chw(reference.convert("L" if channels == 1 else "RGB"))
        assert torch.equal(image, expected)
    elif channels == 3:
        assert torch.equal(image, chw(written))
    else:
        expected = chw(luma(written))
        is_gray = (written == written[..., :1]).all()
        assert torch.equal(image, expected) if is_gray else (image.int() - expected.int()).abs().max() <= 1


def corrupt_files(folder: Path) -> list[Path]:
    """Files with image suffixes that do not decode: a PNG whose pixel data is damaged (torchvision.io's PNG
    decoder crashes the process on it), a truncated JPEG, a truncated GIF, an empty file, a web page saved as
    .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    gray = digits(1)[0][3]
    buffer = io.BytesIO()
    Image.fromarray(coloured(gray)).save(buffer, format="PNG")
    damaged = bytearray(buffer.getvalue())
    damaged[len(damaged) // 2] ^= 0xFF  # inside the IDAT chunk
    jpeg, gif = io.BytesIO(), io.BytesIO()
    Image.fromarray(gray).save(jpeg, format="JPEG")
    Image.fromarray(gray).save(gif, format="GIF")
    files = {
        "damaged.png": bytes(damaged),
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "truncated.gif": gif.getvalue()[:40],
        "empty.png": b"",
        "page.jpg": b"<!DOCTYPE html><html><body>404</body></html>",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in files)


def decode_in_child(path: str, results: multiprocessing.Queue) -> None:
    try:
        read_image(path, 1, 28)
        results.put("decoded")
    except DataError as error:
        results.put(str(error))


def test_a_damaged_png_is_one_line_naming_it_not_a_crash(tmp_path: Path) -> None:
    """In a child process: before the fix, decoding this file killed the process (SIGSEGV)."""
    damaged = str(next(p for p in corrupt_files(tmp_path) if p.name == "damaged.png"))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=decode_in_child, args=(damaged, results))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert results.get(timeout=5).startswith(f"unreadable image {damaged}: ")


@pytest.mark.parametrize("name", ["truncated.jpg", "truncated.gif", "empty.png", "page.jpg"])
def test_an_image_that_does_not_decode_is_one_line_naming_it(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    corrupt_files(tmp_path)
    with pytest.raises(DataError) as error:
        read_image(str(path), 3, 28)
    assert first_line(error.value) == str(error.value) and str(error.value).startswith(f"unreadable image {path}: ")


def mixed_folder(root: Path, per_class: int = 13, classes: int = 2) -> list[Path]:
    """`classes` class folders of digits in every format (each kind in each class); returns the files."""
    images, labels = digits(per_class)
    files = []
    for i, (gray, label) in enumerate(zip(images, labels, strict=True)):
        if label >= classes:
            continue
        kind = KINDS[i % len(KINDS)]
        path = root / f"digit_{label}" / f"{i:03d}_{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, kind, gray)
        files.append(path.with_suffix(SUFFIX[kind]))
    return files


def as_list(root: Path, files: list[Path]) -> Path:
    """The same files as a CSV list, labelled by their class folder."""
    listing = root / "list.csv"
    listing.write_text("".join(f"{f.relative_to(root)},{f.parent.name.split('_')[1]}\n" for f in sorted(files)))
    return listing


def module(source: str, root: Path, channels: int, cache: str) -> ImageDataModule:
    settings = {"dataset": source, "root": str(root), "num_classes": None, "val_size": 4, "test_size": 4}
    settings.update(in_channels=channels, image_size=28, mean=None, std=None, batch_size=8, eval_batch_size=8)
    return ImageDataModule(**settings, cache=cache)


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("cache", ["none", "memory"])
@pytest.mark.parametrize("source", ["image_folder", "image_list"])
@pytest.mark.parametrize("channels", [1, 3])
def test_a_set_of_every_format_serves_batches_of_the_models_channels(
    tmp_path: Path, source: str, cache: str, channels: int
) -> None:
    files = mixed_folder(tmp_path / "mixed")
    root = tmp_path / "mixed" if source == "image_folder" else as_list(tmp_path / "mixed", files)
    dm = module(source, root, channels, cache)
    dm.setup()
    expected = {digest(read_image(str(f), channels, 28)) for f in files}
    served = []
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for images, _ in loader:
            assert images.shape[1:] == (channels, 28, 28) and images.dtype == torch.uint8
            served += [digest(image) for image in images]
    assert len(served) == len(files) and set(served) == expected  # every file once, as read_image decodes it


def test_embedding_a_folder_of_every_format_stacks_into_batches(tmp_path: Path) -> None:
    """ImageFiles over a folder's index, as `embed input=<folder>` batches it, at one channel."""
    files = mixed_folder(tmp_path / "mixed", per_class=3)
    loader = torch.utils.data.DataLoader(ImageFiles(scan_folder(tmp_path / "mixed"), 1, 28), batch_size=len(files))
    images, _ = next(iter(loader))
    assert images.shape == (len(files), 1, 28, 28)


@pytest.fixture
def folder_with_bad_files(tmp_path: Path) -> tuple[Path, list[Path], list[Path]]:
    """(root, readable files, files that do not decode): a mixed folder plus corrupt files in a class, and a class
    whose only file does not decode."""
    root = tmp_path / "mixed"
    good = mixed_folder(root)
    bad = corrupt_files(root / "digit_1")
    (root / "digit_9").mkdir()
    (root / "digit_9" / "only.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return root, good, [*bad, root / "digit_9" / "only.png"]


@pytest.mark.parametrize("cache", ["none", "memory"])
@pytest.mark.parametrize("source", ["image_folder", "image_list"])
def test_images_that_do_not_decode_are_skipped_and_listed_before_training(
    folder_with_bad_files, caplog: pytest.LogCaptureFixture, source: str, cache: str
) -> None:
    root, good, bad = folder_with_bad_files
    where = root if source == "image_folder" else as_list(root, [*good, *bad])
    dm = module(source, where, 1, cache)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    messages = [r.getMessage() for r in caplog.records]
    listed = [m.removeprefix("skipped: unreadable image ").split(": ")[0] for m in messages if m.startswith("skipped")]
    assert sorted(listed) == sorted(map(str, bad))
    summary = f"{len(bad)} image(s) that cannot be decoded skipped (first: "
    assert any(summary in message for message in messages)
    assert dm.classes == ["digit_0", "digit_1"] if source == "image_folder" else ["0", "1"]  # digit_9: no id
    served = [image for split in ("train", "val", "test") for batch in getattr(dm, f"{split}_dataloader")()
              for image in batch[0]]  # fmt: skip
    assert len(served) == len(good)  # every readable file, no bad one, and no error mid-epoch


def test_a_set_with_no_readable_image_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = corrupt_files(tmp_path / "bad" / "a")
    with pytest.raises(DataError, match=r"^data.root=.*bad has no image that can be decoded \(unreadable image "):
        module("image_folder", tmp_path / "bad", 1, "none").setup()
    assert len(bad) == 5


def test_training_on_every_format_with_bad_files_runs_to_the_end(folder_with_bad_files, tmp_path: Path) -> None:
    """A 1-channel model on grayscale GIF/WebP among the rest, and files that do not decode: a normal run."""
    root, good, _ = folder_with_bad_files
    cfg = tiny_config(
        tmp_path,
        tmp_path / "run",
        "data=image_folder",
        f"data.root={root}",
        "data.in_channels=1",
        "data.image_size=28",
        "data.val_size=4",
        "data.test_size=4",
        "data.batch_size=8",
        "data.num_workers=1",
    )
    metrics = run(train, cfg)
    assert metrics["status"] == "ok" and metrics["train/samples"] == len(good) - 8, metrics


def test_pack_skips_and_lists_bad_files_and_streams_every_format_at_the_models_channels(
    folder_with_bad_files, tmp_path: Path
) -> None:
    root, good, bad = folder_with_bad_files
    manifest = pack(root, tmp_path / "packed", val_size=4, test_size=4, workers=1, chunk_bytes="16KB")
    assert manifest["skipped"] == len(bad) and sum(manifest["samples"].values()) == len(good)
    listed = [line.split("\t")[0] for line in (tmp_path / "packed" / "skipped.txt").read_text().splitlines()]
    assert listed == sorted(map(str, bad))
    for channels in (1, 3):
        settings = {"in_channels": channels, "image_size": 28, "batch_size": 8, "mean": None, "std": None}
        dm = StreamingDataModule(root=str(tmp_path / "packed"), num_classes=None, **settings)
        dm.setup("fit")
        dm.setup("test")
        served = []
        for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
            for images, _ in loader:
                assert images.shape[1:] == (channels, 28, 28)
                served += [digest(image) for image in images]
        assert sorted(served) == sorted(digest(read_image(str(f), channels, 28)) for f in good)
