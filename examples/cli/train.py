"""LightningCLI with the guard set up in YAML (see config.yaml beside this file).

python examples/cli/train.py fit --config examples/cli/config.yaml
"""

from __future__ import annotations

from collections.abc import Sequence

from pytorch_lightning.cli import LightningCLI

from lr_guard.testing import TinyRegressionModule


def main(argv: Sequence[str] | None = None) -> LightningCLI:
    return LightningCLI(TinyRegressionModule, args=list(argv) if argv is not None else None, save_config_callback=None)


if __name__ == "__main__":
    main()
