"""The open core: a user's detector plugs into the guard with no edit to the package; the settings are one
validated configuration shared by the callbacks, their presets and replay; the policy owns its counters."""

import math
import re
import sys
import types
from pathlib import Path

import pytest
from conftest import make_trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lr_guard import Detector, DivergenceRollback, Event, LRGuard, PlateauDetector, PlateauLRReducer, SpikeDetector
from lr_guard.config import GuardConfig
from lr_guard.diagnostics import DECISIONS_TAG
from lr_guard.policy import GuardPolicy
from lr_guard.replay import replay
from lr_guard.testing import ScriptedLossModule, check_detector

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> dict:
    """Run the README's "Writing your own detector" example as a module (its classes pickle); its namespace."""
    text = README.read_text()
    code = re.search(r"<!-- readme-detector-example -->\n```python\n(.*?)```", text, re.DOTALL).group(1)
    module = types.ModuleType("readme_example")
    sys.modules[module.__name__] = module
    exec(compile(code, "README.md", "exec"), module.__dict__)
    return module.__dict__


def worse_than_chance_at(step: int, n: int = 120, lasting: int = 1) -> list[float]:
    """A healthy decaying loss with ``lasting`` values from ``step`` above ln 256 (5.55) but under 10x the best:
    the built-in divergence detector does not roll back on them (the spike detector logs them)."""
    values = [2.0 / (1.0 + 0.02 * t) for t in range(n)]
    values[step : step + lasting] = [6.0] * lasting
    return values


def test_the_readme_detector_rolls_back_and_shows_everywhere(tmp_path):
    """The README's detector beside the defaults: the update gate skips the first three updates of a jump above
    chance (at most 3 in a row), and the detector rolls back on the fourth value, which the gate lets through."""
    example = readme_example()
    guard = example["guard"]
    assert "above_chance" in guard.detectors and guard.settings()["detectors"][0].startswith("AboveChanceDetector(")
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    # the gate skips the first outliers of a change (at most 3 in a row) and leaves a lasting one to the detectors
    values = worse_than_chance_at(70, lasting=6)
    make_trainer([guard], max_steps=len(values), logger=logger, log_every_n_steps=1).fit(
        ScriptedLossModule(values, optimizer="adam", lr=0.01)
    )
    seen = [(d.event.step, d.event.detector, d.action.value) for d in guard.decisions]
    assert seen == [(70, "gate", "skip"), (71, "gate", "skip"), (72, "gate", "skip"), (73, "above_chance", "rollback")]
    rollbacks = [d for d in guard.decisions if d.action.value == "rollback"]
    assert "worse than chance" in rollbacks[0].message and guard.counts["divergence"] == 1
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert {"lr_guard/above_chance/score", "lr_guard/above_chance/threshold"} <= set(acc.Tags()["scalars"])
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{DECISIONS_TAG}/text_summary")]
    assert any("worse than chance" in t for t in texts)

    # the replay runs the same detector (a fresh one) on the logged losses; it does not replay the gate (which
    # acts on updates, not on a log), so it rolls back at the first value above chance: one such value here
    fresh = example["AboveChanceDetector"](ceiling=math.log(256), name="above_chance")
    values = worse_than_chance_at(70)
    result = replay(list(enumerate(values)), {"detectors": [fresh]}, max_steps=len(values))
    assert [(r.step, r.action) for r in result.rows if r.action == "rollback"] == [(70, "rollback")]


def test_the_readme_detector_keeps_the_detector_contract():
    example = readme_example()
    stream = [2.0 / (1.0 + 0.01 * t) for t in range(3000)]
    stream[2000] = 7.0
    check_detector(lambda: example["AboveChanceDetector"](ceiling=5.0), stream=stream)


class FrozenBatchDetector(Detector):
    """A new kind: the same loss, to the bit, for ``repeats`` steps in a row (a data loader stuck on a batch)."""

    kind = "frozen_batch"
    _STATE_FIELDS = ("_n", "_last", "_same")

    def __init__(self, repeats: int = 5, name: str | None = None, signal: str = "loss") -> None:
        self.repeats = repeats
        super().__init__(name, signal)

    def _reset(self) -> None:
        self._n, self._last, self._same = 0, math.nan, 0

    def update(self, value: float, step: int) -> Event | None:
        value = float(value)
        self._same = self._same + 1 if value == self._last else 0
        self._n, self._last = self._n + 1, value
        if self._same == self.repeats:
            return Event(self.kind, step, value, float(self._same), float(self.repeats), self.name, f"step {step}")
        return None


def test_a_new_kind_is_counted_and_logged_under_its_own_name():
    values = [2.0 / (1.0 + 0.02 * t) for t in range(80)]
    values[40:47] = [values[40]] * 7
    guard = LRGuard(detectors=[FrozenBatchDetector()], verbose=False)
    make_trainer([guard], max_steps=len(values)).fit(ScriptedLossModule(values, optimizer="adam", lr=0.01))
    frozen = [d for d in guard.decisions if d.event.kind == "frozen_batch"]
    assert [(d.event.step, d.action.value) for d in frozen] == [(45, "none")]
    assert guard.counts["frozen_batch"] == 1 and guard.counts["rollbacks"] == 0
    result = replay(list(enumerate(values)), {"detectors": [FrozenBatchDetector()]})
    assert [(r.step, r.kind, r.action) for r in result.rows if r.kind == "frozen_batch"] == [
        (45, "frozen_batch", "none")
    ]


def test_a_detector_of_another_signal_reads_the_logged_metric():
    class LogsGradNorm(ScriptedLossModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("grad_proxy", 100.0 if self.global_step == 60 else 1.0)
            return loss

    detector = SpikeDetector(name="grad_spike", signal="grad_proxy", warmup_steps=10)
    guard = LRGuard(detectors=[detector], verbose=False)
    values = [2.0 / (1.0 + 0.02 * t) for t in range(100)]
    make_trainer([guard], max_steps=len(values)).fit(LogsGradNorm(values, optimizer="adam", lr=0.01))
    assert [(d.event.step, d.event.detector) for d in guard.decisions] == [(60, "grad_spike")]
    assert guard.detectors["grad_spike"].n_updates == len(values)


def test_detectors_are_checked_at_construction():
    with pytest.raises(
        TypeError,
        match=r"spike must be a SpikeDetector, True or False; got a PlateauDetector.*"
        r"detectors=\[\.\.\.\]",
    ):
        LRGuard(gate=False, spike=PlateauDetector())
    with pytest.raises(ValueError, match="two detectors are named 'plateau'"):
        LRGuard(gate=False, detectors=[PlateauDetector(name="plateau")])
    with pytest.raises(TypeError, match="detectors must hold lr_guard Detector instances"):
        LRGuard(gate=False, detectors=["spike"])
    with pytest.raises(TypeError, match="must set the class attribute kind"):

        class NoKind(Detector):
            def _reset(self):
                pass

            def update(self, value, step):
                return None

        NoKind()
    with pytest.raises(ValueError, match="signal must be a non-empty name"):
        SpikeDetector(signal="a/b")


def test_settings_are_validated_when_changed_and_presets_share_them():
    guard = LRGuard()
    with pytest.raises(ValueError, match=r"rollback_factor must be in \(0.0, 1.0\), got 2.0"):
        guard.rollback_factor = 2.0
    with pytest.raises(TypeError, match="skip_batches must be an int"):
        guard.skip_batches = 1.5
    reducer = PlateauLRReducer()
    reducer.factor = 0.1  # one source of truth: the policy uses it, the logged configuration shows it
    assert reducer.policy.config.plateau_factor == 0.1 and reducer.settings()["factor"] == 0.1
    rollback = DivergenceRollback(factor=0.25, snapshot_device="disk", snapshot_memory_budget=10**9)
    assert rollback.policy.config.rollback_factor == 0.25 and rollback.snapshot_device == "disk"
    with pytest.raises(AttributeError, match="GuardConfig has no setting 'rolback'"):
        GuardConfig().rolback = True  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="check_on='validation' needs monitor="):
        LRGuard(check_on="validation")


def test_the_policy_counts_its_own_outcomes():
    from lr_guard import DivergenceDetector

    policy = GuardPolicy({"divergence": DivergenceDetector()}, GuardConfig(skip_batches=2, snapshot_every=10))
    policy.start(0)
    for t in range(20):
        policy.observe(t, 2.0 - 0.01 * t)
    (intent,) = policy.observe(20, math.nan)
    assert intent.action.value == "rollback" and policy.skip_left == 2
    assert policy.should_skip(21) and policy.should_skip(22) and not policy.should_skip(23)
    assert policy.counts["skipped_batches"] == 2 and policy.counts["rollbacks"] == 1
    assert policy.state_dict()["skip_left"] == 0


def test_a_setting_changed_during_a_run_takes_effect_at_once():
    import pytorch_lightning as pl

    class TurnOnSkipping(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 20:
                guard.skip_spikes = True

    values = [2.0 / (1.0 + 0.02 * t) for t in range(80)]
    values[50] *= 8.0
    guard = LRGuard(verbose=False)
    make_trainer([TurnOnSkipping(), guard], max_steps=len(values)).fit(
        ScriptedLossModule(values, optimizer="adam", lr=0.01)
    )
    assert [(d.event.step, d.action.value) for d in guard.decisions] == [(50, "skip")]
    assert guard.counts["skipped_batches"] == 1


def test_skip_spikes_needs_the_spike_detector_on_the_loss():
    with pytest.raises(ValueError, match="skip_spikes=True needs the spike detector on the loss"):
        LRGuard(spike=SpikeDetector(signal="grad_norm"), skip_spikes=True)
    with pytest.raises(ValueError, match="skip_spikes=True needs the spike detector"):
        LRGuard(spike=False, skip_spikes=True)


def test_the_policy_takes_any_number_for_the_loss():
    import numpy as np

    policy = GuardPolicy({"spike": SpikeDetector()}, GuardConfig())
    policy.start(0)
    assert policy.observe(0, np.float32(1.0)) == [] and policy.observe(1, 2) == []
    assert policy.detectors["spike"].n_updates == 2


def test_replay_refuses_detectors_of_another_signal():
    from lr_guard.replay import ReplayError

    with pytest.raises(ReplayError, match="a replay reads one series, the loss; .*signal='grad_norm'"):
        replay([(0, 1.0), (1, 1.0)], {"detectors": [SpikeDetector(name="g", signal="grad_norm")]})
    with pytest.raises(ReplayError, match="steps_per_epoch must be a positive number of steps, got 0"):
        replay([(0, 1.0)], steps_per_epoch=0)
