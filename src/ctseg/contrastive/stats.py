"""``CTStats``: the statistics of one CT loss call, read from the device only when first looked at.

The loss packs every statistic into one tensor on the loss's device. Reading a value needs the host
to wait for the GPU (a synchronisation); doing it inside a training step stops the host from queuing
the backward pass while the GPU still runs the forward, which on a GPU costs more than the loss
itself. So the mapping fetches all values with a single ``tolist()`` the first time a value, a key
list or the length is asked for, and a training loop that only accumulates :attr:`CTStats.tensor`
on the device never synchronises for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch


class CTStats(Mapping[str, float]):
    """Read-only mapping ``name → float`` over a packed ``(N,)`` float32 tensor of statistics.

    Args:
        values: ``(N,)`` detached tensor, one entry per name (any device).
        names: the N statistic names, in the order of ``values``.
        fetched: the values as Python floats when the caller already synchronised (no second fetch).
    """

    __slots__ = ("_floats", "_index", "_names", "_tensor")

    def __init__(
        self, values: torch.Tensor, names: Sequence[str], fetched: Sequence[float] | None = None
    ) -> None:
        if values.dim() != 1 or values.numel() != len(names):
            raise ValueError(f"CTStats: {values.numel()} values for {len(names)} names")
        self._tensor = values.detach()
        self._names = tuple(names)
        self._index = {n: i for i, n in enumerate(self._names)}
        self._floats: list[float] | None = None if fetched is None else [float(v) for v in fetched]

    @property
    def tensor(self) -> torch.Tensor:
        """``(N,)`` float32 on the loss's device, in the order of :attr:`names` (no host sync)."""
        return self._tensor

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def fetched(self) -> bool:
        """Whether the values have been copied to the host already."""
        return self._floats is not None

    def _values(self) -> list[float]:
        if self._floats is None:
            self._floats = self._tensor.float().tolist()  # the one host sync
        return self._floats

    def __getitem__(self, key: str) -> float:
        return self._values()[self._index[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __repr__(self) -> str:
        if self._floats is None:
            return f"CTStats({len(self._names)} values on {self._tensor.device}, not fetched)"
        return f"CTStats({dict(zip(self._names, self._floats, strict=True))!r})"


def count_stats(counts: torch.Tensor, active: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The statistics that depend on the counts only, from the fields of a
    :class:`~ctseg.contrastive.config.GroupResult` with a leading group dimension G (``(3, G, S, K)``
    counts of positives, negatives and pairs, ``(G, S, K)`` ``active``, ``(G, K)`` ``present``),
    packed as they follow the three loss values in
    :attr:`PatchContrastiveLoss.stat_names <ctseg.contrastive.loss.PatchContrastiveLoss.stat_names>`:
    ``active``, ``skipped_fraction``, per stage positives, negatives and pairs (summed over classes),
    then the same per (stage, class); counts summed over groups. ``(2 + 3·S + 3·S·K,)`` float32, on
    the inputs' device (the reference mode makes them on the host, with its plan). On a GPU each
    operator here is a launch: the few there are are chosen for that (e.g. no sum over one group)."""
    S = active.shape[1]
    per_class = (counts[:, 0] if counts.shape[1] == 1 else counts.sum(1)).float()  # (3, S, K)
    n_terms = present.sum() * S
    skipped = (present[:, None, :] > active).sum()  # present and not active
    flags = torch.stack([active.any(), skipped / n_terms.clamp(min=1)])  # promoted to float32
    return torch.cat([flags, per_class.sum(-1).flatten(), per_class.flatten()])


def term_weights(term_active: torch.Tensor) -> torch.Tensor:
    """``(G, S, K, T)`` bool → float32 weights whose sum over groups of ``weights · terms`` is each
    term's mean over the groups where it was active (0 where it never was)."""
    active = term_active.float()
    return active / active.sum(0).clamp(min=1)
