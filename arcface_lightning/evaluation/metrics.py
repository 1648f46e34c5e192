"""Embedding metrics: what ArcFace is for, beyond closed-set accuracy. Plain torch (+ torchmetrics' ROC).

Retrieval: each L2-normalised embedding queries all the others by cosine similarity.
- precision_at_1: the nearest other embedding has the query's class.
- map_at_r: mean average precision at R, R = the number of other embeddings of the query's class
  ("A Metric Learning Reality Check", Musgrave et al. 2020): AP@R = (1/R) Σ_{i ≤ R} P@i · [i-th is relevant].

Verification: pairs of embeddings scored by cosine similarity, same class = positive. All pairs when there are at
most `max_pairs`, else a seeded sample of equally many positive and negative pairs.
- verification_auc: ROC AUC; tar_at_far_1e-3 / 1e-4: the true accept rate at that false accept rate;
- verification_acc: 10-fold accuracy, the LFW protocol: threshold chosen on 9 folds, accuracy on the 10th, averaged.
`pair_metrics` does the same for a given list of scored pairs and folds (a pair list such as LFW's pairs.txt).

Memory stays bounded: similarities are computed `chunk_size` queries at a time (chunk × N), never N × N.
"""

from __future__ import annotations

import math

import torch

from arcface_lightning.models.heads import normalize


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> dict[str, float]:
    """precision_at_1 and map_at_r of every embedding querying all the others."""
    x = normalize(embeddings.float())
    labels = torch.unique(labels, return_inverse=True)[1]  # any ids → 0..C-1
    relevant = torch.bincount(labels)[labels] - 1  # other embeddings of each query's class
    if len(x) < 2:
        raise ValueError(f"retrieval needs at least 2 embeddings, got {len(x)}")
    k = max(int(relevant.max()), 1)
    ranks = torch.arange(1, k + 1, device=x.device)
    hits_at_1, ap_sum = 0.0, 0.0
    for start in range(0, len(x), chunk_size):
        stop = min(start + chunk_size, len(x))
        similarity = x[start:stop] @ x.t()
        rows = torch.arange(stop - start, device=x.device)
        similarity[rows, rows + start] = -torch.inf  # a query is not its own neighbour
        nearest = similarity.topk(k, dim=1).indices
        is_relevant = (labels[nearest] == labels[start:stop, None]).float()
        hits_at_1 += is_relevant[:, 0].sum().item()
        r = relevant[start:stop]
        within_r = (ranks[None, :] <= r[:, None]).float()
        precision_at_i = is_relevant.cumsum(1) / ranks
        ap_sum += ((precision_at_i * is_relevant * within_r).sum(1) / r.clamp_min(1)).sum().item()
    has_relevant = int((relevant > 0).sum())
    return {"precision_at_1": hits_at_1 / len(x), "map_at_r": ap_sum / max(has_relevant, 1)}


def sample_pairs(labels: torch.Tensor, max_pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j), i ≠ j: all of them when few enough, else max_pairs/2 positive and max_pairs/2 negative."""
    n = len(labels)
    if n * (n - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
        return i, j
    g = torch.Generator().manual_seed(seed)
    class_of = torch.unique(labels, return_inverse=True)[1]
    counts = torch.bincount(class_of)
    order = torch.argsort(class_of, stable=True)  # the members of each class are contiguous in `order`
    place = torch.empty_like(order)
    place[order] = torch.arange(n)
    starts = torch.cumsum(counts, 0) - counts
    half = max_pairs // 2
    # positives: an anchor from a class with ≥ 2 members and another member of its class, never itself
    eligible = torch.nonzero(counts[class_of] > 1).squeeze(1)
    anchors = eligible[torch.randint(len(eligible), (half,), generator=g)]
    c = class_of[anchors]
    step = 1 + torch.randint(1 << 30, (half,), generator=g) % (counts[c] - 1)
    partners = order[starts[c] + (place[anchors] - starts[c] + step) % counts[c]]
    # negatives: random pairs, redrawn until the classes differ
    a, b = torch.randint(n, (half,), generator=g), torch.randint(n, (half,), generator=g)
    while (same := labels[a] == labels[b]).any():
        b[same] = torch.randint(n, (int(same.sum()),), generator=g)
    return torch.cat([anchors, a]), torch.cat([partners, b])


def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> float:
    """The threshold (accept score ≥ t) with the highest accuracy on these pairs."""
    order = torch.argsort(scores, descending=True)
    s, y = scores[order], same[order].float()
    accepted_positives = torch.cumsum(y, 0)  # accepting the top k pairs
    rejected_negatives = (1 - y).sum() - torch.cumsum(1 - y, 0)
    accuracy = torch.cat([((1 - y).sum()).view(1), accepted_positives + rejected_negatives])  # k = 0, 1, ..., n
    k = int(torch.argmax(accuracy))
    if k == 0:
        return float(s[0]) + 1e-6
    return float(s[k - 1]) if k == len(s) else float((s[k - 1] + s[k]) / 2)


def threshold_at_far(scores: torch.Tensor, same: torch.Tensor, far: float) -> float:
    """The lowest cosine threshold (accept score ≥ t) that accepts at most a fraction `far` of the different-class
    pairs: just above the (⌊far · negatives⌋ + 1)-th highest negative score. Needs at least 1/far negatives."""
    negatives = torch.sort(scores[~same].double(), descending=True).values
    if len(negatives) * far < 1:
        raise ValueError(
            f"a threshold at FAR {far:g} needs at least {int(1 / far)} different-class pairs, got {len(negatives)}"
        )
    return float(torch.nextafter(negatives[int(far * len(negatives))], torch.tensor(math.inf, dtype=torch.float64)))


def verification_metrics(
    embeddings: torch.Tensor, labels: torch.Tensor, max_pairs: int = 200_000, seed: int = 0, folds: int = 10
) -> dict[str, float]:
    """ROC AUC, TAR at FAR 1e-3 and 1e-4, and 10-fold verification accuracy of cosine similarity on pairs."""
    x = normalize(embeddings.float())
    i, j = sample_pairs(labels, max_pairs, seed)
    scores, same = (x[i] * x[j]).sum(1), labels[i] == labels[j]
    fold_of = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed)) % folds
    metrics = pair_metrics(scores, same, fold_of)
    del metrics["verification_acc_std"], metrics["threshold"]
    return metrics


def pair_metrics(scores: torch.Tensor, same: torch.Tensor, fold_of: torch.Tensor) -> dict[str, float]:
    """Scored pairs (same: the pair shows one class) in folds: ROC AUC, TAR at FAR 1e-3 and 1e-4, and the LFW
    protocol's accuracy — for each fold, the threshold with the best accuracy on the other folds, applied to it —
    as the mean and standard deviation over folds, with the mean threshold."""
    if same.all() or not same.any():
        raise ValueError("verification needs both same-class and different-class pairs")
    # torchmetrics here, not at the top: it imports torchvision, scipy and matplotlib (seconds), and config.py reads
    # SELECTION from this module in every command
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    far, tar, _ = binary_roc(scores, same.long())
    metrics = {"verification_auc": float(binary_auroc(scores, same.long()))}
    for target, name in ((1e-3, "tar_at_far_1e-3"), (1e-4, "tar_at_far_1e-4")):
        metrics[name] = float(tar[far <= target].max())
    accuracies, thresholds = [], []
    for fold in torch.unique(fold_of).tolist():
        test = fold_of == fold
        thresholds.append(best_threshold(scores[~test], same[~test]) if (~test).any() else 0.0)
        accuracies.append(((scores[test] >= thresholds[-1]) == same[test]).double().mean())
    accuracy = torch.stack(accuracies)
    metrics["verification_acc"] = float(accuracy.mean())
    metrics["verification_acc_std"] = float(accuracy.std()) if len(accuracy) > 1 else 0.0
    metrics["threshold"] = sum(thresholds) / len(thresholds)
    return metrics


# the validation metric that picks the checkpoint, by data.val_split: accuracy where validation images are of the
# head's classes; retrieval precision@1 where they are of held-out classes (closed-set accuracy does not exist)
SELECTION = {"by_sample": "val/acc", "by_class": "val/precision_at_1"}


def embedding_metrics(embeddings: torch.Tensor, labels: torch.Tensor, **kwargs: int) -> dict[str, float]:
    return {**retrieval_metrics(embeddings, labels), **verification_metrics(embeddings, labels, **kwargs)}
