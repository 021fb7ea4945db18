"""Nothing bad leaks out of the lag of the rollback path: weight averaging (EMA, SWA) beside the guard and the
checkpoints a run writes never hold the weights of the steps a rollback discards. Each on a real Trainer."""

import math

import pytest
import torch
from conftest import make_trainer
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging

from lr_guard import LRGuard
from lr_guard.events import Action
from lr_guard.testing import ScriptedLossModule, TinyRegressionModule


def rollbacks(guard):
    return [(d.step, d.rollback_to) for d in guard.decisions if d.action == Action.ROLLBACK]


def finite(module):
    return all(torch.isfinite(t).all() for t in module.state_dict().values())


class AverageRecorder(Callback):
    """The averaging callback's average (its tensors and ``n_averaged``) at the end of every optimizer step,
    after every other callback's hook (it is the last one)."""

    def __init__(self, averaging):
        self.averaging, self.at = averaging, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        average = self.averaging._average_model
        state = {k: v.detach().clone() for k, v in average.state_dict().items()}
        n_averaged = getattr(self.averaging, "n_averaged", None)
        if n_averaged is not None:
            state["n_averaged"] = n_averaged.clone()
        self.at[trainer.global_step] = state


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("guard_first", "device"), [(True, "cpu"), (False, "cpu"), (True, "disk")], ids=["guard_first", "ema_first", "disk"]
)
def test_ema_beside_the_guard_drops_the_discarded_steps_and_ends_finite(guard_first, device, tmp_path):
    """A NaN batch at step 45 is rolled back at the check of step 48 to the snapshot of step 40: the EMA has taken
    in the NaN weights by then. It is restored with the snapshot, so after step 48 it is exactly the EMA of step
    40 (as if steps 41-48 never happened), and the model Lightning copies it into at the end is finite."""

    guard = LRGuard(
        gate=False, snapshot_every=10, confirm_steps=3, snapshot_device=device, snapshot_dir=tmp_path, verbose=False
    )
    ema = EMAWeightAveraging(decay=0.9)
    recorder = AverageRecorder(ema)
    module = TinyRegressionModule(lr=0.05, seed=1, poison_steps=(45,))
    make_trainer([guard, ema, recorder] if guard_first else [ema, guard, recorder], max_steps=120).fit(module)
    assert rollbacks(guard) == [(48, 40)]
    assert same(recorder.at[48], recorder.at[40])
    assert all(torch.isfinite(t).all() for t in recorder.at[120].values())
    assert finite(module) and module.full_loss() < 0.5


def test_swa_beside_the_guard_drops_an_epoch_start_average_of_discarded_weights():
    """SWA takes in the weights at each epoch start (16 steps an epoch). A blow-up that builds from step 44 is
    found some steps into epoch 3: SWA has taken in the weights of the rise at the start of epoch 3 by then. The
    rollback to step 40 restores SWA's average and ``n_averaged`` to what they were at step 40."""
    script = [1.0 - 0.004 * i for i in range(100)]
    for t in range(44, 50):
        script[t] = script[43] * 1.5 ** (t - 43)
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3, check_every_n_steps=1, verbose=False)
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1, annealing_epochs=1)
    recorder = AverageRecorder(swa)
    module = ScriptedLossModule(script, lr=0.05)
    make_trainer([guard, swa, recorder], max_steps=-1, max_epochs=6).fit(module)
    (at, to), *_ = rollbacks(guard)
    assert to == 40 and at > 48
    assert same(recorder.at[at], recorder.at[40])  # the weights of the rise taken in at step 48 are gone
    assert finite(module)


@pytest.mark.parametrize("gate", [False, True], ids=["rollback_path", "gate"])
def test_a_checkpoint_written_in_the_lag_of_a_nan_holds_checked_weights_and_resumes(tmp_path, gate):
    """A NaN batch at step 45; the guard checks every 8 steps, so the NaN is seen at step 48. A ModelCheckpoint
    fires at step 47, inside that lag: the guard checks every value gathered first, so the rollback (or with the
    gate, the skip) has happened before the file is written. Its weights are finite, and a run resumed from it
    goes on with no further rollback."""
    guard = LRGuard(snapshot_every=10, confirm_steps=3, gate=gate, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=47, save_top_k=-1, filename="{step}")
    module = TinyRegressionModule(lr=0.05, seed=1, poison_steps=(45,))
    make_trainer([guard, checkpoint], max_steps=60, enable_checkpointing=True).fit(module)
    expected = [(45, "skip")] if gate else [(45, "rollback")]
    assert [(d.event.step, d.action.value) for d in guard.decisions] == expected
    if not gate:
        assert guard.decisions[0].step == 47  # at the forced check of the save, not at the check of step 48
    path = tmp_path / "step=47.ckpt"
    saved = torch.load(path, weights_only=False)
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    assert saved["callbacks"][guard.state_key]["counts"]["rollbacks"] == (0 if gate else 1)
    resumed_guard = LRGuard(snapshot_every=10, confirm_steps=3, gate=gate, verbose=False)
    resumed = TinyRegressionModule(lr=0.05, seed=1)
    make_trainer([resumed_guard], max_steps=80).fit(resumed, ckpt_path=path)
    assert rollbacks(resumed_guard) == [] and finite(resumed)
    assert math.isfinite(resumed.full_loss())


class ValidatedRegression(TinyRegressionModule):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=64)


@pytest.mark.parametrize("when", ["every_n_train_steps", "validation"])
def test_a_weights_only_checkpoint_written_in_the_lag_of_a_nan_holds_checked_weights(tmp_path, when):
    """A weights-only ModelCheckpoint does not ask the guard for its state as it saves, so nothing would check the
    values gathered since the last check. The guard checks them in the hook before each such save (at its
    ``every_n_train_steps``, and after each validation run): the NaN of step 45, inside the lag of the checks
    every 8 steps, is rolled back at step 47 and the file holds finite weights. The rollback path is tested (no
    gate): with the gate on the NaN update never lands."""
    guard = LRGuard(snapshot_every=10, confirm_steps=3, gate=False, verbose=False)
    if when == "every_n_train_steps":
        checkpoint = ModelCheckpoint(
            dirpath=tmp_path, every_n_train_steps=47, save_top_k=-1, filename="{step}", save_weights_only=True
        )
        extra = {}
    else:
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{step}", save_weights_only=True)
        extra = {"val_check_interval": 47, "check_val_every_n_epoch": None, "limit_val_batches": 1}
    kind = ValidatedRegression if when == "validation" else TinyRegressionModule
    module = kind(lr=0.05, seed=1, poison_steps=(45,))
    make_trainer([guard, checkpoint], max_steps=60, enable_checkpointing=True, **extra).fit(module)
    assert [(d.event.step, d.action.value, d.step) for d in guard.decisions] == [(45, "rollback", 47)]
    saved = torch.load(tmp_path / "step=47.ckpt", weights_only=False)
    assert "callbacks" not in saved  # weights only
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
