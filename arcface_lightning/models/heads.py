"""Angular-margin classification heads: ArcFace and its family in one file.

Every margin head computes, for L2-normalised embeddings x̂ and class weights Ŵ_j (one row per class),

    cos θ_j = x̂ · Ŵ_j
    training logits:  s · cos θ_j   for j ≠ y,      s · ψ(θ_y)   for the label y
    inference logits: s · cos θ_j   for every j (no label, no margin)

with the combined margin of insightface, ψ(θ) = cos(m1·θ + m2) − m3:

    | head              | m1 | m2 | m3 |
    | ArcFaceHead       | 1  | m  | 0  |
    | CosFaceHead       | 1  | 0  | m  |
    | SphereFaceHead    | m  | 0  | 0  |
    | CombinedMarginHead| m1 | m2 | m3 |

Choices, and why:
- ψ must decrease over θ ∈ [0, π], or a badly placed sample is rewarded. cos(m1·θ + m2) stops
  decreasing once m1·θ + m2 > π, i.e. past θ* = (π − m2)/m1. Beyond θ* we use cos θ − c − m3 with
  c = max(m2·sin m2, 1 + cos θ*). For ArcFace (m1 = 1) and m ≤ 2.3 that is insightface's and
  pytorch-metric-learning's cos θ − m·sin m; the max() keeps ψ monotone where that formula does not
  (m > 2.3, and the SphereFace-style m1 > 1, for which it is the continuous extension).
- The margin touches the target column only (gather → ψ → scatter), in fp32 whatever the autocast
  dtype: acos has an infinite slope at ±1, so taking it over the whole matrix and masking would give
  0·∞ = NaN gradients, and under fp16/bf16 the clamp 1 − 1e-7 rounds to 1.
- The gradient is the true one (no straight-through `no_grad` trick); the clamp keeps it finite.
- A vector shorter than NORM_EPS normalises to 0 (cos = 0) with zero gradient: plain x / max(‖x‖, eps), as in
  F.normalize, would send a gradient of 1/eps (≈ 1e12 with its default eps) back through a dead embedding.
- m = 0 takes no angle round trip at all, so ArcFaceHead(m=0) equals s·cos exactly.
- `training_logits` returns both logits from one cosine matrix: the (batch × classes) matmul is the head's
  whole cost, and it grows with the number of classes.
- Labels are range-checked only on CPU tensors. On an accelerator, `bad.any()` would make the host wait for the
  device at every step; there the data module checks every label once when it builds its splits
  (data/datasets.py), and an out-of-range label from elsewhere ends in the device's own index assertion.

Margin warm-up: `set_margin_scale(t)` (t ∈ [0, 1], 1 unless set) multiplies every margin by t — m2 and m3 become
t·m2 and t·m3, m1 becomes 1 + t·(m1 − 1) (`ramp`, exact at both ends) — so at t = 0 the training logits are s·cos θ,
bit for bit, and at t = 1 the configured head's. The module sets t per step from its schedule when the head's
`margin_warmup_epochs` > 0 (protocol.warmup_factor); a plain attribute, not state: the step decides it.

`psi(cos, m1, m2, m3)` is ψ as one pure function: every margin head here, the newer heads of recent_heads.py and
Partial FC call it. Every head answers the module through protocol.py's `Head` (`step`, and optional hooks).
No framework imports beyond torch: these are plain nn.Modules usable in any training loop.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from arcface_lightning.core.checks import check_int, check_number
from arcface_lightning.models.protocol import Head

NORM_EPS = 1e-6  # vectors shorter than this count as zero
COS_EPS = 1e-7  # acos is evaluated on cos clamped to [−1 + eps, 1 − eps] (in fp32)


def _check_sizes(owner: str, embedding_size: int, num_classes: int) -> None:
    check_int(owner, "embedding_size", embedding_size, minimum=2)
    check_int(owner, "num_classes", num_classes, minimum=2)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; rows shorter than NORM_EPS become 0, with zero gradient."""
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > NORM_EPS, x / norm.clamp_min(NORM_EPS), torch.zeros_like(x))


def cosine_similarity(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos θ between each embedding row and each weight row, in fp32 even inside an autocast region."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return normalize(embeddings.float()) @ normalize(weight.float()).t()


def reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading a tensor's values on the host costs no device synchronisation: it is in host memory."""
    return tensor.device.type == "cpu"


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise a ValueError naming the first label outside [0, num_classes). Shape and dtype are always checked;
    values only on CPU, where reading them costs no device synchronisation (see the module doc)."""
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} and {labels.dtype}")
    if not reads_are_free(labels):
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"label {labels[bad][0].item()} is out of range; allowed: 0 ≤ label < {num_classes}")


Margin = float | torch.Tensor  # one value, or one per element of the target cosines (per-sample margins)


def psi(cos_target: torch.Tensor, m1: Margin = 1.0, m2: Margin = 0.0, m3: Margin = 0.0) -> torch.Tensor:
    """The margin ψ(θ) = cos(m1·θ + m2) − m3 of the target cosines (any shape, fp32), with its monotone fallback
    cos θ − c − m3 past θ* = (π − m2)/m1, c = max(m2·sin m2, 1 + cos θ*) (module doc). Every margin head's ψ is this
    function; margins may be tensors broadcastable to `cos_target` (ElasticFace draws one per sample)."""
    per_element = isinstance(m1, torch.Tensor) or isinstance(m2, torch.Tensor)
    if not per_element and m1 == 1.0 and m2 == 0.0:  # no angular part: exact, and no acos to differentiate
        return cos_target - m3
    if not per_element:
        theta_max = (math.pi - m2) / m1
        shift = max(m2 * math.sin(m2), 1.0 + math.cos(theta_max))
    else:
        m1, m2 = (torch.as_tensor(m, dtype=cos_target.dtype, device=cos_target.device) for m in (m1, m2))
        theta_max = (math.pi - m2) / m1
        shift = torch.maximum(m2 * torch.sin(m2), 1.0 + torch.cos(theta_max))
    theta = torch.acos(cos_target.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))
    return torch.where(theta <= theta_max, torch.cos(m1 * theta + m2), cos_target - shift) - m3


def ramp(margin: float, scale: float, none: float = 0.0) -> float:
    """A margin at warm-up factor `scale`: `none` (no margin) at 0, `margin` at 1, linear between. Written
    (1 − t)·none + t·margin so that both ends are exact in floating point."""
    return (1.0 - scale) * none + scale * margin


def warmed_margins(margins: dict[str, float], scale: float) -> dict[str, float]:
    """ψ's constants (m1, m2, m3) at warm-up factor `scale`: m1 from 1, m2 and m3 from 0."""
    return {name: ramp(value, scale, none=1.0 if name == "m1" else 0.0) for name, value in margins.items()}


class MarginHead(Head):
    """Class weights (`per_class` rows per class, class-major) and the inference side every margin head shares:
    cosines, and logits s·cos θ without a margin. Subclasses give `training_logits(embeddings, labels)`, with
    their margins multiplied by `margin_scale` (the warm-up's factor, see the module doc)."""

    def __init__(
        self, embedding_size: int, num_classes: int, s: float, per_class: int = 1, margin_warmup_epochs: int = 0
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_sizes(owner, embedding_size, num_classes)
        check_number(owner, "s", s, "a finite number > 0", lambda v: v > 0)
        check_int(owner, "margin_warmup_epochs", margin_warmup_epochs, minimum=0)
        self.embedding_size, self.num_classes, self.s = int(embedding_size), int(num_classes), float(s)
        self.margin_warmup_epochs, self.margin_scale = int(margin_warmup_epochs), 1.0
        self.weight = nn.Parameter(torch.empty(self.num_classes * per_class, self.embedding_size))
        nn.init.xavier_uniform_(self.weight)

    def set_margin_scale(self, scale: float) -> None:
        check_number(type(self).__name__, "margin_scale", scale, "0 ≤ scale ≤ 1", lambda v: 0.0 <= v <= 1.0)
        self.margin_scale = float(scale)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Plain cosines cos θ (batch, num_classes), fp32, no margin and no scale."""
        return cosine_similarity(embeddings, self.weight)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Inference logits s·cos θ: no labels, no margin. Their argmax is the prediction."""
        return self.s * self.cosine(embeddings)

    def training_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training logits (batch, num_classes), the margin on each row's label column."""
        return self.training_logits(embeddings, labels)[0]


class CombinedMarginHead(MarginHead):
    """The shared margin: training target logit s·ψ(θ_y) with ψ(θ) = cos(m1·θ + m2) − m3 (see module doc)."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
        margin_warmup_epochs: int = 0,
    ) -> None:
        owner = type(self).__name__
        _check_sizes(owner, embedding_size, num_classes)
        check_number(owner, "s", s, "a finite number > 0", lambda v: v > 0)
        check_number(owner, "m1", m1, "1 ≤ m1 ≤ 10", lambda v: 1.0 <= v <= 10.0)
        check_number(owner, "m2", m2, "0 ≤ m2 < π", lambda v: 0.0 <= v < math.pi)
        check_number(owner, "m3", m3, "0 ≤ m3 ≤ 1", lambda v: 0.0 <= v <= 1.0)
        super().__init__(embedding_size, num_classes, s, margin_warmup_epochs=margin_warmup_epochs)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    @property
    def margins(self) -> dict[str, float]:
        """ψ's configured constants, for psi(cos, **margins) (Partial FC keeps these, not the head)."""
        return {"m1": self.m1, "m2": self.m2, "m3": self.m3}

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The margin ψ applied to the target cosines (any shape, fp32), at the warm-up's `margin_scale`."""
        return psi(cos_target, **warmed_margins(self.margins, self.margin_scale))

    def training_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training logits with the margin, inference logits without), both (batch, num_classes), from one
        cosine matrix: s·cos θ_j everywhere, and s·ψ(θ_y) in each row's label column of the first."""
        check_labels(labels, self.num_classes)
        cos = self.cosine(embeddings)
        index = labels.long().unsqueeze(1)
        return self.s * cos.scatter(1, index, self.psi(cos.gather(1, index))), self.s * cos

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"
        )


class ArcFaceHead(CombinedMarginHead):
    """ArcFace (Deng et al., 2019): additive angular margin, ψ(θ) = cos(θ + m), m in radians."""

    def __init__(
        self, embedding_size: int, num_classes: int, s: float = 30.0, m: float = 0.5, margin_warmup_epochs: int = 0
    ) -> None:
        check_number(type(self).__name__, "m", m, "0 ≤ m < π", lambda v: 0.0 <= v < math.pi)
        super().__init__(
            embedding_size, num_classes, s=s, m1=1.0, m2=m, m3=0.0, margin_warmup_epochs=margin_warmup_epochs
        )
        self.m = float(m)


class CosFaceHead(CombinedMarginHead):
    """CosFace (Wang et al., 2018): additive cosine margin, ψ(θ) = cos θ − m."""

    def __init__(
        self, embedding_size: int, num_classes: int, s: float = 30.0, m: float = 0.35, margin_warmup_epochs: int = 0
    ) -> None:
        check_number(type(self).__name__, "m", m, "0 ≤ m ≤ 1", lambda v: 0.0 <= v <= 1.0)
        super().__init__(
            embedding_size, num_classes, s=s, m1=1.0, m2=0.0, m3=m, margin_warmup_epochs=margin_warmup_epochs
        )
        self.m = float(m)


class SphereFaceHead(CombinedMarginHead):
    """SphereFace-style (Liu et al., 2017) multiplicative angular margin ψ(θ) = cos(m·θ), on normalised weights
    and a fixed scale s (the original's unnormalised features and annealing are left out)."""

    def __init__(
        self, embedding_size: int, num_classes: int, s: float = 30.0, m: float = 1.5, margin_warmup_epochs: int = 0
    ) -> None:
        check_number(type(self).__name__, "m", m, "1 ≤ m ≤ 10", lambda v: 1.0 <= v <= 10.0)
        super().__init__(
            embedding_size, num_classes, s=s, m1=m, m2=0.0, m3=0.0, margin_warmup_epochs=margin_warmup_epochs
        )
        self.m = float(m)


class SoftmaxHead(Head):
    """Plain softmax baseline: a linear layer, with the same forward/logits/cosine interface as the margin heads."""

    def __init__(self, embedding_size: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        _check_sizes(type(self).__name__, embedding_size, num_classes)
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.linear = nn.Linear(self.embedding_size, self.num_classes, bias=bias)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosines between embeddings and class weights (for embedding analysis; predictions use `logits`)."""
        return cosine_similarity(embeddings, self.weight)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings).float()

    def training_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """No margin: the training and the inference logits are the same tensor."""
        check_labels(labels, self.num_classes)
        logits = self.logits(embeddings)
        return logits, logits

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.training_logits(embeddings, labels)[0]
