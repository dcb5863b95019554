"""Mean / sample std / Welch against hand-computed values and against the spec's Table 1 figures."""

from __future__ import annotations

import math

import pytest

from ctseg.experiments.stats import Summary, fmt, fmt_mean_std, fmt_p, holm, welch, welch_from_stats


def test_summary_is_mean_and_sample_std():
    s = Summary.of([0.50, 0.54, 0.58])
    assert s.n == 3 and s.mean == pytest.approx(0.54)
    # ddof = 1: sqrt((0.04² + 0 + 0.04²) / 2) = 0.04
    assert s.std == pytest.approx(0.04)


def test_summary_of_one_or_none_has_no_std():
    assert Summary.of([0.7]) == Summary(1, 0.7, None)
    assert Summary.of([]) == Summary(0, None, None)
    assert Summary.of([None, float("nan"), 0.5]).n == 1  # undefined values are dropped, not zeros
    assert fmt_mean_std(Summary.of([0.7])) == "0.7000 ± n/a"
    assert fmt_mean_std(Summary.of([])) == "n/a"


def test_welch_hand_computed():
    # a = (0.60, 0.58): mean 0.59, s² = 0.0002; b = (0.50, 0.54): mean 0.52, s² = 0.0008.
    w = welch([0.60, 0.58], [0.50, 0.54])
    assert w is not None
    se = math.sqrt(0.0002 / 2 + 0.0008 / 2)  # = sqrt(0.0005)
    assert w.diff == pytest.approx(0.07)
    assert w.se == pytest.approx(se)
    assert w.t == pytest.approx(0.07 / se)  # 3.1305
    assert w.t == pytest.approx(3.1305, abs=1e-4)
    # Welch–Satterthwaite: 0.0005² / (0.0001²/1 + 0.0004²/1) = 1.4706
    assert w.df == pytest.approx(0.0005**2 / (0.0001**2 + 0.0004**2))
    from scipy import stats

    assert w.p == pytest.approx(2 * stats.t.sf(abs(w.t), w.df))
    q = stats.t.ppf(0.975, w.df)
    assert (w.ci_low, w.ci_high) == pytest.approx((0.07 - q * se, 0.07 + q * se))


def test_welch_equal_n_equal_var_matches_students_t():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 3.5, 4.0, 6.5]
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w is not None and w.t == pytest.approx(ref.statistic) and w.p == pytest.approx(ref.pvalue)


def test_welch_undefined_cases():
    assert welch([0.5], [0.4, 0.45]) is None  # n < 2
    assert welch([0.5, 0.5], [0.4, 0.4]) is None  # zero spread on both sides
    assert fmt(None) == "n/a" and fmt_p(None) == "n/a" and fmt_p(0.0001) == "<0.001"


# Spec §6.1: Table 1 means and σ, n = 3 each; the spec quotes these Welch t values.
TABLE1 = {
    "DCSwin": ((0.7728, 0.0016), {"CL": (0.7740, 0.0019, 0.8), "InfoNCE": (0.7730, 0.0013, 0.2)}),
    "UnetFormer": ((0.7687, 0.0011), {"CL": (0.7674, 0.0017, -1.1), "InfoNCE": (0.7715, 0.0006, 3.9)}),
    "DCPoolFormer": ((0.7559, 0.0021), {"CL": (0.7620, 0.0055, 1.8), "InfoNCE": (0.7625, 0.0068, 1.6)}),
}


@pytest.mark.parametrize("model", sorted(TABLE1))
def test_welch_reproduces_the_spec_table1_figures(model):
    (mb, sb), rows = TABLE1[model]
    for m, s, t_spec in rows.values():
        w = welch_from_stats(m, s, 3, mb, sb, 3)
        assert w is not None and round(w.t, 1) == pytest.approx(t_spec)


def test_only_unetformer_infonce_is_separated_at_n3():
    ps = {
        (model, ct): welch_from_stats(m, s, 3, mb, sb, 3).p  # type: ignore[union-attr]
        for model, ((mb, sb), rows) in TABLE1.items()
        for ct, (m, s, _) in rows.items()
    }
    assert [k for k, p in ps.items() if p < 0.05] == [("UnetFormer", "InfoNCE")]
    assert ps[("UnetFormer", "InfoNCE")] == pytest.approx(0.03, abs=0.01)


def test_holm_adjustment():
    # sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04); None is not counted.
    assert holm([0.04, None, 0.01, 0.02]) == [
        pytest.approx(0.04),
        None,
        pytest.approx(0.03),
        pytest.approx(0.04),
    ]
    assert holm([0.5, 0.9]) == [pytest.approx(1.0), pytest.approx(1.0)]
    assert holm([]) == []
