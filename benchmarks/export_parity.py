"""Parity of the exported embedding model with the eager one, per backbone and format (the closing figures).

    python benchmarks/export_parity.py            # every conf/backbone/*.yaml at its configured size

Each backbone (random weights, running statistics moved off their defaults) is wrapped in checkpoints.Embedder,
exported with export.export_model at batch 2, read back with inference.load_model (ONNX Runtime, torch.jit.load)
and compared with the eager model on 64 random uint8 images: the max absolute difference of the unit embeddings.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from arcface_lightning.core.config import register_configs
from arcface_lightning.export import export_model
from arcface_lightning.serving.checkpoints import Embedder
from arcface_lightning.serving.contract import Contract
from arcface_lightning.serving.inference import load_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"
SIZES = {"resnet18": (3, 32)}  # (channels, image size): the CIFAR stem's data; the CNNs take MNIST's 1×28×28


def backbone(name: str, channels: int, size: int) -> torch.nn.Module:
    """conf/backbone/<name>.yaml composed as train would compose it, at 128-D, randomly initialised."""
    overrides = [f"backbone={name}", f"data.in_channels={channels}", f"data.image_size={size}", "embedding_size=128"]
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "~experiment"])
    return instantiate(cfg.backbone)


def main() -> None:
    register_configs()
    torch.manual_seed(0)
    print("| backbone | format | max abs diff (64 images) |\n|---|---|---|")
    for path in sorted(CONF.glob("*.yaml")):
        channels, size = SIZES.get(path.stem, (1, 28))
        model = backbone(path.stem, channels, size)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        contract = Contract(size, channels, True, [0.5] * channels, [0.25] * channels, 128)
        embedder = Embedder(model, contract).eval()
        images = torch.randint(0, 256, (64, channels, size, size), dtype=torch.uint8)
        with torch.inference_mode():
            eager = embedder(images).numpy()
        for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt")):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / f"model{suffix}"
                export_model(embedder, contract, fmt, out)
                embed, _ = load_model(out)
                print(f"| {path.stem} | {fmt} | {abs(embed(images.numpy()) - eager).max():.2e} |")


if __name__ == "__main__":
    main()
