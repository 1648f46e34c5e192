"""The head comparison (compare.py): selection on validation only, the table's statistics and marks, and one real
run of the command (two heads, a two-point search, two seeds) on synthetic MNIST."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from arcface_lightning.compare import choose, evaluation_metrics, grid_of, separated_best, summarise, train_overrides
from conftest import cli, compose_config


def test_the_setting_is_chosen_on_validation_and_never_on_test() -> None:
    rows = [
        {"head.m": 0.3, "seed": 0, "status": "ok", "val/acc_best": 0.91, "test/acc": 0.99},
        {"head.m": 0.5, "seed": 0, "status": "ok", "val/acc_best": 0.95, "test/acc": 0.20},
        {"head.m": 0.7, "seed": 0, "status": "failed"},
    ]
    setting, row = choose(rows, ["head.m"], "val/acc_best")
    assert setting == {"head.m": 0.5} and row is rows[1]
    assert choose([rows[2]], ["head.m"], "val/acc_best") is None  # nothing finished: the head is reported failed


def test_the_table_marks_a_best_only_where_intervals_do_not_overlap() -> None:
    runs = {
        "a": [{"seed": s, "test/acc": v} for s, v in enumerate((0.90, 0.92, 0.91))],
        "b": [{"seed": s, "test/acc": v} for s, v in enumerate((0.80, 0.81, 0.79))],
        "c": [{"seed": s, "test/acc": v} for s, v in enumerate((0.905, 0.95, 0.86))],
    }
    table = [summarise(name, {"head.s": 30}, rows, ["test/acc"], failed=0) for name, rows in runs.items()]
    assert table[0]["test/acc mean"] == pytest.approx(0.91)
    assert table[0]["test/acc std"] == pytest.approx(statistics.stdev([0.90, 0.92, 0.91]))  # sample std
    assert table[0]["setting"] == "s=30" and table[0]["seeds"] == "0,1,2"
    assert separated_best(table, "test/acc") is None  # c's wide interval overlaps a's
    assert separated_best(table[:2], "test/acc") == "a"
    one_seed = [summarise(n, {}, rows[:1], ["test/acc"], failed=0) for n, rows in runs.items()]
    assert separated_best(one_seed, "test/acc") is None and math.isnan(one_seed[0]["test/acc std"])


def test_grids_and_training_overrides_become_dotted_overrides() -> None:
    train = {
        "trainer": {"max_epochs": 3},
        "logger": "csv",
        "evaluation": {"figures": False},
        "backbone": {"channels": [4, 8]},
    }
    cfg = OmegaConf.create({"grid": {"head": {"s": [16, 30], "m": [0.3]}}, "train": train})
    assert grid_of(cfg.grid) == {"head.s": [16, 30], "head.m": [0.3]}
    assert train_overrides(cfg.train) == [
        "trainer.max_epochs=3", "logger=csv", "evaluation.figures=false", "backbone.channels=[4, 8]"
    ]  # fmt: skip


TINY_COMPARE = [
    "train.trainer.max_epochs=1",
    "+train.data.val_size=60",
    "+train.data.batch_size=32",
    "+train.data.download=false",
    "+train.embedding_size=16",
    "+train.backbone.channels=[4,8]",
    "+train.trainer.enable_model_summary=false",
    "+train.callbacks.progress_bar.refresh_rate=0",
]


@pytest.mark.slow
def test_compare_searches_on_seed_zero_then_runs_the_chosen_setting_on_the_other_seeds(mnist_root, tmp_path) -> None:
    out = tmp_path / "compare"
    result = cli(
        "compare", f"hydra.run.dir={out}", f"paths.data_dir={mnist_root}", "heads=[arcface]",
        "grids.arcface.head.m=[0.2,0.5]", "grids.arcface.head.s=[16]", "seeds=[0,1]", *TINY_COMPARE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    searched = [json.loads(p.read_text()) for p in sorted((out / "search" / "arcface").glob("*/metrics.json"))]
    assert len(searched) == 2 and {r["seed"] for r in searched} == {0}
    job = compose_config("experiment=mnist_openset", "paths.output_dir=/unused")
    assert {"val/acc_best", *evaluation_metrics(job)} <= set(searched[0])  # what compare accepts, a job records
    best = max(searched, key=lambda r: r["val/acc_best"])
    chosen_m = OmegaConf.load(Path(best["best_checkpoint"]).parents[1] / ".hydra" / "overrides.yaml")
    m = next(float(o.split("=")[1]) for o in chosen_m if o.startswith("head.m="))
    arc_seeds = [json.loads(p.read_text()) for p in (out / "seeds" / "arcface").glob("*/metrics.json")]
    assert [r["seed"] for r in arc_seeds] == [1]  # seed 0's run is the search's, not run again
    overrides = OmegaConf.load(next((out / "seeds" / "arcface").glob("*/.hydra/overrides.yaml")))
    assert f"head.m={m}" in overrides and "head.s=16" in overrides
    table = {row["head"]: row for row in json.loads((out / "comparison.json").read_text())["table"]}
    assert table["arcface"]["setting"] == f"s=16, m={m}" and table["arcface"]["n"] == 2
    expected = statistics.fmean([best["openset/map_at_r"], arc_seeds[0]["openset/map_at_r"]])
    assert table["arcface"]["openset/map_at_r mean"] == pytest.approx(expected)
    text = (out / "comparison.md").read_text()
    assert "| arcface | s=16, m=" in text and " ± " in text
    assert (out / "comparison.png").stat().st_size > 10_000 and (out / "comparison.csv").is_file()


def test_a_head_without_a_grid_runs_every_seed_at_its_config_and_a_failed_search_is_reported(tmp_path, monkeypatch):
    """The orchestration without training: each multirun call is recorded and answered with made-up job rows."""
    from arcface_lightning import compare as module

    calls = []

    def fake_multirun(cfg, sweep_dir, head, sweeps):
        calls.append((sweep_dir.relative_to(tmp_path).as_posix(), head, sweeps))
        status = "failed" if head == "cosface" else "ok"
        point = {k: v[0] for k, v in sweeps.items() if k != "seed"}
        row = {"status": status, "val/acc_best": 0.9, **point}
        return [{**row, "seed": seed, "test/acc": 0.5 + seed / 10} for seed in sweeps["seed"]]

    monkeypatch.setattr(module, "multirun", fake_multirun)
    cfg = compose_config("heads=[softmax,cosface]", "seeds=[3,4]", config_name="compare")
    cfg.paths.output_dir = str(tmp_path)
    module.compare(cfg)
    assert calls == [
        ("seeds/softmax", "softmax", {"seed": [3, 4]}),  # no grid: no search, every seed
        ("search/cosface", "cosface", {"head.s": [16, 30], "head.m": [0.2, 0.35], "seed": [3]}),
    ]  # a search with no finished run: no seeds run for it
    table = {row["head"]: row for row in json.loads((tmp_path / "comparison.json").read_text())["table"]}
    assert table["softmax"]["n"] == 2 and table["softmax"]["test/acc mean"] == pytest.approx(0.85)
    assert table["cosface"]["n"] == 0 and table["cosface"]["failed"] == 1
    assert "| cosface |  | 0 | failed |" in (tmp_path / "comparison.md").read_text()


def test_each_head_is_paired_by_seed_against_the_baseline_head(tmp_path, monkeypatch) -> None:
    """baseline=softmax: per-seed differences at each head's chosen setting, their mean and 95% t interval, in
    comparison.md, comparison_paired.csv and comparison.json (the multiruns answered with made-up rows)."""
    from arcface_lightning import compare as module

    acc = {"softmax": [0.90, 0.91, 0.92], "arcface": [0.91, 0.94, 0.94], "cosface": [0.95, None, None]}

    def fake_multirun(cfg, sweep_dir, head, sweeps):
        point = {k: v[0] for k, v in sweeps.items() if k != "seed"}
        return [
            {"status": "failed"} if acc[head][seed] is None else
            {**point, "seed": seed, "status": "ok", "val/acc_best": 0.9, "test/acc": acc[head][seed]}
            for seed in sweeps["seed"]
        ]  # fmt: skip

    monkeypatch.setattr(module, "multirun", fake_multirun)
    overrides = ["heads=[softmax,arcface,cosface]", "baseline=softmax", "seeds=[0,1,2]", "columns=[test/acc]"]
    one_point = ["grids.arcface.head.s=[30]", "grids.arcface.head.m=[0.5]", "grids.cosface.head.s=[30]"]
    cfg = compose_config(*overrides, *one_point, "grids.cosface.head.m=[0.35]", config_name="compare")
    cfg.paths.output_dir = str(tmp_path)
    module.compare(cfg)
    paired = {row["head"]: row for row in json.loads((tmp_path / "comparison.json").read_text())["paired"]}
    assert sorted(paired) == ["arcface", "cosface"] and paired["arcface"]["metric"] == "test/acc"
    assert paired["arcface"]["diff_mean"] == pytest.approx(0.02) and paired["arcface"]["diff_sd"] == pytest.approx(0.01)
    assert paired["arcface"]["low"] == pytest.approx(0.02 - 0.024841, abs=1e-6)  # t(0.975, 2) · 0.01 / √3
    assert (paired["cosface"]["paired"], paired["cosface"]["unpaired"]) == (1, 2)
    text = (tmp_path / "comparison.md").read_text()
    assert "## Paired against softmax" in text and "mean [95% interval (Student t)]" in text
    assert "| arcface | s=30, m=0.5 | +0.0200 [-0.0048, +0.0448] n=3 |" in text
    assert "| cosface | s=30, m=0.35 | 1 paired replicate(s): fewer than 2, no interval |" in text
    with open(tmp_path / "comparison_paired.csv") as f:
        assert [row["head"] for row in csv.DictReader(f)] == ["arcface", "cosface"]


HEADS = "adaface, arcface, combined, cosface, curricularface, elasticface, softmax, sphereface, subcenter_arcface"
SELECT = "val/acc_best (the validation score of the checkpoint each job tests, with experiment=mnist_openset's"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["heads=[arcface,magface]"], f"heads: 'magface' has no conf/head/magface.yaml; allowed: {HEADS}"),
        (["seeds=[0,0]"], "seeds=[0, 0] repeats a seed; allowed: distinct integers"),
        (
            ["heads=[arcface,softmax]", "baseline=cosface"],
            "baseline='cosface' is invalid; allowed: null or one of heads: arcface, softmax",
        ),
        (["protocol=bogus"], "protocol='bogus' is invalid; allowed: cifar10_resnet, mnist_2d, mnist_3d, mnist_best, "),
        (["launcher=x"], "launcher='x' is invalid; allowed: a list of overrides, e.g. 'launcher="),
        (
            ["columns=test/acc"],
            "columns='test/acc' is invalid; allowed: a list of metric names, e.g. columns=[test/acc]",
        ),
        (["columns=[]"], "columns=[] is invalid; allowed: a list of metric names"),
        (
            ["grids.arcface=5"],
            "grids.arcface=5 is invalid; allowed: lists of values by key, e.g. grids.arcface.head.s=",
        ),
        (["+grids.arcfce.head.m=[0.3]"], f"grids.arcfce: no conf/head/arcfce.yaml; allowed: {HEADS}"),
        (
            ["grids.arcface.head.m=0.5"],
            "grids.arcface.head.m=0.5 is invalid; allowed: a non-empty list of distinct values",
        ),
        (
            ["grids.arcface.head.m=[]"],
            "grids.arcface.head.m=[] is invalid; allowed: a non-empty list of distinct values",
        ),
        (
            ["grids.arcface.head.m=[0.3,0.3]"],
            "grids.arcface.head.m=[0.3, 0.3] is invalid; allowed: a non-empty list of ",
        ),
        # below: checked against the train config a job of the head composes (heads=[...] keeps that to one)
        (["heads=[arcface]", "grids.arcface.head.m=[0.3,5]"], "grids.arcface.head.m: 5 is invalid; allowed: 0 ≤ m < π"),
        (
            ["heads=[arcface]", "grids.arcface.head.s=[abc]"],
            "grids.arcface.head.s: 'abc' is invalid; allowed: a finite",
        ),
        (
            ["heads=[sphereface]", "grids.sphereface.head.m=[0.5]"],
            "grids.sphereface.head.m: 0.5 is invalid; allowed: 1 ≤",
        ),
        (
            ["heads=[softmax]", "+grids.softmax.head.s=[16]"],
            "grids.softmax.head.s: head=softmax has no head.s; head has: embedding_size, num_classes, bias, sharded, "
            "sample_rate",
        ),
        (
            ["heads=[arcface]", "+grids.arcface.optimizer.lrr=[0.1]"],
            "grids.arcface.optimizer.lrr: head=arcface has no optimizer.lrr; optimizer has: lr, weight_decay",
        ),
        (["heads=[softmax]", "select=val/bogus"], f"select='val/bogus' is invalid; allowed: {SELECT}"),
        (
            ["heads=[softmax]", "select=val/precision_at_1_best"],
            f"select='val/precision_at_1_best' is invalid; allowed: {SELECT}",
        ),
        (
            ["heads=[softmax]", "columns=[test/acc,test/bogus]"],
            "columns: 'test/bogus' is not recorded by a job of experiment=mnist_openset; allowed: val/acc_best, "
            "test/acc, test/acc_margin, test/loss, test/precision_at_1, test/map_at_r, ",
        ),
        (  # held-out identities: validation selects on retrieval, and there is no closed-set accuracy to report
            [
                "heads=[softmax]",
                "+train.data.val_split=by_class",
                "select=val/precision_at_1_best",
                "columns=[test/acc]",
            ],
            "columns: 'test/acc' is not recorded by a job of experiment=mnist_openset; allowed: "
            "val/precision_at_1_best, test/precision_at_1, ",
        ),
        (
            ["heads=[softmax]", "+train.trainer.bogus=1"],
            "train: the train config does not compose with head=softmax: Could not override 'trainer.bogus'.",
        ),
    ],
)
def test_bad_settings_are_refused_in_one_line_before_any_training(tmp_path, monkeypatch, overrides, message) -> None:
    from arcface_lightning import compare as module
    from arcface_lightning.core.runs import run

    monkeypatch.setattr(module, "multirun", lambda *args: pytest.fail("a multirun was launched"))
    cfg = compose_config(*overrides, config_name="compare")
    cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(SystemExit, match="^error: " + re.escape(message)) as refused:
        run(module.compare, cfg)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "search").exists() and not (tmp_path / "seeds").exists()


def test_the_selection_metric_follows_the_protocols_validation_split(tmp_path, monkeypatch) -> None:
    """With held-out identities (by_class) the retrieval selection metric is accepted and the comparison starts."""
    from arcface_lightning import compare as module

    class Launched(Exception):
        pass

    def launch(cfg, sweep_dir, head, sweeps):
        raise Launched(head)

    monkeypatch.setattr(module, "multirun", launch)
    overrides = ["heads=[softmax]", "+train.data.val_split=by_class", "select=val/precision_at_1_best"]
    cfg = compose_config(*overrides, "columns=[test/precision_at_1,openset/map_at_r]", config_name="compare")
    cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(Launched, match=r"^softmax$"):
        module.compare(cfg)
