"""Every config option composes and instantiates; the documented command-line keys do what they say."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf
from submitit.slurm.slurm import _make_sbatch_string  # what sbatch is given: the oracle of the launcher config
from torchvision.io import write_png

from arcface_lightning.core.config import native_bf16_precision, register_configs
from arcface_lightning.train import build
from arcface_lightning.training.module import build_head
from conftest import CONF, cli, compose_config

OPTIONS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("data", "backbone", "head", "trainer", "optimizer", "scheduler", "logger", "experiment")
}


def test_option_lists_are_what_the_readme_promises() -> None:
    assert OPTIONS["data"] == [
        "cifar10", "fashion_mnist", "image_folder", "image_list", "insightface", "kmnist", "mnist", "streaming"
    ]  # fmt: skip
    assert OPTIONS["head"] == [
        "adaface", "arcface", "combined", "cosface", "curricularface", "elasticface", "softmax", "sphereface",
        "subcenter_arcface",
    ]  # fmt: skip
    assert OPTIONS["backbone"] == [
        "iresnet100", "iresnet18", "iresnet50", "mobilefacenet", "resnet18", "simple_cnn", "simple_cnn_bn", "timm"
    ]  # fmt: skip
    assert OPTIONS["trainer"] == ["cpu", "ddp", "ddp_cpu", "ddp_multinode", "default", "gpu"]


# every data set (ArcFace, the default experiment's backbone), every head on MNIST and on a user's folder (its class
# count comes from the files), and every backbone on MNIST-shaped and CIFAR-shaped input: a head depends on the
# data only through num_classes, a backbone only through the image's shape
MODEL_AND_DATA = [(data, "simple_cnn_bn", "arcface") for data in OPTIONS["data"]]
MODEL_AND_DATA += [(data, "simple_cnn_bn", head) for head in OPTIONS["head"] for data in ("mnist", "image_folder")]
MODEL_AND_DATA += [(data, backbone, "arcface") for backbone in OPTIONS["backbone"] for data in ("mnist", "cifar10")]
MODEL_AND_DATA = sorted(set(MODEL_AND_DATA))


def write_images(root: Path) -> Path:
    """Three classes of four RGB images as a folder, and the same as a CSV list (list.csv)."""
    for i in range(12):
        (root / f"class_{i % 3}").mkdir(parents=True, exist_ok=True)
        write_png(torch.full((3, 120, 100), 20 * i, dtype=torch.uint8), str(root / f"class_{i % 3}/{i}.png"))
    (root / "list.csv").write_text("\n".join(f"class_{i % 3}/{i}.png,{i % 3}" for i in range(12)))
    return root


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """data.root for each of a user's sources: an image folder, a CSV list, a packed set of the folder."""
    root = write_images(tmp_path_factory.mktemp("own") / "images")
    packed = root.parent / "packed"
    result = cli("pack", str(root), str(packed), "--val-size", "2", "--workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    insightface = Path(__file__).parent / "data" / "insightface" / "header"  # written by MXNet: 10 classes
    return {"image_folder": root, "image_list": root / "list.csv", "streaming": packed, "insightface": insightface}


@pytest.mark.parametrize("data, backbone, head", MODEL_AND_DATA)
def test_every_combination_composes_and_builds(data: str, backbone: str, head: str, tmp_path, own_data) -> None:
    """Every data × head and every backbone on top of the default experiment (whose own settings must suit them
    all); the trainer presets are independent of these and are instantiated on their own below."""
    overrides = [f"data={data}", f"backbone={backbone}", f"head={head}", "trainer=cpu"]
    if data in own_data:  # a user's data: three classes
        overrides.append(f"data.root={own_data[data]}")
    cfg = compose_config(*overrides, f"paths.output_dir={tmp_path}")
    datamodule, model, lightning_trainer = build(cfg)
    assert isinstance(lightning_trainer, L.Trainer) and datamodule.hparams.dataset == cfg.data.dataset
    images = torch.randn(2, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
    labels = torch.tensor([0, cfg.data.num_classes - 1])
    embeddings = model(images)
    assert embeddings.shape == (2, cfg.embedding_size)
    assert model.head(embeddings, labels).shape == model.head.logits(embeddings).shape == (2, cfg.data.num_classes)


@pytest.mark.parametrize("group", ["optimizer", "scheduler", "logger"])
def test_every_optimizer_scheduler_and_logger_builds_with_the_default_experiment(group: str, tmp_path: Path) -> None:
    for option in OPTIONS[group]:
        cfg = compose_config(f"{group}={option}", "trainer=cpu", f"paths.output_dir={tmp_path}")
        _, _, trainer = build(cfg)
        if group == "logger":
            assert len(trainer.loggers) == (2 if option == "many_loggers" else 1)


@pytest.mark.parametrize("trainer", OPTIONS["trainer"])
def test_trainer_presets_instantiate(trainer: str, tmp_path: Path) -> None:
    cfg = compose_config(f"trainer={trainer}", f"paths.output_dir={tmp_path}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU here: the preset composes, instantiating it needs a GPU")
    assert isinstance(instantiate(cfg.trainer), L.Trainer)


def test_command_line_keys() -> None:
    cfg = compose_config(
        "head.s=16",
        "head.m=0.3",
        "embedding_size=64",
        "data.batch_size=128",
        "seed=7",
        "paths.data_dir=/somewhere",
        "ckpt_path=/x.ckpt",
        "trainer.max_epochs=3",
        "trainer.gradient_clip_val=1.0",
        "trainer.limit_train_batches=5",
        "trainer.accumulate_grad_batches=2",
        "paths.output_dir=/unused",
    )
    assert (cfg.head.s, cfg.head.m, cfg.seed, cfg.ckpt_path) == (16, 0.3, 7, "/x.ckpt")
    assert cfg.backbone.embedding_size == cfg.head.embedding_size == 64  # one key feeds both
    assert (cfg.data.batch_size, cfg.data.data_dir) == (128, "/somewhere")
    trainer = instantiate(cfg.trainer)  # any Lightning flag, without '+'
    assert (trainer.max_epochs, trainer.gradient_clip_val, trainer.limit_train_batches) == (3, 1.0, 5)
    assert trainer.accumulate_grad_batches == 2


def test_data_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCFACE_DATA_DIR", "/from/env")
    assert compose_config().paths.data_dir == "/from/env"
    monkeypatch.delenv("ARCFACE_DATA_DIR")
    repo = CONF.parent
    assert compose_config().paths.data_dir == f"{repo}/data"  # the repository's data/, wherever we run from
    assert compose_config().paths.log_dir == f"{repo}/logs"


def test_seed_mnist_is_the_seed_recipe() -> None:
    cfg = compose_config("experiment=seed_mnist", "paths.output_dir=/unused")
    assert cfg.backbone._target_.endswith("SimpleCNN") and list(cfg.backbone.channels) == [32, 64]
    assert cfg.head._target_.endswith("ArcFaceHead") and (cfg.head.s, cfg.head.m) == (30.0, 0.5)
    assert cfg.embedding_size == 128 and cfg.scheduler is None
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-3
    assert (cfg.data.dataset, cfg.data.batch_size, cfg.data.normalize) == ("MNIST", 64, False)
    assert cfg.trainer.max_epochs == 10
    net = instantiate(cfg.backbone)
    assert net.embedding.in_features == 64 * 7 * 7 and sum(p.numel() for p in net.parameters()) == (9 * 32 + 32) + (
        9 * 32 * 64 + 64
    ) + (3136 * 128 + 128)


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_schedulers_compose(scheduler: str) -> None:
    cfg = compose_config(f"scheduler={scheduler}", "paths.output_dir=/unused")
    assert cfg.scheduler.scheduler._partial_ and cfg.scheduler.interval in ("epoch", "step")


def test_sweep_preset_is_a_multirun_of_the_seed_recipe_over_s_and_m() -> None:
    cfg = compose_config("sweep=s_m", return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert set(cfg.hydra.sweeper.params) == {"head.s", "head.m", "seed"}
    assert cfg.data.normalize is False and cfg.head.s == 30.0  # experiment=seed_mnist underneath
    assert cfg.trainer.max_epochs == 1 and cfg.hydra.callbacks.sweep_report._target_.endswith("SweepReportCallback")


def test_optuna_search_space() -> None:
    cfg = compose_config("hparams_search=optuna", return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/acc_best"
    assert dict(cfg.hydra.sweeper.params) == {"head.s": "tag(log, interval(1, 128))", "head.m": "interval(0.0, 0.8)"}


def test_slurm_launcher_follows_the_trainer() -> None:
    cfg = compose_config(
        "hydra/launcher=submitit_slurm",
        "trainer=ddp_multinode",
        "trainer.devices=8",
        "hydra.launcher.partition=gpu",
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.nodes == 2  # one task per GPU
    # the requeue signal Lightning's SLURM environment handles, in place of submitit's USR2 (one --signal line)
    params = OmegaConf.to_container(launcher, resolve=True)
    script = _make_sbatch_string(command="python -m arcface_lightning.train", folder=".submitit/%j",
                                 signal_delay_s=params["signal_delay_s"],
                                 additional_parameters=params["additional_parameters"])  # fmt: skip
    assert [line for line in script.splitlines() if "--signal" in line] == ["#SBATCH --signal=USR1@120"]


@pytest.mark.parametrize("trainer, precision", [("cpu", "bf16-mixed"), ("gpu", "16-mixed"), ("gpu", "bf16-mixed")])
def test_mixed_precision_flags_reach_the_trainer(trainer: str, precision: str, tmp_path) -> None:
    cfg = compose_config(f"trainer={trainer}", f"trainer.precision={precision}", f"paths.output_dir={tmp_path}")
    assert cfg.trainer.precision == precision
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("composes; a GPU is needed to instantiate a GPU trainer")
    assert instantiate(cfg.trainer).precision == precision


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config(f"experiment={experiment}", f"paths.output_dir={tmp_path}")
    _, model, _ = build(cfg)
    images = torch.randn(4, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
    assert model(images).shape == (4, cfg.embedding_size) and model.head.num_classes == cfg.data.num_classes
    # its runs go to logs/<experiment>/; the default experiment's to logs/train/
    assert cfg.task_name == ("train" if experiment == "mnist_default" else experiment)


@pytest.mark.parametrize("native", ["32-true", "bf16-mixed"], ids=["no native bf16", "native bf16"])
def test_no_experiment_hard_codes_a_reduced_precision(native: str) -> None:
    """Every experiment takes ${native_bf16:}'s choice: on a CPU without native bf16 (where emulated bf16 is slower
    than fp32) none runs in bf16 or fp16; where it is native, those that use it do."""
    OmegaConf.register_new_resolver("native_bf16", lambda: native, replace=True)
    try:
        precisions = {e: str(compose_config(f"experiment={e}").trainer.precision) for e in EXPERIMENTS}
    finally:
        register_configs()  # the real resolver back
    if native == "32-true":
        assert all("16" not in p for p in precisions.values()), precisions
    else:
        assert {e for e, p in precisions.items() if p == native} >= {"mnist_default", "mnist_fast", "mnist_best"}


@pytest.mark.parametrize("head", OPTIONS["head"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds_with_every_head(experiment: str, head: str) -> None:
    """README: experiments combine with any head. A head chosen on the command line comes with its own settings,
    never with keys the experiment set for the head it chose itself (ArcFace's s and m mean nothing to softmax).
    The backbone does not depend on the head: each experiment's is built and run above."""
    cfg = compose_config(f"experiment={experiment}", f"head={head}", "paths.output_dir=/unused")
    assert OmegaConf.to_container(cfg.head) == OmegaConf.to_container(OmegaConf.load(CONF / "head" / f"{head}.yaml"))
    head_module = build_head(OmegaConf.to_container(cfg.head, resolve=True))  # as the model builds it
    embeddings, labels = torch.randn(2, cfg.embedding_size), torch.tensor([0, cfg.data.num_classes - 1])
    assert head_module(embeddings, labels).shape == (2, cfg.data.num_classes)


def test_recipes_are_what_their_comments_say() -> None:
    fast = compose_config("experiment=mnist_fast")
    assert fast.head._target_.endswith("ArcFaceHead") and fast.trainer.max_epochs <= 2 and fast.backbone.batch_norm
    best = compose_config("experiment=mnist_best")
    assert best.backbone.batch_norm and best.data.augment.kind == "affine" and best.scheduler is not None
    cifar = compose_config("experiment=cifar10_resnet")
    assert cifar.backbone._target_.endswith("ResNet") and list(cifar.backbone.blocks) == [2, 2, 2, 2]
    assert cifar.data.augment.kind == "crop_flip" and cifar.optimizer._target_ == "torch.optim.SGD"
    assert cifar.head._target_.endswith("ArcFaceHead")
    assert (fast.head.s, fast.head.m) == (best.head.s, best.head.m) == (16.0, 0.3)  # the experiment's own head
    two_d, three_d = compose_config("experiment=mnist_2d"), compose_config("experiment=mnist_3d")
    assert (two_d.head.s, two_d.head.m, three_d.head.s, three_d.head.m) == (10.0, 0.1, 30.0, 0.3)


def test_the_default_experiment_is_the_quick_recipe() -> None:
    cfg = compose_config("paths.output_dir=/unused")
    assert cfg.backbone._target_.endswith("SimpleCNN") and list(cfg.backbone.channels) == [32, 64, 128]
    assert cfg.backbone.batch_norm and cfg.data.augment.kind == "affine" and cfg.scheduler.interval == "step"
    assert cfg.trainer.precision == native_bf16_precision() and cfg.task_name == "train"
    plain = compose_config("~experiment", "paths.output_dir=/unused")  # the groups' own defaults: the seed's network
    assert list(plain.backbone.channels) == [32, 64] and plain.scheduler is None and plain.data.augment.kind is None


def test_native_bf16_reads_the_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    assert native_bf16_precision(cpuinfo, capability="AVX512") == "bf16-mixed"
    # PyTorch held below AVX512 (ATEN_CPU_CAPABILITY=avx2|default, or oneDNN's ISA): bf16 is emulated there
    assert native_bf16_precision(cpuinfo, capability="AVX2") == "32-true"
    assert native_bf16_precision(cpuinfo, capability="DEFAULT") == "32-true"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert native_bf16_precision(cpuinfo, capability="AVX512") == "32-true"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert native_bf16_precision(cpuinfo, capability="AVX512") == "bf16-mixed"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert native_bf16_precision(cpuinfo, capability="AVX512") == "32-true"
    assert native_bf16_precision(tmp_path / "absent") == "32-true"  # no /proc (macOS, Windows)


@pytest.mark.parametrize(
    "debug, expected",
    [
        ("fdr", {"fast_dev_run": True}),
        ("overfit", {"overfit_batches": 3, "max_epochs": 20}),
        ("limit", {"limit_train_batches": 0.01, "limit_val_batches": 0.05, "max_epochs": 3}),
    ],
)
def test_debug_configs_set_the_lightning_flags(debug: str, expected: dict) -> None:
    cfg = compose_config(f"debug={debug}", "paths.output_dir=/unused")
    assert {k: cfg.trainer[k] for k in expected} == expected and cfg.extras.print_config and cfg.task_name == "debug"
