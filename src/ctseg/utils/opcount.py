"""Counting the ATen operators a piece of code dispatches (for launch-cost checks and benchmarks).

On a GPU a small-tensor loss is bound by kernel launches, one or more per operator, so the number of
operators it runs is a machine-independent measure of its cost there that a CPU can take.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ATen operators that only make a view, allocate or read metadata: no kernel, a few µs of host time
# each (the same names as the profiler's ``aten::…`` events).
VIEW_OPS = frozenset(
    {"alias", "as_strided", "chunk", "detach", "expand", "expand_as", "flatten", "lift_fresh", "narrow",
     "permute", "reshape", "resolve_conj", "resolve_neg", "select", "slice", "split", "split_with_sizes",
     "squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze", "view", "view_as", "_reshape_alias",
     "_unsafe_view", "empty", "empty_like", "empty_strided", "is_nonzero", "item", "_local_scalar_dense",
     "size", "stride"}
)  # fmt: skip


class FloatOpCounter(TorchDispatchMode):
    """Context manager counting the non-view operators that read or write a floating-point tensor.

    Those are the math of a loss (with autograd's backward operators when ``backward()`` runs inside);
    index planning on integer and bool host tensors is left out. ``count`` is the total, ``by_name``
    the count per operator (``"mul"``, ``"addmm"``, …).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_name: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name not in VIEW_OPS and any(
            isinstance(x, torch.Tensor) and x.is_floating_point() for x in tree_leaves((args, kwargs, out))
        ):
            self.count += 1
            self.by_name[name] = self.by_name.get(name, 0) + 1
        return out
