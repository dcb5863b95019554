"""Projection heads ψ_s: one small MLP per backbone stage, applied only to the patch rows a loss uses.

The heads are training-only: they live in the loss module, not in the segmentation model, so an
exported or inference model never contains them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """``Linear(C, hidden) → GELU → Linear(hidden, dim)``, then L2-normalised.

    Shapes: ``(N, C)`` → ``(N, dim)`` with unit-norm rows, always float32 (similarities are computed
    in fp32 whatever the backbone precision).
    """

    def __init__(self, in_channels: int, dim: int = 128, hidden: int | None = None) -> None:
        super().__init__()
        hidden = dim if hidden is None else hidden
        self.in_channels = in_channels
        self.dim = dim
        self.fc1 = nn.Linear(in_channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # Casts only where needed: on a GPU every call, even a no-op, costs host time (launch-bound loss).
        if rows.dtype != self.fc1.weight.dtype:
            rows = rows.to(self.fc1.weight.dtype)
        z = self.fc2(self.act(self.fc1(rows)))
        if z.dtype != torch.float32:
            z = z.float()
        # F.normalize(z, eps=1e-12) as a multiplication by rsqrt: same values (≤ 1 ulp), and a
        # cheaper backward than the division on the (N, d) rows.
        return z * torch.rsqrt((z * z).sum(-1, keepdim=True).clamp_min(1e-24))


def build_heads(
    in_channels: Sequence[int], stages: Sequence[int], dim: int = 128, hidden: int | None = None
) -> nn.ModuleList:
    """One head per entry of ``in_channels`` (indexed by stage number).

    Stages not in ``stages`` get a parameter-free ``nn.Identity`` so that ``heads[s]`` still indexes by
    stage number and no unused parameters reach the optimizer (DDP would reject them).
    """
    return nn.ModuleList(
        [ProjectionHead(c, dim, hidden) if s in stages else nn.Identity() for s, c in enumerate(in_channels)]
    )


def split_rows(rows: torch.Tensor, patches_per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat patch indices ``b·h·w + i·w + j`` (row-major over batch, row, column, the order of the
    reference's ``rearrange``) → image ``b`` and patch ``i·w + j``, same shapes."""
    return torch.div(rows, patches_per_image, rounding_mode="floor"), rows % patches_per_image


def take_rows(feature: torch.Tensor, image: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Rows of a feature map without copying the whole map: ``(B, C, h, w)`` and indices of any
    (equal) shape ``(*S,)`` → ``(*S, C)``. One indexing op; its backward scatters into the map's
    gradient only."""
    return feature.flatten(2)[image, :, patch]


def gather_rows(feature: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a feature map by flat patch index (:func:`split_rows`): ``(B, C, h, w)``, ``(*S,)`` →
    ``(*S, C)``."""
    _B, C, h, w = feature.shape
    image, patch = split_rows(rows.reshape(-1), h * w)
    return take_rows(feature, image, patch).reshape(*rows.shape, C)


def project_rows(head: nn.Module, feature: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``head`` applied to the given patch rows of ``feature``: ``(B, C, h, w)``, ``(*S,)`` → ``(*S, d)``.

    When more rows are requested than the map has patches (small maps, large budgets), projecting
    the whole map once and indexing the result is cheaper than projecting duplicates.
    """
    B, C, h, w = feature.shape
    n_map = B * h * w
    if rows.numel() >= n_map:
        z = head(feature.flatten(2).transpose(1, 2).reshape(n_map, C))
        return z[rows.reshape(-1)].reshape(*rows.shape, z.shape[-1])
    return head(gather_rows(feature, rows))
