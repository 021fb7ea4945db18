"""LightningCLI with the guard set up in YAML (see config.yaml beside this file).

python examples/cli/train.py fit --config examples/cli/config.yaml

LightningCLI needs ``jsonargparse[signatures]``: ``pip install -e '.[cli]'`` (lr_guard's ``cli`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence

from pytorch_lightning.cli import LightningCLI

from lr_guard.testing import TinyRegressionModule

INSTALL_HINT = "pip install 'lr_guard[cli]' (or, in a checkout, pip install -e '.[cli]')"


def main(argv: Sequence[str] | None = None) -> LightningCLI:
    try:
        return LightningCLI(
            TinyRegressionModule, args=list(argv) if argv is not None else None, save_config_callback=None
        )
    except ModuleNotFoundError as err:
        if "jsonargparse" not in str(err):
            raise
        # Lightning's own check of its CLI's requirement failed: one line on what to install, not a traceback
        raise SystemExit(f"examples/cli/train.py: LightningCLI needs jsonargparse[signatures]; {INSTALL_HINT}") from err


if __name__ == "__main__":
    main()
