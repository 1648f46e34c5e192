"""The probe suite: every command driven with the bad inputs a hostile but honest user tries (issue 22's families),
each answered by one line (`error: ...` or `interrupted: ...`), a non-zero exit, no traceback and no file left
behind where the command would have written.

The commands run in this process, as their console scripts would (`cli()`/`main()` with sys.argv), so the suite pays
for its imports once per worker; a traceback here is an exception escaping the command (Hydra prints it and exits
1), which the harness reports as such. Paths in the cases are placeholders filled from one `world` of files per
worker: a trained checkpoint, its embeddings and exports, hostile and malformed files.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from arcface_lightning.serving.checkpoints import checkpoint_contract
from arcface_lightning.serving.contract import save_embeddings
from conftest import TINY, Outcome, invoke


def error_line(outcome: Outcome) -> str:
    lines = [line for line in outcome.err.splitlines() if line.startswith(("error:", "interrupted:"))]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def world(trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files the probes point at (placeholders in the cases): a good checkpoint and others."""
    data, record = trained
    root = tmp_path_factory.mktemp("world")
    ckpt = Path(record["best_checkpoint"])
    tensor_file = root / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor_file)
    text_file = root / "notes.txt"
    text_file.write_text("not a model\n")
    small = torch.load(ckpt, map_location="cpu", weights_only=True)
    small["hyper_parameters"]["optimizer"] = {"_target_": "builtins.open", "_args_": [str(root / "marker"), "w"]}
    torch.save(small, root / "hostile.ckpt")
    (root / "model.onnx").write_text("not really ONNX: refused by its name before it is read\n")
    image = root / "digit.png"
    write_png(torch.full((1, 28, 28), 128, dtype=torch.uint8), str(image))
    for folder in ("empty_sweep", "adir.onnx", "adir.npz", "classes/a", "classes/b"):
        (root / folder).mkdir(parents=True)
    for name in ("classes/a/1.png", "classes/b/2.png"):
        write_png(torch.full((1, 28, 28), 200, dtype=torch.uint8), str(root / name))
    contract = checkpoint_contract(ckpt)
    rows = np.eye(5, contract.embedding_size, dtype=np.float32)
    save_embeddings(root / "gallery.npz", rows, np.arange(5), [f"g{i}" for i in range(5)], contract, str(ckpt))
    other = dataclasses.replace(contract, weights_sha256="0" * 64)  # another training's weights
    save_embeddings(root / "other.npz", rows, np.arange(5), [f"o{i}" for i in range(5)], other, "other.ckpt")
    good = dict(np.load(root / "gallery.npz"))
    bad_files = {
        "flat": {"embeddings": rows[0]},
        "short": {"labels": np.arange(4)},
        "names": {"labels": np.array(["a", "b", "c", "d", "e"])},
        "nan": {"embeddings": np.where(rows > 0, np.nan, 0).astype(np.float32)},
        "scaled": {"embeddings": rows * 100},
    }
    for name, changed in bad_files.items():
        np.savez(root / f"{name}.npz", **{**good, **changed})
    return {
        "data": str(data),
        "ckpt": str(ckpt),
        "tensor": str(tensor_file),
        "text": str(text_file),
        "hostile": str(root / "hostile.ckpt"),
        "folder": str(root),
        "root": str(root),
        "onnx": str(root / "model.onnx"),
        "image": str(image),
        "gallery": str(root / "gallery.npz"),
        "other": str(root / "other.npz"),
        "empty_sweep": str(root / "empty_sweep"),
        "classes": str(root / "classes"),
        **{name: str(root / f"{name}.npz") for name in bad_files},
    }


# (id, command, arguments, the error line's start as a regex). {name} is a path of the world; {run} the probe's run dir.
TRAIN = "train"
CASES = [
    # train: a checkpoint to resume that is not one, and what it holds
    ("train ckpt folder", TRAIN, ["ckpt_path={folder}"], r"ckpt_path=\S+ is a folder; give the path of a \.ckpt"),
    ("train ckpt tensor", TRAIN, ["ckpt_path={tensor}"], r"ckpt_path=\S+ is not a Lightning checkpoint \(it holds"),
    ("train ckpt text", TRAIN, ["ckpt_path={text}"], r"ckpt_path=\S+ is not a readable checkpoint"),
    ("train ckpt onnx name", TRAIN, ["ckpt_path={root}/x.onnx"], r"ckpt_path=\S+ does not exist"),
    ("train resume other size", TRAIN, ["ckpt_path={ckpt}", "embedding_size=32"], r"ckpt_path=\S+ holds backbone"),
    ("train hostile optimizer", TRAIN, ["optimizer._target_=builtins.open"], r"optimizer._target_='builtins.open' is"),
    ("train bad allowed_targets", TRAIN, ["allowed_targets=[a-b]"], r"allowed_targets: 'a-b' is invalid"),
    ("train partial fc accumulate", TRAIN, ["head.sample_rate=0.5", "trainer.accumulate_grad_batches=2"], r"head.sam"),
    ("train sample_rate range", TRAIN, ["head.sample_rate=0"], r"head.sample_rate=0 is invalid; allowed: 0 < sampl"),
    ("train run dir in /proc", TRAIN, ["hydra.run.dir=/proc/nope/run"], r"hydra.run.dir=/proc/nope/run cannot be m"),
    ("train run dir under a file", TRAIN, ["hydra.run.dir={text}/run"], r"hydra.run.dir=\S+ cannot be made: \S+ is a"),
    # evaluate
    ("evaluate no ckpt", "evaluate", [], r"ckpt_path is required"),
    ("evaluate ckpt folder", "evaluate", ["ckpt_path={folder}"], r"ckpt_path=\S+ is a folder"),
    ("evaluate ckpt tensor", "evaluate", ["ckpt_path={tensor}"], r"ckpt_path=\S+ is not a Lightning checkpoint"),
    ("evaluate hostile", "evaluate", ["ckpt_path={hostile}"], r"ckpt_path=\S+ could not be loaded: optimizer._targe"),
    ("evaluate run dir in /proc", "evaluate", ["ckpt_path={ckpt}", "hydra.run.dir=/proc/x"], r"hydra.run.dir=/pro"),
    ("evaluate batch size", "evaluate", ["ckpt_path={ckpt}", "data.eval_batch_size=0"], r"data.eval_batch_size=0 is"),
    ("evaluate pairs missing", "evaluate", ["ckpt_path={ckpt}", "evaluation.pairs=/no/p.csv"], r"evaluation.pairs="),
    ("train data root a file", TRAIN, ["data=image_folder", "data.root={text}"], r"data.root=\S+ is not a folder"),
    ("train pairs missing", TRAIN, ["evaluation.pairs=/no/p.csv"], r"evaluation.pairs=/no/p.csv"),
    # embed
    ("embed no output", "embed", ["ckpt_path={ckpt}"], r"output is required"),
    ("embed output folder", "embed", ["ckpt_path={ckpt}", "output={root}/adir.npz"], r"output=\S+ is a folder"),
    ("embed output /proc", "embed", ["ckpt_path={ckpt}", "output=/proc/nope/e.npz"], r"output=/proc/nope/e.npz: can"),
    ("embed output under file", "embed", ["ckpt_path={ckpt}", "output={text}/e.npz"], r"output=\S+: \S+ is a file"),
    ("embed ckpt onnx", "embed", ["ckpt_path={onnx}", "output={run}/e.npz"], r"ckpt_path=\S+ is an export; this c"),
    ("embed ckpt tensor", "embed", ["ckpt_path={tensor}", "output={run}/e.npz"], r"ckpt_path=\S+ is not a Lightning"),
    ("embed hostile", "embed", ["ckpt_path={hostile}", "output={run}/e.npz"], r"ckpt_path=\S+ could not be loaded"),
    ("embed input missing", "embed", ["ckpt_path={ckpt}", "output={run}/e.npz", "input=/no/such"], r"input=/no/such"),
    # export
    ("export output folder", "export", ["ckpt_path={ckpt}", "output={root}/adir.onnx"], r"output=\S+ is a folder"),
    ("export output /proc", "export", ["ckpt_path={ckpt}", "output=/proc/nope/m.onnx"], r"output=/proc/nope/m.onnx"),
    ("export output under file", "export", ["ckpt_path={ckpt}", "output={text}/m.onnx"], r"output=\S+: \S+ is a f"),
    ("export ckpt onnx", "export", ["ckpt_path={onnx}", "output={run}/m.onnx"], r"ckpt_path=\S+ is an export"),
    ("export ckpt tensor", "export", ["ckpt_path={tensor}", "output={run}/m.onnx"], r"ckpt_path=\S+ is not a Lightn"),
    ("export hostile", "export", ["ckpt_path={hostile}", "output={run}/m.onnx"], r"ckpt_path=\S+ could not be loaded"),
    ("export bad format", "export", ["ckpt_path={ckpt}", "output={run}/m.onnx", "format=tflite"], r"format='?tflite"),
    # search
    ("search gallery folder", "search", ["gallery={folder}", "query={gallery}"], r"gallery=\S+ is a folder"),
    ("search gallery missing", "search", ["gallery=/no/g.npz", "query={gallery}"], r"gallery=/no/g.npz does not exis"),
    ("search gallery text", "search", ["gallery={text}", "query={gallery}"], r"gallery=\S+ is not"),
    ("search 1-D embeddings", "search", ["gallery={flat}", "query={gallery}"], r"gallery=\S+: embeddings is float"),
    ("search short labels", "search", ["gallery={short}", "query={gallery}"], r"gallery=\S+: labels has shape \(4"),
    ("search string labels", "search", ["gallery={gallery}", "query={names}"], r"query=\S+: labels holds strings"),
    ("search NaN rows", "search", ["gallery={nan}", "query={gallery}"], r"gallery=\S+: embeddings row 0 holds NaN"),
    ("search rows not unit", "search", ["gallery={scaled}", "query={gallery}"], r"gallery=\S+: embeddings row 0 has"),
    ("search other model", "search", ["gallery={gallery}", "query={other}"], r"gallery=\S+ and query=\S+ come from"),
    (
        "search output is gallery",
        "search",
        ["gallery={gallery}", "query={gallery}", "output={gallery}"],
        r"output=\S+ is",
    ),
    (
        "search output folder",
        "search",
        ["gallery={gallery}", "query={gallery}", "output={folder}"],
        r"output=\S+ is a ",
    ),
    ("search k zero", "search", ["gallery={gallery}", "query={gallery}", "k=0"], r"k=0 is invalid"),
    # verify
    ("verify a folder", "verify", ["ckpt_path={ckpt}", "a={folder}", "b={image}"], r"a=\S+ is a folder"),
    ("verify a missing", "verify", ["ckpt_path={ckpt}", "a=/no/a.png", "b={image}"], r"a=/no/a.png: no such file"),
    ("verify a text", "verify", ["ckpt_path={ckpt}", "a={text}", "b={image}"], r"unreadable image \S+notes.txt: "),
    ("verify ckpt tensor", "verify", ["ckpt_path={tensor}", "a={image}", "b={image}"], r"ckpt_path=\S+ is not a Ligh"),
    ("verify hostile", "verify", ["ckpt_path={hostile}", "a={image}", "b={image}"], r"ckpt_path=\S+ could not be lo"),
    ("verify run dir /proc", "verify", ["ckpt_path={ckpt}", "a={image}", "b={image}", "hydra.run.dir=/proc/r"], r"hyd"),
    ("verify far", "verify", ["ckpt_path={ckpt}", "a={image}", "b={image}", "far=2"], r"far=2"),
    # report
    ("report missing dir", "report", ["/no/sweep"], r"/no/sweep does not exist; give a sweep dir"),
    ("report a file", "report", ["{text}"], r"\S+ is a file, not a folder; give a sweep dir"),
    ("report no jobs", "report", ["{empty_sweep}"], r"\S+ is not a sweep dir"),
    # pack
    ("pack source missing", "pack", ["/no/src", "{run}/p"], r"source=/no/src does not exist"),
    ("pack output /proc", "pack", ["{classes}", "/proc/nope/p"], r"output=/proc/nope/p cannot be created"),
    ("pack output under file", "pack", ["{classes}", "{text}/p"], r"output=\S+ is inside \S+, which is a file"),
    ("pack output exists", "pack", ["{classes}", "{folder}"], r"output=\S+ exists; give a new folder"),
    ("pack chunk bytes", "pack", ["{classes}", "{run}/p", "--chunk-bytes", "bogus"], r"argument --chunk-bytes: 'bo"),
    ("pack val size", "pack", ["{classes}", "{run}/p", "--val-size", "40"], r"--val-size=40"),
    # compare: checked before any job starts
    ("compare select", "compare", ["select=val/bogus"], r"select='val/bogus' is invalid; allowed: val/acc_best"),
    ("compare columns", "compare", ["columns=[test/bogus]"], r"columns: 'test/bogus' is not recorded"),
    ("compare grid value", "compare", ["grids.arcface.head.m=[5]"], r"grids.arcface.head.m: 5 is invalid"),
    ("compare grid key", "compare", ["heads=[softmax]", "+grids.softmax.head.s=[1]"], r"grids.softmax.head.s: head="),
    ("compare head", "compare", ["heads=[arcfce]"], r"heads"),
]


@pytest.mark.parametrize("case, command, arguments, expected", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_leaves_nothing(world, tmp_path: Path, case, command, arguments, expected) -> None:
    run_dir = tmp_path / "run"
    argv = [a.format(**world, run=run_dir) for a in arguments]
    if command not in ("pack", "report") and not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={run_dir}")
    if command == "evaluate":
        argv.append(f"paths.data_dir={world['data']}")
    if command == TRAIN:
        argv = [f"paths.data_dir={world['data']}", "~experiment", *TINY, *argv]  # the shared tiny run's config
    outcome = invoke(command, argv)
    assert outcome.escaped is None, f"traceback: {outcome.escaped!r}"
    assert outcome.code != 0 and "Traceback" not in outcome.err, outcome.err[-2000:]
    line = error_line(outcome)
    assert re.match(f"(error|interrupted): {expected}", line), (line, outcome.err[-2000:])
    assert "\n" not in line
    assert not (Path(world["root"]) / "marker").exists()
    left = [p for p in tmp_path.rglob("*") if p.is_file() and ("partial" in p.name or "checkpoints" in p.parts)]
    assert not left, left
    record = run_dir / "metrics.json"
    if record.exists():
        assert '"status": "failed"' in record.read_text()
