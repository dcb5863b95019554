"""Contrastive Transformer (CT): supervised patch-level contrastive loss on backbone stage features.

Usage (see docs/contrastive.md)::

    from ctseg.contrastive import PatchContrastiveLoss

    ct = PatchContrastiveLoss(in_channels=[64, 128, 256, 512], num_classes=6, ignore_index=6)
    loss_ct, stats = ct(features, mask)  # features: list of (B, C_s, H_s, W_s); mask: (B, H, W)
    (seg_loss + loss_ct).backward()
"""

from ctseg.contrastive.clip import CLIP_MODES
from ctseg.contrastive.heads import ProjectionHead, build_heads
from ctseg.contrastive.loss import MODES, NonFiniteFeaturesError, PatchContrastiveLoss, check_ct_options
from ctseg.contrastive.losses import CL_MAX, CL_MIN, cl_pair_loss, info_nce
from ctseg.contrastive.patches import StageGrid, infer_patch_size, patch_class_counts, stage_grids
from ctseg.contrastive.sampling import SAMPLERS
from ctseg.contrastive.stats import CTStats
from ctseg.contrastive.terms import PAPER_TERMS

__all__ = [
    "CLIP_MODES",
    "CL_MAX",
    "CL_MIN",
    "MODES",
    "PAPER_TERMS",
    "SAMPLERS",
    "CTStats",
    "NonFiniteFeaturesError",
    "PatchContrastiveLoss",
    "ProjectionHead",
    "StageGrid",
    "build_heads",
    "check_ct_options",
    "cl_pair_loss",
    "infer_patch_size",
    "info_nce",
    "patch_class_counts",
    "stage_grids",
]
