"""docs/contrastive.md: its python blocks run, in order, as written."""

from __future__ import annotations

import re

import torch

from tests.conftest import REPO_ROOT


def test_docs_example_runs():
    text = (REPO_ROOT / "docs" / "contrastive.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    ct_lines = [ln for ln in blocks[1].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(ct_lines) <= 10  # "add CT to your own model in ≤ 10 lines"
    torch.manual_seed(0)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/contrastive.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and isinstance(scope["stats"]["loss_raw"], float)
    assert scope["ct"].heads[0].fc1.weight.grad is not None
