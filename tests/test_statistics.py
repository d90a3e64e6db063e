"""Tests of pdl1exp.evaluation.statistics, against R pROC values and by construction."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from pdl1exp.evaluation import (
    METRICS,
    BootstrapCI,
    bootstrap_ci,
    delong_ci,
    delong_test,
    hosmer_lemeshow,
    metric_value,
    net_benefit,
    net_benefit_treat_all,
    youden_threshold,
)

TESTS = Path(__file__).parent
EXPECTED = TESTS / "data" / "proc_expected.json"
R_SCRIPT = TESTS / "reference" / "make_proc_expected.R"
TOL = 1e-6


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


STORED = _load(EXPECTED)


def _check_roc_case(case: dict[str, Any]) -> None:
    y, a, b = (np.array(case[k]) for k in ("y", "score_a", "score_b"))
    for score, auc_key, ci_key in ((a, "auc_a", "ci_a"), (b, "auc_b", "ci_b")):
        expected = [case[auc_key], *case[ci_key]]
        assert delong_ci(y, score) == pytest.approx(expected, abs=TOL), case["name"]
    assert delong_test(y, a, b) == pytest.approx([case["test_z"], case["test_p"]], abs=TOL)
    threshold = youden_threshold(y, a)
    assert threshold == pytest.approx(case["youden_thresholds"][0], abs=TOL)
    sens = metric_value(y, a, "sensitivity", threshold=threshold)
    spec = metric_value(y, a, "specificity", threshold=threshold)
    assert sens == pytest.approx(case["youden_sensitivity"], abs=TOL)
    assert spec == pytest.approx(case["youden_specificity"], abs=TOL)


def _check_hl_case(case: dict[str, Any]) -> None:
    result = hosmer_lemeshow(case["y"], case["prob"], groups=case["groups"])
    assert result == pytest.approx([case["statistic"], case["p_value"]], abs=TOL), case["name"]


@pytest.mark.parametrize("case", STORED["roc_cases"], ids=lambda c: c["name"])
def test_roc_statistics_match_proc(case: dict[str, Any]) -> None:
    _check_roc_case(case)


@pytest.mark.parametrize("case", STORED["hosmer_lemeshow"], ids=lambda c: c["name"])
def test_hosmer_lemeshow_matches_r(case: dict[str, Any]) -> None:
    _check_hl_case(case)


def test_stored_cases_cover_the_hard_ones() -> None:
    by_name = {c["name"]: c for c in STORED["roc_cases"]}
    assert by_name["auc_below_half"]["auc_a"] < 0.5
    assert by_name["perfect"]["ci_a"] == [1, 1]
    assert len(by_name["n10"]["youden_thresholds"]) > 1  # tied optima: first one is returned
    assert len(by_name["medium"]["y"]) == 352
    assert sum(by_name["imbalanced"]["y"]) == 10


def _r_with_proc() -> bool:
    if shutil.which("Rscript") is None:
        return False
    probe = subprocess.run(
        ["Rscript", "-e", 'quit(status = !requireNamespace("pROC", quietly = TRUE))'],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.reference
@pytest.mark.skipif(not _r_with_proc(), reason="Rscript with the pROC package is not installed")
def test_live_proc_reference(tmp_path: Path) -> None:
    out = tmp_path / "proc_expected.json"
    subprocess.run(["Rscript", str(R_SCRIPT), str(out)], check=True, capture_output=True)
    fresh = _load(out)
    assert [c["name"] for c in fresh["roc_cases"]] == [c["name"] for c in STORED["roc_cases"]]
    for case in fresh["roc_cases"]:
        _check_roc_case(case)
    for case in fresh["hosmer_lemeshow"]:
        _check_hl_case(case)


# ---- bootstrap ---------------------------------------------------------------------------------


def _binormal(n_pos: int, n_neg: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)]
    score = rng.normal(size=y.size) + shift * y
    return y, score


def _count_positives(y: np.ndarray, score: np.ndarray) -> float:
    return float(y.sum())


def test_stratified_bootstrap_keeps_class_counts() -> None:
    y, score = _binormal(7, 23, 1.0, seed=1)
    assert tuple(bootstrap_ci(y, score, _count_positives, n_boot=300)) == (7.0, 7.0, 7.0)
    est, lower, upper = bootstrap_ci(y, score, _count_positives, n_boot=300, stratified=False)
    assert est == 7.0
    assert lower < 7.0 < upper


def test_same_seed_same_ci_and_other_seed_differs() -> None:
    y, score = _binormal(20, 30, 0.8, seed=2)
    first = bootstrap_ci(y, score, n_boot=500, seed=11)
    assert bootstrap_ci(y, score, n_boot=500, seed=11) == first
    assert bootstrap_ci(y, score, n_boot=500, seed=12) != first


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("stratified", [True, False])
def test_vectorised_bootstrap_equals_loop(metric: str, stratified: bool) -> None:
    y, score = _binormal(9, 14, 1.0, seed=3)
    prob = stats.norm.cdf(np.round(score, 1))  # rounded: ties in the scores
    kwargs = {"n_boot": 400, "seed": 5, "stratified": stratified, "threshold": 0.5}
    # Seeded draws: no non-stratified resample holds a single class, which metric_value rejects.
    loop_metric = partial(metric_value, metric=metric, threshold=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fast = bootstrap_ci(y, prob, metric, **kwargs)
        slow = bootstrap_ci(y, prob, loop_metric, **kwargs)
    assert tuple(fast) == pytest.approx(tuple(slow), abs=1e-12)
    assert fast.n_undefined == slow.n_undefined


def test_bootstrap_auc_equals_sklearn_per_resample() -> None:
    y, score = _binormal(25, 40, 0.7, seed=4)
    score = np.round(score, 1)
    ours = bootstrap_ci(y, score, "auc", n_boot=300, seed=9)
    theirs = bootstrap_ci(y, score, roc_auc_score, n_boot=300, seed=9)
    assert tuple(ours) == pytest.approx(tuple(theirs), abs=1e-12)
    assert ours[0] == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_undefined_resamples_are_counted_and_warned() -> None:
    y, score = _binormal(10, 40, 0.0, seed=6)
    score[0] = 10.0  # the only score above the threshold, on a positive
    with pytest.warns(RuntimeWarning, match=r"'ppv' was undefined in \d+ of 1000"):
        result = bootstrap_ci(y, score, "ppv", n_boot=1000, threshold=5.0)
    # P(a resample misses that one positive) = (1 - 1/10) ** 10, about 0.35.
    assert 250 < result.n_undefined < 450
    estimate, lower, upper = result  # still three values
    assert (estimate, lower, upper) == (1.0, 1.0, 1.0)


def test_all_resamples_undefined_gives_nan_interval() -> None:
    y, score = _binormal(5, 5, 1.0, seed=7)
    with pytest.warns(RuntimeWarning, match="undefined in 50 of 50"):
        result = bootstrap_ci(y, score, "ppv", n_boot=50, threshold=100.0)
    assert np.isnan(result).all()
    assert result.n_undefined == 50


def test_bootstrap_ci_result_type() -> None:
    y, score = _binormal(10, 10, 1.0, seed=8)
    result = bootstrap_ci(y, score, n_boot=100)
    assert isinstance(result, BootstrapCI)
    assert len(result) == 3
    assert result.n_undefined == 0
    again = pickle.loads(pickle.dumps(result))
    assert again == result
    assert again.n_undefined == 0
    assert "n_undefined=0" in repr(result)


def test_threshold_metric_without_threshold_is_a_clear_error() -> None:
    y, score = _binormal(5, 5, 1.0, seed=0)
    with pytest.raises(ValueError, match="needs a decision threshold"):
        bootstrap_ci(y, score, "sensitivity")
    with pytest.raises(ValueError, match="unknown metric 'kappa'"):
        bootstrap_ci(y, score, "kappa")


def test_auc_below_half_is_not_flipped() -> None:
    y, score = _binormal(30, 30, -1.0, seed=9)
    auc, lower, upper = delong_ci(y, score)
    assert lower < auc < upper < 0.5
    assert auc == pytest.approx(roc_auc_score(y, score))
    assert delong_ci(y, -score)[0] == pytest.approx(1 - auc)
    assert bootstrap_ci(y, score, n_boot=200)[0] == pytest.approx(auc)


def test_delong_test_is_antisymmetric() -> None:
    y, a = _binormal(20, 25, 1.0, seed=10)
    b = a + np.random.default_rng(0).normal(size=a.size)
    z, p = delong_test(y, a, b)
    assert delong_test(y, b, a) == pytest.approx((-z, p))
    assert 0 < p < 1


def test_delong_with_a_single_positive_is_nan() -> None:
    y = np.array([1, 0, 0, 0])
    score = np.array([0.9, 0.1, 0.5, 0.3])
    with pytest.warns(RuntimeWarning, match="at least 2 positives"):
        auc, lower, upper = delong_ci(y, score)
    assert auc == 1.0
    assert np.isnan([lower, upper]).all()
    with pytest.warns(RuntimeWarning, match="at least 2 positives"):
        assert np.isnan(delong_test(y, score, score[::-1])).all()


def test_bootstrap_ci_coverage_on_binormal_data() -> None:
    shift, n_pos, n_neg, reps = 1.0, 60, 80, 200
    true_auc = stats.norm.cdf(shift / np.sqrt(2))
    covered_boot = covered_delong = 0
    for rep in range(reps):
        y, score = _binormal(n_pos, n_neg, shift, seed=1000 + rep)
        _, lower, upper = bootstrap_ci(y, score, n_boot=1000, seed=rep)
        covered_boot += lower <= true_auc <= upper
        _, lower, upper = delong_ci(y, score)
        covered_delong += lower <= true_auc <= upper
    assert 0.90 <= covered_boot / reps <= 0.99
    assert 0.90 <= covered_delong / reps <= 0.99


# ---- Youden, decision curve, calibration ------------------------------------------------------


def test_youden_hand_example_with_tied_optima() -> None:
    y = np.array([0, 0, 1, 1])
    score = np.array([0.1, 0.4, 0.35, 0.8])
    # Cut-offs 0.225 (tp 2, fp 1) and 0.6 (tp 1, fp 0) both give J = 0.5: the lower is returned.
    assert youden_threshold(y, score) == pytest.approx(0.225)


def test_net_benefit_hand_example() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    prob = np.array([0.9, 0.6, 0.7, 0.2, 0.4, 0.1])
    thresholds = np.array([0.0, 0.5, 0.6, 0.65])
    # pt 0: treat all, 3/6; 0.5: TP 2 FP 1, 2/6 - 1/6; 0.6 (prob 0.6 treated): 2/6 - 1.5/6;
    # 0.65: TP 1 FP 1, 1/6 - 1/6 * 13/7 = -1/7.
    expected = [0.5, 1 / 6, 1 / 12, -1 / 7]
    assert net_benefit(y, prob, thresholds) == pytest.approx(expected)
    assert net_benefit_treat_all(y, thresholds) == pytest.approx([0.5, 0.0, -0.25, -3 / 7])


def test_net_benefit_rejects_threshold_one() -> None:
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        net_benefit([0, 1], [0.2, 0.8], [0.5, 1.0])


def test_hosmer_lemeshow_undefined_group_warns() -> None:
    # Three probabilities cut at ten quantiles leave empty groups (R gives NaN there too).
    y, prob = [0, 1, 1], [0.1, 0.5, 0.9]
    with pytest.warns(RuntimeWarning, match="expected count 0"):
        result = hosmer_lemeshow(y, prob)
    assert np.isnan(result).all()


def test_hosmer_lemeshow_needs_three_groups() -> None:
    with pytest.raises(ValueError, match="groups must be >= 3"):
        hosmer_lemeshow([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], groups=2)


# ---- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "score", "match"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "only 0/1"),
        (["a", "b", "a"], [0.1, 0.2, 0.3], "only 0/1"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "one class only"),
        ([0, 1, 1], [0.1, 0.2], "has shape"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "1 NaN value"),
        ([], [], "non-empty"),
    ],
)
def test_input_validation(y: list[Any], score: list[float], match: str) -> None:
    for call in (
        lambda: delong_ci(y, score),
        lambda: bootstrap_ci(y, score, n_boot=10),
        lambda: youden_threshold(y, score),
        lambda: hosmer_lemeshow(y, score),
        lambda: net_benefit(y, score, [0.5]),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_probabilities_must_lie_in_unit_interval() -> None:
    with pytest.raises(ValueError, match="probabilities in"):
        metric_value([0, 1], [0.2, 1.3], "brier")
    with pytest.raises(ValueError, match="level must be in"):
        delong_ci([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], level=95)
