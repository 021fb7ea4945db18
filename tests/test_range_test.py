"""find_lr: the LR range test on real Trainers (state restored exactly, threshold, early stop, bad arguments)."""

import math
import sys

import pytest
import torch
from conftest import load_benchmark, make_trainer

import lr_guard
from lr_guard import DivergenceDetector, find_lr
from lr_guard.range_test import SUGGESTED_FRACTION, read_sweep
from lr_guard.testing import TinyRegressionModule


def _state(trainer, model):
    optimizer = trainer.optimizers[0]
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {
            i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in optimizer.state_dict()["state"].items()
        },
        [g["lr"] for g in optimizer.param_groups],
        trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        trainer.global_step,
        torch.get_rng_state(),
    )


def _same(a, b):
    weights_a, opt_a, lrs_a, sched_a, step_a, rng_a = a
    weights_b, opt_b, lrs_b, sched_b, step_b, rng_b = b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for k, v in opt_a[i].items():
            assert torch.equal(v, opt_b[i][k]) if torch.is_tensor(v) else v == opt_b[i][k]
    assert lrs_a == lrs_b and sched_a == sched_b and step_a == step_b
    assert torch.equal(rng_a, rng_b)


def test_state_after_a_fit_is_restored_exactly():
    model = TinyRegressionModule(
        lr=0.01, optimizer="adam", scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5), batch_size=64
    )
    trainer = make_trainer(max_steps=10)
    trainer.fit(model)
    before = _state(trainer, model)
    result = find_lr(trainer, model, min_lr=1e-4, max_lr=1.0, num_steps=20)
    assert len(result.losses) > 1
    _same(before, _state(trainer, model))
    assert trainer.callbacks is not None and not any(type(c).__name__ == "_SweepCallback" for c in trainer.callbacks)


def test_a_fit_after_the_sweep_is_the_fit_without_it():
    def train(sweep_first):
        torch.manual_seed(3)
        model = TinyRegressionModule(lr=0.05, batch_size=32)
        trainer = make_trainer(max_steps=15)
        if sweep_first:
            find_lr(trainer, model, num_steps=30)
            assert trainer.global_step == 0
        trainer.fit(model)
        return trainer.global_step, model.state_dict()

    step_plain, plain = train(False)
    step_swept, swept = train(True)
    assert step_plain == step_swept == 15
    assert all(torch.equal(plain[k], swept[k]) for k in plain)


def _diverges_at(lr, steps=60):
    model = TinyRegressionModule(lr=lr, batch_size=64)
    start = model.full_loss()
    make_trainer(max_steps=steps).fit(model)
    end = model.full_loss()
    return not math.isfinite(end) or end > start


def test_threshold_is_near_where_plain_sgd_diverges():
    grid = [0.02 * 2**i for i in range(8)]  # 0.02 .. 2.56
    diverging = next(lr for lr in grid if _diverges_at(lr))
    result = find_lr(make_trainer(), TinyRegressionModule(lr=0.05, batch_size=64), min_lr=1e-4, max_lr=10.0)
    assert result.threshold is not None
    assert diverging / 3 <= result.threshold <= diverging * 3, (result.threshold, diverging)
    assert result.steepest is not None and result.steepest <= result.threshold
    assert result.suggestion == pytest.approx(result.threshold * SUGGESTED_FRACTION)
    assert f"{result.threshold:.3g}" in result.reason


def test_divergence_stops_the_sweep_early():
    result = find_lr(make_trainer(), TinyRegressionModule(lr=0.05, batch_size=64), min_lr=1e-3, max_lr=1e3)
    assert result.stopped_early
    assert len(result.losses) < 100
    assert result.threshold is not None and result.threshold < result.lrs[-1]


def test_a_sweep_that_never_rises_gives_no_threshold():
    result = find_lr(make_trainer(), TinyRegressionModule(lr=0.05, batch_size=64), min_lr=1e-5, max_lr=1e-3)
    assert not result.stopped_early and len(result.losses) == 100
    assert result.threshold is None and result.suggestion is None
    assert "raise max_lr" in result.reason


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"min_lr": 0.0}, ValueError, "min_lr"),
        ({"min_lr": 1.0, "max_lr": 0.1}, ValueError, r"max_lr must be greater than min_lr; got min_lr=1.0, max_lr=0.1"),
        ({"num_steps": 5}, ValueError, "num_steps"),
        ({"divergence": "divergence"}, TypeError, r"divergence must be a lr_guard Detector .* got 'divergence'"),
    ],
)
def test_bad_arguments_are_refused_before_training(kwargs, error, match):
    model = TinyRegressionModule()
    trainer = make_trainer()
    with pytest.raises(error, match=match):
        find_lr(trainer, model, **kwargs)
    assert trainer.global_step == 0


def test_the_trainers_epoch_and_step_limits_neither_cut_nor_hold_off_the_sweep():
    trainer = make_trainer(max_epochs=1, max_steps=-1, min_steps=500)  # 4 batches an epoch; a minimum of 500 steps
    result = find_lr(trainer, TinyRegressionModule(batch_size=64), min_lr=1e-4, max_lr=1e3)
    assert result.stopped_early and 10 < len(result.losses) < 100  # ran past the first epoch, stopped before 500
    assert (trainer.max_epochs, trainer.min_steps, trainer.max_steps, trainer.global_step) == (1, 500, -1, 0)


def test_fast_dev_run_is_refused():
    with pytest.raises(ValueError, match=r"fast_dev_run=True"):
        find_lr(make_trainer(fast_dev_run=True), TinyRegressionModule())


def test_a_custom_divergence_detector_is_used():
    strict = DivergenceDetector(factor=1.2, instant_factor=1.5, instant_confirm=0, patience=1, warmup_steps=2)
    result = find_lr(make_trainer(), TinyRegressionModule(lr=0.05, batch_size=64), divergence=strict)
    assert result.stopped_early


def test_a_sweep_too_short_or_diverging_at_once_says_which():
    assert "too few to read" in read_sweep([1e-3, 1e-2, 1e-1], [1.0, 0.9, 0.8]).reason
    assert "lower min_lr" in read_sweep([1e-3, 1e-2, 1e-1], [1.0, 0.9, math.nan]).reason


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    result = read_sweep([1e-3 * 1.1**k for k in range(30)], [1.0 / (k + 1) for k in range(30)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'lr_guard\[plot\]'"):
        result.plot()


def test_find_lr_is_exported():
    assert "find_lr" in lr_guard.__all__ and lr_guard.find_lr is find_lr


def test_with_gradient_accumulation_each_sweep_step_is_one_optimizer_step():
    trainer = make_trainer(accumulate_grad_batches=2)
    result = find_lr(trainer, TinyRegressionModule(batch_size=32), min_lr=1e-5, max_lr=1e-4, num_steps=12)
    assert len(result.losses) == 12 and not result.stopped_early
    assert all(math.isfinite(v) and v > 0 for v in result.losses)
    assert trainer.global_step == 0


def test_other_param_groups_keep_their_ratio_to_the_first():
    seen = []

    class Recording(TinyRegressionModule):
        def on_before_optimizer_step(self, optimizer):
            seen.append([g["lr"] for g in optimizer.param_groups])

    result = find_lr(make_trainer(), Recording(param_groups=2, batch_size=64), min_lr=1e-4, max_lr=1e-2, num_steps=10)
    assert [first for first, _ in seen] == pytest.approx(result.lrs)
    assert all(second == pytest.approx(0.1 * first) for first, second in seen)


def test_a_lightning_pytorch_trainer_runs_the_sweep():
    lightning = pytest.importorskip("lightning.pytorch")
    from test_guard import _lightning_scripted

    script = [2.0 / (1 + 0.1 * t) for t in range(50)] + [100.0] * 50  # the loss blows up at sweep step 50
    trainer = make_trainer(trainer_class=lightning.Trainer)
    result = find_lr(trainer, _lightning_scripted(script), min_lr=1e-4, max_lr=1.0, num_steps=100)
    assert result.stopped_early and len(result.losses) < 55
    assert result.threshold == pytest.approx(result.lrs[49]) and trainer.global_step == 0


def test_the_benchmark_runs_in_its_fast_mode(capsys):
    table = load_benchmark("range_test").main(["--seeds", "1", "--steps", "20", "--grid", "3", "--tasks", "regression"])
    assert set(table["regression"]) >= {"threshold", "suggestion", "lightning", "run x0.33", "run lightning"}
    assert "regression (1 seeds)" in capsys.readouterr().out


def test_the_benchmark_measures_the_suggestion_against_a_tuned_grid_on_an_adam_warm_up_task(capsys):
    pytest.importorskip("sklearn")
    columns = load_benchmark("range_test").main(
        ["--seeds", "1", "--steps", "20", "--grid", "4", "--tasks", "digits_adam"]
    )["digits_adam"]
    grid = {key: v[0] for key, v in columns.items() if key.startswith("run grid ")}
    assert len(grid) == 4
    lrs = sorted(float(key.removeprefix("run grid ")) for key in grid)
    assert lrs[-1] / lrs[0] == pytest.approx(1000, rel=0.01)  # 3 decades
    assert lrs[0] < columns["threshold"][0] < lrs[-1]  # around the threshold
    assert columns["run tuned"][0] == min(grid.values())  # the best grid LR is the tuned run
    suggestion, tuned = columns["run suggestion"][0], columns["run tuned"][0]
    assert columns["gap suggestion %"][0] == pytest.approx(100 * (suggestion / tuned - 1))
    assert columns["train gap lightning %"][0] == pytest.approx(
        100 * (columns["train lightning"][0] / columns["train tuned"][0] - 1)
    )
    out = capsys.readouterr().out
    assert "digits_adam (1 seeds)" in out and "against the tuned run" in out


def test_the_benchmarks_verdict_says_within_noise_only_when_the_seeds_spread_covers_the_gap():
    verdict = load_benchmark("range_test").verdict
    assert verdict([0.5, -0.2, 0.9]) == "within 1%"
    assert verdict([-3.0, 9.0, 3.0]) == "within noise"  # mean +3.0, spread 6.0
    assert verdict([4.0, 5.0, 6.0]) == "+5.0% above"
    assert verdict([1.0, math.inf]) == "runs lost"
