"""Pair lists (CSV and LFW's pairs.txt) and their verification metrics, read and verified at test time."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_images import digits, write_folder
from torchvision.io import write_png

from arcface_lightning.core.runs import run
from arcface_lightning.data import DataError
from arcface_lightning.data.pairs import read_pairs
from arcface_lightning.evaluate import evaluate
from arcface_lightning.evaluation.metrics import pair_metrics
from arcface_lightning.train import train
from conftest import compose_config, tiny_config


def lfw_folder(root: Path, people: dict[str, int]) -> Path:
    for name, count in people.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(1, count + 1):
            write_png(torch.full((1, 8, 8), n, dtype=torch.uint8), str(root / name / f"{name}_{n:04d}.png"))
    return root


def test_lfw_pairs_txt_gives_folds_same_flags_and_paths(tmp_path: Path) -> None:
    root = lfw_folder(tmp_path / "lfw", {"Ann_A": 3, "Bob_B": 2, "Cy_C": 1})
    lines = ["2\t2", "Ann_A\t1\t2", "Bob_B\t1\t2", "Ann_A\t1\tCy_C\t1", "Bob_B\t2\tCy_C\t1"]
    lines += ["Ann_A\t2\t3", "Ann_A\t1\t3", "Ann_A\t3\tBob_B\t1", "Cy_C\t1\tBob_B\t2"]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    pairs = read_pairs(root / "pairs.txt")
    assert pairs.same.tolist() == [True, True, False, False] * 2 and pairs.fold.tolist() == [0] * 4 + [1] * 4
    assert len(pairs.paths) == 6 and pairs.paths[0] == str(root / "Ann_A" / "Ann_A_0001.png")
    first = (pairs.paths[pairs.a[0]], pairs.paths[pairs.b[0]])
    assert first == (str(root / "Ann_A" / "Ann_A_0001.png"), str(root / "Ann_A" / "Ann_A_0002.png"))
    (root / "pairs.txt").write_text("\n".join(["3\t2", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"pairs.txt: header says 3 folds of 2×2 pairs, the file has 8$"):
        read_pairs(root / "pairs.txt")


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.png,b.png,maybe\n", r"pairs.csv:1: expected path_a,path_b,same \(same: 1/0 or true/false\), got "),
        ("a.png,nope.png,1\n", r"evaluation.pairs=.*pairs.csv names 1 missing image\(s\), the first .*nope.png$"),
        ("path_a,path_b,same\n", r"evaluation.pairs=.*pairs.csv lists no pairs$"),
    ],
    ids=["same", "missing", "empty"],
)
def test_a_bad_pair_list_fails_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    lfw_folder(tmp_path, {"x": 1})
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes((tmp_path / "x" / "x_0001.png").read_bytes())
    (tmp_path / "pairs.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        read_pairs(tmp_path / "pairs.csv")


def lfw_oracle(scores: list[float], same: list[bool], fold: list[int]) -> list[float]:
    """Per-fold accuracy, by brute force in float64: every threshold between sorted training scores (and above
    the highest), the first with the best training accuracy from the top, applied to the fold."""
    accuracies = []
    for f in sorted(set(fold)):
        train = sorted(((s, y) for s, y, g in zip(scores, same, fold, strict=True) if g != f), reverse=True)
        candidates = [train[0][0] + 1e-6] + [
            train[k - 1][0] if k == len(train) else (train[k - 1][0] + train[k][0]) / 2
            for k in range(1, len(train) + 1)
        ]
        best = max(candidates, key=lambda t: (sum((s >= t) == y for s, y in train), t))
        test = [(s, y) for s, y, g in zip(scores, same, fold, strict=True) if g == f]
        accuracies.append(sum((s >= best) == y for s, y in test) / len(test))
    return accuracies


def test_pair_metrics_match_the_lfw_protocol_by_brute_force() -> None:
    rng = random.Random(0)
    same = [rng.random() < 0.5 for _ in range(200)]
    scores = [rng.gauss(0.6 if y else 0.2, 0.2) for y in same]
    fold = [k * 10 // 200 for k in range(200)]
    metrics = pair_metrics(torch.tensor(scores, dtype=torch.float64), torch.tensor(same), torch.tensor(fold))
    expected = lfw_oracle(scores, same, fold)
    assert metrics["verification_acc"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert metrics["verification_acc_std"] == pytest.approx(np.std(expected, ddof=1), abs=1e-12)
    pos = [s for s, y in zip(scores, same, strict=True) if y]
    neg = [s for s, y in zip(scores, same, strict=True) if not y]
    auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))  # Mann-Whitney
    assert metrics["verification_auc"] == pytest.approx(auc, abs=1e-6)


@pytest.fixture
def pair_csv(tmp_path: Path) -> tuple[Path, Path]:
    """A training folder of digits, and a pair list over other images of the same digits (30 same, 30 different)."""
    images, labels = digits(40)
    train_root = write_folder(tmp_path / "train", images[::2], labels[::2])
    pairs_root = write_folder(tmp_path / "pairs", images[1::2], labels[1::2])
    files = {d: sorted((pairs_root / f"digit_{d}").glob("*.png")) for d in range(10)}
    rows = [f"digit_{d}/{files[d][k].name},digit_{d}/{files[d][k + 1].name},1" for d in range(10) for k in range(3)]
    rows += [
        f"digit_{d}/{files[d][k].name},digit_{(d + 1) % 10}/{files[(d + 1) % 10][k].name},0"
        for d in range(10)
        for k in range(3)
    ]
    (pairs_root / "pairs.csv").write_text("path_a,path_b,same\n" + "\n".join(rows) + "\n")
    return train_root, pairs_root / "pairs.csv"


def test_train_and_evaluate_verify_a_pair_list(pair_csv: tuple[Path, Path], tmp_path: Path) -> None:
    train_root, pairs = pair_csv
    common = ["data.in_channels=1", "data.image_size=28", "data.val_size=20", "data.num_workers=0"]
    cfg = tiny_config(
        tmp_path, tmp_path / "run", "data=image_folder", f"data.root={train_root}", *common,
        f"evaluation.pairs={pairs}", "trainer.max_epochs=4", "optimizer.lr=0.01", "head.s=10", "head.m=0.1",
        "logger=csv",
    )  # fmt: skip
    metrics = run(train, cfg)
    for key in ("verification_acc", "verification_acc_std", "verification_auc", "tar_at_far_1e-3", "threshold"):
        assert f"pairs/{key}" in metrics, key
    assert metrics["pairs/verification_auc"] > 0.7, metrics  # trained digits, unseen images: mostly separable
    import csv

    (logged,) = (tmp_path / "run").rglob("metrics.csv")
    rows = [row for row in csv.DictReader(logged.open()) if row.get("pairs/verification_auc")]
    assert len(rows) == 4 + 1  # every validation epoch, and the test
    eval_cfg = compose_config(
        f"ckpt_path={metrics['best_checkpoint']}", f"evaluation.pairs={pairs}", "trainer=cpu", "logger=csv",
        "data.num_workers=0", config_name="eval",
    )  # fmt: skip
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    evaluated = run(evaluate, eval_cfg)
    for key in ("pairs/verification_acc", "pairs/verification_auc", "pairs/threshold"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_a_pair_list_with_a_missing_image_stops_before_training(pair_csv: tuple[Path, Path], tmp_path: Path) -> None:
    train_root, pairs = pair_csv
    pairs.write_text(pairs.read_text() + "digit_0/nope.png,digit_1/nope.png,0\n")
    cfg = tiny_config(
        tmp_path, tmp_path / "run", "data=image_folder", f"data.root={train_root}", "data.in_channels=1",
        "data.image_size=28", "data.val_size=20", f"evaluation.pairs={pairs}",
    )  # fmt: skip
    with pytest.raises(SystemExit, match=r"^error: evaluation.pairs=.* names 2 missing image\(s\), the first .*nope"):
        run(train, cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "checkpoints").exists()


def csv_of_the_bin(folder: Path) -> Path:
    """The pairs of tests/data/insightface/mnist_pairs.bin (real MNIST test digits) as image files and a CSV."""
    import pickle

    images, same = pickle.loads((Path(__file__).parent / "data" / "insightface" / "mnist_pairs.bin").read_bytes())
    folder.mkdir(parents=True)
    png = b"\x89PNG"
    names = [f"{i:02d}." + ("png" if image.startswith(png) else "jpg") for i, image in enumerate(images)]
    for name, image in zip(names, images, strict=True):
        (folder / name).write_bytes(image)
    rows = [f"{names[2 * k]},{names[2 * k + 1]},{int(flag)}" for k, flag in enumerate(same)]
    (folder / "mnist_csv.csv").write_text("path_a,path_b,same\n" + "\n".join(rows) + "\n")
    return folder / "mnist_csv.csv"


def test_a_bin_and_the_same_pairs_as_a_csv_give_the_same_numbers_each_under_its_name(trained, tmp_path) -> None:
    """`evaluation.pairs=[mnist_pairs.bin, mnist_csv.csv]`: one checkpoint, two sets under their own names, equal
    numbers (the same images, decoded the same way); one set keeps the plain pairs/* names; flip changes them."""
    data, record = trained
    binary = Path(__file__).parent / "data" / "insightface" / "mnist_pairs.bin"
    listed = csv_of_the_bin(tmp_path / "pairs")

    def evaluated(*overrides: str) -> dict:
        cfg = compose_config(f"ckpt_path={record['best_checkpoint']}", f"data.data_dir={data}", "trainer=cpu",
                             "logger=csv", "data.num_workers=0", *overrides, config_name="eval")  # fmt: skip
        cfg.paths.output_dir = str(tmp_path / f"eval_{len(list(tmp_path.iterdir()))}")
        return run(evaluate, cfg)

    both = evaluated(f"evaluation.pairs=[{binary},{listed}]")
    keys = ("verification_acc", "verification_acc_std", "verification_auc", "tar_at_far_1e-3", "threshold")
    for key in keys:
        assert both[f"pairs/mnist_pairs/{key}"] == pytest.approx(both[f"pairs/mnist_csv/{key}"], abs=1e-7), key
    assert not any(key.startswith("pairs/verification") for key in both)
    alone = evaluated(f"evaluation.pairs={binary}")
    assert alone["pairs/verification_auc"] == pytest.approx(both["pairs/mnist_pairs/verification_auc"], abs=1e-7)
    flipped = evaluated(f"evaluation.pairs={binary}", "evaluation.flip=true")
    assert flipped["pairs/threshold"] != pytest.approx(alone["pairs/threshold"], abs=1e-6)


def test_two_sets_of_one_name_and_a_hostile_bin_stop_before_any_work(tmp_path: Path) -> None:
    import pickle

    from arcface_lightning.core.checks import BadValue
    from arcface_lightning.training.callbacks import PairVerification

    with pytest.raises(BadValue, match=r"pairs=\['a/lfw\.bin', 'b/lfw\.bin'\] is invalid; allowed: sets of distinct"):
        PairVerification(["a/lfw.bin", "b/lfw.bin"])
    hostile = tmp_path / "lfw.bin"
    hostile.write_bytes(pickle.dumps(([b"a", b"b"], [True], print)))
    with pytest.raises(DataError, match=r"lfw\.bin is refused: it names builtins\.print; allowed: a \.bin of plain"):
        PairVerification([str(hostile)]).setup(None, None, "fit")


def test_a_pair_sets_metric_can_select_the_checkpoint(pair_csv: tuple[Path, Path], tmp_path: Path) -> None:
    """`evaluation.select=pairs/verification_auc`: ModelCheckpoint monitors the pair set's validation metric (the
    best checkpoint is named by it); a metric no set logs, or not a metric, is one line before any work."""
    train_root, pairs = pair_csv
    common = ["data=image_folder", f"data.root={train_root}", "data.in_channels=1", "data.image_size=28",
              "data.val_size=20", "data.num_workers=0", f"evaluation.pairs={pairs}",
              "trainer.max_epochs=2"]  # fmt: skip
    cfg = tiny_config(tmp_path, tmp_path / "run", *common, "evaluation.select=pairs/verification_auc")
    metrics = run(train, cfg)
    assert (
        Path(metrics["best_checkpoint"]).name.startswith("epoch_")
        and "pairs_verification_auc_" in Path(metrics["best_checkpoint"]).name
    )
    for select, message in [
        ("pairs/lfw/verification_acc", r"evaluation\.select=pairs/lfw/verification_acc is not a metric of evaluation"
                                       r"\.pairs; allowed: pairs/verification_acc$"),
        ("pairs/threshold", r"evaluation\.select='pairs/threshold' is invalid; allowed: null, or pairs/"),
    ]:  # fmt: skip
        bad = tiny_config(tmp_path, tmp_path / "bad", *common, f"evaluation.select={select}")
        with pytest.raises(SystemExit, match=r"^error: " + message):
            run(train, bad)
