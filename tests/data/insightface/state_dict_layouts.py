"""Writes tests/data/insightface/state_dict_layouts.json: every state-dict key and shape of insightface's own
arcface_torch backbones (iresnet18, iresnet50, mbf), built on the meta device from insightface's source, so
tests/test_face_backbones.py can hold IResNet and MobileFaceNet to the model zoo's backbone.pth layout. insightface's
code is not part of this repository: pass the folder holding its `backbones/iresnet.py` and `mobilefacenet.py`
(recognition/arcface_torch/backbones of https://github.com/deepinsight/insightface), from the repository root:

    python tests/data/insightface/state_dict_layouts.py <insightface>/recognition/arcface_torch/backbones \
        tests/data/insightface/state_dict_layouts.json
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch


def load(folder: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"insightface_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(folder: Path, out: Path) -> None:
    iresnet, mobilefacenet = load(folder, "iresnet"), load(folder, "mobilefacenet")
    builders = {
        "iresnet18": lambda: iresnet.iresnet18(num_features=512),
        "iresnet50": lambda: iresnet.iresnet50(num_features=512),
        "mbf": lambda: mobilefacenet.get_mbf(False, 512),
    }
    layouts = {}
    for name, build in builders.items():
        with torch.device("meta"):
            model = build()
        layouts[name] = {key: list(value.shape) for key, value in model.state_dict().items()}
    out.write_text(json.dumps(layouts, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
