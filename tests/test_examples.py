"""Examples are tests: each example's main() runs here in its fast mode."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_rescues_the_poisoned_run(capsys, tmp_path):
    result = load("demo").main(["--fast", "--logdir", str(tmp_path)])
    without, rescued = result["without_guard"], result["with_lr_guard"]
    assert not without["finite"] and math.isnan(without["val_loss"])
    assert rescued["finite"] and rescued["val_loss"] < 0.5 and rescued["val_acc"] > 0.85
    out = capsys.readouterr().out
    assert "its update was not applied" in out and f"tensorboard --logdir {tmp_path}" in out
    assert rescued["val_loss"] < 1.05 * result["no_fault"]["val_loss"]  # the skipped update costs next to nothing
    assert (tmp_path / "with_lr_guard").is_dir() and (tmp_path / "without_guard").is_dir()


def test_real_curves_example_finds_the_labelled_trouble(capsys):
    found = load("real_curves").main(["--fast"])
    steps = {name: {(e.kind.value, e.step) for e in events} for name, events in found.items()}
    assert ("divergence", 71) in steps["criteo_dlrm_warmup_divergence_inf_nan_algoperf"]
    assert {("spike", 919), ("spike", 947)} <= steps["lm_gpt2_124m_modded_muon_dataspike"]
    assert ("plateau", 79) in steps["resnet110_cifar10_steplr_per_epoch"]
    assert "blew up" in capsys.readouterr().out


def test_detection_benchmark_prints_one_json_line(capsys):
    import json
    import sys

    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    try:
        results = load_benchmark("detection").main(["--streams", "2", "--steps", "3000"])
    finally:
        sys.path.pop(0)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(results))
    for name in ("spike", "oscillation", "plateau", "divergence"):
        assert set(results[name]) >= {
            "precision",
            "recall",
            "f1",
            "median_delay_steps",
            "fp_per_10k_clean_steps",
            "us_per_update",
        }


def test_overhead_benchmark_runs_and_reports_its_keys(capsys):
    import json

    summary = load_benchmark("overhead").main(["--steps", "60", "--repeats", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(summary))
    assert {"cpu_overhead_pct", "cpu_overhead_median_pct", "guard_us_per_step", "tiny_cpu", "small_cpu"} <= set(last)
    assert "gate_us_per_step" in last and last["tiny_cpu_gate"]["gate_inside_us"] > 0
    assert last["guard_us_per_step"] > 0 and last["small_cpu"]["guard_share_pct"] > 0
    assert {"overhead_pct", "overhead_median_pct", "noop_callback_overhead_pct"} <= set(last["tiny_cpu"])


def test_overhead_benchmark_alternates_the_callback_block_by_block():
    """The wall-clock comparison puts the callback in for one block of steps and out for the next: every hook of
    a step "with" reaches it, none of a step "without" does, and it is back in the list for the teardown."""
    import pytorch_lightning as pl

    bench = load_benchmark("overhead")

    class Counting(pl.Callback):
        def __init__(self):
            self.started, self.ended, self.torn_down = [], [], False

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.started.append(trainer.global_step)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.ended.append(trainer.global_step - 1)  # the step this batch trained

        def teardown(self, trainer, module, stage):
            self.torn_down = True

    guest = Counting()
    clock = bench.Alternate(guest, block=4)
    bench.fit(bench.TinyMLP, [clock, guest], 24, "cpu")
    expected = [s for s in range(24) if (s // 4) % 2 == 0]
    assert guest.started == expected and guest.ended == expected
    assert clock.present == [(s // 4) % 2 == 0 for s in range(24)] and guest.torn_down
    figures = clock.overhead(warmup_blocks=1)
    assert figures["step_ms"] > 0 and figures["hiccups"] >= 0
    # where no wall clock could resolve the guard (the GPT-style model on CPU) only its hooks are timed
    hooks_only = bench.measure("tiny", bench.TinyMLP, "cpu", 40, 1, wall_clock=False)
    assert "overhead_pct" not in hooks_only and hooks_only["guard_us_mean"] > 0


def test_overhead_benchmark_times_both_ways_of_writing_the_scalars_to_tensorboard():
    writes = load_benchmark("overhead").time_scalar_writes(rounds=5)
    assert writes["scalars"] >= 16 and writes["one_event_us"] > 0 and writes["log_metrics_us"] > 0


def test_snapshot_benchmark_measures_only_states_that_fit_in_memory():
    bench = load_benchmark("snapshot")
    assert bench.fits(1, "cpu") and not bench.fits(bench.available_host_bytes() / 1e6, "cpu")


def test_snapshot_benchmark_runs_and_reports_its_keys(capsys):
    import json

    summary = load_benchmark("snapshot").main(["--sizes-mb", "4", "--repeats", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"snapshot_gbps", "restore_gbps", "pinned_copy_gbps"} <= set(last) == set(summary)
    assert last["snapshot_gbps"] > 0 and last["restore_gbps"] > 0


def test_plateau_example_cuts_once_after_the_warmup_and_the_cut_persists(capsys):
    out = load("plateau_warmup_cosine").main(["--fast"])
    printed = capsys.readouterr().out
    assert "[1/2] training" in printed and "[2/2] training" in printed  # a line per run, before it starts
    [decision] = [d for d in out["decisions"] if d.action.value == "lr_cut"]
    assert decision.event.step > 30  # after the warm-up (30 steps in fast mode)
    cut_at = decision.step  # where it was made: the values are checked in batches of 8 steps
    assert 0 < cut_at - decision.event.step <= 8
    for step in range(cut_at + 1, 300):
        assert out["guarded"][step] == pytest.approx(0.5 * out["plain"][step], rel=1e-9)


def test_rollback_example_keeps_the_run_finite():
    out = load("rollback_skip_batches").main(["--fast"])
    assert not math.isfinite(out["without"]) and out["with DivergenceRollback"] < 0.5


def test_dashboard_example_writes_event_files(tmp_path, capsys):
    out = load("tensorboard_dashboard").main(["--fast", "--logdir", str(tmp_path)])
    actions = {d.action.value for d in out["decisions"]}
    assert {"skip", "rollback", "lr_cut"} <= actions
    assert list(Path(out["log_dir"]).glob("events.out.tfevents.*"))
    assert capsys.readouterr().out.startswith(
        f"Training 400 steps with LRGuard (a spike, a plateau, a NaN, a blow-up), logging to {out['log_dir']}"
    )


def test_examples_write_each_run_to_a_fresh_folder_by_default(capsys):
    """A fixed default folder piles up ``version_N`` runs that overlay in TensorBoard and in ``lr-guard replay``."""
    import shutil

    example = load("replay_finished_run")
    first, second = example.main(["--fast"]), example.main(["--fast"])
    try:
        assert Path(first["log_dir"]).parent != Path(second["log_dir"]).parent
        for out in (first, second):
            assert Path(out["log_dir"]).name == "version_0"  # the only run in its folder
        assert f"logged to {first['log_dir']}" in capsys.readouterr().out
    finally:
        for out in (first, second):
            shutil.rmtree(Path(out["log_dir"]).parent.parent)


def test_replay_example(tmp_path, capsys):
    out = load("replay_finished_run").main(["--fast", "--logdir", str(tmp_path)])
    assert out["exit_code"] == 0
    text = capsys.readouterr().out
    assert "rollback" in text and "diagnostics written to" in text


def test_cli_example_builds_the_guard_from_yaml_and_trains():
    from lr_guard import LRGuard

    spec = importlib.util.spec_from_file_location("cli_train", EXAMPLES / "cli" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cli = module.main(["fit", "--config", str(EXAMPLES / "cli" / "config.yaml"), "--trainer.max_steps", "250"])
    [guard] = [c for c in cli.trainer.callbacks if isinstance(c, LRGuard)]
    assert guard.skip_batches == 5 and guard.detectors["spike"].threshold == 7.0
    assert (200, "skip") in [(d.event.step, d.action.value) for d in guard.decisions]  # the poisoned batch: gated
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_llm_example_rescues_the_too_high_warmup(capsys):
    out = load("llm_warmup_spike").main(["--fast"])
    assert out["with LRGuard"] < 3.0 and out["without a guard"] > 2 * out["with LRGuard"]
    printed = capsys.readouterr().out
    assert "[1/2] training without a guard" in printed and "[2/2] training with LRGuard" in printed
    decisions = " ".join(line.strip() for line in printed.splitlines() if line.startswith(" " * 18))
    assert "rolled back to step" in decisions and "(rollback 1 of 3" in decisions  # whole messages, not cut at 160


def test_rescue_benchmark_smoke(capsys, tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    means = load_benchmark("rescue").main(["--seeds", "1", "--steps", "200", "--scenarios", "healthy", "nan_inputs"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"healthy", "nan_inputs"} and math.isfinite(means["nan_inputs"]["lr_guard"])
    assert means["nan_inputs"]["none"] == math.inf
    assert list(tmp_path.iterdir()) == []  # nothing left in the working directory (no checkpoints, no logs)


def test_peak_train_loss_benchmark_reads_the_sweep_on_both_losses(capsys):
    means = load_benchmark("peak_train_loss").main(["--multiples", "1", "3", "--seeds", "1", "--steps", "60"])
    assert set(means) == {1.0, 3.0} and all(0.0 < v < 3.0 for pair in means.values() for v in pair)
    assert "training loss" in capsys.readouterr().out


def test_overhead_benchmark_times_the_policy_and_the_snapshots_inside_a_run():
    bench = load_benchmark("overhead")
    inside = bench.time_inside(bench.TinyMLP, "cpu", steps=120, warmup=10)
    assert inside["first_value_us"] > 0 and inside["other_values_us"] > 0 and inside["snapshot_us"] > 0
