"""Hostile input and faults in the commands that use a trained model (embed, export, search, verify): output paths
that cannot be written, checkpoints that are not checkpoints, hand-made embeddings files, embeddings of another
model, an output that would replace an input, images far smaller than the model's input, and export stopped by
SIGTERM or Ctrl-C. Each answer is one line naming the key, before any work, and nothing is left half-written."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import open_dict
from torchvision.io import write_png

from arcface_lightning.core.checks import ModelError
from arcface_lightning.core.runs import run
from arcface_lightning.core.writing import written_aside
from arcface_lightning.embed import embed
from arcface_lightning.export import export
from arcface_lightning.search import search
from arcface_lightning.serving.checkpoints import checkpoint_contract, weights_fingerprint
from arcface_lightning.serving.contract import UNIT_TOLERANCE, Contract, read_embeddings, save_embeddings
from arcface_lightning.serving.inference import load_model
from arcface_lightning.verify import verify
from conftest import cli_command, compose_config

ENTRY = {"export": export, "embed": embed, "search": search, "verify": verify}


def run_line(tmp_path: Path, command: str, *overrides: str) -> str:
    """The one line a command exits with (it must fail), checked against metrics.json."""
    cfg = compose_config(*overrides, config_name=command)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    (tmp_path / "run" / "metrics.json").unlink(missing_ok=True)  # a refusal keeps an earlier record (runs.run)
    with pytest.raises(SystemExit) as exit_info:
        run(ENTRY[command], cfg)
    line = str(exit_info.value)
    assert "\n" not in line and line.startswith("error: "), line
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and f"error: {record['error']}" == line
    return line.removeprefix("error: ")


def contract(sha: str | None = "a" * 64, size: int = 8) -> Contract:
    return Contract(28, 1, True, [0.5], [0.5], size, weights_sha256=sha)


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def gallery_file(path: Path, sha: str | None = "a" * 64, n: int = 5, seed: int = 0) -> Path:
    return save_embeddings(
        path, unit_rows(n, 8, seed), np.arange(n) % 2, [f"s{i}" for i in range(n)], contract(sha), "m"
    )


# --- output paths: refused before any work -------------------------------------------------------------------------

OUTPUT_SUFFIX = {"export": ".onnx", "embed": ".npz", "search": ".csv"}
INPUTS = {
    "export": ["ckpt_path=m.ckpt"],
    "embed": ["ckpt_path=m.ckpt", "input=images"],
    "search": ["gallery=g.npz", "query=q.npz"],
}
FIRST_WORK = {  # what each command does first once its arguments are checked: reaching it fails the test
    "export": "arcface_lightning.export.embedder_from_checkpoint",
    "embed": "arcface_lightning.serving.checkpoints.Checkpoint",  # imported where called
    "search": "arcface_lightning.search.read_embeddings",
}


@pytest.mark.parametrize("command", OUTPUT_SUFFIX)
@pytest.mark.parametrize("case", ["unwritable folder", "under a file", "a folder"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(command, case, tmp_path, monkeypatch) -> None:
    suffix = OUTPUT_SUFFIX[command]
    (tmp_path / "plain").write_text("a file")
    (tmp_path / f"taken{suffix}").mkdir()
    output = {"unwritable folder": "/proc/nope", "under a file": f"{tmp_path}/plain", "a folder": str(tmp_path)}[case]
    output += f"/out{suffix}" if case != "a folder" else f"/taken{suffix}"
    message = {
        "unwritable folder": f"output={output}: cannot write in /proc/nope (",
        "under a file": f"output={output}: {tmp_path}/plain is a file, not a folder; give a path in a folder",
        "a folder": f"output={output} is a folder; give the path of a file to write",
    }[case]

    def started(*args, **kwargs):
        raise AssertionError(f"{command} started its work before refusing output={output}")

    monkeypatch.setattr(FIRST_WORK[command], started)
    before = sorted(tmp_path.iterdir())
    assert run_line(tmp_path, command, *INPUTS[command], f"output={output}").startswith(message)
    assert sorted(p for p in tmp_path.iterdir() if p.name != "run") == before


# --- checkpoints that are not checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "embed", "verify"])
@pytest.mark.parametrize("case", ["bare tensor", "an export", "a folder"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(command, case, tmp_path) -> None:
    image = tmp_path / "a.png"
    write_png(torch.zeros(1, 28, 28, dtype=torch.uint8), str(image))
    path = tmp_path / {"bare tensor": "bare.ckpt", "an export": "model.onnx", "a folder": "run.ckpt"}[case]
    if case == "bare tensor":
        torch.save(torch.zeros(3), path)
    elif case == "an export":
        path.write_bytes(b"\x08\x07an onnx protobuf")
    else:
        path.mkdir()
    expected = {
        "bare tensor": f"ckpt_path={path} is not a Lightning checkpoint (it holds a Tensor, no state_dict)",
        "an export": f"ckpt_path={path} is an export; this command needs a .ckpt checkpoint of training",
        "a folder": f"ckpt_path={path} is a folder; give the path of a .ckpt file",
    }[case]
    if command in ("verify", "embed") and case == "an export":  # they read exports too (embed with input=)
        expected = f"ckpt_path={path} is not a readable ONNX model: "
    if command == "verify" and case == "a folder":  # a folder names what verify takes
        expected = f"ckpt_path={path} is a folder; give a .ckpt, .onnx or TorchScript (.pt) file"
    rest = {"export": [f"output={tmp_path}/m.onnx"], "embed": [f"output={tmp_path}/e.npz", f"input={image}"]}
    line = run_line(tmp_path, command, f"ckpt_path={path}", *rest.get(command, [f"a={image}", f"b={image}"]))
    assert line.startswith(expected), line
    assert not list(tmp_path.glob("m.onnx*")) and not list(tmp_path.glob("e.npz*"))


# --- hand-made embeddings files ------------------------------------------------------------------------------------


def broken_file(path: Path, case: str) -> tuple[Path, str]:
    """An embeddings file in save_embeddings' format with one thing wrong, and what the one line says of it."""
    x = unit_rows(5, 8)
    arrays = dict(embeddings=x, labels=np.zeros(5, np.int64), sources=np.array(list("abcde")), classes=np.array([]),
                  contract=np.asarray(contract().to_json()), model=np.asarray("m"),
                  format=np.asarray("arcface-lightning embeddings"))  # fmt: skip
    change, problem = {
        "1-D embeddings": ({"embeddings": x[0]}, "embeddings is float32 of shape (8,); allowed: a 2-D float array"),
        "text embeddings": ({"embeddings": x.astype(str)}, "embeddings is <U"),
        "columns": ({"embeddings": unit_rows(5, 6)}, "embeddings has 6 columns but its contract has embedding_size=8"),
        "short labels": ({"labels": np.zeros(4, np.int64)}, "labels has shape (4,) but embeddings has 5 rows"),
        "long sources": ({"sources": np.array(list("abcdef"))}, "sources has shape (6,) but embeddings has 5 rows"),
        "string labels": ({"labels": np.array(list("abcde"))}, "labels holds strings; allowed: one integer per row"),
        "float labels": ({"labels": np.zeros(5)}, "labels holds float64 of shape (5,); allowed: one integer per row"),
        "NaN": ({"embeddings": np.where(np.arange(5)[:, None] == 3, np.nan, x)}, "embeddings row 3 holds NaN or inf"),
        "inf": ({"embeddings": np.where(np.arange(5)[:, None] == 1, np.inf, x)}, "embeddings row 1 holds NaN or inf"),
        "not unit": ({"embeddings": x * np.float32([[1], [1], [100], [1], [1]])}, "embeddings row 2 has norm 100;"),
        "no labels": ({"labels": None}, "has no labels array; allowed: embeddings, labels, sources, classes, contract"),
    }[case]  # fmt: skip
    arrays.update(change)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path, problem


BROKEN = ["1-D embeddings", "text embeddings", "columns", "short labels", "long sources", "string labels",
          "float labels", "NaN", "inf", "not unit", "no labels"]  # fmt: skip


@pytest.mark.parametrize("key", ["gallery", "query"])
@pytest.mark.parametrize("case", BROKEN)
def test_a_hand_made_embeddings_file_that_is_wrong_is_one_line_naming_the_key(key, case, tmp_path) -> None:
    good = gallery_file(tmp_path / "good.npz")
    bad, problem = broken_file(tmp_path / "bad.npz", case)
    inputs = {"gallery": good, "query": good, key: bad}
    line = run_line(tmp_path, "search", f"gallery={inputs['gallery']}", f"query={inputs['query']}")
    separator = " " if case == "no labels" else ": "
    assert line.startswith(f"{key}={bad}{separator}{problem}"), line


def test_rows_within_the_unit_tolerance_and_zero_rows_are_accepted(tmp_path: Path) -> None:
    """Rows normalised in float16 are within UNIT_TOLERANCE of unit length; a zero row is what heads.normalize makes
    of a degenerate embedding. Just outside the tolerance is refused."""
    x = unit_rows(50, 64).astype(np.float16).astype(np.float32)
    x[7] = 0
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert 0 < np.abs(norms[norms > 0] - 1).max() <= UNIT_TOLERANCE
    path = save_embeddings(tmp_path / "g.npz", x, np.zeros(50), [str(i) for i in range(50)], contract(size=64), "m")
    np.testing.assert_array_equal(read_embeddings(path).embeddings, x)
    x[3] *= 1 + 2 * UNIT_TOLERANCE
    path = save_embeddings(tmp_path / "g.npz", x, np.zeros(50), [str(i) for i in range(50)], contract(size=64), "m")
    with pytest.raises(ModelError, match=r"^gallery=.*g\.npz: embeddings row 3 has norm 1\.002"):
        read_embeddings(path)


# --- embeddings of another model -----------------------------------------------------------------------------------


def test_a_query_file_of_another_model_is_refused_and_one_without_a_fingerprint_is_a_warning(tmp_path, caplog) -> None:
    gallery = gallery_file(tmp_path / "g.npz", sha="a" * 64)
    other = gallery_file(tmp_path / "q.npz", sha="b" * 64, seed=1)
    line = run_line(tmp_path, "search", f"gallery={gallery}", f"query={other}")
    assert line == (
        f"gallery={gallery} and query={other} come from two different models (weights sha256 {'a' * 12}… and "
        f"{'b' * 12}…): their embeddings are not comparable; use one model for both"
    )
    older = gallery_file(tmp_path / "old.npz", sha=None, seed=1)  # written before fingerprints existed
    cfg = compose_config(f"gallery={gallery}", f"query={older}", config_name="search")
    cfg.paths.output_dir = str(tmp_path / "run")
    assert run(search, cfg)["queries"] == 5
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"query={older} does not record the model that made it: cannot check it against gallery={gallery}" in warned


def test_images_embedded_by_another_model_than_the_gallerys_are_refused(trained, tmp_path: Path) -> None:
    """The other model: the same checkpoint with one backbone weight changed (same preprocessing contract)."""
    ckpt = Path(trained[1]["best_checkpoint"])
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if k.startswith("backbone.") and k.endswith("weight"))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 1e-3
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    mine, theirs = checkpoint_contract(ckpt), checkpoint_contract(other)
    assert mine.preprocessing == theirs.preprocessing and mine.weights_sha256 != theirs.weights_sha256
    image = tmp_path / "q.png"
    write_png(torch.full((1, 28, 28), 9, dtype=torch.uint8), str(image))
    gallery = save_embeddings(tmp_path / "g.npz", unit_rows(4, 16), np.zeros(4), list("abcd"), mine, str(ckpt))
    line = run_line(tmp_path, "search", f"gallery={gallery}", f"query={image}", f"query_model={other}")
    assert line.startswith(f"gallery={gallery} and model={other} come from two different models (weights sha256 ")
    cfg = compose_config(f"gallery={gallery}", f"query={image}", config_name="search")  # the gallery's own model
    cfg.paths.output_dir = str(tmp_path / "run")
    assert run(search, cfg)["queries"] == 1


def test_the_fingerprint_is_of_the_values_not_the_memory_layout() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    fingerprint = weights_fingerprint(state)
    channels_last = {k: v.to(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in state.items()}
    assert not channels_last["weight"].is_contiguous() and weights_fingerprint(channels_last) == fingerprint
    state["weight"].view(-1)[5] = torch.nextafter(state["weight"].view(-1)[5], torch.tensor(2.0))
    assert weights_fingerprint(state) != fingerprint
    assert weights_fingerprint({"bias": state["bias"], "weight": state["weight"]}) == weights_fingerprint(state)


# --- an output that would replace an input -------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["same", "through ..", "a symlink"])
def test_the_hits_never_replace_the_gallery(alias: str, tmp_path: Path) -> None:
    gallery = gallery_file(tmp_path / "g.npz")
    before = gallery.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.npz").symlink_to(gallery)
    output = {"same": gallery, "through ..": tmp_path / "sub" / ".." / "g.npz", "a symlink": tmp_path / "link.npz"}
    line = run_line(tmp_path, "search", f"gallery={gallery}", f"query={gallery}", f"output={output[alias]}")
    assert line == f"output={output[alias]} is gallery={gallery}; give another file name for the hits"
    assert gallery.read_bytes() == before


def test_the_hits_never_replace_a_query_list_or_the_model(trained, tmp_path: Path) -> None:
    gallery = gallery_file(tmp_path / "g.npz", sha=None)
    listing = tmp_path / "queries.csv"
    listing.write_text("path,label\nnowhere.png,0\n")
    line = run_line(tmp_path, "search", f"gallery={gallery}", f"query={listing}", f"output={listing}")
    assert line == f"output={listing} is query={listing}; give another file name for the hits"
    ckpt = trained[1]["best_checkpoint"]
    line = run_line(
        tmp_path, "search", f"gallery={gallery}", f"query={listing}", f"query_model={ckpt}", f"output={ckpt}"
    )
    assert line == f"output={ckpt} is model={ckpt}; give another file name for the hits"
    assert listing.read_text() == "path,label\nnowhere.png,0\n"


# --- verify: images far smaller than the model's input -------------------------------------------------------------


@pytest.mark.parametrize("height, width, warned", [(1, 1, True), (13, 40, True), (14, 14, False), (28, 28, False)])
def test_verify_warns_of_an_image_far_smaller_than_the_models_input(height, width, warned, trained, tmp_path, caplog):
    """The rule: a shorter side below half the model's image_size (28 here: below 14) is warned of."""
    ckpt = trained[1]["best_checkpoint"]
    small, normal = tmp_path / "small.png", tmp_path / "normal.png"
    write_png(torch.full((1, height, width), 200, dtype=torch.uint8), str(small))
    write_png(torch.full((1, 28, 28), 200, dtype=torch.uint8), str(normal))
    cfg = compose_config(f"ckpt_path={ckpt}", f"a={normal}", f"b={small}", "threshold=0.5", config_name="verify")
    cfg.paths.output_dir = str(tmp_path / "run")
    record = run(verify, cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.endswith("verify")]
    expected = (
        f"b={small} is {width}×{height}, far smaller than the model's 28×28 input: its score says little about "
        "the identity"
    )
    assert warnings == ([expected] if warned else [])
    assert record.get("small_images") == (["b"] if warned else None)


# --- faults: nothing half-written ----------------------------------------------------------------------------------


def test_sigterm_inside_written_aside_removes_the_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "out.npz"
    path.write_text("the previous file")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException), written_aside(path) as partial:
        partial.write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode; never reached
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"] and path.read_text() == "the previous file"
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_interrupted_onnxruntime_import_is_the_interrupt_not_a_missing_package(tmp_path, monkeypatch) -> None:
    """onnxruntime's pybind module reports a Ctrl-C during its import as `ImportError: initialization failed`."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "onnxruntime":
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as interrupt:
                raise ImportError("initialization failed") from interrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model(model)


def test_a_failed_embed_leaves_no_share_and_no_partial_file(trained, tmp_path, monkeypatch) -> None:
    data, record = trained
    image = tmp_path / "images" / "x.png"
    image.parent.mkdir()
    write_png(torch.zeros(1, 28, 28, dtype=torch.uint8), str(image))

    def fail(*args, **kwargs):
        raise ModelError("disk full")

    monkeypatch.setattr("arcface_lightning.embed.save_embeddings", fail)
    out = tmp_path / "out" / "e.npz"
    overrides = [f"ckpt_path={record['best_checkpoint']}", f"paths.data_dir={data}", "trainer=cpu"]
    assert run_line(tmp_path, "embed", *overrides, f"input={image.parent}", f"output={out}") == "disk full"
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_export_stopped_by_a_signal_leaves_no_partial_file(signum: int, trained, tmp_path: Path) -> None:
    """A real `python -m arcface_lightning.export`, signalled once its partial file exists (written, being checked).
    On a loaded machine this process can be descheduled long enough for the export to finish before the signal is
    sent (it then exits 0 with the file in place): that attempt says nothing, and the export is run again."""
    out = tmp_path / "out" / "m.onnx"
    partial = out.with_name("m.onnx.partial.onnx")
    command = cli_command("export", f"ckpt_path={trained[1]['best_checkpoint']}", f"output={out}",
                          f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    for _ in range(3):
        process = subprocess.Popen(
            **command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # as in a terminal: a script's background jobs (pytest started with `&`) inherit SIGINT ignored, which
            # Python and the command keep (runs.sigint_as_sigterm), and the SIGINT case would then test nothing
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while not partial.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert partial.exists(), "the export never wrote its partial file"
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
        if not (process.returncode == 0 and out.is_file()):  # the signal arrived while it was still working
            break
        out.unlink()
    assert process.returncode != 0, stdout[-2000:]
    assert list(out.parent.iterdir()) == []
    assert "needs onnxruntime" not in stdout + stderr  # the wrong reason an interrupted import used to give
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines()[-1].startswith(f"interrupted: {name}"), stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "interrupted"
