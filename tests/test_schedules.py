"""Pure schedules: step-by-step equality with torch.optim.lr_scheduler, Caffe formulas, bad input."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler as tl

from lightning_tricks.schedules import (
    Constant,
    Cosine,
    CosineRestarts,
    Cyclic,
    CyclicMomentum,
    Exponential,
    Inverse,
    Linear,
    MultiStep,
    OneCycle,
    OneCycleMomentum,
    Poly,
    Schedule,
    Sigmoid,
    Step,
    Warmup,
    resolve_steps,
)

BASE = 0.5  # base LR of the torch optimizer; our multiplier times BASE must equal torch's LR
TOL = 1e-9


def torch_run(
    make: Callable[[torch.optim.Optimizer], object], total: int, optimizer: str = "sgd"
) -> tuple[list[float], list[float]]:
    """LR and momentum (SGD momentum / Adam beta1) used by each of ``total`` optimizer steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam([p], lr=BASE)
    sched = make(opt)
    lrs, moms = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(total):
            g = opt.param_groups[0]
            lrs.append(g["lr"])
            moms.append(g["momentum"] if "momentum" in g else g["betas"][0])
            opt.step()
            sched.step()  # type: ignore[attr-defined]
    return lrs, moms


def assert_close_run(ours: Schedule, reference: list[float], total: int, scale: float = BASE) -> None:
    mine = [scale * ours(t, total) for t in range(total)]
    worst = max(abs(a - b) for a, b in zip(mine, reference))
    assert len(mine) == len(reference) == total
    assert worst <= TOL, f"{ours!r}: max |ours - torch| = {worst:.3g}"


# id, our schedule, torch factory, total steps
CASES = [
    ("step", Step(step_size=7, gamma=0.5), lambda o: tl.StepLR(o, step_size=7, gamma=0.5), 50),
    ("step-fraction", Step(step_size=0.1, gamma=0.3), lambda o: tl.StepLR(o, step_size=5, gamma=0.3), 50),
    (
        "multistep",
        MultiStep(milestones=[10, 25, 40], gamma=0.3),
        lambda o: tl.MultiStepLR(o, milestones=[10, 25, 40], gamma=0.3),
        50,
    ),
    (
        "multistep-fraction",
        MultiStep(milestones=[0.5, 0.75]),
        lambda o: tl.MultiStepLR(o, milestones=[30, 45], gamma=0.1),
        60,
    ),
    ("exponential", Exponential(gamma=0.95), lambda o: tl.ExponentialLR(o, gamma=0.95), 80),
    ("poly", Poly(power=0.9), lambda o: tl.PolynomialLR(o, total_iters=50, power=0.9), 50),
    ("poly-steps", Poly(power=2.0, steps=40), lambda o: tl.PolynomialLR(o, total_iters=40, power=2.0), 50),
    ("cosine", Cosine(min_factor=0.05), lambda o: tl.CosineAnnealingLR(o, T_max=64, eta_min=0.05 * BASE), 64),
    ("cosine-zero", Cosine(), lambda o: tl.CosineAnnealingLR(o, T_max=37), 37),
    (
        "cosine-restarts",
        CosineRestarts(T_0=10, T_mult=1, min_factor=0.1),
        lambda o: tl.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=1, eta_min=0.1 * BASE),
        55,
    ),
    (
        "cosine-restarts-mult",
        CosineRestarts(T_0=5, T_mult=2),
        lambda o: tl.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2),
        80,
    ),
    (
        "linear-warmup",
        Linear(start_factor=0.25, end_factor=1.0, steps=12),
        lambda o: tl.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=12),
        30,
    ),
    (
        "linear-decay",
        Linear(start_factor=1.0, end_factor=0.1),
        lambda o: tl.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=30),
        30,
    ),
    (
        "warmup-constant",
        Warmup(steps=8, start_factor=0.1),
        lambda o: tl.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=8),
        30,
    ),
    (
        "warmup-cosine",
        Warmup(steps=10, start_factor=0.1, then=Cosine(min_factor=0.02)),
        lambda o: tl.SequentialLR(
            o,
            [
                tl.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=10),
                tl.CosineAnnealingLR(o, T_max=40, eta_min=0.02 * BASE),
            ],
            milestones=[10],
        ),
        50,
    ),
]
for _mode in ("triangular", "triangular2", "exp_range"):
    CASES.append(
        (
            f"cyclic-{_mode}",
            Cyclic(min_factor=0.1, max_factor=1.0, step_size_up=5, step_size_down=8, mode=_mode, gamma=0.97),
            lambda o, m=_mode: tl.CyclicLR(
                o,
                base_lr=0.1 * BASE,
                max_lr=BASE,
                step_size_up=5,
                step_size_down=8,
                mode=m,
                gamma=0.97,
                cycle_momentum=False,
            ),
            60,
        )
    )
for _total, _pct, _anneal, _three in [
    (100, 0.3, "cos", False),
    (37, 0.25, "linear", False),
    (100, 0.3, "cos", True),
    (61, 0.2, "linear", True),
]:
    CASES.append(
        (
            f"one-cycle-{_total}-{_anneal}-{'3' if _three else '2'}phase",
            OneCycle(pct_start=_pct, anneal=_anneal, three_phase=_three, div_factor=25.0, final_div_factor=1e4),
            lambda o, t=_total, p=_pct, a=_anneal, th=_three: tl.OneCycleLR(
                o, max_lr=BASE, total_steps=t, pct_start=p, anneal_strategy=a, three_phase=th, cycle_momentum=False
            ),
            _total,
        )
    )


@pytest.mark.parametrize("ours, make, total", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_equals_torch_scheduler_over_a_whole_run(ours: Schedule, make, total: int) -> None:
    lrs, _ = torch_run(make, total)
    assert_close_run(ours, lrs, total)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_momentum_equals_torch(optimizer: str, three_phase: bool) -> None:
    total = 90
    oc = OneCycle(pct_start=0.3, three_phase=three_phase)

    def make(o: torch.optim.Optimizer) -> tl.OneCycleLR:
        return tl.OneCycleLR(
            o,
            max_lr=BASE,
            total_steps=total,
            pct_start=0.3,
            three_phase=three_phase,
            base_momentum=0.8,
            max_momentum=0.93,
        )

    lrs, moms = torch_run(make, total, optimizer)
    assert_close_run(oc, lrs, total)
    mom = oc.momentum(base_momentum=0.8, max_momentum=0.93)
    assert isinstance(mom, OneCycleMomentum) and mom.pct_start == 0.3 and mom.three_phase == three_phase
    assert_close_run(mom, moms, total, scale=1.0)


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclic_momentum_equals_torch(mode: str) -> None:
    total = 70
    cyc = Cyclic(min_factor=0.2, step_size_up=6, step_size_down=4, mode=mode, gamma=0.98)

    def make(o: torch.optim.Optimizer) -> tl.CyclicLR:
        return tl.CyclicLR(
            o,
            base_lr=0.2 * BASE,
            max_lr=BASE,
            step_size_up=6,
            step_size_down=4,
            mode=mode,
            gamma=0.98,
            base_momentum=0.8,
            max_momentum=0.9,
        )

    lrs, moms = torch_run(make, total)
    assert_close_run(cyc, lrs, total)
    mom = cyc.momentum(base_momentum=0.8, max_momentum=0.9)
    assert isinstance(mom, CyclicMomentum)
    assert_close_run(mom, moms, total, scale=1.0)


# ---------------------------------------------------------------------------------------------
# Caffe policies without a torch counterpart: the formulas of caffe/src/caffe/solvers/sgd_solver.cpp
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma, power", [(1e-4, 0.75), (0.01, 1.0), (0.5, 2.0)])
def test_inv_matches_caffe_formula(gamma: float, power: float) -> None:
    s = Inverse(gamma=gamma, power=power)
    for t in range(0, 5000, 37):
        assert abs(s(t, 5000) - (1.0 + gamma * t) ** (-power)) <= TOL


@pytest.mark.parametrize("gamma, stepsize", [(-0.05, 100), (0.1, 30), (-2.0, 0)])
def test_sigmoid_matches_caffe_formula(gamma: float, stepsize: int) -> None:
    s = Sigmoid(gamma=gamma, step_size=stepsize)
    for t in range(0, 300, 7):
        caffe = 1.0 / (1.0 + math.exp(-gamma * (t - stepsize)))
        assert abs(s(t, 300) - caffe) <= TOL
    assert Sigmoid(gamma=-10.0, step_size=0)(10_000) == 0.0  # no overflow far from the center


def test_fixed_poly_step_exp_multistep_match_caffe_formulas() -> None:
    total = 120
    for t in range(total):
        assert Constant()(t, total) == 1.0
        assert Step(step_size=25, gamma=0.1)(t, total) == pytest.approx(0.1 ** (t // 25), abs=TOL)
        assert Exponential(gamma=0.99)(t, total) == pytest.approx(0.99**t, abs=TOL)
        assert Poly(power=1.5)(t, total) == pytest.approx((1 - t / total) ** 1.5, abs=TOL)
        n = sum(m <= t for m in (30, 60, 90))
        assert MultiStep(milestones=[30, 60, 90], gamma=0.5)(t, total) == pytest.approx(0.5**n, abs=TOL)


# ---------------------------------------------------------------------------------------------
# fractions of the run, warmup semantics, helpers
# ---------------------------------------------------------------------------------------------
def test_resolve_steps_ints_and_fractions() -> None:
    assert resolve_steps(17, None) == 17
    assert resolve_steps(0.25, 10) == 3  # rounded half up
    assert resolve_steps(0.1, 2000) == 200
    assert resolve_steps(1.0, 7) == 7
    with pytest.raises(ValueError, match="needs total_steps"):
        resolve_steps(0.5, None, "milestones")
    assert resolve_steps(0.01, 10, minimum=1) == 1  # a length is at least one step in a short run
    assert Step(step_size=0.001, gamma=0.5)(3, 10) == 0.125
    assert Step(step_size=1000.0).step_size == 1000  # integral floats (YAML) are step counts


def test_warmup_ramps_then_hands_the_rest_of_the_run_to_the_next_schedule() -> None:
    total, w = 100, 20
    s = Warmup(steps=0.2, then=Cosine(min_factor=0.1))
    for t in range(w):
        assert s(t, total) == pytest.approx(t / w, abs=TOL)
    assert s(w, total) == 1.0
    assert s(total - 1, total) == pytest.approx(Cosine(min_factor=0.1)(79, 80), abs=TOL)
    assert Cosine(min_factor=0.1)(80, 80) == pytest.approx(0.1)
    # warming up into a schedule that does not start at 1 ramps to its first value
    oc = Warmup(steps=5, start_factor=0.0, then=OneCycle(div_factor=10))
    assert oc(5, 50) == pytest.approx(0.1) and oc(4, 50) == pytest.approx(0.8 * 0.1)


def test_cosine_restarts_cycles_for_snapshot_ensembles() -> None:
    s = CosineRestarts(T_0=10, T_mult=1)
    assert s.cycle_ends(45) == [9, 19, 29, 39]
    assert s.position(23) == (2, 3, 10)
    assert [s(t, 40) for t in (0, 10, 20, 30)] == [1.0, 1.0, 1.0, 1.0]
    assert s(9, 40) == pytest.approx((1 + math.cos(math.pi * 0.9)) / 2)
    s2 = CosineRestarts(T_0=0.25, T_mult=1)  # four cycles whatever the run length
    assert s2.cycle_ends(200) == [49, 99, 149, 199]
    assert CosineRestarts(T_0=3, T_mult=3).cycle_ends(100) == [2, 11, 38]


def test_schedules_past_their_end_hold_the_last_value() -> None:
    assert Cosine(min_factor=0.2, steps=10)(500) == pytest.approx(0.2)
    assert Poly(steps=10)(50) == 0.0
    assert Linear(start_factor=1.0, end_factor=0.3, steps=10)(50) == pytest.approx(0.3)
    oc = OneCycle()
    assert oc(150, 100) == oc(99, 100)


def test_curve_and_repr() -> None:
    s = Warmup(steps=2, then=Step(step_size=2, gamma=0.5))
    assert s.curve(6) == [0.0, 0.5, 1.0, 1.0, 0.5, 0.5]
    assert repr(Cosine(min_factor=0.1)) == "Cosine(min_factor=0.1, steps=None)"
    assert Cosine(0.1) == Cosine(min_factor=0.1)


# ---------------------------------------------------------------------------------------------
# bad input fails at construction (or when the run length is known) naming the value
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Step(step_size=-3), r"step_size must be .* got -3"),
        (lambda: Step(step_size=0), r"step_size must be an int >= 1 .* got 0"),
        (lambda: Step(step_size=2.5), r"step_size .* got 2.5"),
        (lambda: Step(step_size=10, gamma=0.0), r"gamma must be in \(0.0, inf\), got 0.0"),
        (lambda: MultiStep(milestones=[30, 10]), r"milestones must be strictly increasing, got \[30, 10\]"),
        (lambda: MultiStep(milestones=[5, -1]), r"milestones\[1\] .* got -1"),
        (lambda: MultiStep(milestones=[]), "milestones must not be empty"),
        (lambda: Exponential(gamma=-0.5), r"gamma .* got -0.5"),
        (lambda: Inverse(gamma=-1.0, power=0.75), r"gamma must be in \[0.0, inf\), got -1.0"),
        (lambda: Poly(power=-1.0), r"power .* got -1.0"),
        (lambda: Sigmoid(gamma=0.0, step_size=10), r"gamma must be a finite non-zero number .* got 0.0"),
        (lambda: Cosine(min_factor=1.5), r"min_factor must be in \[0.0, 1.0\], got 1.5"),
        (lambda: Cosine(steps=-10), r"steps .* got -10"),
        (lambda: CosineRestarts(T_0=10, T_mult=0), r"T_mult must be an int >= 1, got 0"),
        (lambda: CosineRestarts(T_0=10, T_mult=1.5), r"T_mult must be an int >= 1, got 1.5"),
        (lambda: CosineRestarts(T_0=-5), r"T_0 .* got -5"),
        (lambda: Cyclic(min_factor=1.0, max_factor=0.1), r"bounds reversed.*min_factor=1.0 > max_factor=0.1"),
        (lambda: Cyclic(mode="sawtooth"), r"mode must be one of .* got 'sawtooth'"),
        (lambda: Cyclic(step_size_up=-1), r"step_size_up .* got -1"),
        (lambda: CyclicMomentum(base_momentum=0.95, max_momentum=0.85), r"bounds reversed.*0.95 > max_momentum=0.85"),
        (lambda: OneCycle(pct_start=1.2), r"pct_start must be in \(0.0, 1.0\], got 1.2"),
        (lambda: OneCycle(pct_start=0.6, three_phase=True), r"pct_start must be in \(0.0, 0.5\].*got 0.6"),
        (lambda: OneCycle(anneal="exp"), r"anneal must be one of .* got 'exp'"),
        (lambda: OneCycle(div_factor=0), r"div_factor .* got 0"),
        (lambda: OneCycleMomentum(base_momentum=0.99, max_momentum=0.9), r"bounds reversed"),
        (lambda: Linear(steps=-1), r"steps .* got -1"),
        (lambda: Warmup(steps=-5), r"steps must be .* got -5"),
        (lambda: Warmup(steps=0), r"steps must be an int >= 1 .* got 0"),
        (lambda: Warmup(steps=5, start_factor=2.0), r"start_factor must be in \[0.0, 1.0\], got 2.0"),
        (lambda: Warmup(steps=5, then="cosine"), r"then must be a schedule"),
    ],
)
def test_bad_arguments_fail_at_construction(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_run_lengths_fail_when_the_run_length_is_known() -> None:
    w = Warmup(steps=200, then=Cosine())
    match = r"warmup steps=200 \(200 steps\) must be shorter than the run \(total_steps=100\)"
    with pytest.raises(ValueError, match=match):
        w.check(100)
    with pytest.raises(ValueError, match="must be shorter than the run"):
        w(0, 100)
    with pytest.raises(ValueError, match=r"warmup steps=1.0 \(50 steps\)"):
        Warmup(steps=1.0).check(50)
    with pytest.raises(ValueError, match="Cosine with steps=None runs over the whole run, so it needs total_steps"):
        Cosine().check(None)
    with pytest.raises(ValueError, match="needs total_steps"):
        Warmup(steps=0.1).check(None)
    with pytest.raises(ValueError, match="leaves phase 1 without steps in a run of total_steps=50"):
        OneCycle(pct_start=0.01).check(50)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        Constant()(-1)
    with pytest.raises(ValueError, match="total_steps must be >= 1, got 0"):
        Constant()(0, 0)
    Warmup(steps=5, then=Step(step_size=10)).check(None)  # needs no run length: fine
