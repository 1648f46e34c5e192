"""Search: exact chunked top-k against a brute-force oracle, faiss against exact, and the CLI end to end (embeddings
and images as queries), with one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from torchvision import datasets
from torchvision.io import write_png

from arcface_lightning.core.runs import run
from arcface_lightning.data.files import read_image
from arcface_lightning.evaluation.metrics import retrieval_metrics
from arcface_lightning.search import faiss_top_k, search, top_k
from arcface_lightning.serving.contract import Contract, save_embeddings
from arcface_lightning.serving.inference import embed_images, index_inputs, load_model
from conftest import cli, compose_config


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def oracle(queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False) -> tuple:
    """The full float64 similarity matrix, sorted by (score descending, gallery index ascending)."""
    s = queries.astype(np.float64) @ gallery.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(gallery)), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def contract(embedding_size: int = 8, classes: list[str] | None = None) -> Contract:
    return Contract(28, 1, True, [0.5], [0.5], embedding_size, classes)


def search_config(tmp_path: Path, *overrides: str) -> DictConfig:
    cfg = compose_config(*overrides, config_name="search")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


@pytest.mark.parametrize("chunk_size", [7, 13, 1, 1000])
def test_top_k_is_the_brute_force_ranking(chunk_size: int) -> None:
    rng = np.random.default_rng(chunk_size)
    queries, gallery = unit(rng, 50, 8), unit(rng, 40, 8)
    scores, indices = top_k(queries, gallery, 5, chunk_size)
    expected_scores, expected = oracle(queries, gallery, 5)
    assert scores.dtype == np.float32 and indices.dtype == np.int64 and indices.shape == (50, 5)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    # ties: entries ±1/2 make every dot product exact in float32, so many scores are equal; lower index first
    signs = (rng.integers(0, 2, size=(60, 4)) * 2 - 1).astype(np.float32) / 2
    for k in (1, 5, 30):
        scores, indices = top_k(signs[:25], signs[25:], k, chunk_size)
        expected_scores, expected = oracle(signs[:25], signs[25:], k)
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_array_equal(scores, expected_scores)
    scores, indices = top_k(signs, signs, 5, chunk_size, exclude_self=True)  # leave-one-out
    np.testing.assert_array_equal(indices, oracle(signs, signs, 5, exclude_self=True)[1])
    assert top_k(queries, gallery[:3], 5, chunk_size)[1].shape == (50, 3)  # k clamped to the gallery


def test_faiss_gives_the_exact_ranking() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    queries, gallery = unit(rng, 300, 16), unit(rng, 500, 16)
    for exclude_self, q in ((False, queries), (True, gallery)):
        exact_scores, exact = top_k(q, gallery, 5, 64, exclude_self=exclude_self)
        scores, indices = faiss_top_k(q, gallery, 5, 64, exclude_self=exclude_self)
        np.testing.assert_array_equal(indices, exact)
        np.testing.assert_allclose(scores, exact_scores, atol=1e-5)


def test_cli_ranks_a_query_file_against_a_gallery(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    classes = ["cat", "dog", "owl"]
    gallery, queries = unit(rng, 30, 8), unit(rng, 12, 8)
    gallery_labels, query_labels = np.arange(30) % 3, rng.integers(0, 3, 12)
    gallery_file = save_embeddings(tmp_path / "g.npz", gallery, gallery_labels, [f"g{i}" for i in range(30)],
                                   contract(classes=classes), "model.onnx")  # fmt: skip
    query_file = save_embeddings(tmp_path / "q.npz", queries, query_labels, [f"q{i}" for i in range(12)],
                                 contract(classes=classes), "model.onnx")  # fmt: skip
    output = tmp_path / "out" / "hits.csv"
    result = cli(
        "search",
        f"gallery={gallery_file}",
        f"query={query_file}",
        "k=4",
        f"output={output}",
        "chunk_size=5",
        "model=null",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip (model=: the rename)
    assert result.returncode == 0, result.stderr[-2000:]
    expected_scores, expected = oracle(queries, gallery, 4)
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["query", "rank", "gallery", "label", "score"] and len(rows) == 12 * 4
    for q in range(12):
        mine = rows[q * 4 : q * 4 + 4]
        assert [r["query"] for r in mine] == [f"q{q}"] * 4 and [int(r["rank"]) for r in mine] == [1, 2, 3, 4]
        assert [r["gallery"] for r in mine] == [f"g{i}" for i in expected[q]]
        assert [r["label"] for r in mine] == [classes[gallery_labels[i]] for i in expected[q]]
        scores = [float(r["score"]) for r in mine]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, expected_scores[q], atol=1e-5)
    accuracy = float(np.mean(gallery_labels[expected[:, 0]] == query_labels))
    assert f"top-1 accuracy: {accuracy:.4f} (12 labelled queries)" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["top1_accuracy"] == pytest.approx(accuracy)


def test_the_gallery_as_its_own_query_leaves_each_item_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    centres = unit(rng, 4, 8)
    labels = np.arange(40) % 4
    embeddings = centres[labels] + 0.6 * rng.normal(size=(40, 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    gallery = save_embeddings(tmp_path / "g.npz", embeddings, labels, [str(i) for i in range(40)], contract(), "m")
    record = run(search, search_config(tmp_path, f"gallery={gallery}", f"query={gallery}", "k=50", "chunk_size=7"))
    expected = retrieval_metrics(torch.from_numpy(embeddings), torch.from_numpy(labels))["precision_at_1"]
    assert 0 < expected < 1 and record["top1_accuracy"] == pytest.approx(expected) and record["k"] == 39


def write_images(data: Path, folder: Path, per_class: int = 2, classes: int = 4) -> None:
    """Synthetic MNIST test images as PNGs in class folders: <folder>/<label>/<index>.png."""
    test = datasets.MNIST(data, train=False)
    for i in range(per_class * classes):
        (folder / str(int(test.targets[i]))).mkdir(parents=True, exist_ok=True)
        write_png(test.data[i][None], str(folder / str(int(test.targets[i])) / f"{i}.png"))


def test_image_queries_find_themselves(trained, tmp_path: Path) -> None:
    data, record = trained
    checkpoint = record["best_checkpoint"]
    write_images(data, tmp_path / "images")
    paths, labels, classes = index_inputs(tmp_path / "images")
    embed, model_contract = load_model(checkpoint)
    images = [read_image(p, model_contract.in_channels, model_contract.image_size) for p in paths]
    embeddings = embed_images(embed, images)
    gallery = save_embeddings(tmp_path / "g.npz", embeddings, labels, paths, model_contract, checkpoint, classes)
    output = tmp_path / "hits.csv"
    overrides = [f"gallery={gallery}", f"query={tmp_path / 'images'}", "k=3", f"output={output}", "batch_size=3"]
    result = run(search, search_config(tmp_path, *overrides, f"query_model={checkpoint}"))  # the CLI's model=
    assert result["status"] == "ok", result
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * len(paths)
    for q, path in enumerate(paths):
        best, second = rows[3 * q], rows[3 * q + 1]
        assert best["query"] == path and best["gallery"] == path and best["label"] == Path(path).parent.name
        assert float(best["score"]) == pytest.approx(1.0, abs=1e-5) and float(second["score"]) < float(best["score"])
    assert result["top1_accuracy"] == 1.0 and result["queries"] == 8
    # without model=: the gallery's model; a model of another contract, and an unreadable image, in one line
    assert run(search, search_config(tmp_path, f"gallery={gallery}", f"query={paths[0]}"))["queries"] == 1
    size = model_contract.image_size
    larger = replace(model_contract, image_size=size + 4)
    other = save_embeddings(tmp_path / "o.npz", embeddings, labels, paths, larger, checkpoint)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    failures = [
        (
            [f"gallery={other}", f"query={paths[0]}"],
            f"gallery={other} has image_size={size + 4} but model={checkpoint} has image_size={size}",
        ),
        ([f"gallery={gallery}", f"query={tmp_path / 'bad'}"], f"unreadable image {tmp_path / 'bad' / 'broken.png'}"),
    ]
    for overrides, message in failures:
        with pytest.raises(SystemExit) as exit_info:
            run(search, search_config(tmp_path, *overrides))
        assert str(exit_info.value).startswith(f"error: {message}") and "\n" not in str(exit_info.value)


def test_bad_input_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    gallery = save_embeddings(tmp_path / "g.npz", unit(rng, 5, 8), np.zeros(5), list("abcde"), contract(8), "m.ckpt")
    wide = save_embeddings(tmp_path / "w.npz", unit(rng, 5, 16), np.zeros(5), list("abcde"), contract(16), "m.ckpt")
    (tmp_path / "empty").mkdir()
    other = "they come from models with another preprocessing contract"
    failures = [
        ([f"query={wide}"], f"gallery={gallery} has embedding_size=8 but query={wide} has embedding_size=16: {other}"),
        ([f"query={tmp_path / 'empty'}"], f"query={tmp_path / 'empty'} has no images (directly or in class folders)"),
        (["k=0", f"query={wide}"], "k=0 is invalid; allowed: an integer ≥ 1"),
        (["index=hnsw", f"query={wide}"], "index='hnsw' is invalid; allowed: exact, faiss"),
    ]
    for overrides, message in failures:
        with pytest.raises(SystemExit) as exit_info:
            run(search, search_config(tmp_path, f"gallery={gallery}", *overrides))
        assert str(exit_info.value) == f"error: {message}"
        assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if not installed: import faiss raises ImportError
    with pytest.raises(SystemExit, match=r'^error: index=faiss needs faiss: pip install "arcface-lightning\[faiss\]"$'):
        run(search, search_config(tmp_path, f"gallery={gallery}", f"query={gallery}", "index=faiss"))
    missing = tmp_path / "no" / "such.npz"
    with pytest.raises(SystemExit) as exit_info:
        run(search, search_config(tmp_path, f"gallery={missing}", f"query={gallery}"))
    assert (
        str(exit_info.value)
        == f"error: gallery={missing} does not exist; make one with python -m arcface_lightning.embed"
    )
