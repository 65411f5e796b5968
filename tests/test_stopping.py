"""The pure early-stopping rules: scripted curves, stop epochs worked out by hand from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tricks._lightning import PLEarlyStopping
from lightning_tricks.stopping import (
    CRITERIA,
    GL,
    PQ,
    UP,
    StopRule,
    decide,
    first_stop,
    generalization_loss,
    increase_count,
    progress_quotient,
    to_error,
    training_progress,
    up_count,
)

_RULE_ARGS = {
    "mode",
    "patience",
    "min_delta",
    "min_checks",
    "check_finite",
    "stopping_threshold",
    "divergence_threshold",
}


def make_rule(criterion="patience", **kwargs):
    """A StopRule from flat arguments: the criterion's own go to the criterion, the rest to the rule."""
    own = {k: v for k, v in kwargs.items() if k not in _RULE_ARGS}
    return StopRule(CRITERIA[criterion](**own), **{k: v for k, v in kwargs.items() if k in _RULE_ARGS})


def stop_index(history, train=None, **rule):
    return first_stop(history, train, make_rule(**rule)).index


def acc(curve):
    """The same curve as an accuracy: E = 1 - acc gives back the error (up to rounding)."""
    return [1.0 - v for v in curve]


# ------------------------------------------------------------------------------------------------
# GL
# ------------------------------------------------------------------------------------------------
GL_CURVE = [1.0, 0.8, 0.7, 0.72, 0.74, 0.75, 0.69, 0.73, 0.76]
# E_opt:      1.0  0.8  0.7  0.7   0.7   0.7   0.69  0.69  0.69
# GL = 100 (E/E_opt - 1):
#             0    0    0    2.857 5.714 7.143 0     5.797 10.14


def test_gl_values_follow_the_formula():
    by_hand = [
        0.0,
        0.0,
        0.0,
        100 * (0.72 / 0.7 - 1),
        100 * (0.74 / 0.7 - 1),
        100 * (0.75 / 0.7 - 1),
        0.0,
        100 * (0.73 / 0.69 - 1),
        100 * (0.76 / 0.69 - 1),
    ]
    got = [generalization_loss(GL_CURVE[: t + 1]) for t in range(len(GL_CURVE))]
    assert got == pytest.approx(by_hand, abs=1e-12)
    assert got[4] == pytest.approx(5.714285714, abs=1e-8)


@pytest.mark.parametrize(("alpha", "expected"), [(5.0, 4), (2.0, 3), (6.0, 5), (8.0, 8), (11.0, None)])
def test_gl_stop_epoch_min_and_max_mode(alpha, expected):
    assert stop_index(GL_CURVE, criterion="gl", alpha=alpha) == expected
    # an accuracy: E = 1 - acc is the same error, so the same epoch
    assert stop_index(acc(GL_CURVE), criterion="gl", alpha=alpha, mode="max") == expected
    # a metric to maximize with another ideal value: E = optimum - metric
    assert stop_index([10 - v for v in GL_CURVE], criterion="gl", alpha=alpha, mode="max", optimum=10.0) == expected


def test_gl_reason_is_one_readable_line():
    d = decide(GL_CURVE[:5], criterion=GL(alpha=5.0), name="val/loss", epochs=[10, 11, 12, 13, 14])
    assert d.stop and d.kind == "gl" and d.best == 2
    assert d.reason == "GL=5.71 > alpha=5 (best 0.7 at 12)"
    assert set(d.values) == {"gl", "up_count", "wait_count"}  # no training metric: no P_k / PQ


def test_min_checks_delays_every_criterion():
    # min_checks=m: a stop is allowed from check m (1-based) on
    assert stop_index(GL_CURVE, criterion="gl", alpha=5.0, min_checks=5) == 4
    assert stop_index(GL_CURVE, criterion="gl", alpha=5.0, min_checks=6) == 5  # GL=7.14 at check 6
    assert stop_index(GL_CURVE, criterion="gl", alpha=5.0, min_checks=7) == 7  # check 7 is a new best
    assert stop_index(GL_CURVE, criterion="gl", alpha=5.0, min_checks=10) is None


# ------------------------------------------------------------------------------------------------
# PQ
# ------------------------------------------------------------------------------------------------
PQ_VAL = [1.0, 0.6, 0.5, 0.45, 0.44, 0.45, 0.46, 0.47, 0.48, 0.5, 0.52, 0.55]
PQ_TRAIN = [1.0, 0.5, 0.4, 0.35, 0.3, 0.3, 0.29, 0.29, 0.28, 0.28, 0.28, 0.28]
# strip k=3, strip ends at checks 3, 6, 9, 12 (indices 2, 5, 8, 11):
#   t=3: P_3 = 1000 (1.9 / (3 * 0.4) - 1)    = 583.3,  GL = 0                        -> PQ = 0
#   t=6: P_3 = 1000 (0.95 / (3 * 0.3) - 1)   = 55.56,  GL = 100 (0.45 / 0.44 - 1) = 2.273 -> PQ = 0.0409
#   t=9: P_3 = 1000 (0.86 / (3 * 0.28) - 1)  = 23.81,  GL = 100 (0.48 / 0.44 - 1) = 9.091 -> PQ = 0.3818
# and between strip ends, t=8: P_3 = 1000 (0.88 / 0.87 - 1) = 11.49, GL = 6.818 -> PQ = 0.593 (not checked)


def test_training_progress_and_quotient_follow_the_formula():
    assert training_progress(PQ_TRAIN[:3], 3) == pytest.approx(1000 * (1.9 / 1.2 - 1))
    assert training_progress(PQ_TRAIN[:6], 3) == pytest.approx(1000 * (0.95 / 0.9 - 1))
    assert training_progress(PQ_TRAIN[:9], 3) == pytest.approx(1000 * (0.86 / 0.84 - 1))
    assert math.isnan(training_progress(PQ_TRAIN[:2], 3))
    d = StopRule(PQ(strip=3, alpha=10.0)).decide(PQ_VAL[:9], PQ_TRAIN[:9])
    assert d.values["pq"] == pytest.approx((100 * (0.48 / 0.44 - 1)) / (1000 * (0.86 / 0.84 - 1)))
    assert d.values["pq"] == pytest.approx(0.381818, abs=1e-6)
    d8 = StopRule(PQ(strip=3, alpha=0.3)).decide(PQ_VAL[:8], PQ_TRAIN[:8])
    assert d8.values["pq"] == pytest.approx((100 * (0.47 / 0.44 - 1)) / (1000 * (0.88 / 0.87 - 1)))
    assert d8.values["pq"] > 0.3 and not d8.stop  # above alpha, but check 8 is no strip end


@pytest.mark.parametrize(("alpha", "expected"), [(0.3, 8), (0.04, 5), (0.5, 11), (1e6, 11)])
def test_pq_stop_epoch_min_and_max_mode(alpha, expected):
    # t=12: P_3 = 1000 (0.84 / (3 * 0.28) - 1) = 0 (no training progress) with GL = 25 > 0 -> PQ = inf
    assert training_progress(PQ_TRAIN[9:12], 3) == 0.0
    assert StopRule(PQ(strip=3)).decide(PQ_VAL, PQ_TRAIN).values["pq"] == math.inf
    assert stop_index(PQ_VAL, PQ_TRAIN, criterion="pq", alpha=alpha, strip=3) == expected
    assert stop_index(acc(PQ_VAL), PQ_TRAIN, criterion="pq", alpha=alpha, strip=3, mode="max") == expected
    # training accuracy instead of training loss: E_tr = 1 - acc
    assert (
        stop_index(acc(PQ_VAL), acc(PQ_TRAIN), criterion="pq", alpha=alpha, strip=3, mode="max", train_mode="max")
        == expected
    )


def test_pq_needs_the_training_metric():
    with pytest.raises(ValueError, match="train"):
        StopRule(PQ()).decide([1.0, 0.9])
    with pytest.raises(ValueError, match="one value per check"):
        StopRule(PQ()).decide([1.0, 0.9], [1.0])


# ------------------------------------------------------------------------------------------------
# UP
# ------------------------------------------------------------------------------------------------
UP_CURVE = [1.0, 0.8, 0.6, 0.55, 0.5, 0.56, 0.52, 0.58, 0.57, 0.6, 0.59, 0.55]
# strip 2, strip ends at checks 2, 4, 6, 8, 10, 12: 0.8, 0.55, 0.56, 0.58, 0.6, 0.55
# rose at the end of the strip?                      -,   no,   yes,  yes,  yes,  no
# UP count at the strip ends:                        0,   0,    1,    2,    3,    0


def test_up_count_by_hand():
    counts = [up_count(UP_CURVE[:t], 2) for t in (2, 4, 6, 8, 10, 12)]
    assert counts == [0, 0, 1, 2, 3, 0]
    # between strip ends the count of the last strip end holds (check 7 dips, nothing changes)
    assert up_count(UP_CURVE[:7], 2) == 1


@pytest.mark.parametrize(("s", "expected"), [(1, 5), (2, 7), (3, 9), (4, None)])
def test_up_stop_epoch_min_and_max_mode(s, expected):
    assert stop_index(UP_CURVE, criterion="up", strips=s, strip=2) == expected
    assert stop_index(acc(UP_CURVE), criterion="up", strips=s, strip=2, mode="max") == expected
    # the negated metric as a score to maximize: comparisons never depend on optimum
    assert stop_index([-v for v in UP_CURVE], criterion="up", strips=s, strip=2, mode="max") == expected


def test_up_with_strip_one_is_consecutive_rises():
    # strip 1: every check is a strip end; rises at checks 6, 8, 10 (not successive)
    assert stop_index(UP_CURVE, criterion="up", strips=2, strip=1) is None
    assert stop_index([3, 2, 1, 2, 3, 4], criterion="up", strips=3, strip=1) == 5


# ------------------------------------------------------------------------------------------------
# patience: Lightning's rule and the seed's rule
# ------------------------------------------------------------------------------------------------
PATIENCE_CURVE = [1.0, 0.8, 0.85, 0.79, 0.795, 0.81, 0.8, 0.7]
# min_delta = 0:    best 1.0, 0.8, -, 0.79, then 0.795, 0.81, 0.8 are 3 checks without improvement -> index 6
# min_delta = 0.02: 0.79 + 0.02 = 0.81 is not < 0.8, so 0.85, 0.79, 0.795 are 3 checks -> index 4


@pytest.mark.parametrize(("min_delta", "expected"), [(0.0, 6), (0.02, 4)])
def test_patience_no_improvement_by_hand(min_delta, expected):
    assert stop_index(PATIENCE_CURVE, criterion="patience", patience=3, min_delta=min_delta) == expected
    assert (
        stop_index(acc(PATIENCE_CURVE), criterion="patience", patience=3, min_delta=min_delta, mode="max") == expected
    )


def _lightning_stop_index(curve, patience, min_delta, mode):
    es = PLEarlyStopping(monitor="m", patience=patience, min_delta=min_delta, mode=mode)
    for i, v in enumerate(curve):
        if es._evaluate_stopping_criteria(torch.tensor(v))[0]:
            return i
    return None


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("min_delta", [0.0, 0.01])
def test_patience_equals_lightnings_rule_on_random_curves(mode, min_delta):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        curve = (1.0 + 0.05 * torch.randn(30, generator=g).cumsum(0)).tolist()
        curve = [float(torch.tensor(v)) for v in curve]  # float32 values, as logged
        for patience in (1, 3, 5):
            ours = stop_index(curve, criterion="patience", patience=patience, min_delta=min_delta, mode=mode)
            assert ours == _lightning_stop_index(curve, patience, min_delta, mode)


def test_patience_increase_rule_by_hand():
    curve = [1.0, 0.9, 0.95, 0.9, 0.92, 0.93, 0.91]
    # rises at checks 3 (reset at 4), 5, 6 -> two in a row at check 6 (index 5)
    assert [increase_count(curve[:t]) for t in range(1, 8)] == [0, 0, 1, 0, 1, 2, 0]
    assert stop_index(curve, criterion="increase", patience=2) == 5
    assert stop_index(acc(curve), criterion="increase", patience=2, mode="max") == 5
    # Lightning's rule stops earlier: 0.95 and 0.9 are two checks without improving on 0.9
    assert stop_index(curve, criterion="patience", patience=2) == 3
    # a rise must exceed min_delta: 0.92 -> 0.93 is no rise with min_delta = 0.015
    assert stop_index(curve, criterion="increase", patience=2, min_delta=0.015) is None


# ------------------------------------------------------------------------------------------------
# Lightning's guards, edge cases, bad input
# ------------------------------------------------------------------------------------------------
def test_thresholds_and_non_finite():
    assert stop_index(GL_CURVE, criterion="gl", alpha=50.0, stopping_threshold=0.75) == 2
    assert stop_index(acc(GL_CURVE), criterion="gl", alpha=50.0, mode="max", stopping_threshold=0.25) == 2
    assert stop_index(GL_CURVE, criterion="gl", alpha=50.0, divergence_threshold=0.9) == 0
    d = first_stop([1.0, 0.9, math.nan], rule=StopRule(GL(), min_checks=10))  # not finite: stops at once
    assert d.index == 2 and d.decision.kind == "non_finite" and "nan" in d.decision.reason
    assert stop_index([1.0, 0.9, math.nan], criterion="gl", check_finite=False) is None


def test_zero_and_negative_errors():
    assert generalization_loss([0.5, 0.0, 0.0]) == 0.0
    assert generalization_loss([0.5, 0.0, 0.1]) == math.inf
    # accuracy 1.0 then 0.99: E_opt = 0, GL = inf -> GL stops whatever alpha
    assert stop_index([0.9, 1.0, 0.99], criterion="gl", alpha=1000.0, mode="max") == 2
    assert training_progress([0.0, 0.0], 2) == 0.0
    assert training_progress([0.1, 0.0], 2) == math.inf
    assert progress_quotient(5.0, math.inf) == 0.0 and progress_quotient(0.0, 0.0) == 0.0
    # a metric below its optimum: GL would flip sign, so the rule says which value to set
    with pytest.raises(ValueError, match=r"got -0\.5.*optimum"):
        StopRule(GL()).decide([-0.5, -0.4])
    assert StopRule(GL(optimum=-1.0)).decide([-0.5, -0.4]).values["gl"] == pytest.approx(20.0)
    # criteria that only compare values do not need E >= 0 (GL is then not reported)
    d = StopRule(patience=1).decide([-0.5, -0.4])
    assert d.stop and "gl" not in d.values
    assert to_error(0.97, "max") == pytest.approx(0.03) and to_error(0.3, "min", optimum=0.1) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: StopRule("plateau"),
            r"criterion must be one of \('patience', 'increase', 'gl', 'pq', 'up'\), got 'plateau'",
        ),
        (lambda: GL(alpha=0.0), r"alpha must be a number in \(0, inf\), got 0\.0"),
        (lambda: PQ(alpha=-1.0), r"alpha must be a number in \(0, inf\), got -1\.0"),
        (lambda: PQ(strip=0), r"strip must be an int >= 1, got 0"),
        (lambda: UP(strips=0), r"strips must be an int >= 1, got 0"),
        (lambda: PQ(train_mode="up"), r"train_mode must be one of \('min', 'max'\), got 'up'"),
        (lambda: StopRule(patience=-1), r"patience must be an int >= 0, got -1"),
        (lambda: StopRule(mode="maximize"), r"mode must be one of \('min', 'max'\), got 'maximize'"),
        (lambda: StopRule(GL(), min_delta=-0.1), r"min_delta must be a number in \[0, inf\), got -0\.1"),
        (lambda: StopRule(min_checks=-1), r"min_checks must be an int >= 0, got -1"),
        (lambda: GL(optimum=math.inf), r"optimum must be a number in \(-inf, inf\) or None, got inf"),
    ],
)
def test_bad_arguments_name_the_value_and_the_choices(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_lightnings_patience_takes_what_lightning_takes():
    # a negative min_delta (a slightly worse value still counts as an improvement) and patience 0 (acts as 1)
    curve = [1.0, 1.05, 1.2, 1.3]
    assert stop_index(curve, patience=1, min_delta=-0.1) == 2 == _lightning_stop_index(curve, 1, -0.1, "min")
    assert stop_index(curve, patience=0) == 1 == _lightning_stop_index(curve, 0, 0.0, "min")


def test_every_criterion_reports_every_value():
    for name in CRITERIA:
        criterion = {"gl": GL(alpha=100.0), "pq": PQ(alpha=100.0, strip=3), "up": UP(strip=3)}.get(name, name)
        d = StopRule(criterion).decide(PQ_VAL[:6], PQ_TRAIN[:6])
        assert set(d.values) >= {"gl", "pk", "pq", "up_count", "wait_count"}, name
        assert d.values["wait_count"] == 1.0 and d.values["up_count"] == 0.0


def test_counters_carried_over_decide_like_a_replay():
    # a resumed run starts from Lightning's (best_score, wait_count) instead of the lost curve
    rule = StopRule(patience=3)
    full = rule.decide(PATIENCE_CURVE[:7])
    resumed = rule.decide(PATIENCE_CURVE[4:7], counters=rule.counters(PATIENCE_CURVE[:6]))
    assert (full.stop, full.best_score, full.wait_count) == (resumed.stop, resumed.best_score, resumed.wait_count)
    assert full.stop and full.best_score == 0.79 and full.wait_count == 3


# ties at strip ends: a metric equal to its value one strip earlier did not rise; a PQ or GL equal to
# alpha does not exceed it; a flat training strip (P_k = 0) makes PQ infinite only when GL > 0
def test_up_tie_at_a_strip_end_is_no_rise():
    rule = StopRule(UP(strips=1, strip=2))
    assert up_count([4.0, 3.0, 5.0, 3.0], strip=2) == 0  # check 4 == check 2
    assert not rule.decide([4.0, 3.0, 5.0, 3.0]).stop
    assert rule.decide([4.0, 3.0, 5.0, 3.0 + 1e-9]).stop  # the smallest rise is a rise
    # two strips: the first rose, the second tied -> the run of rising strips is broken
    assert up_count([5.0, 2.0, 0.0, 3.0, 0.0, 3.0], strip=2) == 0
    assert up_count([5.0, 2.0, 0.0, 3.0, 0.0, 4.0], strip=2) == 2
    assert not StopRule(UP(strips=2, strip=2)).decide([5.0, 2.0, 0.0, 3.0, 0.0, 3.0]).stop
    assert StopRule(UP(strips=2, strip=2)).decide([5.0, 2.0, 0.0, 3.0, 0.0, 4.0]).stop


def test_pq_ties_at_a_strip_end():
    flat_train = [0.5, 0.4, 0.4, 0.4]  # the last strip of 3 is flat: P_3 = 0
    assert StopRule(PQ(strip=3)).decide([0.3, 0.2, 0.25, 0.2], flat_train).values["pq"] == 0.0  # GL = 0
    grown = StopRule(PQ(strip=3, alpha=1e6)).decide([0.3, 0.2, 0.25, 0.2, 0.3, 0.24], [*flat_train, 0.4, 0.4])
    assert grown.values["pq"] == math.inf and grown.stop  # GL = 20 > 0 over a flat strip
    # PQ exactly alpha (GL = 10, P_2 = 1000 * (0.42 / 0.4 - 1) = 50, PQ = 0.2) does not stop; just above does
    val, train = [0.2, 0.22], [0.22, 0.2]
    vals = StopRule(PQ(strip=2, alpha=0.2)).decide(val, train).values
    assert vals["gl"] == pytest.approx(10.0) and vals["pk"] == pytest.approx(50.0)
    alpha = vals["pq"]
    assert not StopRule(PQ(strip=2, alpha=alpha)).decide(val, train).stop
    assert StopRule(PQ(strip=2, alpha=alpha * (1 - 1e-9))).decide(val, train).stop


def test_gl_equal_to_alpha_does_not_stop():
    gl = generalization_loss([0.2, 0.25])
    assert gl == pytest.approx(25.0)
    assert not StopRule(GL(alpha=gl)).decide([0.2, 0.25]).stop
    assert StopRule(GL(alpha=gl * (1 - 1e-9))).decide([0.2, 0.25]).stop
