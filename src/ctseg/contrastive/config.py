"""Validated settings of the CT loss and the per-group result every mode returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctseg.errors import ConfigError


@dataclass(frozen=True)
class CTConfig:
    """Hyper-parameters shared by the modes (see :class:`~ctseg.contrastive.PatchContrastiveLoss`)."""

    num_classes: int
    ignore_index: int | None
    stages: tuple[int, ...]
    loss: str
    mode: str
    sampling: str
    take_top: float
    smoothing: float
    temperature: float
    num_positives: int
    num_negatives: int
    infonce_max_pairs: int
    min_positives: int
    min_negatives: int
    min_pair_positives: int
    min_infonce: int
    gather_negatives: bool

    def validate(self, num_stage_maps: int) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"CT loss: {msg}")

        if self.num_classes < 1:
            raise bad(f"num_classes must be ≥ 1, got {self.num_classes}")
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            raise bad(f"ignore_index {self.ignore_index} is a class index (num_classes={self.num_classes})")
        if not self.stages:
            raise bad("stages is empty")
        if len(set(self.stages)) != len(self.stages) or any(not 0 <= s < num_stage_maps for s in self.stages):
            raise bad(
                f"stages {list(self.stages)} must be distinct indices into {num_stage_maps} feature maps"
            )
        if not 0.0 < self.take_top <= 1.0:
            raise bad(f"take_top must be in (0, 1], got {self.take_top}")
        if not 0.0 <= self.smoothing < 1.0:
            raise bad(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.temperature <= 0:
            raise bad(f"temperature must be > 0, got {self.temperature}")
        for name in ("num_positives", "num_negatives", "infonce_max_pairs"):
            if getattr(self, name) < 2:
                raise bad(f"{name} must be ≥ 2, got {getattr(self, name)}")
        for name in ("min_positives", "min_negatives", "min_pair_positives", "min_infonce"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.mode == "reference":
            if self.sampling != "random":
                raise bad(
                    "mode='reference' reproduces the paper-era code, which samples at random; "
                    f"sampling={self.sampling!r} needs mode='paper'"
                )
            if self.gather_negatives:
                raise bad("gather_negatives needs mode='paper' (the reference samples per replica)")


@dataclass
class GroupResult:
    """What a mode computes for one group of images (S stages, K classes, T loss terms); with a leading
    group dimension G on every field when it describes several groups (:meth:`stack`).

    Attributes:
        loss: scalar raw loss of the group, ``Σ_s Σ_c L_sc / S / (number of classes present)``.
        counts: ``(3, S, K)`` float, the positives, negatives and pairs used by the active terms
            (one tensor: the stats read them together).
        terms: ``(S, K, T)`` per-term loss values (0 where the term is inactive).
        term_active: ``(S, K, T)`` bool.
        active: ``(S, K)`` bool, the (stage, class) term contributed.
        present: ``(K,)`` bool, the class occurs in the group's mask.
        count_stats: the statistics that depend on the counts only, packed
            (:func:`~ctseg.contrastive.stats.count_stats`), when the mode knew them on the host and
            sent them with its plan (reference mode); None: computed from the fields above.
        term_weights: the weights of the per-term means over groups, ``(G, S, K, T)``, likewise
            (:func:`~ctseg.contrastive.stats.term_weights`).
    """

    loss: torch.Tensor
    counts: torch.Tensor
    terms: torch.Tensor
    term_active: torch.Tensor
    active: torch.Tensor
    present: torch.Tensor
    count_stats: torch.Tensor | None = None
    term_weights: torch.Tensor | None = None


def as_stage_tuple(stages: Sequence[int] | None, num_maps: int) -> tuple[int, ...]:
    return tuple(range(num_maps)) if stages is None else tuple(int(s) for s in stages)
