from __future__ import annotations

import pytest

from ctseg.engine.schedulers import lr_factor
from ctseg.errors import ConfigError


def test_constant_is_flat_after_warmup():
    assert [lr_factor("constant", s, 10, warmup_steps=3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_and_poly_end_points():
    assert lr_factor("cosine", 0, 100) == pytest.approx(1.0)
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor("poly", 0, 100) == pytest.approx(1.0)
    assert lr_factor("poly", 100, 100) == pytest.approx(0.0)
    assert lr_factor("poly", 50, 100, power=1.0) == pytest.approx(0.5)


def test_unknown_schedule():
    with pytest.raises(ConfigError, match="unknown scheduler"):
        lr_factor("step", 0, 10)
