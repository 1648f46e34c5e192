"""The face backbones against their published sizes, real forward/backward passes, and the timm wrapper.

Sizes: parameters, and multiply-accumulates (MACs) from torch's FlopCounterMode, which counts 2 FLOPs per
multiply-add of convolutions and matrix products and nothing for BN, PReLU or additions: MACs = FLOPs / 2. The
published figures are converted to MACs where they count FLOPs (noted per source). The full-size models are built
and run on the meta device: shapes only, no memory and no arithmetic.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from arcface_lightning.core.checks import BadValue
from arcface_lightning.core.config import instantiate_node
from arcface_lightning.models.backbones import TimmBackbone
from arcface_lightning.models.face_backbones import IResNet, MobileFaceNet
from conftest import compose_config

# insightface recognition/arcface_torch/README.md, "ViT For Face Recognition" table, FLOPs column (G). Its flops.py
# prints ptflops' MAC count as "GFLOPs", so these are multiply-adds; ptflops also counts BN (2/element) and PReLU
# (1/element), which FlopCounterMode does not: +0.5 % for IResNet-18, +2.6 % for the "mbf" MobileFaceNet.
README = "insightface arcface_torch README"
# OpenVINO open_model_zoo models/public/<model>/README.md (insightface's MXNet models converted): "MParams", and
# "GFLOPs" that are 2 × MACs (24.2115 for ResNet-100, whose README figure above is 12.1 G multiply-adds).
OMZ = "open_model_zoo"
# Chen et al. 2018, MobileFaceNets (arXiv:1804.07573): 0.99 M parameters and 221 M MAdds at 112×112, embedding 128.
PAPER = "MobileFaceNets paper"
# Boutros et al., AdaDistill (ECCV 2024, arXiv:2407.01332): teacher ResNet-50 (insightface's IResNet-50, embedding
# 512) 43.59 M parameters; student MobileFaceNet with embedding 512, 1.19 M (as quoted in a summary of the paper).
ADADISTILL = "AdaDistill"

R18, R34, R50, R100 = (2, 2, 2, 2), (3, 4, 6, 3), (3, 4, 14, 3), (3, 13, 30, 3)

PUBLISHED = [  # (name, class, arguments, quantity, published value, unit of its last digit, source)
    ("IResNet-18", IResNet, {"blocks": R18, "embedding_size": 512}, "macs", 2.6e9, 0.1e9, README),
    ("IResNet-50", IResNet, {"blocks": R50, "embedding_size": 512}, "macs", 6.3e9, 0.1e9, README),
    ("IResNet-100", IResNet, {"blocks": R100, "embedding_size": 512}, "macs", 12.1e9, 0.1e9, README),
    ("IResNet-50", IResNet, {"blocks": R50, "embedding_size": 512}, "params", 43.59e6, 0.01e6, ADADISTILL),
    # face-recognition-resnet100-arcface-onnx (LResNet100E-IR): 65.1320 MParams, 24.2115 GFLOPs
    ("IResNet-100", IResNet, {"blocks": R100, "embedding_size": 512}, "params", 65.1320e6, 0.0001e6, OMZ),
    ("IResNet-100", IResNet, {"blocks": R100, "embedding_size": 512}, "macs", 24.2115e9 / 2, 0.0001e9, OMZ),
    # face-recognition-resnet34-arcface (LResNet34E-IR): 34.129 MParams, 8.934 GFLOPs
    ("IResNet-34", IResNet, {"blocks": R34, "embedding_size": 512}, "params", 34.129e6, 0.001e6, OMZ),
    ("IResNet-34", IResNet, {"blocks": R34, "embedding_size": 512}, "macs", 8.934e9 / 2, 0.001e9, OMZ),
    ("MobileFaceNet", MobileFaceNet, {"embedding_size": 128}, "params", 0.99e6, 0.01e6, PAPER),
    ("MobileFaceNet", MobileFaceNet, {"embedding_size": 128}, "macs", 221e6, 1e6, PAPER),
    # face-recognition-mobilefacenet-arcface (MobileFaceNet,ArcFace@ms1m-refine-v1, embedding 128): 0.993, 0.449
    ("MobileFaceNet", MobileFaceNet, {"embedding_size": 128}, "params", 0.993e6, 0.001e6, OMZ),
    ("MobileFaceNet", MobileFaceNet, {"embedding_size": 128}, "macs", 0.449e9 / 2, 0.001e9, OMZ),
    ("MobileFaceNet-512", MobileFaceNet, {"embedding_size": 512}, "params", 1.19e6, 0.01e6, ADADISTILL),
    # "mobilefacenet-0.45G": arcface_torch's mbf, scale 2, embedding 512 (0.4375 G here; ptflops' BN/PReLU: 0.449)
    ("mbf", MobileFaceNet, {"embedding_size": 512, "scale": 2}, "macs", 0.45e9, 0.01e9, README),
]


SIZES: dict[str, dict[str, float]] = {}  # by model and arguments: several figures per model


def size_of(build, kwargs: dict, image_size: int = 112) -> dict[str, float]:
    """Parameters and multiply-adds of one 3×image_size² image, built and run on the meta device."""
    key = f"{build.__name__}{sorted(kwargs.items())}{image_size}"
    if key not in SIZES:
        with torch.device("meta"):
            net = build(**kwargs).eval()
            images = torch.empty(1, 3, image_size, image_size)
        with FlopCounterMode(display=False) as counter:
            net(images)
        SIZES[key] = {"params": sum(p.numel() for p in net.parameters()), "macs": counter.get_total_flops() / 2}
    return SIZES[key]


@pytest.mark.parametrize("name, build, kwargs, quantity, published, unit, source", PUBLISHED)
def test_sizes_match_the_published_figures(name, build, kwargs, quantity, published, unit, source) -> None:
    """Within 2 % plus half a unit of the figure's last digit: the sources count slightly differently (ptflops adds
    BN and PReLU element-wise ops; the converted models count the graph's tensors), and round."""
    measured = size_of(build, kwargs)[quantity]
    assert abs(measured - published) <= 0.02 * published + unit / 2, f"{name} {quantity}: {measured:,.0f} ({source})"


def test_sizes_follow_the_image_size() -> None:
    """Four stride-2 stages, each ⌈side/2⌉: the embedding FC sees 512·7·7 at 112, 512·2·2 at 28 and 32."""
    for image_size, side in ((112, 7), (32, 2), (28, 2), (16, 1)):
        with torch.device("meta"):
            net = IResNet(blocks=R18, image_size=image_size, embedding_size=8)
        assert net.fc.in_features == 512 * side * side
        with torch.device("meta"):
            mobile = MobileFaceNet(image_size=image_size, embedding_size=8)
        assert mobile.features.layers[0].layers[0].kernel_size == (side, side)  # the global depthwise conv


def test_state_dicts_have_insightfaces_layout() -> None:
    """Module names as insightface's iresnet.py and mobilefacenet.py, so its trained backbone.pth loads."""
    with torch.device("meta"):
        iresnet, mobile = IResNet(blocks=R18), MobileFaceNet(embedding_size=512, scale=2)
    keys = set(iresnet.state_dict())
    expected = ["conv1.weight", "bn1.running_mean", "prelu.weight", "bn2.weight", "fc.weight", "fc.bias"]
    expected += ["features.weight", "features.bias", "layer4.1.bn3.weight"]
    expected += [f"layer1.0.{m}.weight" for m in ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3")]
    expected += ["layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight"]
    assert set(expected) <= keys and not any(k.startswith("layer1.1.downsample") for k in keys)
    keys = set(mobile.state_dict())
    expected = ["layers.0.layers.0.weight", "layers.0.layers.2.weight", "layers.1.layers.0.weight"]
    expected += ["layers.2.layers.1.layers.0.weight", "layers.3.layers.3.layers.2.layers.1.weight"]
    expected += ["conv_sep.layers.0.weight", "features.layers.0.layers.0.weight", "features.layers.2.weight"]
    expected += ["features.layers.3.running_var"]
    assert set(expected) <= keys
    assert mobile.layers[1].layers[0].groups == 64  # insightface's 64 groups of 2 channels at scale 2


def check_trains(net: torch.nn.Module, images: torch.Tensor, embedding_size: int) -> None:
    """A training step's forward and backward (finite, right shape, gradients reach the first layer), then eval
    on one image, and channels_last giving the same embeddings."""
    net.train()
    embeddings = net(images)
    assert embeddings.shape == (len(images), embedding_size) and torch.isfinite(embeddings).all()
    (embeddings**2).mean().backward()
    first = next(p for p in net.parameters() if p.requires_grad)
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        expected = net(images)
        assert net(images[:1]).shape == (1, embedding_size)
        net.to(memory_format=torch.channels_last)
        assert torch.allclose(net(images.to(memory_format=torch.channels_last)), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels, image_size", [(1, 28), (3, 32)])
def test_iresnet18_trains_on_small_images(channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    net = IResNet(embedding_size=16, in_channels=channels, image_size=image_size, blocks=R18, dropout=0.1)
    check_trains(net, torch.randn(4, channels, image_size, image_size), 16)
    # insightface's output BN: scale fixed at 1 and not trained, shift trained
    assert not net.features.weight.requires_grad and net.features.weight.grad is None
    assert torch.equal(net.features.weight, torch.ones(16)) and net.features.bias.grad is not None


def test_mobilefacenet_trains_on_face_crops() -> None:
    torch.manual_seed(0)
    check_trains(MobileFaceNet(embedding_size=128), torch.randn(2, 3, 112, 112), 128)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: IResNet(image_size=8),
            r"^IResNet: image_size=8 is invalid; allowed: an integer ≥ 16 \(four stride-2 stages; aligned face crops "
            r"are 112, MNIST's 28 and CIFAR's 32 work too\)$",
        ),
        (lambda: IResNet(blocks=[2, 2, 2]), r"^IResNet: blocks=\[2, 2, 2\] is invalid; allowed: a list of 4 integers"),
        (lambda: IResNet(dropout=1.0), r"^IResNet: dropout=1.0 is invalid; allowed: a number in \[0, 1\)$"),
        (lambda: MobileFaceNet(scale=0), r"^MobileFaceNet: scale=0 is invalid; allowed: an integer ≥ 1$"),
    ],
)
def test_bad_face_backbone_settings_are_one_line_errors(build, message: str) -> None:
    with pytest.raises(BadValue, match=message):
        build()


# Small timm models of three families (CNN, mobile CNN, ViT); the test ViT is built for its input size.
TIMM_MODELS = [("resnet10t", {}), ("mobilenetv3_small_050", {}), ("test_vit", {"patch_size": 4})]


@pytest.mark.parametrize("name, kwargs", TIMM_MODELS)
@pytest.mark.parametrize("channels, image_size", [(1, 28), (3, 32)])
def test_timm_models_train(name: str, kwargs: dict, channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    if name.startswith("test_vit"):
        kwargs = {**kwargs, "img_size": image_size}
    net = TimmBackbone(name=name, embedding_size=16, in_channels=channels, model_kwargs=kwargs)
    check_trains(net, torch.randn(4, channels, image_size, image_size), 16)


def test_timm_checkpoint_path_loads_local_weights(tmp_path) -> None:
    """A classifier-ful RGB state dict saved locally (without BatchNorm's step counters, as timm publishes them):
    the classifier dropped, the stem summed to one channel."""
    torch.manual_seed(0)
    source = timm.create_model("resnet10t")
    path = tmp_path / "resnet10t.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    for channels in (3, 1):
        net = TimmBackbone(name="resnet10t", embedding_size=8, in_channels=channels, checkpoint_path=str(path))
        assert torch.equal(net.model.layer4[0].conv2.weight, source.layer4[0].conv2.weight)
        stem = source.conv1[0].weight
        assert torch.allclose(net.model.conv1[0].weight, stem if channels == 3 else stem.sum(1, keepdim=True))
        assert not any(key.startswith("fc.") for key in net.model.state_dict())


def test_timm_checkpoint_of_another_model_is_one_line(tmp_path) -> None:
    for source, target, found in [
        ("test_vit", "resnet10t", r"\d+ of \d+ tensors are not in the file, e\.g\. conv1\.0\.weight"),
        ("mobilenetv3_small_050", "mobilenetv3_small_100", r"size mismatch for \S+: copying a param with shape"),
    ]:
        path = tmp_path / f"{source}.pth"
        torch.save(timm.create_model(source).state_dict(), path)
        message = rf"^TimmBackbone: checkpoint_path='{path}' is invalid; allowed: {target}'s weights \({found}.*\)$"
        with pytest.raises(BadValue, match=message):
            TimmBackbone(name=target, checkpoint_path=str(path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"name": "resnet1000"},
            r"^TimmBackbone: name='resnet1000' is invalid; allowed: a timm model name \(closest: .*resnet.*\); "
            r"list them with timm\.list_models\('\*resnet\*'\)$",
        ),
        (
            {"checkpoint_path": "/no/such/weights.pth"},
            r"^TimmBackbone: checkpoint_path='/no/such/weights\.pth' is invalid; allowed: null or an existing",
        ),
        (
            {"model_kwargs": {"img_size": 32}},
            r"^TimmBackbone: model_kwargs=\{'img_size': 32\} is invalid; allowed: keywords of resnet10t \(.*img_size",
        ),
        ({"embedding_size": 0}, r"^TimmBackbone: embedding_size=0 is invalid; allowed: an integer ≥ 1$"),
    ],
)
def test_bad_timm_settings_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(BadValue, match=message):
        TimmBackbone(**{"name": "resnet10t", **kwargs})


def test_timm_download_failure_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nmore lines")

    monkeypatch.setattr(timm, "create_model", offline)
    message = r"^TimmBackbone: pretrained=True is invalid; allowed: false, or true where timm can download .*path$"
    with pytest.raises(BadValue, match=message):
        TimmBackbone(name="resnet10t", pretrained=True)


CONFIGS = [(b, "mnist") for b in ("timm", "iresnet18", "iresnet50", "iresnet100", "mobilefacenet")]


@pytest.mark.parametrize("backbone, data", [*CONFIGS, ("timm", "cifar10"), ("iresnet18", "cifar10")])
def test_configs_compose_and_instantiate(backbone: str, data: str) -> None:
    """conf/backbone/<backbone>.yaml with MNIST-sized (28, 1 channel) and CIFAR-sized (32, 3 channels) data."""
    cfg = compose_config(f"backbone={backbone}", f"data={data}", "paths.output_dir=/unused")
    with torch.device("meta"):
        net = instantiate_node(cfg, "backbone")
        images = torch.empty(2, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
        assert net.eval()(images).shape == (2, cfg.embedding_size)
