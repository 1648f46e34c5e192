"""The margin math against closed forms, its numerics at the edges, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch

from arcface_lightning.models.heads import ArcFaceHead, CombinedMarginHead, CosFaceHead, SoftmaxHead, SphereFaceHead


def reference_logits(head: CombinedMarginHead, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Float64 closed form: s·cos θ_j, and s·ψ(θ_y) with ψ = cos(m1·θ + m2) − m3 up to θ*, its fallback past θ*."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=1)
    w = torch.nn.functional.normalize(head.weight.detach().double(), dim=1)
    cos = x @ w.t()
    out = cos.clone()
    for i, y in enumerate(labels.tolist()):
        c = cos[i, y].item()
        theta = math.acos(max(-1.0, min(1.0, c)))
        if head.m1 * theta + head.m2 <= math.pi:
            psi = math.cos(head.m1 * theta + head.m2)
        else:
            theta_star = (math.pi - head.m2) / head.m1
            psi = c - max(head.m2 * math.sin(head.m2), 1 + math.cos(theta_star))
        out[i, y] = psi - head.m3
    return head.s * out


def spread_batch(head: torch.nn.Module, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings, with a quarter pointing away from their class (θ near π: the fallback region)."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, head.embedding_size, generator=g)
    labels = torch.randint(0, head.num_classes, (n,), generator=g)
    away = slice(0, n // 4)
    opposite = -torch.nn.functional.normalize(head.weight.detach()[labels[away]], dim=1)
    embeddings[away] = opposite + 0.1 * torch.randn(n // 4, head.embedding_size, generator=g)
    return embeddings, labels


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (ArcFaceHead, dict(embedding_size=8, s=30.0, m=0.5)),
        (ArcFaceHead, dict(embedding_size=2, s=16.0, m=1.2)),
        (ArcFaceHead, dict(embedding_size=8, s=30.0, m=2.8)),  # where cos θ − m·sin m alone would not be monotone
        (CosFaceHead, dict(embedding_size=8, s=30.0, m=0.35)),
        (SphereFaceHead, dict(embedding_size=8, s=30.0, m=2.0)),
        (CombinedMarginHead, dict(embedding_size=8, s=64.0, m1=1.0, m2=0.3, m3=0.2)),
        (CombinedMarginHead, dict(embedding_size=8, s=10.0, m1=1.5, m2=0.2, m3=0.1)),
    ],
)
def test_forward_matches_closed_form(cls: type, kwargs: dict) -> None:
    torch.manual_seed(0)
    head = cls(num_classes=10, **kwargs)
    embeddings, labels = spread_batch(head)
    theta = torch.acos(head.cosine(embeddings).gather(1, labels[:, None]).clamp(-1, 1))
    if head.m1 != 1 or head.m2 != 0:  # heads with an angular margin: the batch must reach the fallback region
        assert (head.m1 * theta + head.m2 > math.pi).any()
    torch.testing.assert_close(
        head(embeddings, labels).double(), reference_logits(head, embeddings, labels), rtol=0, atol=1e-4 * head.s
    )


def test_arcface_fallback_is_insightface_formula() -> None:
    head = ArcFaceHead(4, 3, s=1.0, m=0.5)
    cos = torch.tensor([math.cos(math.pi - 0.2), math.cos(2.0)])  # θ = π − 0.2 (past π − m) and θ = 2 (before)
    expected = torch.tensor([cos[0] - 0.5 * math.sin(0.5), math.cos(2.5)])
    torch.testing.assert_close(head.psi(cos), expected.float())


def test_zero_margin_is_exactly_scaled_cosine() -> None:
    torch.manual_seed(0)
    for head in (ArcFaceHead(16, 10, s=30.0, m=0.0), CosFaceHead(16, 10, s=7.0, m=0.0)):
        embeddings, labels = torch.randn(32, 16), torch.randint(0, 10, (32,))
        assert torch.equal(head(embeddings, labels), head.s * head.cosine(embeddings))


def test_margin_only_touches_the_target_column() -> None:
    torch.manual_seed(0)
    head = ArcFaceHead(16, 10, s=30.0, m=0.5)
    embeddings, labels = torch.randn(32, 16), torch.randint(0, 10, (32,))
    train, infer = head(embeddings, labels), head.logits(embeddings)
    mask = torch.nn.functional.one_hot(labels, 10).bool()
    assert torch.equal(train[~mask], infer[~mask])
    assert (train[mask] < infer[mask]).all()  # the margin always lowers the target logit


def test_logits_are_scaled_cosines() -> None:
    torch.manual_seed(0)
    head = ArcFaceHead(16, 10, s=30.0, m=0.5)
    embeddings = torch.randn(8, 16)
    assert torch.equal(head.logits(embeddings), 30.0 * head.cosine(embeddings))
    cos = head.cosine(embeddings)
    assert cos.shape == (8, 10) and cos.dtype == torch.float32 and cos.abs().max() <= 1 + 1e-6
    a, b = torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)
    assert not torch.equal(head(embeddings, a), head(embeddings, b))  # training logits do depend on the labels


@pytest.mark.parametrize(
    "cls, kwargs",
    [(ArcFaceHead, dict(m=m)) for m in (0.1, 0.5, 1.0, 2.0, 2.8, 3.1)]
    + [(SphereFaceHead, dict(m=m)) for m in (1.35, 2.0, 4.0)]
    + [(CombinedMarginHead, dict(m1=1.2, m2=0.4, m3=0.2)), (CosFaceHead, dict(m=0.4))],
)
def test_psi_decreases_over_zero_to_pi(cls: type, kwargs: dict) -> None:
    head = cls(4, 3, **kwargs)  # ψ does not depend on the weights
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    psi = head.psi(torch.cos(theta).float()).double()
    assert (psi.diff() <= 1e-6).all(), f"ψ increases by {psi.diff().max().item():.3g} somewhere"
    assert psi[0] > psi[-1]


def cosine_extremes(head: CombinedMarginHead) -> tuple[torch.Tensor, torch.Tensor]:
    """Class weights on the axes and embeddings on (+) or opposite (−) their class axis: cos θ = ±1 exactly."""
    with torch.no_grad():
        head.weight.copy_(torch.eye(head.num_classes, head.embedding_size))
    labels = torch.tensor([0, 1, 2, 0])
    signs = torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None]
    embeddings = (signs * torch.eye(head.num_classes, head.embedding_size)[labels]).requires_grad_(True)
    cos = head.cosine(embeddings.detach()).gather(1, labels[:, None]).squeeze(1)
    assert torch.equal(cos, signs.squeeze(1))
    return embeddings, labels


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "make",
    [lambda: ArcFaceHead(8, 3, m=0.5), lambda: SphereFaceHead(8, 3, m=2.0), lambda: CombinedMarginHead(8, 3)],
    ids=["arcface", "sphereface", "combined"],
)
def test_finite_gradients_at_cosine_plus_minus_one(make, dtype) -> None:
    head = make()
    embeddings, labels = cosine_extremes(head)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        inputs = embeddings.to(dtype) if dtype else embeddings  # ±1 and 0 are exact in every dtype
        logits = head(inputs, labels)
        loss = torch.nn.functional.cross_entropy(logits, labels)
    assert logits.dtype == torch.float32  # the margin is computed in fp32 whatever the autocast dtype
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: ArcFaceHead(4, 3, m=0.5), lambda: SphereFaceHead(4, 3, m=3.0)])
def test_psi_gradient_is_finite_at_plus_minus_one(make) -> None:
    cos = torch.tensor([1.0, -1.0], requires_grad=True)
    make().psi(cos).sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_zero_embedding_gives_cosine_zero_and_no_gradient() -> None:
    head = ArcFaceHead(8, 3, m=0.5)
    embeddings = torch.zeros(2, 8, requires_grad=True)
    logits = head(embeddings, torch.tensor([0, 2]))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert torch.equal(head.cosine(embeddings.detach()), torch.zeros(2, 3))
    assert torch.isfinite(logits).all() and torch.equal(embeddings.grad, torch.zeros(2, 8))


def test_class_weights_receive_gradients() -> None:
    head = ArcFaceHead(8, 3)
    assert head.weight.shape == (3, 8) and head.weight.requires_grad
    torch.nn.functional.cross_entropy(
        head(torch.randn(4, 8), torch.tensor([0, 1, 2, 0])), torch.tensor([0, 1, 2, 0])
    ).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [-1, 10, 99])
@pytest.mark.parametrize("cls", [ArcFaceHead, SoftmaxHead])
def test_out_of_range_labels_raise_naming_the_label(cls: type, bad: int) -> None:
    labels = torch.tensor([0, bad, 3])
    with pytest.raises(ValueError, match=rf"label {bad} is out of range; allowed: 0 ≤ label < 10"):
        cls(4, 10)(torch.randn(3, 4), labels)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ArcFaceHead(4, 10, s=0.0), r"ArcFaceHead: s=0.0 .* > 0"),
        (lambda: ArcFaceHead(4, 10, s=-30.0), r"s=-30.0"),
        (lambda: ArcFaceHead(4, 10, s=float("inf")), r"s=inf"),
        (lambda: ArcFaceHead(4, 10, m=-0.1), r"ArcFaceHead: m=-0.1 .* 0 ≤ m < π"),
        (lambda: ArcFaceHead(4, 10, m=math.pi), r"m=3.14159"),
        (lambda: ArcFaceHead(1, 10), r"embedding_size=1 .* ≥ 2"),
        (lambda: ArcFaceHead(4, 1), r"num_classes=1 .* ≥ 2"),
        (lambda: ArcFaceHead(4.5, 10), r"embedding_size=4.5"),
        (lambda: CosFaceHead(4, 10, m=1.5), r"CosFaceHead: m=1.5 .* 0 ≤ m ≤ 1"),
        (lambda: SphereFaceHead(4, 10, m=0.5), r"SphereFaceHead: m=0.5 .* 1 ≤ m ≤ 10"),
        (lambda: CombinedMarginHead(4, 10, m1=0.9), r"m1=0.9"),
        (lambda: CombinedMarginHead(4, 10, m3=-0.2), r"m3=-0.2"),
        (lambda: SoftmaxHead(4, 0), r"SoftmaxHead: num_classes=0"),
    ],
)
def test_bad_constructor_values_raise(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_softmax_baseline_has_the_same_interface() -> None:
    torch.manual_seed(0)
    head = SoftmaxHead(16, 10)
    embeddings, labels = torch.randn(8, 16), torch.randint(0, 10, (8,))
    assert torch.equal(head(embeddings, labels), head.logits(embeddings))
    torch.testing.assert_close(head.logits(embeddings), embeddings @ head.weight.t() + head.linear.bias)
    assert head.cosine(embeddings).shape == (8, 10) and head.weight.shape == (10, 16)


def test_psi_is_one_function_for_every_margin_head_scalar_or_per_element() -> None:
    """heads.psi: the heads' own ψ, and with per-element margins (ElasticFace) each element's scalar ψ; the closed
    form cos(m1·θ + m2) − m3 inside θ*, cos θ − c − m3 past it, in float64."""
    from arcface_lightning.models.heads import psi
    from arcface_lightning.models.recent_heads import CurricularFaceHead

    cos = torch.linspace(-0.999, 0.999, 41)
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.5, 0.0, 0.0), (1.2, 0.3, 0.2), (1.0, 2.8, 0.0)]:
        head = CombinedMarginHead(8, 4, m1=m1, m2=m2, m3=m3)
        torch.testing.assert_close(head.psi(cos), psi(cos, m1, m2, m3))
        theta = torch.acos(cos.double())
        theta_max = (math.pi - m2) / m1
        shift = max(m2 * math.sin(m2), 1 + math.cos(theta_max))
        expected = torch.where(theta <= theta_max, torch.cos(m1 * theta + m2), cos.double() - shift) - m3
        torch.testing.assert_close(psi(cos, m1, m2, m3).double(), expected, atol=2e-6, rtol=0)
    margins = torch.tensor([0.1, 0.5, 1.0, 2.9]).repeat_interleave(10)[:, None]
    cos_y = torch.linspace(-0.99, 0.99, 40)[:, None]
    per_element = psi(cos_y, m2=margins)
    for i in range(40):
        torch.testing.assert_close(per_element[i], psi(cos_y[i], m2=float(margins[i])), atol=2e-6, rtol=0)
    torch.testing.assert_close(psi(cos_y, m3=margins), cos_y - margins)  # no angular part: exactly cos − m
    curricular = CurricularFaceHead(8, 4, m=0.5)
    assert not hasattr(curricular, "_margin")  # its ψ is psi(cos, m2=m), no copy of the constants
