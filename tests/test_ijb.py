"""IJB-B / IJB-C 1:1 verification (evaluation/ijb.py, `python -m arcface_lightning.ijb`) on a synthetic folder in
the official layout whose answer is known: templates of real MNIST digits (written as loose crops with their five
landmarks), a model whose embeddings the test controls, and the TARs against a brute-force float64 computation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import digits

from arcface_lightning import ijb as command
from arcface_lightning.core.checks import DataError
from arcface_lightning.core.runs import run
from arcface_lightning.data.landmarks import reference_points
from arcface_lightning.evaluation.ijb import pool_templates, read_protocol, tar_at_far
from arcface_lightning.serving.contract import Contract
from conftest import compose_config

SIZE, CANVAS, E = 28, 40, 8
CONTRACT = Contract(image_size=SIZE, in_channels=1, normalize=True, mean=[0.5], std=[0.5], embedding_size=E)
PROJECTION = np.random.default_rng(0).normal(size=(E, SIZE * SIZE))


def projection_model(images: np.ndarray) -> np.ndarray:
    """The model whose embeddings the test controls: a fixed projection of the pixels, unit rows."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255 @ PROJECTION.T
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_ijb(root: Path, target: str = "IJBC") -> dict:
    """8 templates (two per digit class for 4 classes), 2 media each of 1–2 faces; every template pair listed."""
    images, classes = digits(6)  # real MNIST digits where ARCFACE_DATA_DIR holds them (CI), else synthetic ones
    rng = np.random.default_rng(1)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    faces, points, truth = [], [], {"faces": [], "template_class": {}}
    face = 0
    for template in range(8):
        digit = template // 2
        pool = np.flatnonzero(classes == digit)
        truth["template_class"][100 + template] = digit
        for media in range(2):
            for _ in range(1 + (template + media) % 2):
                image = images[pool[face % len(pool)]]
                dx, dy = rng.integers(0, CANVAS - SIZE, size=2)
                canvas = np.zeros((CANVAS, CANVAS), np.uint8)
                canvas[dy : dy + SIZE, dx : dx + SIZE] = image
                name = f"{face}.png" if face % 3 else f"{face}.jpg"
                Image.fromarray(canvas).save(root / "loose_crop" / name, quality=100)
                landmarks = reference_points(SIZE) + np.array([dx, dy])
                score = 0.5 + 0.5 * rng.random()
                faces.append(f"{name} {100 + template} {1000 + 10 * template + media}")
                points.append(" ".join([name, *(f"{v:.4f}" for v in landmarks.reshape(-1)), f"{score:.4f}"]))
                truth["faces"].append((name, 100 + template, 1000 + 10 * template + media, score))
                face += 1
    pairs = [f"{100 + a} {100 + b} {int(a // 2 == b // 2)}" for a, b in itertools.combinations(range(8), 2)]
    t = target.lower()
    (root / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(points) + "\n")
    (root / "meta" / f"{t}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return truth


def brute_force_tar(scores: np.ndarray, same: np.ndarray, far: float) -> float | None:
    """max TPR over every threshold (accept: score > t) whose FPR ≤ far; None with fewer than 1/far negatives."""
    negatives = (~same).sum()
    if negatives * far < 1:
        return None
    best = 0.0
    for t in [-np.inf, *np.unique(scores)]:
        if (scores[~same] > t).sum() / negatives <= far:
            best = max(best, float((scores[same] > t).mean()))
    return best


def test_the_protocol_scores_templates_as_a_brute_force_computation(tmp_path, monkeypatch) -> None:
    truth = write_ijb(tmp_path / "IJBC")
    monkeypatch.setattr(command, "load_model", lambda path: (projection_model, CONTRACT))
    cfg = compose_config("ckpt_path=model.onnx", f"root={tmp_path / 'IJBC'}", config_name="ijb")
    cfg.paths.output_dir = str(tmp_path / "run")
    record = run(command.ijb, cfg)
    written = json.loads((tmp_path / "run" / "ijb.json").read_text())
    assert (tmp_path / "run" / "roc.png").stat().st_size > 1000
    # the oracle: each face cut out where it was pasted (its landmarks say where), embedded with its mirror,
    # weighted, pooled in float64, all pairs scored
    features, templates, medias = [], [], []
    for name, template, media, score in truth["faces"]:
        canvas = np.asarray(Image.open(tmp_path / "IJBC" / "loose_crop" / name))
        line = next(r for r in (tmp_path / "IJBC" / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()
                    if r.split()[0] == name)  # fmt: skip
        dx, dy = np.rint(np.array(line.split()[1:3], float) - reference_points(SIZE)[0]).astype(int)
        crop = canvas[dy : dy + SIZE, dx : dx + SIZE][None, None]
        fused = projection_model(crop) + projection_model(crop[..., ::-1].copy())
        features.append(fused[0] / np.linalg.norm(fused[0]) * score)
        templates.append(template)
        medias.append(media)
    features, templates, medias = np.array(features, np.float64), np.array(templates), np.array(medias)
    pooled = {}
    for t in np.unique(templates):
        total = sum(features[(templates == t) & (medias == m)].mean(0) for m in np.unique(medias[templates == t]))
        pooled[t] = total / np.linalg.norm(total)
    pairs = list(itertools.combinations(sorted(pooled), 2))
    scores = np.array([pooled[a] @ pooled[b] for a, b in pairs])
    same = np.array([truth["template_class"][a] == truth["template_class"][b] for a, b in pairs])
    assert record["pairs"] == 28 and record["same_pairs"] == int(same.sum()) == 4 and record["templates"] == 8
    for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        expected = brute_force_tar(scores, same, far)
        key = f"tar_at_far_{far:.0e}"
        assert written[key] == record[key] and (written[key] is None) == (expected is None), key
        if expected is not None:
            assert written[key] == pytest.approx(expected, abs=1e-9), key
    assert written["tar_at_far_1e-01"] is not None and written["tar_at_far_1e-06"] is None  # 24 negatives


def test_tar_at_far_and_pooling_against_brute_force_on_random_scores() -> None:
    rng = np.random.default_rng(3)
    scores, same = rng.normal(size=3000), rng.random(3000) < 0.3
    scores[same] += 1.0
    scores[::7] = scores[1::7][: len(scores[::7])]  # ties across the classes
    for far, tar in tar_at_far(scores, same, (1e-3, 1e-2, 1e-1)).items():
        assert tar == pytest.approx(brute_force_tar(scores, same, float(far)), abs=1e-12), far
    features = rng.normal(size=(6, 4))
    ids, pooled = pool_templates(features, np.array([1, 1, 1, 2, 2, 2]), np.array([5, 5, 6, 7, 8, 8]))
    one = features[:2].mean(0) + features[2]
    two = features[3] + features[4:].mean(0)
    np.testing.assert_allclose(pooled, np.stack([one / np.linalg.norm(one), two / np.linalg.norm(two)]), atol=1e-12)
    assert ids.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "meta" / "ijbc_template_pair_label.txt").unlink(), r"ijbc_template_pair_label\.txt is missing"),
        (lambda r: (r / "loose_crop" / "1.png").unlink(), r"loose_crop/1\.png is missing \(named in ijbc_face_tid"),
        (lambda r: (r / "meta" / "ijbc_name_5pts_score.txt").write_text("0.jpg 1 2\n"), r"line 1 has 3 fields; "),
        (lambda r: (r / "meta" / "ijbc_template_pair_label.txt").write_text("100 999 1\n"), r"names template 999"),
    ],
    ids=["no pairs file", "no image", "short landmark line", "unknown template"],
)  # fmt: skip
def test_a_damaged_release_is_one_line_before_the_model_loads(damage, message, tmp_path) -> None:
    write_ijb(tmp_path / "IJBC")
    damage(tmp_path / "IJBC")
    with pytest.raises(DataError, match=r"^root: .*" + message):
        read_protocol(tmp_path / "IJBC", "IJBC")
    with pytest.raises(DataError, match=r"^target='IJBA' is invalid; allowed: IJBB, IJBC$"):
        read_protocol(tmp_path / "IJBC", "IJBA")
