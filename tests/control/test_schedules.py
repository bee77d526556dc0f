"""LR schedules in samples."""

from __future__ import annotations

import math

import pytest
import torch

from adabatch.control.schedules import (
    SampleCounter,
    SampleSchedule,
    constant,
    sample_lambda_lr,
    warmup_cosine,
    warmup_linear,
    warmup_stable_decay,
)


@pytest.mark.parametrize(
    ("fn", "samples", "expected"),
    [
        (warmup_cosine, 0, 0.0),
        (warmup_cosine, 25, 0.25),
        (warmup_cosine, 100, 1.0),
        (warmup_cosine, 350, 0.5 * (1 + math.cos(math.pi / 4))),
        (warmup_cosine, 600, 0.5),
        (warmup_cosine, 1100, 0.0),
        (warmup_cosine, 10**6, 0.0),
        (warmup_linear, 0, 0.0),
        (warmup_linear, 100, 1.0),
        (warmup_linear, 350, 0.75),
        (warmup_linear, 1100, 0.0),
        (warmup_linear, 2000, 0.0),
    ],
)
def test_schedule_table(fn, samples, expected):
    assert fn(samples, 100, 1100) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fn", [warmup_cosine, warmup_linear])
def test_final_factor(fn):
    assert fn(1100, 100, 1100, final_factor=0.1) == pytest.approx(0.1)
    assert fn(600, 100, 1100, final_factor=0.1) == pytest.approx(0.55)


@pytest.mark.parametrize(
    ("samples", "shape", "expected"),
    [
        (50, "linear", 0.5),
        (100, "linear", 1.0),
        (799, "linear", 1.0),
        (900, "linear", 0.5),
        (900, "cosine", 0.5),
        (850, "cosine", 0.5 * (1 + math.cos(math.pi / 4))),
        (900, "1-sqrt", 1 - math.sqrt(0.5)),
        (1000, "1-sqrt", 0.0),
        (5000, "linear", 0.0),
    ],
)
def test_wsd_table(samples, shape, expected):
    assert warmup_stable_decay(samples, 100, 1000, shape=shape) == pytest.approx(expected)


def test_no_warmup_and_warmup_equals_total():
    assert warmup_cosine(0, 0, 100) == 1.0
    assert warmup_linear(50, 0, 100) == 0.5
    assert warmup_cosine(99, 100, 100) == pytest.approx(0.99)
    assert warmup_cosine(100, 100, 100, final_factor=0.2) == 0.2
    assert constant(10**9) == 1.0


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "match"),
    [
        (warmup_cosine, (-1, 10, 100), {}, "samples=-1"),
        (warmup_cosine, (0, -1, 100), {}, "warmup_samples=-1"),
        (warmup_cosine, (0, 10, 0), {}, "total_samples=0"),
        (warmup_linear, (0, 200, 100), {}, "warmup_samples=200"),
        (warmup_linear, (0, 10, 100), {"final_factor": 1.5}, "final_factor=1.5"),
        (warmup_stable_decay, (0, 10, 100), {"decay_fraction": 1.2}, "decay_fraction=1.2"),
        (warmup_stable_decay, (0, 50, 100), {"decay_fraction": 0.8}, "decay_fraction=0.8"),
        (warmup_stable_decay, (0, 10, 100), {"shape": "exp"}, "shape='exp'"),
        (constant, (-5,), {}, "samples=-5"),
    ],
)
def test_schedules_reject(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_sample_schedule_adapter():
    s = SampleSchedule("warmup_stable_decay", warmup_samples=10, total_samples=100)
    assert s.factor(50) == 1.0 and s(90) == pytest.approx(0.5)
    assert "warmup_stable_decay" in repr(s)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("cosine", {}, "name='cosine'.*warmup_cosine"),
        ("warmup_cosine", {"warmup_samples": 1, "total_samples": 10, "gamma": 2}, "gamma"),
        ("warmup_cosine", {"warmup_samples": 1}, "total_samples"),
        ("warmup_cosine", {"warmup_samples": 20, "total_samples": 10}, "warmup_samples=20"),
    ],
)
def test_sample_schedule_rejects(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampleSchedule(name, **kwargs)


def test_sample_counter():
    c = SampleCounter()
    c.add(10)
    c2 = SampleCounter()
    c2.load_state_dict(c.state_dict())
    assert c2.samples == 10
    with pytest.raises(ValueError, match="n=-1"):
        c.add(-1)


def _run(batches, use_samples):
    """LR after each step for a cosine planned over 6400 samples at B=64 (100 steps)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    counter = SampleCounter()
    schedule = SampleSchedule("warmup_cosine", warmup_samples=640, total_samples=6400)
    if use_samples:
        sched = sample_lambda_lr(opt, schedule, counter)
    else:  # the same schedule written in steps at B=64
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule(step * 64))
    lrs = []
    for b in batches:
        opt.step()
        counter.add(b)
        sched.step()
        lrs.append((counter.samples, opt.param_groups[0]["lr"]))
    return lrs


def test_schedule_in_samples_keeps_shape_when_batch_grows():
    # B = 64 for 20 steps, then 256: in samples the LR follows the planned curve exactly
    batches = [64] * 20 + [256] * 20
    for samples, lr in _run(batches, use_samples=True):
        assert lr == pytest.approx(warmup_cosine(samples, 640, 6400))
    # written in steps it is compressed in data: at 6400 samples the step schedule is still
    # high (step 40 of 100), the sample schedule has finished
    steps = _run(batches, use_samples=False)
    assert steps[-1][0] == 6400
    assert steps[-1][1] > 0.5
    assert _run(batches, use_samples=True)[-1][1] == pytest.approx(0.0, abs=1e-12)


def test_sample_lambda_lr_callable_counter_and_state_dict():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    n = {"s": 0}
    sched = sample_lambda_lr(opt, lambda s: 1.0 / (1 + s), lambda: n["s"])
    n["s"] = 3
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    sd = sched.state_dict()  # must not try to pickle the counter
    assert sd["lr_lambdas"] == [None]
    with pytest.raises(ValueError, match="counter=5"):
        sample_lambda_lr(opt, lambda s: 1.0, 5)


def test_the_callback_as_counter_has_no_lag(tmp_path):
    """``sample_lambda_lr(opt, schedule, counter=<AdaptiveBatchSize>)`` under Lightning, with
    the batch growing 4 -> 16: the LR of every step is the schedule at the exact number of
    samples trained before it (times the SGD linear rule B / B_ref applied around the step).
    The callback counts a step's samples in on_before_optimizer_step, before Lightning steps
    the scheduler; counted in on_train_batch_end, every LR would be one step late."""
    from resume_run import fit

    _, cb, rec = fit(tmp_path, mode="accumulate", accumulation=1, max_epochs=4)
    assert len({r["batch"] for r in rec.rows}) >= 3, "the test needs a changing batch"
    schedule = SampleSchedule("warmup_cosine", warmup_samples=40, total_samples=2000,
                              final_factor=0.1)
    seen = 0
    for row in rec.rows:
        expected = 0.05 * schedule(seen) * row["batch"] / 4  # ref_batch_size=4
        assert row["lr"] == pytest.approx(expected, rel=1e-12), row
        seen += row["batch"]
    assert cb.samples == seen
