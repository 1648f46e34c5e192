"""Margin heads after ArcFace: sub-centres, adaptive, random and curriculum margins. Plain torch (and
torch.distributed), the same interface as heads.py: `cosine`, `logits` (inference: s·cos, no margin),
`training_logits(embeddings, labels) -> (margin logits, logits)`, `forward`. `embeddings` are the backbone's raw
outputs, not normalised: AdaFace reads their norms.

    | head                  | target logit / s                                   | state                         |
    | SubCenterArcFaceHead  | cos(θ_y + m), θ_y from the best of k sub-centres    | counts, live (sub-centre use) |
    | AdaFaceHead           | cos(clip(θ_y − m·ẑ)) − m − m·ẑ, ẑ from the norm     | batch_mean, batch_std (EMA)   |
    | ElasticFaceHead       | cos(θ_y + m_i) or cos θ_y − m_i, m_i ~ N(m, σ)      | draws (training forwards)     |
    | CurricularFaceHead    | cos(θ_y + m); hard negatives cos_j·(t + cos_j)      | t (EMA of cos θ_y)            |

What heads.py's module doc says holds here too: cosines in fp32 whatever the autocast dtype, acos only on the
target column (gather → margin → scatter), the true gradient, clamped acos, zero gradient for dead vectors, labels
range-checked on CPU only.

State and DDP:
- Statistics (AdaFace's norm moments, CurricularFace's mean target cosine, the sub-centre counts) are taken over
  the global batch: one all_reduce per training step, so every rank holds the same buffers. That is required, not
  only tidy: DDP (broadcast_buffers, Lightning's default) copies rank zero's buffers over every other rank's at each
  forward, so per-rank statistics would silently become rank zero's.
- Nothing in a training step reads a device value on the host: counts are accumulated with scatter_add_, EMA updates
  are in-place tensor ops, and no tensor is built from host data on the device.
- Buffers move only in training forwards (`self.training`); validation and test, which also call training_logits
  for their loss, use them as they are.
- The margin ψ of ArcFace (monotone fallback past θ = π − m) is heads.psi(cos, m2=m), the one function every
  margin head uses; ElasticFace's per-sample margins go through it element-wise (m2 or m3 a tensor).

Margin warm-up (heads.py's module doc: `set_margin_scale(t)`, every margin × t) and the state: the statistics do not
depend on the margin, so they keep moving from the first step, and the margin comes in on settled values:
- sub-centres: m → t·m; the counts (nearest sub-centre) accumulate as without warm-up;
- AdaFace: m → t·m (both its angular and its additive part, m·ẑ included); the norm EMAs update at every step;
- ElasticFace: each draw m_i → t·m_i (mean and spread ramp together); `draws` advances at every training forward, so
  the stream of draws is the one the run would have without warm-up;
- CurricularFace: m → t·m, and each hard negative's logit blends from cos θ_j to cos θ_j·(t_c + cos θ_j) by t (at
  t = 0 no negative is modulated: the logits are s·cos θ); its t_c keeps its EMA of cos θ_y at every step.
At t = 0 every one gives s·cos θ exactly (no angle round trip: AdaFace and ElasticFace skip it at a zero margin).

Why CurricularFace and not MagFace: MagFace adds a regulariser g(‖z‖) on the feature magnitude to the loss and
needs the magnitude bounded to [l_a, u_a]. The heads hand logits to the module, which computes plain cross-entropy,
so MagFace's extra term would need a second return value and a module change; CurricularFace only changes logits.

None of these is a heads.CombinedMarginHead, so Partial FC (partial_fc.py) refuses them with a clear error.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from arcface_lightning.core.checks import check_choice, check_int, check_number, is_int, require
from arcface_lightning.models.distributed import rank_and_world
from arcface_lightning.models.heads import COS_EPS, MarginHead, check_labels, cosine_similarity, psi, ramp


def _target(cos: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (B, 1) of each row's label column, cos θ_y (B, 1)): the margin is computed on these and scattered back."""
    index = labels.long().unsqueeze(1)
    return index, cos.gather(1, index)


def _global_mean_std(values: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased standard deviation of 1-D `values` over the global batch (all ranks: count, sum and sum of
    squares all-reduced, so ranks may hold different batch sizes). The values are centred on `shift` (the previous
    estimate, equal on every rank) first, so the fp32 sum of squares does not cancel. One value: std 0 (the
    official AdaFace code's torch.std gives NaN there, which would poison the EMA for good)."""
    centred = values.float() - shift.float()
    moments = torch.stack([centred.new_full((), centred.numel()), centred.sum(), centred.square().sum()])
    if rank_and_world()[1] > 1:
        dist.all_reduce(moments)
    n, s1, s2 = moments.unbind()
    variance = (s2 - s1 * s1 / n) / (n - 1).clamp_min(1)
    return shift + s1 / n, variance.clamp_min(0).sqrt()


class SubCenterArcFaceHead(MarginHead):
    """Sub-center ArcFace (Deng et al., ECCV 2020): k sub-centres per class, cos θ_j = max_k cos θ_{j,k}, then
    ArcFace's target logit s·cos(θ_y + m) (monotone fallback past θ = π − m). Paper: s = 64, m = 0.5, k = 3.

    `weight` is (num_classes·k, E), class-major: class c owns rows c·k … c·k + k − 1 (pytorch-metric-learning's
    SubCenterArcFaceLoss.W is its transpose). `counts` (C, k) counts, over training forwards and the global batch,
    which sub-centre of its label each sample was closest to; `live` (C, k) marks the sub-centres still in use.
    With `drop_after_epoch`, `end_of_epoch(drop_after_epoch − 1)` keeps only each class's dominant sub-centre (most
    counts, ties to the first): the others get cos = −inf before the max, so they never win and get no gradient.
    The paper also drops the samples far from the dominant centre and retrains; here the non-dominant sub-centres
    just stop being used. `class_centres()` gives each class's dominant live sub-centre."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        k: int = 3,
        drop_after_epoch: int | None = None,
        margin_warmup_epochs: int = 0,
    ) -> None:
        owner = type(self).__name__
        check_number(owner, "m", m, "0 ≤ m < π", lambda v: 0.0 <= v < math.pi)
        check_int(owner, "k", k, minimum=1)
        require(
            owner,
            "drop_after_epoch",
            drop_after_epoch,
            "null or an integer ≥ 1",
            lambda v: v is None or (is_int(v) and v >= 1),
        )
        super().__init__(embedding_size, num_classes, s, per_class=k, margin_warmup_epochs=margin_warmup_epochs)
        self.m, self.k, self.drop_after_epoch = float(m), int(k), drop_after_epoch
        self.register_buffer("counts", torch.zeros(self.num_classes, self.k, dtype=torch.int64))
        self.register_buffer("live", torch.ones(self.num_classes, self.k, dtype=torch.bool))

    def _closest(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos θ_j over each class's live sub-centres (B, C), which sub-centre that was (B, C))."""
        cos = cosine_similarity(embeddings, self.weight).view(-1, self.num_classes, self.k)
        return torch.where(self.live, cos, float("-inf")).max(dim=2)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self._closest(embeddings)[0]

    def training_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_labels(labels, self.num_classes)
        cos, closest = self._closest(embeddings)
        index, cos_y = _target(cos, labels)
        if self.training:
            self._count(index, closest.gather(1, index))
        margin = psi(cos_y, m2=ramp(self.m, self.margin_scale))
        return self.s * cos.scatter(1, index, margin), self.s * cos

    @torch.no_grad()
    def _count(self, index: torch.Tensor, sub: torch.Tensor) -> None:
        flat = (index * self.k + sub).view(-1)
        delta = torch.zeros_like(self.counts).view(-1).scatter_add_(0, flat, torch.ones_like(flat))
        if rank_and_world()[1] > 1:
            dist.all_reduce(delta)
        self.counts.view(-1).add_(delta)

    def dominant(self) -> torch.Tensor:
        """Each class's live sub-centre with the most counts (C,), ties to the first."""
        return self.counts.masked_fill(~self.live, -1).argmax(dim=1)

    @torch.no_grad()
    def end_of_epoch(self, epoch: int) -> None:
        """Called after each training epoch (0-based `epoch`); drops the non-dominant sub-centres after the
        `drop_after_epoch`-th. The counts are already global (see the module doc), so every rank drops the same."""
        if self.drop_after_epoch is not None and epoch + 1 == self.drop_after_epoch:
            self.live.copy_(F.one_hot(self.dominant(), self.k).bool())

    def class_centres(self) -> torch.Tensor:
        """(C, E): each class's dominant live sub-centre, a detached row of `weight`."""
        rows = torch.arange(self.num_classes, device=self.weight.device) * self.k + self.dominant()
        return self.weight.detach()[rows]

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, m={self.m}, "
            f"k={self.k}, drop_after_epoch={self.drop_after_epoch}"
        )


class AdaFaceHead(MarginHead):
    """AdaFace (Kim, Jain, Liu, CVPR 2022): a margin adapted to image quality through the feature norm ‖z‖.

        ẑ = clip(h·(‖z‖ − μ) / (σ + ε), −1, 1),  ‖z‖ clipped to [0.001, 100] and detached, ε = 1e-3
        target logit s·(cos(clip(θ_y − m·ẑ, ε, π − ε)) − (m + m·ẑ)),  other columns s·cos θ_j

    μ, σ (`batch_mean`, `batch_std`, initially 20 and 100) are EMAs of the batch mean and unbiased std of the norms:
    new = t_alpha·batch + (1 − t_alpha)·old, updated before ẑ uses them, as in the official code
    (mk-minchul/AdaFace head.py); over the global batch under DDP. Paper: s = 64, m = 0.4, h = 0.333, t_alpha = 0.01.
    As in the official code the target cosine is clamped to ±(1 − ε) before acos (no gradient beyond); unlike it,
    the other columns are not clamped (it only changes |cos θ_j| > 1 − ε)."""

    EPS = 1e-3

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        margin_warmup_epochs: int = 0,
    ) -> None:
        owner = type(self).__name__
        check_number(owner, "m", m, "0 ≤ m ≤ 1", lambda v: 0.0 <= v <= 1.0)
        check_number(owner, "h", h, "h ≥ 0", lambda v: v >= 0.0)
        check_number(owner, "t_alpha", t_alpha, "0 < t_alpha ≤ 1", lambda v: 0.0 < v <= 1.0)
        super().__init__(embedding_size, num_classes, s, margin_warmup_epochs=margin_warmup_epochs)
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @torch.no_grad()
    def margin_scaler(self, embeddings: torch.Tensor) -> torch.Tensor:
        """ẑ (B,), after updating the EMAs with this batch when training."""
        norms = embeddings.detach().float().norm(dim=1).clamp(0.001, 100.0)
        if self.training:
            mean, std = _global_mean_std(norms, self.batch_mean)
            self.batch_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * mean)
            self.batch_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * std)
        return (self.h * (norms - self.batch_mean) / (self.batch_std + self.EPS)).clamp(-1.0, 1.0)

    def training_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_labels(labels, self.num_classes)
        cos = self.cosine(embeddings)
        scaler = self.margin_scaler(embeddings).unsqueeze(1)
        index, cos_y = _target(cos, labels)
        m = ramp(self.m, self.margin_scale)
        if m == 0.0:  # no margin: s·cos θ exactly, without the clamped angle round trip
            return self.s * cos, self.s * cos
        theta = torch.acos(cos_y.clamp(-1.0 + self.EPS, 1.0 - self.EPS))
        theta = (theta - m * scaler).clamp(self.EPS, math.pi - self.EPS)
        margin = torch.cos(theta) - (m + m * scaler)
        return self.s * cos.scatter(1, index, margin), self.s * cos

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, m={self.m}, "
            f"h={self.h}, t_alpha={self.t_alpha}"
        )


def _stream_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers: distinct tuples give unrelated streams (seed + draws would not)."""
    digest = hashlib.blake2b(" ".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ElasticFaceHead(MarginHead):
    """ElasticFace (Boutros et al., CVPRW 2022): a margin drawn per sample and training step, m_i ~ N(m, σ).

        variant "arc": target logit s·cos(θ_y + m_i) (monotone fallback past θ = π − m_i, as ArcFace)
        variant "cos": target logit s·(cos θ_y − m_i)

    Paper and official configs (fdbtrs/ElasticFace): s = 64, σ = 0.05, m = 0.5 (arc) or 0.35 (cos, the default
    when m is left out). Arc margins drawn below 0 are raised to 0: a negative angular margin would make ψ rise
    over θ ∈ [0, −m_i].

    `plus` (ElasticFace+): the batch's drawn margins are ranked against cos θ_y, the sample farthest from its class
    centre (smallest cos θ_y) getting the largest margin, as the paper states. The official code indexes the sorted
    margins with the sort permutation instead of its inverse (`margin[idicate_cosie]`), which matches that rule
    only for some batches; this head follows the paper. Ranking is within each rank's batch, as the official code
    ranks each GPU's.

    Outside training (validation and test also ask for training_logits, for their loss) the margin is m itself: no
    draw, deterministic. Draws are reproducible: training forward number `draws` (a persistent int64 buffer) draws
    from a generator seeded with (seed, draws, rank) on the embeddings' device, so a run resumed from a checkpoint
    (on the same kind of device and number of ranks) draws what the uninterrupted run would have. The seed needs a
    host integer, and reading the buffer would wait for the device at every step, so the head keeps a Python mirror
    `_draws`, advanced with the buffer and set from a loaded state dict (`_load_from_state_dict`); it, not the
    buffer, seeds the draws (write a new count through load_state_dict, not into the buffer). `margins(n, device)`
    returns what the next training forward draws."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        variant: str = "arc",
        m: float | None = None,
        sigma: float = 0.05,
        plus: bool = False,
        seed: int = 0,
        margin_warmup_epochs: int = 0,
    ) -> None:
        owner = type(self).__name__
        check_choice(owner, "variant", variant, ("arc", "cos"))
        m = (0.5 if variant == "arc" else 0.35) if m is None else m
        if variant == "arc":
            check_number(owner, "m", m, "0 ≤ m < π", lambda v: 0.0 <= v < math.pi)
        else:
            check_number(owner, "m", m, "0 ≤ m ≤ 1", lambda v: 0.0 <= v <= 1.0)
        check_number(owner, "sigma", sigma, "sigma ≥ 0", lambda v: v >= 0.0)
        check_choice(owner, "plus", plus, (True, False))
        check_int(owner, "seed", seed, minimum=0)
        super().__init__(embedding_size, num_classes, s, margin_warmup_epochs=margin_warmup_epochs)
        self.variant, self.m, self.sigma, self.plus, self.seed = variant, float(m), float(sigma), bool(plus), seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        self._draws = 0

    def margins(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The n margins (fp32, in batch order, before ElasticFace+'s ranking) the next training forward draws."""
        generator = torch.Generator(device=device)
        generator.manual_seed(_stream_seed(self.seed, self._draws, rank_and_world()[0]))
        margins = self.m + self.sigma * torch.randn(n, generator=generator, device=device)
        return margins.clamp_min(0.0) if self.variant == "arc" else margins

    @staticmethod
    def rank_margins(margins: torch.Tensor, cos_target: torch.Tensor) -> torch.Tensor:
        """ElasticFace+: the largest margin to the smallest cos θ_y, the next to the next, and so on."""
        order = torch.argsort(cos_target.detach(), stable=True)
        return torch.empty_like(margins).scatter_(0, order, margins.sort(descending=True).values)

    def training_logits(
        self, embeddings: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`margins` (B,) replaces the draw (for tests); ElasticFace+ still ranks them, and the warm-up scales them.
        A training forward advances `draws` whether or not it drew."""
        check_labels(labels, self.num_classes)
        cos = self.cosine(embeddings)
        index, cos_y = _target(cos, labels)
        if margins is None:
            margins = self.margins(len(labels), cos.device) if self.training else cos.new_full((len(labels),), self.m)
        if self.training:
            self.draws.add_(1)
            self._draws += 1
        if self.margin_scale == 0.0:  # warm-up at its start: s·cos θ exactly (the draw above still counted)
            return self.s * cos, self.s * cos
        margins = margins.to(cos) * self.margin_scale
        if self.plus:
            margins = self.rank_margins(margins, cos_y.squeeze(1))
        margins = margins.unsqueeze(1)
        margin = psi(cos_y, m2=margins) if self.variant == "arc" else psi(cos_y, m3=margins)
        return self.s * cos.scatter(1, index, margin), self.s * cos

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "draws" in state_dict:  # a host read once per load, not per step
            self._draws = int(state_dict[prefix + "draws"])

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, "
            f"variant={self.variant}, m={self.m}, sigma={self.sigma}, plus={self.plus}, seed={self.seed}"
        )


class CurricularFaceHead(MarginHead):
    """CurricularFace (Huang et al., CVPR 2020): ArcFace's target logit plus hard negatives weighted by an
    adaptive curriculum t.

        target:    s·cos(θ_y + m) while θ_y ≤ π − m, else s·(cos θ_y − m·sin m)
        negative:  s·cos θ_j if cos θ_j ≤ cos(θ_y + m), else s·cos θ_j·(t + cos θ_j) (a hard one)
        t ← 0.01·mean(cos θ_y) + 0.99·t  (initially 0)

    As in the official code (HuangYG123/CurricularFace head/metrics.py): t is updated in the training forward
    before the negatives use it, from the batch's plain target cosines (over the global batch under DDP), and
    hardness compares with cos(θ_y + m) itself, not with the fallback target (they differ only past π − m). The
    fallback is heads.py's, which for m ≤ 2.3 is the official cos θ_y − sin(π − m)·m. Paper: s = 64, m = 0.5."""

    T_MOMENTUM = 0.01

    def __init__(
        self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, margin_warmup_epochs: int = 0
    ) -> None:
        check_number(type(self).__name__, "m", m, "0 ≤ m < π", lambda v: 0.0 <= v < math.pi)
        super().__init__(embedding_size, num_classes, s, margin_warmup_epochs=margin_warmup_epochs)
        self.m = float(m)
        self.register_buffer("t", torch.zeros(()))

    def training_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_labels(labels, self.num_classes)
        cos = self.cosine(embeddings)
        index, cos_y = _target(cos, labels)
        scale, m = self.margin_scale, ramp(self.m, self.margin_scale)
        with torch.no_grad():
            if self.training:
                mean = _global_mean_std(cos_y.squeeze(1), self.t)[0]
                self.t.mul_(1.0 - self.T_MOMENTUM).add_(self.T_MOMENTUM * mean)
            boundary = torch.cos(torch.acos(cos_y.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)) + m)
        if scale == 0.0:
            negatives = cos
        else:  # the warm-up blends the modulation in: none at t = 0, the configured one at t = 1
            hard = cos * (self.t + cos)
            negatives = torch.where(cos > boundary, hard if scale == 1.0 else torch.lerp(cos, hard, scale), cos)
        margin = psi(cos_y, m2=m)
        return self.s * negatives.scatter(1, index, margin), self.s * cos

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, m={self.m}"
