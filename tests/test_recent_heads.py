"""The recent margin heads (recent_heads.py) against independent oracles: pytorch-metric-learning's
SubCenterArcFaceLoss, and float64 closed forms of the papers' official code written out here; their state (EMAs,
sub-centre counts, margin draws) through steps, eval mode, state dicts, and 2 gloo ranks."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from ranks import free_port, join, leave, start_ranks

from arcface_lightning.models.recent_heads import AdaFaceHead, CurricularFaceHead, ElasticFaceHead, SubCenterArcFaceHead

E, C = 8, 5


def cosines64(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.double(), dim=1) @ F.normalize(weight.detach().double(), dim=1).t()


def arc64(c: float, m: float) -> float:
    """ArcFace's target cosine with the fallback past θ = π − m (m ≤ 2.3: cos θ − m·sin m)."""
    theta = math.acos(max(-1.0, min(1.0, c)))
    return math.cos(theta + m) if theta <= math.pi - m else c - m * math.sin(m)


def near_and_opposite(weight: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Embeddings: the first third close to their class's weight row (θ small), the second third opposite (θ near
    π: ArcFace's fallback region), the rest random; norms spread over 0.5 … 40."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    direction = F.normalize(weight.detach()[labels], dim=1)
    x = torch.randn(n, weight.shape[1], generator=g)
    x[: n // 3] = direction[: n // 3] + 0.02 * x[: n // 3]
    x[n // 3 : 2 * n // 3] = -direction[n // 3 : 2 * n // 3] + 0.05 * x[n // 3 : 2 * n // 3]
    assert math.gcd(n, 7) == 1
    norms = torch.linspace(0.5, 40.0, n)[torch.arange(n) * 7 % n]  # high and low norms in every third
    return F.normalize(x, dim=1) * norms[:, None]


# -- Sub-center ArcFace ---------------------------------------------------------------------------------------------


def clustered_subcentres(head: SubCenterArcFaceHead, seed: int = 0) -> None:
    """Each class's k sub-centres near one direction, so an embedding opposite it is far from all of them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(head.num_classes, 1, head.embedding_size, generator=g)
    spread = 0.3 * torch.randn(head.num_classes, head.k, head.embedding_size, generator=g)
    with torch.no_grad():
        head.weight.copy_((base + spread).reshape(-1, head.embedding_size))


def subcenter_problem(k: int = 3, n: int = 24) -> tuple[SubCenterArcFaceHead, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = SubCenterArcFaceHead(E, C, s=64.0, m=0.5, k=k)
    clustered_subcentres(head)
    labels = torch.arange(n) % C
    mean_centre = head.weight.detach().view(C, k, E).mean(1)
    return head, near_and_opposite(mean_centre, labels), labels


def test_subcenter_matches_pml_loss_logits_and_gradients() -> None:
    """PML's SubCenterArcFaceLoss (margin in degrees, W = our weight transposed) in float64: loss, inference logits
    and both gradients, with rows in the fallback region."""
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    head, x, y = subcenter_problem()
    oracle = SubCenterArcFaceLoss(num_classes=C, embedding_size=E, margin=math.degrees(0.5), scale=64.0, sub_centers=3)
    oracle.W.data = head.weight.detach().t().double().clone()
    assert (torch.acos(head.cosine(x).gather(1, y[:, None]).clamp(-1, 1)) > math.pi - 0.5).any()
    x64, x32 = x.double().requires_grad_(True), x.clone().requires_grad_(True)
    expected = oracle(x64, y)
    expected.backward()
    loss = F.cross_entropy(head(x32, y), y)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), oracle.W.grad.t(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.logits(x).double(), oracle.get_logits(x.double()).detach(), rtol=0, atol=1e-4)


def subcenter64(weight: torch.Tensor, live: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s: float, m: float):
    """Float64 closed form: (margin logits, the winning sub-centre of every class per row)."""
    k = live.shape[1]
    cos = cosines64(x, weight).view(len(x), -1, k).masked_fill(~live, -math.inf)
    best, winner = cos.max(dim=2)
    out = best.clone()
    for i, label in enumerate(y.tolist()):
        out[i, label] = arc64(best[i, label].item(), m)
    return s * out, winner


def test_subcenter_closed_form_and_counts() -> None:
    head, x, y = subcenter_problem(k=3)
    expected, winner = subcenter64(head.weight, head.live, x, y, head.s, head.m)
    torch.testing.assert_close(head(x, y).double(), expected, rtol=0, atol=1e-5 * head.s)
    counts = torch.zeros(C, 3, dtype=torch.int64)
    for i, label in enumerate(y.tolist()):
        counts[label, winner[i, label]] += 1
    assert torch.equal(head.counts, counts)
    head.eval()
    head(x, y)
    assert torch.equal(head.counts, counts)  # eval forwards do not count


def test_subcenter_drop_keeps_the_dominant_subcentre_and_masks_the_rest() -> None:
    torch.manual_seed(0)
    head = SubCenterArcFaceHead(E, C, s=30.0, m=0.5, k=3, drop_after_epoch=2)
    clustered_subcentres(head, seed=1)
    y = torch.arange(40) % (C - 1)  # the last class gets no sample: all counts 0, the tie goes to sub-centre 0
    x = torch.randn(40, E, generator=torch.Generator().manual_seed(2))
    _, winner = subcenter64(head.weight, head.live, x, y, head.s, head.m)
    for _ in range(2):
        head(x, y)
    counts = torch.zeros(C, 3, dtype=torch.int64)
    for i, label in enumerate(y.tolist()):
        counts[label, winner[i, label]] += 2
    assert torch.equal(head.counts, counts)
    dominant = [max(range(3), key=lambda j, c=c: (counts[c, j].item(), -j)) for c in range(C)]
    head.end_of_epoch(0)  # epoch 1 of 2: nothing yet
    assert head.live.all()
    head.end_of_epoch(1)
    assert head.live.sum(1).tolist() == [1] * C and head.live.float().argmax(1).tolist() == dominant
    assert dominant[C - 1] == 0 and set(dominant) != {0}  # not just the first sub-centre everywhere
    torch.testing.assert_close(head.class_centres(), head.weight.detach().view(C, 3, E)[torch.arange(C), dominant])
    live = head.live.clone()
    head.end_of_epoch(1)  # called again (a resumed epoch): the same choice
    assert torch.equal(head.live, live)

    expected, _ = subcenter64(head.weight, head.live, x, y, head.s, head.m)
    logits = head(x, y)
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-5 * head.s)
    F.cross_entropy(logits, y).backward()
    row_grad = head.weight.grad.view(C, 3, E).abs().sum(2)
    assert (row_grad[~head.live] == 0).all() and (row_grad[head.live] > 0).all()


def test_subcenter_checks_its_keys() -> None:
    with pytest.raises(ValueError, match=r"SubCenterArcFaceHead: k=0 .* ≥ 1"):
        SubCenterArcFaceHead(E, C, k=0)
    with pytest.raises(ValueError, match=r"drop_after_epoch=0 .* null or an integer ≥ 1"):
        SubCenterArcFaceHead(E, C, drop_after_epoch=0)


# -- AdaFace --------------------------------------------------------------------------------------------------------


def adaface64(head: AdaFaceHead, x: torch.Tensor, y: torch.Tensor, mean: float, std: float, training: bool = True):
    """The official AdaFace forward (mk-minchul/AdaFace head.py) in float64: EMA update first, then the margin on the
    target column. Returns (logits, new mean, new std)."""
    eps, a = 1e-3, head.t_alpha
    norms = [min(max(v, 0.001), 100.0) for v in x.double().norm(dim=1).tolist()]
    if training:
        mean = a * statistics.fmean(norms) + (1 - a) * mean
        std = a * statistics.stdev(norms) + (1 - a) * std
    cos = cosines64(x, head.weight)
    out = cos.clone()
    for i, label in enumerate(y.tolist()):
        scaler = max(-1.0, min(1.0, head.h * (norms[i] - mean) / (std + eps)))
        theta = math.acos(max(-1 + eps, min(1 - eps, cos[i, label].item())))
        theta = max(eps, min(math.pi - eps, theta - head.m * scaler))
        out[i, label] = math.cos(theta) - (head.m + head.m * scaler)
    return head.s * out, mean, std


def adaface_problem(seed: int = 0) -> tuple[AdaFaceHead, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    head = AdaFaceHead(E, C, s=64.0, m=0.4, h=0.333, t_alpha=0.1)
    y = torch.arange(18) % C
    return head, near_and_opposite(head.weight, y, seed), y


def test_adaface_matches_the_official_formula_over_two_steps() -> None:
    """Steps from a chosen EMA (μ = 12, σ = 2) with t_alpha = 0.1, so ẑ reaches both clips at ±1 and θ − m·ẑ leaves
    [ε, π − ε] on both sides (rows near and opposite their centre)."""
    head, x, y = adaface_problem()
    head.batch_mean.fill_(12.0)
    head.batch_std.fill_(2.0)
    mean, std = 12.0, 2.0
    for step in range(2):
        xs = x if step == 0 else x.flip(0)[:11] * 0.5  # a second, different batch
        ys = y if step == 0 else y.flip(0)[:11]
        expected, mean, std = adaface64(head, xs, ys, mean, std)
        torch.testing.assert_close(head(xs, ys).double(), expected, rtol=0, atol=1e-5 * head.s)
        torch.testing.assert_close(head.batch_mean.double(), torch.tensor(mean, dtype=torch.float64), rtol=1e-6, atol=0)
        torch.testing.assert_close(head.batch_std.double(), torch.tensor(std, dtype=torch.float64), rtol=1e-6, atol=0)
        if step == 0:  # the first batch covers the clip regions
            norms = x.norm(dim=1)
            scaler = (head.h * (norms - mean) / (std + 1e-3)).clamp(-1, 1)
            theta = torch.acos(head.cosine(x).gather(1, y[:, None]).squeeze(1).clamp(-1 + 1e-3, 1 - 1e-3))
            shifted = theta - head.m * scaler
            assert (scaler == 1).any() and (scaler == -1).any()
            assert (shifted < 1e-3).any() and (shifted > math.pi - 1e-3).any()


def test_adaface_default_ema_from_its_initial_values() -> None:
    torch.manual_seed(0)
    head = AdaFaceHead(E, C)  # t_alpha 0.01, μ = 20, σ = 100
    x, y = torch.randn(6, E) * 3, torch.arange(6) % C
    expected, mean, std = adaface64(head, x, y, 20.0, 100.0)
    torch.testing.assert_close(head(x, y).double(), expected, rtol=0, atol=1e-5 * head.s)
    assert head.batch_mean.item() == pytest.approx(mean, rel=1e-6) and head.batch_std.item() == pytest.approx(std)


def test_adaface_eval_uses_the_ema_without_updating_it() -> None:
    head, x, y = adaface_problem()
    head(x, y)
    before = (head.batch_mean.clone(), head.batch_std.clone())
    head.eval()
    expected, _, _ = adaface64(head, x, y, before[0].item(), before[1].item(), training=False)
    torch.testing.assert_close(head(x, y).double(), expected, rtol=0, atol=1e-5 * head.s)
    assert torch.equal(head.batch_mean, before[0]) and torch.equal(head.batch_std, before[1])


def test_adaface_buffers_round_trip_through_the_state_dict() -> None:
    head, x, y = adaface_problem()
    head(x, y)
    head(x[:7], y[:7])
    state = head.state_dict()
    assert {"weight", "batch_mean", "batch_std"} == set(state)
    fresh = AdaFaceHead(E, C, s=64.0, m=0.4, h=0.333, t_alpha=0.1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.batch_mean, head.batch_mean) and torch.equal(fresh.batch_std, head.batch_std)
    assert torch.equal(fresh(x, y), head(x, y))  # the same step from the same state
    assert torch.equal(fresh.batch_mean, head.batch_mean)


# -- ElasticFace ----------------------------------------------------------------------------------------------------


def elastic64(head: ElasticFaceHead, x: torch.Tensor, y: torch.Tensor, margins: list[float]) -> torch.Tensor:
    """Float64 closed form with given per-sample margins, already assigned to the rows."""
    cos = cosines64(x, head.weight)
    out = cos.clone()
    for i, label in enumerate(y.tolist()):
        c = cos[i, label].item()
        out[i, label] = arc64(c, margins[i]) if head.variant == "arc" else c - margins[i]
    return head.s * out


def ranked(margins: list[float], cos_target: list[float]) -> list[float]:
    """ElasticFace+ as the paper states it: the smallest cos θ_y gets the largest margin."""
    rows = sorted(range(len(margins)), key=lambda i: cos_target[i])
    out = [0.0] * len(margins)
    for row, margin in zip(rows, sorted(margins, reverse=True), strict=True):
        out[row] = margin
    return out


@pytest.mark.parametrize("variant", ["arc", "cos"])
@pytest.mark.parametrize("plus", [False, True])
def test_elastic_matches_closed_form_with_given_margins(variant: str, plus: bool) -> None:
    torch.manual_seed(0)
    head = ElasticFaceHead(E, C, s=64.0, variant=variant, sigma=0.05, plus=plus)
    y = torch.arange(15) % C
    x = near_and_opposite(head.weight, y)
    margins = torch.linspace(0.1, 0.9, 15)[torch.randperm(15, generator=torch.Generator().manual_seed(3))]
    cos_y = cosines64(x, head.weight).gather(1, y[:, None]).squeeze(1).tolist()
    assigned = ranked(margins.tolist(), cos_y) if plus else margins.tolist()
    if variant == "arc":  # some rows past their own π − m_i
        assert any(math.acos(c) > math.pi - m for c, m in zip(cos_y, assigned, strict=True))
    logits = head.training_logits(x, y, margins=margins)[0]
    torch.testing.assert_close(logits.double(), elastic64(head, x, y, assigned), rtol=0, atol=1e-5 * head.s)


def test_elastic_draws_are_normal_seeded_and_drive_the_margins() -> None:
    torch.manual_seed(0)
    a, b = ElasticFaceHead(E, C, sigma=0.05, seed=7), ElasticFaceHead(E, C, sigma=0.05, seed=7)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.margins(4000), b.margins(4000))
    draws = a.margins(4000)
    assert abs(draws.mean().item() - 0.5) < 0.005 and abs(draws.std().item() - 0.05) < 0.005
    assert not torch.equal(draws, ElasticFaceHead(E, C, sigma=0.05, seed=8).margins(4000))
    x, y = torch.randn(6, E), torch.arange(6) % C
    drawn = a.margins(6)
    torch.testing.assert_close(a(x, y).double(), elastic64(a, x, y, drawn.tolist()), rtol=0, atol=1e-5 * a.s)
    assert a.draws.item() == 1 and not torch.equal(a.margins(6), drawn)  # the next step draws anew


def test_elastic_resumed_head_draws_what_the_original_draws_next() -> None:
    torch.manual_seed(0)
    original = ElasticFaceHead(E, C, variant="cos", sigma=0.1, plus=True, seed=3)
    x, y = torch.randn(6, E), torch.arange(6) % C
    first = original.margins(6)
    for _ in range(3):
        original(x, y)
    resumed = ElasticFaceHead(E, C, variant="cos", sigma=0.1, plus=True, seed=3)
    resumed.load_state_dict(copy.deepcopy(original.state_dict()))
    assert resumed.draws.item() == 3 and not torch.equal(resumed.margins(6), first)
    assert torch.equal(resumed.margins(6), original.margins(6))
    assert torch.equal(resumed(x, y), original(x, y))  # the 4th forward of both
    assert torch.equal(resumed.margins(6), original.margins(6))  # and the 5th


def test_elastic_eval_uses_the_mean_margin_and_draws_nothing() -> None:
    torch.manual_seed(0)
    head = ElasticFaceHead(E, C, variant="arc", sigma=0.2, plus=True)
    x, y = torch.randn(6, E), torch.arange(6) % C
    head.eval()
    logits = head(x, y)
    torch.testing.assert_close(logits.double(), elastic64(head, x, y, [0.5] * 6), rtol=0, atol=1e-5 * head.s)
    assert torch.equal(head(x, y), logits) and head.draws.item() == 0


def test_elastic_checks_its_keys() -> None:
    assert ElasticFaceHead(E, C, variant="cos").m == 0.35 and ElasticFaceHead(E, C).m == 0.5
    with pytest.raises(ValueError, match=r"ElasticFaceHead: variant='sphere' .* arc, cos"):
        ElasticFaceHead(E, C, variant="sphere")
    with pytest.raises(ValueError, match=r"sigma=-0.1"):
        ElasticFaceHead(E, C, sigma=-0.1)


# -- CurricularFace -------------------------------------------------------------------------------------------------


def curricular64(head: CurricularFaceHead, x: torch.Tensor, y: torch.Tensor, t: float, training: bool = True):
    """The official CurricularFace forward (HuangYG123/CurricularFace head/metrics.py) in float64: t updated from the
    mean target cosine first, then hard negatives (cos θ_j > cos(θ_y + m)) become cos θ_j·(t + cos θ_j)."""
    m = head.m
    cos = cosines64(x, head.weight).clamp(-1, 1)
    target = [cos[i, label].item() for i, label in enumerate(y.tolist())]
    if training:
        t = 0.01 * statistics.fmean(target) + 0.99 * t
    out = cos.clone()
    hard = 0
    for i, label in enumerate(y.tolist()):
        c = target[i]
        cos_theta_m = c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m)
        for j in range(cos.shape[1]):
            if j != label and cos[i, j].item() > cos_theta_m:
                out[i, j] = cos[i, j] * (t + cos[i, j])
                hard += 1
        out[i, label] = cos_theta_m if c > math.cos(math.pi - m) else c - math.sin(math.pi - m) * m
    return head.s * out, t, hard


def test_curricular_matches_the_official_formula_over_two_steps() -> None:
    torch.manual_seed(0)
    head = CurricularFaceHead(E, C, s=64.0, m=0.5)
    y = torch.arange(15) % C
    x = near_and_opposite(head.weight, y)
    t = 0.0
    for _ in range(2):
        expected, t, hard = curricular64(head, x, y, t)
        assert 0 < hard < len(y) * (C - 1)  # hard and easy negatives
        torch.testing.assert_close(head(x, y).double(), expected, rtol=0, atol=1e-5 * head.s)
        assert head.t.item() == pytest.approx(t, rel=1e-6, abs=1e-9)
    theta = torch.acos(head.cosine(x).gather(1, y[:, None]).clamp(-1, 1))
    assert (theta > math.pi - head.m).any()  # rows in the fallback region
    torch.testing.assert_close(head.logits(x).double(), head.s * cosines64(x, head.weight), rtol=0, atol=1e-4)


def test_curricular_eval_uses_t_without_updating_it() -> None:
    torch.manual_seed(0)
    head = CurricularFaceHead(E, C, s=30.0, m=0.5)
    y = torch.arange(10) % C
    x = near_and_opposite(head.weight, y)
    head(x, y)
    t = head.t.clone()
    head.eval()
    expected, _, _ = curricular64(head, x, y, t.item(), training=False)
    torch.testing.assert_close(head(x, y).double(), expected, rtol=0, atol=1e-5 * head.s)
    assert torch.equal(head.t, t) and head.t.item() != 0
    assert set(head.state_dict()) == {"weight", "t"}


# -- all heads ------------------------------------------------------------------------------------------------------

HEADS = {
    "subcenter": lambda: SubCenterArcFaceHead(E, C, k=3),
    "adaface": lambda: AdaFaceHead(E, C),
    "elastic_arc": lambda: ElasticFaceHead(E, C, plus=True),
    "elastic_cos": lambda: ElasticFaceHead(E, C, variant="cos"),
    "curricular": lambda: CurricularFaceHead(E, C),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(HEADS))
def test_autocast_gives_finite_fp32_logits_and_gradients(name: str, dtype: torch.dtype) -> None:
    """Embeddings on, opposite and beside their class's weight row (cos θ_y = ±1, 0 exactly), and a dead one."""
    torch.manual_seed(0)
    head = HEADS[name]()
    rows = head.weight.detach()[:: len(head.weight) // C][:C]
    y = torch.tensor([0, 1, 2, 3, 4])
    x = torch.stack([rows[0] * 3, -rows[1], torch.zeros(E), rows[3] * 50, torch.randn(E)]).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        margin_logits, logits = head.training_logits(x.to(dtype), y)
        loss = F.cross_entropy(margin_logits, y)
    assert margin_logits.dtype == logits.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(margin_logits).all() and torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(b.float()).all() for b in head.buffers())


def test_not_margin_heads_so_partial_fc_refuses_them() -> None:
    from arcface_lightning.models.partial_fc import PartialFC

    for make in HEADS.values():
        with pytest.raises(ValueError, match=r"PartialFC: head=.* a margin head"):
            PartialFC(make(), sample_rate=0.5)


# -- 2 gloo ranks ---------------------------------------------------------------------------------------------------

SIZES = (5, 7)  # uneven per-rank batches: the global statistics weigh ranks by their sizes


class Heads(torch.nn.Module):
    """The stateful heads in one DDP-wrapped module: DDP broadcasts rank zero's buffers at every forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ada = AdaFaceHead(E, C, t_alpha=0.5)
        self.curricular = CurricularFaceHead(E, C)
        self.subcenter = SubCenterArcFaceHead(E, C, k=3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(head(x, y), y) for head in (self.ada, self.curricular, self.subcenter))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    n = sum(SIZES)
    return [(torch.randn(n, E, generator=g) * (1 + 9 * torch.rand(n, 1, generator=g)), torch.arange(n) % C)] * 2


def buffers_after_two_steps(model: torch.nn.Module, rows: slice) -> dict[str, torch.Tensor]:
    for x, y in global_batches():
        model(x[rows], y[rows]).backward()
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("weight")}


def two_ranks(rank: int, port: int, expected: dict[str, torch.Tensor]) -> None:
    join(port, rank, len(SIZES))
    model = torch.nn.parallel.DistributedDataParallel(Heads())
    start = sum(SIZES[:rank])
    got = buffers_after_two_steps(model, slice(start, start + SIZES[rank]))
    got = {k.removeprefix("module."): v for k, v in got.items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    leave()


def test_ema_and_counts_over_two_ranks_equal_one_process_on_the_global_batch() -> None:
    expected = buffers_after_two_steps(Heads(), slice(None))
    assert expected["subcenter.counts"].sum() == 2 * sum(SIZES) and expected["ada.batch_mean"] != 20
    start_ranks(two_ranks, (free_port(), expected), len(SIZES))
