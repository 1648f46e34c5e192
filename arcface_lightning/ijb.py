"""IJB-B / IJB-C 1:1 verification: the number every face paper reports, TAR at FAR 1e-6 … 1e-1 over template pairs.

    python -m arcface_lightning.ijb ckpt_path=model.onnx root=/data/IJB_release/IJBC target=IJBC
    python -m arcface_lightning.ijb ckpt_path=<run>/checkpoints/<best>.ckpt root=/data/IJB_release/IJBB target=IJBB

`root` holds the official layout (evaluation/ijb.py): `meta/` and `loose_crop/`. Each face is aligned by its five
landmarks to the model's image size (data/landmarks.py, insightface's reference points), embedded with its mirror
(`flip`), weighted by its detector score (`detector_score`), pooled per media then per template; each template pair
is scored by the cosine of its templates. Written to the run dir: `ijb.json` (TAR at each FAR, the counts, the
settings), `roc.png`; metrics.json has the TARs as `tar_at_far_1e-06` … `tar_at_far_1e-01` (null where the pairs
hold too few negatives to measure that FAR). With an .onnx model and PNG/JPEG faces the command imports no Lightning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from arcface_lightning.core.runs import entry_point, start
from arcface_lightning.core.writing import written_aside
from arcface_lightning.data.files import pixels, read_bytes
from arcface_lightning.data.landmarks import align_channels_first
from arcface_lightning.evaluation.ijb import pair_scores, pool_templates, read_protocol, roc_points, tar_at_far
from arcface_lightning.serving.contract import Contract
from arcface_lightning.serving.inference import load_model, with_flip

log = logging.getLogger(__name__)


def aligned_face(path: Path, landmarks: np.ndarray, contract: Contract) -> np.ndarray:
    """A loose crop → uint8 (in_channels, image_size, image_size), its landmarks on the reference points."""
    image = pixels(read_bytes(str(path)), contract.in_channels, str(path))
    return align_channels_first(image, landmarks, contract.image_size)


def ijb(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    protocol = read_protocol(cfg.root, cfg.target)  # every file and face checked before the model is loaded
    embed, contract = load_model(cfg.ckpt_path)
    embed = with_flip(embed) if cfg.flip else embed
    parts = []
    for first in range(0, len(protocol.names), cfg.batch_size):
        rows = range(first, min(first + cfg.batch_size, len(protocol.names)))
        parts.append(embed(np.stack([aligned_face(protocol.image(i), protocol.landmarks[i], contract) for i in rows])))
    features = np.concatenate(parts).astype(np.float64)
    if cfg.detector_score:
        features *= protocol.scores[:, None]
    ids, pooled = pool_templates(features, protocol.templates, protocol.medias)
    scores = pair_scores(ids, pooled, protocol.pairs)
    tars = tar_at_far(scores, protocol.same)
    output = Path(cfg.paths.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "target": cfg.target, "faces": len(protocol.names), "templates": len(ids), "pairs": len(scores),
        "same_pairs": int(protocol.same.sum()), "flip": bool(cfg.flip), "detector_score": bool(cfg.detector_score),
        "model": str(cfg.ckpt_path), **{f"tar_at_far_{far}": tar for far, tar in tars.items()},
    }  # fmt: skip
    with written_aside(output / "ijb.json") as partial:
        partial.write_text(json.dumps(record, indent=1) + "\n")
    write_roc(scores, protocol.same, output / "roc.png", f"{cfg.target}: {Path(str(cfg.ckpt_path)).name}")
    for far, tar in tars.items():
        log.info(f"TAR@FAR={far}: {'-' if tar is None else f'{tar:.4f}'}")
    return record


def write_roc(scores: np.ndarray, same: np.ndarray, path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # here: seconds to import, and only this figure needs it

    far, tar = roc_points(scores, same)
    figure = Figure(figsize=(5, 4))
    axes = figure.add_subplot()
    keep = far > 0
    axes.semilogx(far[keep], tar[keep])
    axes.set(xlabel="false accept rate", ylabel="true accept rate", title=title, xlim=(1e-6, 1), ylim=(0, 1.01))
    axes.grid(True, which="both", alpha=0.3)
    with written_aside(path) as partial:
        figure.savefig(partial, format="png", dpi=120)


main, cli = entry_point("ijb", ijb)


if __name__ == "__main__":
    main()
