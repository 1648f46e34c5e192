"""Embedding metrics against known answers, pytorch-metric-learning's AccuracyCalculator, and brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from arcface_lightning.evaluation.metrics import (
    embedding_metrics,
    retrieval_metrics,
    sample_pairs,
    verification_metrics,
)


def clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    centres = torch.randn(classes, dim, generator=g)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_perfect_separation_scores_one_everywhere() -> None:
    embeddings, labels = clusters(20, 5, 16, spread=0.01)
    assert all(value == pytest.approx(1.0) for value in embedding_metrics(embeddings, labels).values())


def test_random_embeddings_score_about_chance() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2000) % 10
    metrics = embedding_metrics(torch.randn(2000, 32, generator=g), labels, max_pairs=50_000)
    assert metrics["precision_at_1"] == pytest.approx(0.1, abs=0.03)
    assert metrics["map_at_r"] < 0.05 and metrics["verification_auc"] == pytest.approx(0.5, abs=0.02)
    assert metrics["verification_acc"] == pytest.approx(0.5, abs=0.02)  # balanced sampled pairs
    assert metrics["tar_at_far_1e-3"] < 0.01


@pytest.mark.parametrize("spread", [0.5, 1.0, 2.0])
def test_retrieval_matches_pytorch_metric_learning(spread: float) -> None:
    calculator_module = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    embeddings, labels = clusters(40, 6, 8, spread=spread, seed=1)
    embeddings, labels = embeddings[:-7], labels[:-7]  # unequal class sizes
    calculator = calculator_module.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),  # exact search, no faiss
        device=torch.device("cpu"),
    )
    normalized = torch.nn.functional.normalize(embeddings)
    oracle = calculator.get_accuracy(normalized, labels, ref_includes_query=True)
    ours = retrieval_metrics(embeddings, labels, chunk_size=17)  # chunks must not change the answer
    assert ours["precision_at_1"] == pytest.approx(oracle["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(oracle["mean_average_precision_at_r"], abs=1e-5)


def brute_force_verification(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    x = torch.nn.functional.normalize(embeddings.double())
    pairs = list(itertools.combinations(range(len(x)), 2))
    scores = torch.tensor([float(x[i] @ x[j]) for i, j in pairs])
    same = torch.tensor([bool(labels[i] == labels[j]) for i, j in pairs])
    positives, negatives = scores[same], scores[~same]
    auc = (positives[:, None] > negatives[None, :]).double().mean() + 0.5 * (
        positives[:, None] == negatives[None, :]
    ).double().mean()
    thresholds = torch.cat([scores, torch.tensor([2.0])])
    tar = {}
    for far_target in (1e-3, 1e-4):
        ok = [(positives >= t).double().mean() for t in thresholds if (negatives >= t).double().mean() <= far_target]
        tar[far_target] = float(max(ok))
    return {"verification_auc": float(auc), "tar_at_far_1e-3": tar[1e-3], "tar_at_far_1e-4": tar[1e-4]}


def test_verification_matches_brute_force_on_all_pairs() -> None:
    embeddings, labels = clusters(12, 4, 6, spread=1.2, seed=2)
    ours = verification_metrics(embeddings, labels)  # 48 embeddings: all 1128 pairs
    expected = brute_force_verification(embeddings, labels)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-5), key
    assert 0.5 < ours["verification_acc"] <= 1.0


def test_ten_fold_accuracy_is_perfect_when_a_threshold_separates() -> None:
    embeddings, labels = clusters(30, 3, 8, spread=0.05, seed=3)
    assert verification_metrics(embeddings, labels)["verification_acc"] == 1.0


def test_sampled_pairs_are_balanced_distinct_and_seeded() -> None:
    labels = torch.arange(5000) % 7
    i, j = sample_pairs(labels, max_pairs=10_000, seed=0)
    assert len(i) == 10_000 and (i != j).all()
    assert (labels[i] == labels[j]).sum() == 5_000  # half positive, half negative
    again = sample_pairs(labels, max_pairs=10_000, seed=0)
    assert torch.equal(i, again[0]) and torch.equal(j, again[1])


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        retrieval_metrics(torch.randn(1, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="both same-class and different-class pairs"):
        verification_metrics(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
