"""Projection heads ψ_s: one small MLP per backbone stage, applied only to the patch rows a loss uses.

The heads are training-only: they live in the loss module, not in the segmentation model, so an
exported or inference model never contains them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.contrastive.constants import device_constant


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
        return unit_rows(self.unnormalized(rows))

    def unnormalized(self, rows: torch.Tensor) -> torch.Tensor:
        """The MLP without the final L2 normalisation (callers that normalise the rows of several
        heads at once): ``(N, C)`` → ``(N, dim)``."""
        # Casts only where needed: on a GPU every call, even a no-op, costs host time (launch-bound loss).
        if rows.dtype != self.fc1.weight.dtype:
            rows = rows.to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(rows)))


def unit_rows(z: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` → float32 rows of unit L2 norm, the values of ``F.normalize(z, eps=1e-12)``."""
    if z.dtype != torch.float32:
        z = z.float()
    y, _norm = _UnitRows.apply(z)
    return y


_NORM_EPS = 1e-12


class _UnitRows(torch.autograd.Function):
    """``y = z / max(‖z‖, eps)`` along the last axis, and that divisor, with a hand-written backward.

    On a GPU the loss is bound by launches; autograd's backward of the composed operators is twelve
    operators on the ``(N, d)`` rows, this one six: ``∂z = (g − y·⟨g, y⟩) / ‖z‖``, where the
    projection term is absent for rows of norm ≤ eps (the clamp's gradient is zero there, as in
    ``F.normalize``). The backward reads the two outputs only, which is also what keeps it exact to
    any order: as a function of them it is the true gradient for every z, and with ``create_graph``
    autograd differentiates it through them. It keeps y, not z: where the rows' later use saves y
    anyway (the paper mode's pair products), no more than the composed form kept.
    """

    @staticmethod
    def forward(ctx, z):  # type: ignore[override]
        norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(_NORM_EPS)
        y = z / norm
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, norm)
        return y, norm

    @staticmethod
    def backward(ctx, grad, grad_norm):  # type: ignore[override]
        y, norm = ctx.saved_tensors
        dz = None
        if grad is not None:
            dot = torch.where(norm > _NORM_EPS, (grad * y).sum(-1, keepdim=True), 0.0)
            dz = torch.addcmul(grad, y, dot, value=-1.0)
            # In place unless create_graph records this backward (div_ would overwrite what it saves):
            # one (N, d) buffer fewer at the backward's peak.
            dz = dz / norm if torch.is_grad_enabled() else dz.div_(norm)
        if grad_norm is not None:  # ∂‖z‖/∂z = y where the clamp passes the norm through
            from_norm = torch.where(norm > _NORM_EPS, grad_norm, 0.0) * y
            dz = from_norm if dz is None else dz + from_norm
        return dz


def _batchable(heads: Sequence[nn.Module]) -> bool:
    """Heads that differ only in their input width (what :func:`build_heads` makes)."""
    first = heads[0]
    if not all(type(h) is ProjectionHead for h in heads):
        return False
    return all(
        h.fc2.weight.shape == first.fc2.weight.shape
        and h.fc1.weight.dtype == h.fc2.weight.dtype == first.fc2.weight.dtype
        and type(h.act) is type(first.act)
        and getattr(h.act, "approximate", None) == getattr(first.act, "approximate", None)
        and h.fc1.bias is not None
        and h.fc2.bias is not None
        for h in heads
    )


def project_stages(
    heads: Sequence[nn.Module],
    rows: Sequence[torch.Tensor],
    params: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The heads of several stages applied to their rows at once: ``(*X, C_s)`` per stage (the same
    ``*X``) → ``(S, *X, d)`` unit rows, float32.

    Only the first layer differs between stages (its input width); the activation, the second layer
    and the normalisation run once for all of them as batched products: for four stages 14 operators
    in the forward instead of 33, which matters on a GPU, where the loss is bound by kernel launches.
    Values equal ``stack([heads[s](rows[s])])`` up to float rounding.

    Args:
        params: per stage the head's parameters by name (``fc1.weight`` …) to use instead of the
            module's own (the recorded loss differentiates with respect to given tensors); None: the
            modules' parameters.
    """
    if params is None:
        params = [dict(h.named_parameters()) for h in heads]
    if not _batchable(heads):
        return torch.stack(
            [
                torch.func.functional_call(h, dict(p), (r,))
                for h, p, r in zip(heads, params, rows, strict=True)
            ]
        )
    hidden = torch.stack(
        [
            F.linear(
                r if r.dtype == p["fc1.weight"].dtype else r.to(p["fc1.weight"].dtype),
                p["fc1.weight"],
                p["fc1.bias"],
            )
            for p, r in zip(params, rows, strict=True)
        ]
    )  # (S, *X, hidden)
    S, X = hidden.shape[0], hidden.shape[1:-1]
    act = heads[0].act(hidden.reshape(S, -1, hidden.shape[-1]))
    w2 = torch.stack([p["fc2.weight"] for p in params])  # (S, d, hidden)
    b2 = torch.stack([p["fc2.bias"] for p in params])  # (S, d)
    z = torch.baddbmm(b2[:, None, :], act, w2.transpose(1, 2))  # (S, N, d)
    return unit_rows(z).reshape(S, *X, z.shape[-1])


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
    (equal) shape ``(*S,)`` → ``(*S, C)``, one indexing op.

    With gradients, the rows' gradient reaches the map late (:class:`_LateRowsGrad`): added to the
    map's gradient once the rest of the network's gradient for it is complete, instead of as a
    map-sized gradient of its own at the start of the backward pass.
    """
    if feature.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _LateRowsGrad.take(feature, image, patch)
    return feature.flatten(2)[image, :, patch]


# Attribute of a feature map holding the rows' gradients that wait for its hook (one hook per map).
_PENDING = "_ctseg_pending_rows"


class _LateRowsGrad(torch.autograd.Function):
    """Indexing whose backward hands its gradient to a hook on the feature map instead of returning it.

    The loss is computed after the decoder, so its backward runs first. A plain index's backward
    makes a zero map-sized gradient and scatters the rows into it, and autograd keeps that buffer
    until the decoder's gradient for the same map arrives, deep into the backward pass: for
    DCPoolFormer at B = 8, 512², 60 MiB of buffers for four maps held through the step's peak, which
    was all of CT's +1.7 % of peak memory (docs/benchmarks.md). Here the backward keeps the rows'
    gradient (``(*S, C)``, small) and returns an expanded zero, which costs no memory; a hook on the
    feature map adds the rows when the map's whole gradient is known, into a copy it returns.

    A map gets one hook for its lifetime, shared by every gather from it (several losses, repeated
    calls on a kept tensor, retained graphs): each backward queues its rows on the map, the hook adds
    all that are queued. Values, also of second derivatives, are those of the plain index up to
    rounding (tested).
    """

    @staticmethod
    def take(feature: torch.Tensor, image: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        pending = getattr(feature, _PENDING, None)
        if pending is None:
            pending = []
            B, C = feature.shape[:2]

            def add_rows(grad: torch.Tensor) -> torch.Tensor:
                if not pending:  # no rows of this map were part of this backward pass
                    return grad
                # A copy: a hook must not change the tensor it is given (autograd may share it).
                out = grad.clone(memory_format=torch.contiguous_format)
                rows = out.view(B, C, -1).transpose(1, 2)  # (B, h·w, C) view
                while pending:
                    image, patch, rows_grad = pending.pop()
                    rows.index_put_((image, patch), rows_grad, accumulate=True)
                return out

            feature.register_hook(add_rows)
            setattr(feature, _PENDING, pending)
        return _LateRowsGrad.apply(feature, image, patch, pending)

    @staticmethod
    def forward(ctx, feature, image, patch, pending):  # type: ignore[override]
        ctx.save_for_backward(image, patch)
        ctx.shape, ctx.pending = feature.shape, pending
        return feature.flatten(2)[image, :, patch]

    @staticmethod
    def backward(ctx, rows_grad):  # type: ignore[override]
        image, patch = ctx.saved_tensors
        first = not ctx.pending  # the first gather from this map to reach this backward pass
        ctx.pending.append((image, patch, rows_grad))
        # One gradient, however small, makes autograd complete the map's gradient and call the hook;
        # the first gather sends it. Several expanded zeros would be summed into a real zero map.
        zero = _zero(rows_grad).expand(ctx.shape) if first else None
        return zero, None, None, None


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-d zero of ``like``'s dtype and device (one fill per map and step saved on a GPU)."""
    return device_constant(("zero", like.dtype), like.device, lambda: like.new_zeros(()))


def project_taken(
    head: nn.Module, feature: torch.Tensor, taken: torch.Tensor | None, normalized: bool = True
) -> torch.Tensor:
    """``head`` applied to rows of ``feature`` ``(B, C, h, w)`` given by their image and patch,
    ``taken`` ``(2, N)`` (:func:`split_rows` already applied) → ``(N, d)``; ``taken=None``: every row of
    the map in row-major ``(b, i, j)`` order → ``(B·h·w, d)``.

    ``normalized=False``: a :class:`ProjectionHead` leaves out its final L2 normalisation, for a
    caller that normalises the rows of several stages at once (:func:`unit_rows`); other heads
    normalise anyway, which a second normalisation does not change.
    """
    if not normalized and isinstance(head, ProjectionHead):
        head = head.unnormalized
    if taken is None:
        C = feature.shape[1]
        return head(feature.flatten(2).transpose(1, 2).reshape(-1, C))
    return head(take_rows(feature, taken[0], taken[1]))


def project_rows(
    head: nn.Module, feature: torch.Tensor, rows: torch.Tensor, normalized: bool = True
) -> torch.Tensor:
    """``head`` applied to the given patch rows of ``feature`` by flat index (:func:`split_rows`):
    ``(B, C, h, w)``, ``(*S,)`` → ``(*S, d)``; ``normalized`` as in :func:`project_taken`.

    When more rows are requested than the map has patches (small maps, large budgets), projecting
    the whole map once and indexing the result is cheaper than projecting duplicates.
    """
    B, _C, h, w = feature.shape
    if rows.numel() >= B * h * w:
        z = project_taken(head, feature, None, normalized)
        return z[rows.reshape(-1)].reshape(*rows.shape, z.shape[-1])
    taken = torch.stack(split_rows(rows.reshape(-1), h * w))
    z = project_taken(head, feature, taken, normalized)
    return z.reshape(*rows.shape, z.shape[-1])
