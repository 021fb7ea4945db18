"""What a person sees on the console: every decision on a line of its own, beside a progress bar, with no logging
set-up; and the sentences themselves, which say what was done and why."""

import logging
import math
import re
import sys

import pytest
import torch
from conftest import make_trainer

from lr_guard import LRGuard, PlateauDetector, PlateauLRReducer
from lr_guard.callbacks.console import ConsoleHandler
from lr_guard.events import Action
from lr_guard.replay import format_table, replay
from lr_guard.testing import ScriptedLossModule

GUARD_LOG = logging.getLogger("lr_guard")


@pytest.fixture
def plain_script(monkeypatch, capsys):
    """A script run as a new user runs it: the ``lr_guard`` logger as Python leaves it, and stdout and stderr on
    one terminal (as in a shell). Each test takes pytest's own root handlers away (:func:`_no_logging_set_up`):
    pytest adds them, and its capture, after the fixtures are set up."""
    monkeypatch.setattr(GUARD_LOG, "handlers", [])
    monkeypatch.setattr(GUARD_LOG, "propagate", True)
    level = GUARD_LOG.level
    GUARD_LOG.setLevel(logging.NOTSET)
    yield capsys
    GUARD_LOG.setLevel(level)


def _no_logging_set_up(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(sys, "stderr", sys.stdout)  # one terminal for both (pytest's capture is set by now)


def _rendered(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: a carriage return moves back to the start of the line, and what
    follows overwrites what was there."""
    lines = []
    for raw in text.split("\n"):
        shown: list[str] = []
        for part in raw.split("\r"):
            shown[: len(part)] = part
        lines.append("".join(shown).rstrip())
    return lines


def _plateau_then_nan_module():
    script = [1.0 - 0.01 * t + 0.002 * (t % 3) for t in range(40)] + [0.62 + 0.002 * (t % 3) for t in range(30)]
    script[55] = math.nan
    return ScriptedLossModule(script)


def _guard(**kwargs):
    plateau = PlateauDetector(patience=8, window=1, noise_sigmas=0, warmup_steps=0)
    return LRGuard(plateau=plateau, snapshot_every=10, check_every_n_steps=1, **{"gate": False, **kwargs})


def test_every_decision_reaches_the_console_on_its_own_line_beside_the_progress_bar(plain_script, monkeypatch):
    _no_logging_set_up(monkeypatch)
    guard = _guard()
    make_trainer([guard], max_steps=90, enable_progress_bar=True).fit(_plateau_then_nan_module())
    shown = _rendered(plain_script.readouterr().out)
    actions = {d.action for d in guard.decisions}
    assert {Action.LR_CUT, Action.ROLLBACK} <= actions  # INFO (cuts) and WARNING (rollbacks) alike
    for decision in guard.decisions:
        assert f"lr_guard: {decision.message}" in shown, f"not on a line of its own: {decision.message}"
    assert sum(isinstance(h, ConsoleHandler) for h in GUARD_LOG.handlers) == 1


def test_the_console_handler_is_added_once_and_verbose_false_prints_nothing(plain_script, monkeypatch):
    _no_logging_set_up(monkeypatch)
    for _ in range(2):  # two guards, two fits
        make_trainer([_guard(), PlateauLRReducer()], max_steps=60).fit(_plateau_then_nan_module())
    assert sum(isinstance(h, ConsoleHandler) for h in GUARD_LOG.handlers) == 1
    plain_script.readouterr()
    make_trainer([_guard(verbose=False)], max_steps=60).fit(_plateau_then_nan_module())
    assert "lr_guard: step" not in plain_script.readouterr().out


def test_a_user_who_configured_logging_keeps_it(plain_script, monkeypatch):
    _no_logging_set_up(monkeypatch)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    GUARD_LOG.addHandler(handler)
    guard = _guard()
    make_trainer([guard], max_steps=60).fit(_plateau_then_nan_module())
    assert GUARD_LOG.handlers == [handler] and GUARD_LOG.propagate  # nothing added, propagation untouched
    assert "lr_guard: step" not in plain_script.readouterr().out
    assert any(r.levelno == logging.WARNING and "rolled back" in r.getMessage() for r in records)


def test_with_root_logging_set_up_the_lines_go_there_and_no_handler_is_added(plain_script, monkeypatch):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    guard = _guard()
    make_trainer([guard], max_steps=60).fit(_plateau_then_nan_module())
    assert not GUARD_LOG.handlers
    assert any(r.levelno == logging.INFO and "lr 0.05 -> 0.025" in r.getMessage() for r in records)


# -- the sentences ----------------------------------------------------------------------------------------------
def _decaying(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.05 * s))


def test_a_rollback_whose_lr_rises_says_it_is_the_schedules_lr_at_the_restored_step():
    script = [1.0 - 0.005 * t + 0.002 * (t % 3) for t in range(80)]
    script[55] = math.nan  # a bad batch after a calm stretch: the LR factor is kept
    guard = LRGuard(gate=False, plateau=False, snapshot_every=10, check_every_n_steps=8)
    make_trainer([guard], max_steps=70).fit(ScriptedLossModule(script, scheduler=_decaying))
    (rollback,) = [d for d in guard.decisions if d.action == Action.ROLLBACK]
    assert rollback.lr_after > rollback.lr_before
    assert f"the LR rises: the schedule's LR at step {rollback.rollback_to} is higher than at step" in rollback.message


def test_a_rollback_that_keeps_the_lr_says_kept_and_why():
    script = [1.0 - 0.005 * t + 0.002 * (t % 3) for t in range(80)]
    script[55] = math.nan
    guard = LRGuard(gate=False, plateau=False, snapshot_every=10, check_every_n_steps=8)
    make_trainer([guard], max_steps=70).fit(ScriptedLossModule(script))
    (rollback,) = [d for d in guard.decisions if d.action == Action.ROLLBACK]
    assert "lr 0.05 kept (rollback 1 of 3; LR factor kept: a sudden blow-up" in rollback.message
    assert "->" not in rollback.message


def test_a_failed_start_reads_as_a_rollback_with_the_loss_above_where_it_started():
    script = [1.0] + [1.03 + 0.002 * (t % 3) for t in range(80)]  # never better than the first value
    plateau = PlateauDetector(patience=10, window=5, noise_sigmas=0, warmup_steps=0)
    guard = LRGuard(plateau=plateau, spike=False, check_every_n_steps=1)
    make_trainer([guard], max_steps=40).fit(ScriptedLossModule(script))
    restart = guard.decisions[0]
    assert restart.action == Action.ROLLBACK  # TensorBoard shows "plateau → rollback": the console says it too
    assert re.search(
        r"rolled back to step 0, where training started, lr 0\.05 -> 0\.025 \(a failed start", restart.message
    )
    assert re.search(r"the loss is \d+\.\d% above where training started", restart.message)
    assert "improved only -" not in restart.message


def test_the_plateau_message_puts_the_mean_the_best_and_the_noise_margin_in_their_roles():
    guard = _guard()
    make_trainer([guard], max_steps=50).fit(_plateau_then_nan_module())
    cut = next(d for d in guard.decisions if d.event.kind == "plateau")
    assert re.search(
        r"no improvement for 9 values \(patience 8\): the mean of the last 1 values, 0\.62\d*, has not improved on "
        r"the best, 0\.61\d*, by more than the threshold",
        cut.message,
    ), cut.message
    noisy = PlateauDetector(patience=5, window=4, warmup_steps=0)
    events = [e for t, x in enumerate([1.0, 0.2, 1.0, 0.2] * 10) if (e := noisy.update(x, t))]
    assert "by more than the noise margin" in events[0].message


def test_replays_plateau_row_says_steps_without_improvement_against_patience_in_words():
    series = [(t, 1.0 - 0.01 * t) for t in range(20)] + [(t, 0.8) for t in range(20, 60)]
    settings = {"plateau": PlateauDetector(patience=12, window=1, noise_sigmas=0, warmup_steps=0)}
    table = format_table(replay(series, settings))
    row = next(line for line in table.splitlines() if " plateau " in line)
    assert "13 steps without improvement (patience 12)" in row
    assert re.search(r"plateau +0\.8 +lr_cut ", row), row  # no score and threshold columns for a count of steps
