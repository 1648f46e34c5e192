"""The trained model as an embedding function: thresholds saved at training, embed and verify, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import digits, write_folder

from arcface_lightning.core.runs import run
from arcface_lightning.embed import embed
from arcface_lightning.evaluation.metrics import sample_pairs, threshold_at_far
from arcface_lightning.serving.checkpoints import contract_of_checkpoint, embedder_from_checkpoint
from arcface_lightning.serving.contract import Contract, read_embeddings
from arcface_lightning.serving.inference import index_inputs
from arcface_lightning.verify import verify
from conftest import cli_process, compose_config


def test_threshold_at_far_accepts_at_most_that_fraction_of_negatives_and_no_lower_threshold_does() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(30_000, generator=g, dtype=torch.float64) * 2 - 1
    same = torch.rand(30_000, generator=g) < 0.3
    negatives = scores[~same].numpy()
    for far in (1e-2, 1e-3, 1e-4):
        t = threshold_at_far(scores, same, far)
        accepted = int((negatives >= t).sum())
        assert accepted <= far * len(negatives)  # the target holds
        below = np.sort(negatives[negatives < t])[-1]  # the next lower negative score would break it
        assert int((negatives >= below).sum()) > far * len(negatives)
    with pytest.raises(ValueError, match="needs at least 10000 different-class pairs, got"):
        threshold_at_far(scores[:5000], same[:5000], 1e-4)


@pytest.fixture(scope="module")
def checkpoint(trained: tuple[Path, dict]) -> tuple[Path, Path]:
    """(data root, best checkpoint) of the shared tiny run."""
    data, record = trained
    assert record["status"] == "ok", record
    return data, Path(record["best_checkpoint"])


def embed_config(tmp_path: Path, data: Path, ckpt: Path, *overrides: str):
    cfg = compose_config(f"ckpt_path={ckpt}", f"paths.data_dir={data}", "trainer=cpu", *overrides, config_name="embed")
    cfg.paths.output_dir = str(tmp_path / "log")
    return cfg


def test_the_checkpoint_carries_thresholds_recomputed_from_its_validation_embeddings(checkpoint, tmp_path) -> None:
    """callbacks.VerificationThresholds: the best checkpoint's threshold at FAR 1e-3 is the one its own
    validation embeddings give (embedded again here by the embed entry point, split=val)."""
    data, ckpt = checkpoint
    saved = contract_of_checkpoint(torch.load(ckpt, weights_only=True)).thresholds
    assert set(saved) == {"best_accuracy", "far=1e-3"}  # 100 validation images: too few negatives for 1e-4
    out = tmp_path / "val.npz"
    record = run(embed, embed_config(tmp_path, data, ckpt, "split=val", f"output={out}"))
    assert record["status"] == "ok" and record["embeddings"] == 100, record
    val = read_embeddings(out)
    x, labels = torch.from_numpy(val.embeddings).double(), torch.from_numpy(val.labels)
    i, j = sample_pairs(labels, 200_000)
    assert threshold_at_far((x[i] * x[j]).sum(1), labels[i] == labels[j], 1e-3) == pytest.approx(
        saved["far=1e-3"], abs=1e-5
    )


def test_embed_a_folder_of_class_folders_gives_the_eager_models_unit_embeddings(checkpoint, tmp_path) -> None:
    data, ckpt = checkpoint
    images, labels = digits(3)
    folder = write_folder(tmp_path / "images", images, labels)
    out = tmp_path / "out" / "emb.npz"
    record = run(
        embed, embed_config(tmp_path, data, ckpt, f"input={folder}", f"output={out}", "data.eval_batch_size=7")
    )
    assert record["status"] == "ok", record
    with np.load(out, allow_pickle=False) as f:  # what a user without this package reads
        assert f["embeddings"].shape == (30, 16) and f["embeddings"].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(f["embeddings"], axis=1), 1.0, atol=1e-6)
        assert list(f["labels"]) == list(labels) and list(f["classes"]) == [f"digit_{d}" for d in range(10)]
        paths, _, _ = index_inputs(folder)
        assert list(f["sources"]) == paths and str(f["model"]) == str(ckpt)
        contract = Contract.from_json(str(f["contract"]))
    embedder, saved = embedder_from_checkpoint(ckpt)
    assert contract == saved
    with torch.inference_mode():
        eager = embedder(torch.from_numpy(images)[:, None]).numpy()
    np.testing.assert_allclose(read_embeddings(out).embeddings, eager, atol=1e-5)
    assert not list(out.parent.glob("*.part-*")) and not list(out.parent.glob("*.partial*"))


def test_embed_a_flat_folder_gives_unknown_labels(checkpoint, tmp_path) -> None:
    data, ckpt = checkpoint
    images, _ = digits(1)
    folder = tmp_path / "flat"
    write_folder(tmp_path / "tmp", images, np.zeros(10, int))
    (tmp_path / "tmp" / "digit_0").rename(folder)
    out = tmp_path / "flat.npz"
    assert run(embed, embed_config(tmp_path, data, ckpt, f"input={folder}", f"output={out}"))["status"] == "ok"
    result = read_embeddings(out)
    assert result.embeddings.shape == (10, 16) and set(result.labels) == {-1} and result.classes == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["output=x.csv"], "output=x.csv: embeddings are written as .npz; give a file name ending in .npz"),
        (["output=x.npz", "split=holdout"], "split=holdout is not one of train, val, test (or give input=<images>)"),
        (
            ["output=x.npz", "input=/nowhere"],
            "input=/nowhere does not exist; give an image, a folder of images or a CSV list",
        ),
    ],
)
def test_embed_refuses_bad_input_in_one_line_before_any_work(checkpoint, tmp_path, overrides, message) -> None:
    data, ckpt = checkpoint
    with pytest.raises(SystemExit) as error:
        run(embed, embed_config(tmp_path, data, ckpt, *overrides))
    assert str(error.value) == f"error: {message}"
    assert json.loads((tmp_path / "log" / "metrics.json").read_text())["status"] == "failed"


def test_embed_an_empty_folder_is_one_line(checkpoint, tmp_path) -> None:
    data, ckpt = checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as error:
        run(embed, embed_config(tmp_path, data, ckpt, f"input={tmp_path / 'empty'}", "output=x.npz"))
    assert str(error.value) == f"error: input={tmp_path / 'empty'} has no images (directly or in class folders)"


def verify_config(tmp_path: Path, *overrides: str):
    cfg = compose_config(*overrides, config_name="verify")
    cfg.paths.output_dir = str(tmp_path / "log")
    return cfg


def test_verify_scores_a_pair_as_the_embeddings_do_at_the_saved_threshold(checkpoint, tmp_path) -> None:
    _, ckpt = checkpoint
    images, labels = digits(2)
    folder = write_folder(tmp_path / "images", images, labels)
    paths, _, _ = index_inputs(folder)
    embedder, contract = embedder_from_checkpoint(ckpt)
    with torch.inference_mode():
        x = embedder(torch.from_numpy(images)[:, None])
    for a, b in ((0, 1), (0, 2), (5, 5)):
        record = run(verify, verify_config(tmp_path, f"ckpt_path={ckpt}", f"a={paths[a]}", f"b={paths[b]}"))
        expected = float(x[a] @ x[b])
        assert record["score"] == pytest.approx(expected, abs=1e-5)
        assert record["threshold"] == contract.thresholds["far=1e-3"]
        assert record["same"] == (expected >= contract.thresholds["far=1e-3"])
    assert record["same"]  # an image and itself
    given = run(verify, verify_config(tmp_path, f"ckpt_path={ckpt}", f"a={paths[0]}", f"b={paths[2]}", "threshold=-1"))
    assert given["same"] and given["threshold"] == -1


def test_verify_says_in_one_line_what_is_wrong(checkpoint, tmp_path) -> None:
    _, ckpt = checkpoint
    images, labels = digits(1)
    paths, _, _ = index_inputs(write_folder(tmp_path / "images", images, labels))
    missing = (
        f"far=0.0001: {ckpt} has no threshold at far=1e-4 (saved: best_accuracy, far=1e-3); pass threshold=<cosine>"
    )
    for overrides, message in (
        ([f"b={paths[1]}", "far=1e-4"], missing),
        ([f"b={tmp_path / 'no.png'}"], f"b={tmp_path / 'no.png'}: no such file; give an image (png, jpg, gif, webp)"),
        (
            [f"b={paths[1]}", "threshold=2"],
            "threshold=2 is not a cosine: give a number in [-1, 1] (or null: the saved one)",
        ),
    ):
        with pytest.raises(SystemExit) as error:
            run(verify, verify_config(tmp_path, f"ckpt_path={ckpt}", f"a={paths[0]}", *overrides))
        assert str(error.value) == f"error: {message}"
        assert json.loads((tmp_path / "log" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_embed_under_ddp_merges_the_ranks_shares_in_order_without_the_padding(checkpoint, tmp_path) -> None:
    """Two gloo processes; 25 images, so the distributed sampler pads one rank with a repeat: the file holds each
    image once, in input order, with the single-process embeddings."""
    data, ckpt = checkpoint
    images, labels = digits(3)
    folder = write_folder(tmp_path / "images", images[:25], labels[:25])
    single, ddp = tmp_path / "single.npz", tmp_path / "ddp.npz"
    overrides = [f"ckpt_path={ckpt}", f"input={folder}", "data.eval_batch_size=4"]
    assert run(embed, embed_config(tmp_path, data, ckpt, *overrides[1:], f"output={single}"))["status"] == "ok"
    result = cli_process("embed", *overrides, f"output={ddp}", "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_embeddings(single), read_embeddings(ddp)
    assert list(two.sources) == list(one.sources) and list(two.labels) == list(one.labels) == list(labels[:25])
    np.testing.assert_allclose(two.embeddings, one.embeddings, atol=1e-5)
    assert not list(tmp_path.glob("ddp.npz.*"))


def test_flip_fuses_each_image_with_its_mirror_the_same_way_in_embed_and_verify(checkpoint, tmp_path) -> None:
    """flip=true: the image's and its mirror's unit embeddings summed and normalised, by embed with a .ckpt
    (Trainer.predict) as by the eager model here; so an image and its mirror embed alike, and verify scores them 1."""
    data, ckpt = checkpoint
    images, labels = digits(1)
    folder = write_folder(tmp_path / "images", images, labels)
    out = tmp_path / "flip.npz"
    assert run(embed, embed_config(tmp_path, data, ckpt, f"input={folder}", f"output={out}", "flip=true"))["status"]
    embedder, _ = embedder_from_checkpoint(ckpt)
    with torch.inference_mode():
        batch = torch.from_numpy(images)[:, None]
        fused = torch.nn.functional.normalize(embedder(batch) + embedder(batch.flip(-1)), dim=1).numpy()
        plain = embedder(batch).numpy()
    np.testing.assert_allclose(read_embeddings(out).embeddings, fused, atol=1e-5)
    assert np.abs(fused - plain).max() > 1e-3  # the mirror changes the embedding
    paths, _, _ = index_inputs(folder)
    mirror = tmp_path / "mirror.png"
    Image.fromarray(images[0][:, ::-1]).save(mirror)
    flipped = run(verify, verify_config(tmp_path, f"ckpt_path={ckpt}", f"a={paths[0]}", f"b={mirror}", "flip=true"))
    plain_score = run(verify, verify_config(tmp_path, f"ckpt_path={ckpt}", f"a={paths[0]}", f"b={mirror}"))["score"]
    assert flipped["score"] == pytest.approx(1.0, abs=1e-5) and plain_score < 1 - 1e-4
