"""Examples are tests: each example's main() runs here in its fast mode."""

import importlib.util
import math
from pathlib import Path

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
    assert "rolled back to step" in out and f"tensorboard --logdir {tmp_path}" in out
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
        results = load_benchmark().main(["--streams", "2", "--steps", "3000"])
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


def load_benchmark():
    spec = importlib.util.spec_from_file_location("detection", EXAMPLES.parent / "benchmarks" / "detection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_benchmark_runs_and_reports_its_keys(capsys):
    import json

    summary = _bench("overhead").main(["--steps", "60", "--repeats", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(summary))
    assert {"cpu_overhead_pct", "guard_us_per_step"} <= set(last) and last["guard_us_per_step"] > 0


def test_snapshot_benchmark_runs_and_reports_its_keys(capsys):
    import json

    summary = _bench("snapshot").main(["--sizes-mb", "4", "--repeats", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"snapshot_gbps", "restore_gbps", "pinned_copy_gbps"} <= set(last) == set(summary)
    assert last["snapshot_gbps"] > 0 and last["restore_gbps"] > 0
