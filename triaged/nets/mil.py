"""Multiple-instance pooling layers and the losses of seeds 000, 002 and 003.

* :class:`GlobalContrastPooling` (He et al. 2021, seed 000, eqs. 1–2): a bag of ``K`` instance features
  becomes ``M`` similarities, one per learned *concept* ``w_m``: ``s_m = max_k cos(w_m, φ_k)``.
  M²UNet uses it twice: over the 8 × 8 feature positions of a patch (embedding level) and over the
  patches of a CT (image level).
* :class:`GatedAttentionPooling` (Ilse et al. 2018, used by seed 002 for the slices of a CT):
  ``a_n = softmax_n(wᵀ(tanh(V h_n) ⊙ sigm(U h_n)))`` and ``z = Σ_n a_n h_n``.
* :class:`SpatialGatedAttention` (Chikontwe et al. 2020, seed 002, Section 3.3): the same gate with
  convolutions over a feature map: conv-tanh ⊙ conv-sigmoid → conv to one channel → softmax over the
  positions → the attention-weighted sum of the feature vectors.
* :func:`contrastive_mil_loss` (seed 002, eq. 5): NT-Xent (SimCLR) between each instance feature and
  its bag feature, cosine similarity over a temperature.
* :func:`class_balanced_focal_loss` and :func:`inverse_frequency_weights` (Hu et al. 2020, seed 003,
  eq. 1): ``−1/N Σ_i w_c (1 − p_c)^γ log p_c`` with ``w_c = 1 / freq(c)``.

Bags may be padded to a common length and batched: every pooling layer takes an optional boolean
``mask`` ``(B, N)`` (True = a real instance).  Research use only - not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _check_mask(mask: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("every bag needs at least one unmasked instance")
    return mask.to(torch.bool)


class GlobalContrastPooling(nn.Module):
    """Global contrast pooling (seed 000): ``s_m = max_k cos(w_m, φ_k)`` for ``M`` learned concepts.

    Parameters
    ----------
    in_features : int
        Dimension ``D`` of an instance feature ``φ_k``.
    concepts : int
        Number ``M`` of concepts (He et al.: 256 at the embedding level, 128 at the image level).
    eps : float
        Floor of the norms in the cosine (a zero feature has similarity 0 with every concept).

    Notes
    -----
    The paper's eq. 2 writes ``w_mᵀ φ_k + R(w_m)`` with "normalised" concepts and calls it a cosine;
    triaged normalises both sides so that every output lies in [−1, 1], and leaves ``R`` to the
    optimiser's weight decay.
    """

    def __init__(self, in_features: int, concepts: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.concepts = int(concepts)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(self.concepts, self.in_features))
        nn.init.normal_(self.weight)

    def similarities(self, instances: torch.Tensor) -> torch.Tensor:
        """Cosine of every instance with every concept: ``(..., K, D)`` → ``(..., K, M)``."""
        if instances.shape[-1] != self.in_features:
            raise ValueError(f"instances have {instances.shape[-1]} features, expected {self.in_features}")
        phi = F.normalize(instances, dim=-1, eps=self.eps)
        w = F.normalize(self.weight, dim=-1, eps=self.eps)
        return torch.matmul(phi, w.t())

    def forward(self, instances: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool a bag ``(..., K, D)`` into ``(..., M)``; ``mask`` ``(..., K)`` hides padded instances."""
        sim = self.similarities(instances)
        m = _check_mask(mask, sim.shape[:-1])
        if m is not None:
            sim = sim.masked_fill(~m.unsqueeze(-1), float("-inf"))
        return sim.max(dim=-2).values

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, concepts={self.concepts}"


class GatedAttentionPooling(nn.Module):
    """Gated attention MIL pooling (Ilse et al. 2018, eq. 9; seed 002's instance attention, eqs. 3–4).

    Parameters
    ----------
    in_features : int
        Dimension ``D`` of an instance feature ``h_n``.
    hidden : int
        Rows ``L`` of ``V`` and ``U`` (Ilse et al.: 128).
    """

    def __init__(self, in_features: int, hidden: int = 128) -> None:
        super().__init__()
        self.V = nn.Linear(in_features, hidden)
        self.U = nn.Linear(in_features, hidden)
        self.w = nn.Linear(hidden, 1)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention ``wᵀ(tanh(V h) ⊙ sigm(U h))``: ``(..., N, D)`` → ``(..., N)``."""
        return torch.as_tensor(self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))))[..., 0]

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool ``h`` ``(N, D)`` or ``(B, N, D)``.

        Returns
        -------
        z : tensor
            Bag feature ``(D,)`` or ``(B, D)``.
        a : tensor
            Attention weights ``(N,)`` or ``(B, N)``, summing to 1 over the (unmasked) instances.
        """
        s = self.scores(h)
        m = _check_mask(mask, s.shape)
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        a = torch.softmax(s, dim=-1)
        z = torch.matmul(a.unsqueeze(-2), h).squeeze(-2)
        return z, a


class SpatialGatedAttention(nn.Module):
    """Seed 002's spatial gated attention: pools a feature map ``(N, C, H, W)`` to ``(N, C)``.

    ``tanh(conv_V g) ⊙ sigm(conv_U g)`` → ``conv_w`` to one channel → softmax over the ``H·W``
    positions → ``φ = Σ_p α_p g_p``.

    Parameters
    ----------
    channels : int
        Channels ``C`` of the backbone's feature map.
    hidden : int
        Channels of the two gate convolutions.
    kernel_size : int
        Kernel of the two gate convolutions (the paper does not say; 1 keeps it a per-position gate).
    """

    def __init__(self, channels: int, hidden: int = 64, kernel_size: int = 1) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv_v = nn.Conv2d(channels, hidden, kernel_size, padding=pad)
        self.conv_u = nn.Conv2d(channels, hidden, kernel_size, padding=pad)
        self.conv_w = nn.Conv2d(hidden, 1, 1)

    def forward(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the pooled features ``(N, C)`` and the attention maps ``(N, H, W)`` (each sums to 1)."""
        n, c, h, w = g.shape
        gate = torch.tanh(self.conv_v(g)) * torch.sigmoid(self.conv_u(g))
        logits = torch.as_tensor(self.conv_w(gate)).reshape(n, h * w)
        alpha = torch.softmax(logits, dim=-1)
        pooled = torch.bmm(g.reshape(n, c, h * w), alpha.unsqueeze(-1)).squeeze(-1)
        return pooled, alpha.reshape(n, h, w)


def contrastive_mil_loss(
    instance_features: torch.Tensor, bag_features: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Seed 002's contrastive loss (eq. 5): NT-Xent between instance features and their bag features.

    The ``2N`` vectors are the ``N`` instance features ``z'_i`` and, for each, the feature ``z_i`` of the
    bag it belongs to; the positive of ``z'_i`` is ``z_i`` (and vice versa), every other vector of the
    ``2N`` is in the denominator (``Q[k, i] = 1`` iff ``k ≠ i``)::

        ℓ(i, j) = −log( exp(sim(r_i, r_j) / τ) / Σ_{k ≠ i} exp(sim(r_i, r_k) / τ) )

    averaged over the ``2N`` anchors, with ``sim`` the cosine.  With a single bag the bag-side copies are
    equal, so the loss pulls every slice towards the patient feature and pushes the slices apart from
    one another, which is the paper's "each slice is a pseudo-augmentation of the patient".

    Parameters
    ----------
    instance_features : tensor
        ``(N, D)`` instance features ``z'``.
    bag_features : tensor
        ``(D,)`` (one bag), ``(N, D)`` (each instance's own bag feature, for a batch of bags).
    temperature : float
        ``τ`` (seed 002: 1.0).
    """
    if instance_features.dim() != 2:
        raise ValueError(f"instance_features must be (N, D), got {tuple(instance_features.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = instance_features.shape[0]
    bags = bag_features.expand_as(instance_features) if bag_features.dim() == 1 else bag_features
    if bags.shape != instance_features.shape:
        raise ValueError(
            f"bag_features {tuple(bag_features.shape)} do not match {tuple(instance_features.shape)}"
        )
    r = F.normalize(torch.cat([instance_features, bags], dim=0), dim=-1)
    logits = (r @ r.t()) / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=r.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(r.device)
    return F.cross_entropy(logits, positives)


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Seed 003's class-balancing factors ``w_c = 1 / freq(c)`` with ``freq(c) = n_c / N``.

    A class absent from ``labels`` gets weight 0 (it contributes no term anyway).
    """
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes)[:num_classes].double()
    total = counts.sum()
    weights = torch.where(counts > 0, total / counts.clamp(min=1.0), torch.zeros_like(counts))
    return weights.float()


def class_balanced_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Seed 003's loss (eq. 1): ``−1/N Σ_i w_{c_i} (1 − p_{c_i})^γ log p_{c_i}``.

    Parameters
    ----------
    logits : tensor
        Class scores ``(N, K)`` (before the softmax).
    target : tensor
        True classes ``(N,)``.
    class_weights : tensor, optional
        ``(K,)`` balancing factors (:func:`inverse_frequency_weights`); all ones when omitted.
    gamma : float
        Focal exponent (seed 003: 1; 0 gives the weighted cross-entropy).
    """
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target.long().unsqueeze(1))[:, 0]
    focal = (1.0 - log_p.exp()).clamp(min=0.0) ** gamma
    w = torch.ones_like(log_p) if class_weights is None else class_weights.to(log_p)[target.long()]
    return -(w * focal * log_p).mean()
