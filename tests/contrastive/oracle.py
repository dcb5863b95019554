"""Test oracle: a plain loop implementation of the paper-era CT loss (spec §1.3, commit 71f35b9).

Written from the spec's prose, deliberately naive (project every row, boolean selection per class,
rearrange-style GT patches, explicit stacked logits and an explicit (n, 1) sort), so that the
vectorised ``mode="reference"`` can be checked against it value for value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gt_patches(mask: torch.Tensor, p: int) -> torch.Tensor:
    """``b (h ph) (w pw) -> (b h w) (ph pw)``: one row of p² labels per patch."""
    B, H, W = mask.shape
    x = mask.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(B * (H // p) * (W // p), p * p)


def feature_rows(f: torch.Tensor) -> torch.Tensor:
    """``b c h w -> (b h w) c``."""
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def soft_ce(logits: torch.Tensor, target: int, smoothing: float) -> torch.Tensor:
    """SoftCrossEntropyLoss (ignore_index=-100): (1-ε)·mean(nll) + ε/K·mean(Σ_k −log p_k)."""
    lp = F.log_softmax(logits, dim=1)
    nll = -lp[:, target]
    smooth = -lp.sum(dim=1)
    return (1 - smoothing) * nll.mean() + smoothing / logits.shape[1] * smooth.mean()


def cl_loss(a: torch.Tensor, b: torch.Tensor, label: int, take_top: float, smoothing: float) -> torch.Tensor:
    s = ((F.cosine_similarity(a, b, dim=-1) + 1) / 2)[:, None]  # (n, 1)
    s = torch.sort(s, descending=(label == 0)).values  # along a size-1 dim: a no-op, as in the reference
    s = s[: int(len(a) * take_top)]
    logits = torch.cat([1 - s, s], dim=1)
    return soft_ce(logits, label, smoothing)


def info_nce_pkg(query, positive, negatives, temperature: float) -> torch.Tensor:
    """info-nce-pytorch 0.1.4, negative_mode='unpaired', reduction='mean'."""
    query, positive, negatives = (F.normalize(x, dim=-1) for x in (query, positive, negatives))
    pos = torch.sum(query * positive, dim=1, keepdim=True)
    neg = query @ negatives.transpose(-2, -1)
    logits = torch.cat([pos, neg], dim=1)
    labels = torch.zeros(len(logits), dtype=torch.long)
    return F.cross_entropy(logits / temperature, labels, reduction="mean")


def binary_cl_term(pos, neg, take_top=0.5, smoothing=0.1):
    pos = pos[torch.randperm(len(pos))]
    neg = neg[torch.randperm(len(neg))]
    n = min(len(pos), len(neg))
    loss = cl_loss(pos[:n], neg[:n], 0, take_top, smoothing)
    if len(pos) >= 10:
        h = len(pos) // 2
        chunks = torch.split(pos, h)
        loss = loss + cl_loss(chunks[0], chunks[1][:h], 1, take_top, smoothing)
    return loss


def binary_infonce_term(pos, neg, take_top=0.5, temperature=0.1, max_pairs=2000):
    pos = pos[torch.randperm(len(pos))]
    neg = neg[torch.randperm(len(neg))]
    m = min(len(pos), len(neg), max_pairs)
    P, N = pos[:m], neg[:m]
    sim = F.cosine_similarity(P, N, dim=-1)
    idx = torch.sort(sim, descending=True).indices[: int(m * take_top)]
    P, N = P[idx], N[idx]
    q = len(idx) // 2
    loss = info_nce_pkg(P[:q], P[q : 2 * q], N, temperature)
    if len(pos) >= 10 and len(neg) >= 10:
        return loss
    return torch.zeros(())  # computed, then discarded by the reference


def oracle_loss(
    heads,
    features,
    mask,
    stages=(0, 1, 2, 3),
    loss="cl",
    ignore_index=6,
    take_top=0.5,
    smoothing=0.1,
    temperature=0.1,
) -> torch.Tensor:
    """``alt_contrastive`` of one replica (before the clip)."""
    classes = [int(c) for c in torch.unique(mask) if int(c) != ignore_index]
    total = torch.zeros(())
    for s in stages:
        f = features[s]
        p = mask.shape[1] // f.shape[2]
        gt = gt_patches(mask, p)
        z = F.normalize(heads[s](feature_rows(f)), dim=-1)
        for c in classes:
            is_pos = (gt == c).all(dim=1)
            is_neg = ~(gt == c).any(dim=1)
            pos, neg = z[is_pos], z[is_neg]
            if len(pos) < 5 or len(neg) < 5:
                continue
            if loss == "cl":
                total = total + binary_cl_term(pos, neg, take_top, smoothing)
            else:
                total = total + binary_infonce_term(pos, neg, take_top, temperature)
    return total / len(stages) / len(classes)


def oracle_clipped(heads, features, mask, group_size, clip=1.0, **kw) -> torch.Tensor:
    """DP replicas of ``group_size`` images: clip each replica's loss, average."""
    outs = []
    for b0 in range(0, mask.shape[0], group_size):
        sl = slice(b0, b0 + group_size)
        outs.append(torch.clip(oracle_loss(heads, [f[sl] for f in features], mask[sl], **kw), 0.0, clip))
    return torch.stack(outs).mean()
