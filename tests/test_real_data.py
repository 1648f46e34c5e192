"""Real MNIST (marked `real_data`; runs where ARCFACE_DATA_DIR holds MNIST/raw, as in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from arcface_lightning.core.runs import run
from arcface_lightning.embed import embed
from arcface_lightning.search import search
from arcface_lightning.serving.contract import read_embeddings, save_embeddings
from arcface_lightning.train import train
from arcface_lightning.verify import verify
from conftest import cli, compose_config, once_per_session

DATA_DIR = os.environ.get("ARCFACE_DATA_DIR", "")
HAS_MNIST = bool(DATA_DIR) and (Path(DATA_DIR) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One epoch of the seed recipe on real MNIST: its metrics.json record. Trained once in the session, whichever
    worker runs its tests (once_per_session)."""

    def make(folder: Path) -> dict:
        cfg = compose_config(
            "experiment=seed_mnist",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "data.download=false",
            f"paths.data_dir={DATA_DIR}",
            "callbacks.progress_bar.refresh_rate=0",
            "logger=csv",
            "evaluation.figures=false",  # no test here looks at them
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        return train(cfg)

    return once_per_session(tmp_path_factory, "seed_run", make)


@pytest.mark.real_data
@pytest.mark.skipif(not HAS_MNIST, reason="ARCFACE_DATA_DIR has no MNIST/raw")
def test_one_epoch_of_the_seed_recipe_reaches_98_percent(seed_run: dict) -> None:
    assert seed_run["test/acc"] >= 0.98, seed_run
    assert seed_run["test/acc_margin"] < seed_run["test/acc"]  # the seed's metric understates the same model


def entry(name: str, tmp_path: Path, *overrides: str):
    cfg = compose_config(*overrides, config_name=name)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
    return cfg


@pytest.mark.real_data
@pytest.mark.skipif(not HAS_MNIST, reason="ARCFACE_DATA_DIR has no MNIST/raw")
def test_embed_search_and_verify_agree_with_the_runs_own_test_metrics(seed_run: dict, tmp_path: Path) -> None:
    """The trained model used as users do: the test set embedded, searched (against itself, and as two halves),
    and pairs verified at the threshold saved with the checkpoint (one through the command line)."""
    ckpt = seed_run["best_checkpoint"]
    test_file, query_file, train_file = tmp_path / "test.npz", tmp_path / "query.npz", tmp_path / "gallery.npz"
    where = [f"ckpt_path={ckpt}", f"paths.data_dir={DATA_DIR}", "trainer=cpu"]  # the CLI: test_inference.py (DDP)
    assert run(embed, entry("embed", tmp_path, *where, "split=test", f"output={test_file}"))["embeddings"] == 10_000
    test = read_embeddings(test_file)
    assert test.embeddings.shape == (10_000, 128) and list(test.sources[:2]) == ["test:0", "test:1"]
    for path, part in ((query_file, slice(0, 5000)), (train_file, slice(5000, None))):  # a gallery the query is not in
        fields = (test.embeddings[part], test.labels[part], list(test.sources[part]), test.contract, test.model)
        save_embeddings(path, *fields, classes=test.classes)
    query, gallery = read_embeddings(query_file), read_embeddings(train_file)

    # the test set searching itself, leaving each query out, is evaluate's precision@1 (from the test step)
    itself = run(search, entry("search", tmp_path, f"gallery={test_file}", f"query={test_file}", "k=1"))
    assert itself["top1_accuracy"] == pytest.approx(seed_run["test/precision_at_1"], abs=2e-4)
    # one half against the other: the top-1 label of a brute-force float64 search
    found = run(search, entry("search", tmp_path, f"gallery={train_file}", f"query={query_file}", "k=5"))
    nearest = (torch.from_numpy(query.embeddings).double() @ torch.from_numpy(gallery.embeddings).double().T).argmax(1)
    assert found["top1_accuracy"] == pytest.approx(float(np.mean(gallery.labels[nearest.numpy()] == query.labels)))
    assert found["top1_accuracy"] > 0.97

    # verify on 3 same-digit and 3 different-digit pairs of test images written as PNG files
    from torchvision.datasets import MNIST
    from torchvision.io import write_png

    images = MNIST(DATA_DIR, train=False, download=False)
    by_digit = {d: np.flatnonzero(images.targets.numpy() == d)[:2] for d in range(10)}
    same = [(by_digit[d][0], by_digit[d][1]) for d in (0, 4, 8)]
    different = [(by_digit[d][0], by_digit[(d + 1) % 10][1]) for d in (1, 5, 9)]
    for i in {i for pair in same + different for i in pair}:
        write_png(images.data[i][None], str(tmp_path / f"{i}.png"))
    a, b = same[0]  # one pair through the command line, as a user runs it
    result = cli("verify", f"ckpt_path={ckpt}", f"a={tmp_path / f'{a}.png'}", f"b={tmp_path / f'{b}.png'}",
                 f"hydra.run.dir={tmp_path / 'verify_cli'}")  # fmt: skip
    assert result.returncode == 0 and "threshold@far=1e-3" in result.stdout, result.stderr[-2000:]
    answers = {}
    for kind, pairs in (("same", same), ("different", different)):
        answers[kind] = [
            run(
                verify,
                entry(
                    "verify", tmp_path, f"ckpt_path={ckpt}", f"a={tmp_path / f'{a}.png'}", f"b={tmp_path / f'{b}.png'}"
                ),
            )["same"]
            for a, b in pairs
        ]
    assert not any(answers["different"])  # at FAR 1e-3 on validation pairs
    assert sum(answers["same"]) >= 2, answers  # the run's test/tar_at_far_1e-3 is about 0.85
