"""Small device constants of the loss (lookup tables, comparison targets), built once per device.

On a GPU the eager loss is bound by the host's cost of launching operators, and a constant rebuilt
on every call is several launches (``arange``, a shift, a copy …) for a few bytes. The cache keeps
them per (name, device). Constants are only ever read, never written in place.

Not cached, but built afresh (they are a handful of operators there anyway):

* while ``torch.compile`` traces (a constant made in the graph is folded or fused);
* while a CUDA graph is being recorded on the current stream: a tensor allocated during capture
  lives in the graph's private memory pool, which is reused once the graph is released, so a cached
  one would dangle.

Builders use device operators only (no host-to-device copy: from pageable memory that is a
synchronisation, which the paper mode must not make).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

_CACHE: dict[tuple[Hashable, torch.device], torch.Tensor] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_constant(key: Hashable, device: torch.device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor ``build()`` makes on ``device``, made once per ``(key, device)``.

    ``key`` must determine the value completely (shape, dtype and the parameters ``build`` uses).
    The tensor is a normal one even when first asked for under ``torch.inference_mode`` (an
    inference tensor could not be used by autograd-recorded operators later).
    """
    if torch.compiler.is_compiling() or _capturing(device):
        return build()
    cache_key = (key, device)
    value = _CACHE.get(cache_key)
    if value is None:
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        _CACHE[cache_key] = value
    return value


def clear() -> None:
    """Forget every cached constant (tests; freeing device memory of a device no longer used)."""
    _CACHE.clear()
