"""The quality report, twenty-seventh audit: differences equal but for float rounding have no
p-value. Fails on the code before its fix."""

import pytest

from moe_gen.quality.report import paired_test


def test_a_lead_of_one_row_on_every_seed_has_no_p_value():
    result = paired_test([33 / 36, 32 / 36, 31 / 36], [32 / 36, 31 / 36, 30 / 36])  # p was 1.8e-30
    assert result["p_value"] is None and result["mean"] == pytest.approx(1 / 36)
    assert result["ci95"] == pytest.approx([1 / 36, 1 / 36])


def test_differences_that_vary_still_get_scipys_paired_t_test():
    from scipy import stats

    a, b = [0.91, 0.86, 0.88], [0.89, 0.86, 0.85]
    assert paired_test(a, b)["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
