"""What a person installs for each part, and what they are told when a part is missing or mismatched.

The ``lightning`` extra serves ``lr_guard.lightning``, the ``cli`` extra LightningCLI; the README names each where it
is used, and the dev extra takes both in, so the tests that need them have them.
"""

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from conftest import make_trainer
from test_guard import _lightning_scripted, decaying

from lr_guard import Action, LRGuard

ROOT = Path(__file__).resolve().parent.parent
CLI_EXAMPLE = ROOT / "examples" / "cli" / "train.py"


def test_the_extras_the_readme_names_are_declared_and_the_dev_extra_takes_them_in():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("lightning>=") for r in extras["lightning"])
    assert any(r.startswith("jsonargparse[signatures]>=") for r in extras["cli"])
    assert "lr_guard[lightning,cli]" in extras["dev"]
    readme = (ROOT / "README.md").read_text()
    for extra, where in (("lightning", "lr_guard.lightning"), ("cli", "LightningCLI")):
        install = f"pip install 'lr_guard[{extra}]'"
        assert install in readme
        # named where the part is used: within the paragraph that introduces it
        assert any(install in p and where in p for p in readme.split("\n\n")), (extra, where)


def test_lr_guard_lightning_without_the_lightning_package_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)  # as if the package were not installed
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "lr_guard.lightning", raising=False)
    with pytest.raises(ImportError, match=re.escape("pip install 'lr_guard[lightning]'")) as info:
        importlib.import_module("lr_guard.lightning")
    assert "lr_guard.LRGuard" in str(info.value)  # and the class that works without it


def test_the_cli_example_without_jsonargparse_says_what_to_install_in_one_line(monkeypatch):
    import pytorch_lightning.cli
    from lightning_utilities.core.imports import RequirementCache

    # Lightning's own check of its CLI's requirement, made to fail as on a machine without jsonargparse
    monkeypatch.setattr(
        pytorch_lightning.cli, "_JSONARGPARSE_SIGNATURES_AVAILABLE", RequirementCache("jsonargparse>=999")
    )
    spec = importlib.util.spec_from_file_location("cli_train", CLI_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as info:
        module.main(["fit", "--config", str(CLI_EXAMPLE.parent / "config.yaml")])
    message = str(info.value.code)
    assert "\n" not in message and "jsonargparse[signatures]" in message and "lr_guard[cli]" in message


def test_a_lightning_pytorch_trainer_runs_the_pytorch_lightning_class(monkeypatch):
    """Lightning's Trainer checks no callback's base class: ``lr_guard.LRGuard`` rescues a ``lightning.pytorch``
    run too. Only the type-checked CLI refuses it (below)."""
    import lightning.pytorch as L

    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    make_trainer([guard], max_steps=40, trainer_class=L.Trainer).fit(_lightning_scripted(decaying(nan_at=[25])))
    assert [(d.action, d.rollback_to) for d in guard.decisions] == [(Action.ROLLBACK, 20)]


def test_a_lightning_pytorch_cli_config_naming_lr_guard_LRGuard_fails_with_the_error_the_readme_explains(
    tmp_path, capsys
):
    """jsonargparse's test (``issubclass(lr_guard.LRGuard, lightning.pytorch.Callback)``) runs before any code of
    the guard's, so the hint lives where a person looks the error up: the README, beside the YAML, and the example
    config. The test pins the line jsonargparse prints, so the README's quote of it stays true."""
    import lightning.pytorch as L
    from lightning.pytorch.cli import LightningCLI

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.1):
            super().__init__()

    config = tmp_path / "config.yaml"
    config.write_text("trainer:\n  logger: false\n  callbacks:\n    - class_path: lr_guard.LRGuard\n")
    with pytest.raises(SystemExit):
        LightningCLI(Module, run=False, args=["--config", str(config)], save_config_callback=None)
    error = "Import path lr_guard.LRGuard does not correspond to a subclass of Callback"
    assert error in capsys.readouterr().err
    readme = (ROOT / "README.md").read_text()
    [paragraph] = [p for p in readme.split("\n\n") if error in p]
    assert "lr_guard.lightning.LRGuard" in paragraph and "lightning.pytorch" in paragraph
    assert "lr_guard.lightning.LRGuard" in (CLI_EXAMPLE.parent / "config.yaml").read_text()
