"""Statistics of a grid: mean ± sample std over seeds, and Welch's unequal-variance t-test.

Conventions (stated in every report):

* ``std`` is the *sample* standard deviation (``ddof=1``); with fewer than 2 values it is undefined
  (``None``, printed ``n/a``), never 0;
* Welch: ``t = (m1 − m2) / sqrt(s1²/n1 + s2²/n2)``, degrees of freedom by Welch–Satterthwaite, two-sided
  p from Student's t with those degrees of freedom (``scipy.stats.t``), and the 95 % confidence interval
  of ``m1 − m2`` from the same t distribution;
* a comparison needs ``n ≥ 2`` on both sides and a non-zero pooled standard error, otherwise it is
  undefined (``None``): with zero spread on both sides the t-statistic means nothing.

Several settings are compared against one baseline, so :func:`holm` adjusts the p-values of a family
of comparisons (Holm–Bonferroni, controls the family-wise error rate without independence assumptions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """``n`` finite values: their mean and sample std (``None`` when ``n < 2``)."""

    n: int
    mean: float | None
    std: float | None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Summary:
        """Summary of the finite values of ``values`` (``None`` / NaN are dropped, not counted)."""
        xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        n = len(xs)
        if n == 0:
            return cls(0, None, None)
        mean = math.fsum(xs) / n
        if n < 2:
            return cls(n, mean, None)
        var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
        return cls(n, mean, math.sqrt(var))


@dataclass(frozen=True)
class Welch:
    """Welch's t-test of ``mean(a) − mean(b)``.

    Attributes:
        diff: ``m_a − m_b``.
        se: standard error of the difference, ``sqrt(s_a²/n_a + s_b²/n_b)``.
        t: ``diff / se``.
        df: Welch–Satterthwaite degrees of freedom.
        p: two-sided p-value.
        ci_low, ci_high: 95 % confidence interval of ``diff``.
    """

    diff: float
    se: float
    t: float
    df: float
    p: float
    ci_low: float
    ci_high: float


def welch_from_stats(
    mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int, *, level: float = 0.95
) -> Welch | None:
    """Welch's test from summary statistics (e.g. a published table's mean and σ); ``None`` if undefined."""
    from scipy import stats as sps

    if n_a < 2 or n_b < 2:
        return None
    va, vb = std_a**2 / n_a, std_b**2 / n_b
    se2 = va + vb
    if not se2 > 0:
        return None
    se = math.sqrt(se2)
    diff = mean_a - mean_b
    t = diff / se
    df = se2**2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    p = float(2.0 * sps.t.sf(abs(t), df))
    q = float(sps.t.ppf(0.5 + level / 2.0, df))
    return Welch(diff=diff, se=se, t=t, df=df, p=p, ci_low=diff - q * se, ci_high=diff + q * se)


def welch(a: Sequence[float | None], b: Sequence[float | None]) -> Welch | None:
    """Welch's test of the finite values of ``a`` against those of ``b``; ``None`` if undefined."""
    sa, sb = Summary.of(a), Summary.of(b)
    if sa.std is None or sb.std is None or sa.mean is None or sb.mean is None:
        return None
    return welch_from_stats(sa.mean, sa.std, sa.n, sb.mean, sb.std, sb.n)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values, in input order (``None`` entries stay ``None``, not counted)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])  # type: ignore[arg-type,return-value]
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        adj = min(1.0, (m - rank) * float(pvalues[i]))  # type: ignore[arg-type]
        running = max(running, adj)  # adjusted p-values are monotone in the raw order
        out[i] = running
    return out


def fmt(v: float | None, digits: int = 4, *, signed: bool = False) -> str:
    """``v`` with ``digits`` decimals, ``n/a`` for ``None`` / NaN."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def fmt_p(p: float | None) -> str:
    """A p-value: 3 significant digits, ``<0.001`` below that, ``n/a`` when undefined."""
    if p is None or not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_mean_std(s: Summary, digits: int = 4) -> str:
    """``mean ± std`` (``mean ± n/a`` for one run, ``n/a`` for none)."""
    if s.mean is None:
        return "n/a"
    return f"{s.mean:.{digits}f} ± {fmt(s.std, digits)}"
