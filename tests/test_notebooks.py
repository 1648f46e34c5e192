"""The notebooks, executed top to bottom by nbclient as Jupyter would run them (kernel python3, cwd notebooks/).

Each run executes an in-memory copy, so the committed files keep no outputs. The notebooks train on their tiny
settings (ARCFACE_NOTEBOOK_QUICK=1). 01 and 02 run once each, on real MNIST where ARCFACE_DATA_DIR holds it (marked
`real_data`) and on synthetic data otherwise: a kernel starts with all the imports, so each run costs that again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from conftest import ROOT, write_mnist

NOTEBOOKS = ROOT / "notebooks"
DATA_DIR = os.environ.get("ARCFACE_DATA_DIR", "")
HAS_MNIST = bool(DATA_DIR) and (Path(DATA_DIR) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
NUMBER_LINE = re.compile(r"^(\S+)((?:\s+-?\d+\.\d+)+)$")  # "name  0.9876  0.5432": the notebooks' metric tables


def execute(name: str, monkeypatch: pytest.MonkeyPatch, **env: str | Path) -> nbformat.NotebookNode:
    """Run notebooks/<name> in a fresh kernel with `env` set; a failing cell raises CellExecutionError."""
    for key in ("ARCFACE_CKPT", "ARCFACE_NOTEBOOK_QUICK", "ARCFACE_NOTEBOOK_EPOCHS"):  # the test says what it runs
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    # the kernel imports arcface_lightning from this checkout, whatever the installed copy (as conftest.cli does)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return notebook


def code_outputs(notebook: nbformat.NotebookNode) -> list[list[dict]]:
    return [cell.outputs for cell in notebook.cells if cell.cell_type == "code"]


def printed(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook printed to stdout."""
    outputs = [o for cell in code_outputs(notebook) for o in cell]
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")


def numbers(notebook: nbformat.NotebookNode) -> dict[str, list[float]]:
    """The notebook's printed metric tables: name → the numbers on its line."""
    rows = (NUMBER_LINE.match(line.strip()) for line in printed(notebook).splitlines())
    return {row[1]: [float(v) for v in row[2].split()] for row in rows if row}


def figures(notebook: nbformat.NotebookNode) -> int:
    """The number of code cells that show an image."""
    return sum(any("image/png" in o.get("data", {}) for o in cell) for cell in code_outputs(notebook))


# a number printed with 4 decimals is within 5e-5 of its value; the logged value is a float32, which can put a
# value the notebook computed in float64 on the other side of a rounding boundary (by < 1e-6)
PRINTED = 5e-5 + 1e-6


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def check_quickstart(notebook: nbformat.NotebookNode, out: Path) -> dict:
    """The run's metrics.json agrees with what the notebook printed; returns it."""
    written = json.loads(only(list(out.glob("01_quickstart/*/metrics.json"))).read_text())
    assert written["status"] == "ok" and Path(written["best_checkpoint"]).is_file()
    shown = numbers(notebook)
    for key in ("val/acc_best", "test/acc", "test/acc_margin", "test/precision_at_1", "test/verification_auc"):
        assert 0.0 <= shown[key][0] <= 1.0, key
        assert shown[key][0] == pytest.approx(written[key], abs=PRINTED), key
    assert figures(notebook) == 1  # test/acc against test/acc_margin
    return written


def check_embeddings(notebook: nbformat.NotebookNode, metrics: dict, sphere: bool) -> dict[str, list[float]]:
    """Printed numbers in range and equal to what the run that wrote the checkpoint measured at test (the notebook
    embeds the same images through the same data pipeline); one figure per section that has one."""
    shown = numbers(notebook)
    stages = ["test", "openset"] if "openset/map_at_r" in metrics else ["test"]  # seen classes, then unseen ones
    assert 0.0 <= shown["test/acc"][0] <= 1.0
    assert shown["test/acc"][0] == pytest.approx(metrics["test/acc"], abs=PRINTED)
    for key in ("precision_at_1", "map_at_r", "verification_auc", "tar_at_far_1e-3", "verification_acc"):
        assert all(0.0 <= v <= 1.0 for v in shown[key]), key
        assert shown[key] == pytest.approx([metrics[f"{stage}/{key}"] for stage in stages], abs=PRINTED), key
    assert figures(notebook) == (3 if sphere else 2)  # angles, (sphere), ROC
    return shown


def test_committed_notebooks_have_no_outputs() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.execution_count is None and cell.outputs == [], f"{path.name}: clear the outputs"


# real MNIST where ARCFACE_DATA_DIR holds it (`make test` and CI), synthetic data otherwise; each test asserts what
# holds on either and the thresholds written for the data at hand
DATA = [pytest.param("mnist", marks=pytest.mark.real_data)] if HAS_MNIST else ["synthetic"]


def data_root(data: str, tmp_path: Path) -> Path:
    return Path(DATA_DIR) if data == "mnist" else write_mnist(tmp_path / "data")


@pytest.mark.slow
@pytest.mark.parametrize("data", DATA)
def test_quickstart(data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notebook's tiny settings (a 4-8 channel CNN, one epoch): on real MNIST, the suite's time budget; the
    default recipe on real MNIST is test_real_data.py's and the notebook's own default run."""
    out = tmp_path / "out"
    committed = (NOTEBOOKS / "01_quickstart.ipynb").read_bytes()
    notebook = execute(
        "01_quickstart.ipynb",
        monkeypatch,
        ARCFACE_DATA_DIR=data_root(data, tmp_path),
        ARCFACE_NOTEBOOK_QUICK=1,
        ARCFACE_NOTEBOOK_OUT=out,
    )
    written = check_quickstart(notebook, out)
    assert written["epochs"] == 1
    if data == "mnist":
        assert written["test/acc"] >= 0.95
        assert written["test/acc_margin"] < written["test/acc"]
    else:
        assert written["test/acc"] > 0.5  # learned something (chance: 0.1)
    assert (NOTEBOOKS / "01_quickstart.ipynb").read_bytes() == committed


@pytest.mark.slow
@pytest.mark.parametrize("data", DATA)
def test_embeddings_trains_its_own_open_set_model(data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    notebook = execute(
        "02_embeddings.ipynb",
        monkeypatch,
        ARCFACE_DATA_DIR=data_root(data, tmp_path),
        ARCFACE_NOTEBOOK_QUICK=1,
        ARCFACE_NOTEBOOK_OUT=out,
    )
    written = json.loads(only(list(out.glob("02_embeddings/*/metrics.json"))).read_text())  # trained here
    shown = check_embeddings(notebook, written, sphere=True)
    assert "open classes [5, 6, 7, 8, 9]" in printed(notebook)
    assert "openset/map_at_r" in written
    if data == "mnist":
        assert shown["test/acc"][0] >= 0.97  # digits 0–4 in 3-D
        seen, unseen = shown["verification_auc"]
        assert seen > 0.99 and 0.5 < unseen < seen  # better than chance on digits never seen, worse than on seen ones


@pytest.mark.slow
def test_embeddings_of_a_given_checkpoint(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ARCFACE_CKPT: no training; a 16-D, 10-class model has no sphere figure and no open set."""
    data, record = trained
    notebook = execute(
        "02_embeddings.ipynb",
        monkeypatch,
        ARCFACE_DATA_DIR=data,
        ARCFACE_CKPT=record["best_checkpoint"],
        ARCFACE_NOTEBOOK_OUT=tmp_path / "out",
    )
    assert not (tmp_path / "out").exists()
    check_embeddings(notebook, record, sphere=False)
    assert "the circle/sphere figure needs 2 or 3" in printed(notebook)


def check_inference(notebook: nbformat.NotebookNode, ckpt: Path, data: Path, gallery: int, queries: int) -> dict:
    """The exported model matches the eager one, and the printed top-1 accuracy and accept rates are what the eager
    model gives on the same images (recomputed here in float64)."""
    from torchvision.datasets import MNIST

    from arcface_lightning.serving.checkpoints import embedder_from_checkpoint

    shown = numbers(notebook)
    assert shown["onnx_vs_eager_max_abs_diff"][0] <= 1e-4
    embedder, contract = embedder_from_checkpoint(ckpt)
    train, test = (MNIST(data, train=t, download=False) for t in (True, False))
    with torch.inference_mode():
        g, q = (embedder(x.data[:n, None]).double() for x, n in ((train, gallery), (test, queries)))
    nearest = (q @ g.T).argmax(1)
    top1 = float((train.targets[:gallery][nearest] == test.targets[:queries]).double().mean())
    assert shown["top1_accuracy"][0] == pytest.approx(top1, abs=PRINTED)
    similarity, labels = q @ q.T, test.targets[:queries]
    i, j = torch.triu_indices(queries, queries, offset=1)
    accepted, same = similarity[i, j] >= contract.thresholds["far=1e-3"], labels[i] == labels[j]
    assert shown["true_accept_rate"][0] == pytest.approx(float(accepted[same].double().mean()), abs=1e-3)
    assert shown["false_accept_rate"][0] == pytest.approx(float(accepted[~same].double().mean()), abs=1e-3)
    assert (ckpt.parent / "model.onnx").is_file() and figures(notebook) == 1
    return shown


@pytest.mark.slow
def test_inference_trains_exports_searches_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = write_mnist(tmp_path / "data"), tmp_path / "out"
    notebook = execute(
        "03_inference.ipynb", monkeypatch, ARCFACE_DATA_DIR=data, ARCFACE_NOTEBOOK_QUICK=1, ARCFACE_NOTEBOOK_OUT=out
    )
    written = json.loads(only(list(out.glob("03_inference/*/metrics.json"))).read_text())
    check_inference(notebook, Path(written["best_checkpoint"]), data, gallery=500, queries=100)
