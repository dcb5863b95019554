"""Cross-process negative pool for DDP: gather the projected negatives of every rank, with gradients.

Each rank samples ``ceil(num_negatives / world_size)`` negatives per (stage, class) from its own
images; after the gather every rank contrasts its positives against the union, so the negative pool
has (about) ``num_negatives`` rows drawn from the global batch whatever the number of GPUs.
Without an initialised process group (or with one process) everything here is a no-op.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def world_size(process_group: object | None = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def local_negative_budget(num_negatives: int, enabled: bool, process_group: object | None = None) -> int:
    return math.ceil(num_negatives / world_size(process_group)) if enabled else num_negatives


def gather_negatives(
    z: torch.Tensor, count: torch.Tensor, process_group: object | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather projected negatives, keeping gradients to every rank's features.

    Args:
        z: ``(K, M, d)`` local negatives; the first ``count[c]`` rows of class c are valid.
        count: ``(K,)`` long.

    Returns:
        ``(K, W·M, d)`` with the valid rows of all ranks first (rank order kept) and their ``(K,)`` count.
    """
    ws = world_size(process_group)
    if ws == 1:
        return z, count
    from torch.distributed.nn.functional import all_gather  # autograd-aware collective

    group = process_group if process_group is not None else dist.group.WORLD
    parts = all_gather(z.contiguous(), group=group)
    counts = [torch.empty_like(count) for _ in range(ws)]
    dist.all_gather(counts, count.contiguous(), group=group)
    _K, M, _ = z.shape
    valid = torch.cat([torch.arange(M, device=z.device)[None, :] < c[:, None] for c in counts], dim=1)
    # Stable sort on "invalid" moves the valid rows of every rank to the front, in rank order.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    gathered = torch.cat(parts, dim=1)
    gathered = gathered.gather(1, order[:, :, None].expand(-1, -1, gathered.shape[-1]))
    return gathered, torch.stack(counts).sum(0)
