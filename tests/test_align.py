"""`python -m arcface_lightning.align`: a user's images with five landmarks each → aligned crops in class folders,
the same pixels as data/landmarks.align, nothing written when any row is bad."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arcface_lightning.align import main
from arcface_lightning.data.landmarks import align
from conftest import ROOT

ORACLE = np.load(Path(__file__).parent / "data" / "insightface" / "aligned_by_opencv.npz")


def faces_csv(tmp_path: Path, header: bool = True) -> Path:
    """Two identities, two photos each (the oracle's real-MNIST image, JPEG and PNG), landmarks per photo."""
    folder = tmp_path / "photos"
    rows = ["path," + ",".join(f"{a}{i}" for i in range(1, 6) for a in "xy")] if header else []
    for k, (name, suffix) in enumerate([("alice", "png"), ("alice", "jpg"), ("bob", "png"), ("bob", "jpg")]):
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ORACLE["image"]).save(folder / name / f"{k}.{suffix}", quality=95)
        points = ORACLE["landmarks"][k % 3]
        rows.append(f"{name}/{k}.{suffix}," + ",".join(f"{v:.4f}" for v in points.reshape(-1)))
    (folder / "faces.csv").write_text("\n".join(rows) + "\n")
    return folder / "faces.csv"


def test_align_writes_class_folders_of_crops_equal_to_the_library(tmp_path: Path, capsys) -> None:
    source = faces_csv(tmp_path)
    main([str(source), str(tmp_path / "aligned")])
    written = sorted(p.relative_to(tmp_path / "aligned").as_posix() for p in (tmp_path / "aligned").rglob("*.png"))
    assert written == ["alice/0.png", "alice/1.png", "bob/2.png", "bob/3.png"]
    crop = np.asarray(Image.open(tmp_path / "aligned" / "alice" / "0.png"))
    points = np.array([float(v) for v in source.read_text().splitlines()[1].split(",")[1:]]).reshape(5, 2)
    assert np.array_equal(crop, align(ORACLE["image"], points, 112))
    assert crop.shape == (112, 112, 3)
    assert "aligned 4 faces" in capsys.readouterr().out
    main([str(faces_csv(tmp_path / "again", header=False)), str(tmp_path / "grey"), "--size", "224", "--channels", "1"])
    assert np.asarray(Image.open(tmp_path / "grey" / "bob" / "3.png")).shape == (224, 224)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace("alice/1.jpg", "alice/none.jpg"), r"names 1 missing image\(s\), the first .*none"),
        (lambda text: text + "carol/9.png,1,2,3\n", r"line 6 is 'carol/9\.png,1,2,3'; allowed: path,x1,y1"),
        (lambda text: text + "carol/9.png," + ",".join(["nan"] * 10) + "\n", r"line 6 .* with finite numbers$"),
    ],
    ids=["missing image", "short row", "nan"],
)
def test_a_bad_csv_is_one_line_and_writes_nothing(edit, message: str, tmp_path: Path) -> None:
    source = faces_csv(tmp_path)
    source.write_text(edit(source.read_text()))
    with pytest.raises(SystemExit, match=r"^error: .*" + message):
        main([str(source), str(tmp_path / "aligned")])
    assert not (tmp_path / "aligned").exists() and not (tmp_path / "aligned.partial").exists()


def test_an_existing_output_and_a_bad_size_are_refused(tmp_path: Path) -> None:
    source = faces_csv(tmp_path)
    (tmp_path / "aligned").mkdir()
    with pytest.raises(SystemExit, match=r"aligned exists; allowed: a folder that does not exist yet$"):
        main([str(source), str(tmp_path / "aligned")])
    result = subprocess.run([sys.executable, "-m", "arcface_lightning.align", str(source), str(tmp_path / "x"),
                             "--size", "0"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: argument --size: '0' is invalid; allowed: an integer ≥ 1; see python -m arcface_lightning.align --help"
    ]
