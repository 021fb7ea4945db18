"""Real loss curves from public training logs, shipped for examples, tests and the replay command.

See ``curves/README.md`` for the source and the labels of each curve.
"""

from __future__ import annotations

import csv
from importlib import resources

__all__ = ["CURVES", "load_curve"]

CURVES = (
    "criteo_dlrm_warmup_divergence_inf_nan_algoperf",
    "ctc_conformer_stuck_plateau_algoperf",
    "lm_gpt2_124m_llmc_healthy",
    "lm_gpt2_124m_modded_muon_dataspike",
    "lm_gpt2_124m_scaleshortcuts_spikes",
    "resnet110_cifar10_steplr_per_epoch",
    "vit_imagenet_noisy_upper_tail_algoperf",
)


def load_curve(name: str) -> list[tuple[int, float]]:
    """The ``(step, loss)`` pairs of one bundled curve; non-finite losses are kept as ``nan``/``inf``."""
    if name not in CURVES:
        raise ValueError(f"no bundled curve named {name!r}; the curves are: {', '.join(CURVES)}")
    with (resources.files(__package__) / "curves" / f"{name}.csv").open() as f:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]
