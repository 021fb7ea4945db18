"""An LLM-style loop: a small causal transformer warmed up to a peak LR past what it can take.

Character-level language model on text that ships with Python (the stdlib's own module docstrings: no download).
The LR warms up to 0.1 with Adam -- too high for this model -- and the loss spikes and blows up. ``LRGuard``
flags the spikes, rolls back to the last good state when the loss diverges, caps the LR at 0.1 x the LR at which
the trouble began (the replayed warm-up rises to the cap and stays there) and skips a few batches; the run carries
on at a peak it can take.

    python examples/llm_warmup_spike.py [--fast]
"""

from __future__ import annotations

import argparse
import logging
import math
import textwrap
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim import lr_scheduler as S
from torch.utils.data import DataLoader, TensorDataset

from lr_guard import LRGuard


def corpus(chars: int = 200_000) -> torch.Tensor:
    import collections
    import csv
    import json

    text = "\n".join(m.__doc__ or "" for m in (collections, csv, json, argparse, logging, math, warnings, pl))
    text = (text * (chars // max(1, len(text)) + 1))[:chars]
    return torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)


class TinyGPT(pl.LightningModule):
    def __init__(self, peak_lr: float, steps: int, seq: int = 64, width: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, width)
        self.pos = nn.Parameter(torch.zeros(seq, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 128)
        self.peak_lr, self.steps, self.seq = peak_lr, steps, seq
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq - 1), persistent=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens = batch[0]
        h = self.blocks(self.embed(tokens[:, :-1]) + self.pos[: self.seq - 1], mask=self.mask, is_causal=True)
        loss = nn.functional.cross_entropy(self.head(h).flatten(0, 1), tokens[:, 1:].flatten())
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        data = corpus()
        n = (len(data) // self.seq) * self.seq
        return DataLoader(
            TensorDataset(data[:n].view(-1, self.seq)),
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.peak_lr)
        warmup = self.steps // 5
        sched = S.SequentialLR(
            opt, [S.LinearLR(opt, 0.01, 1.0, warmup), S.CosineAnnealingLR(opt, self.steps)], [warmup]
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--peak-lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lr_guard").setLevel(logging.ERROR)  # the decisions are printed below
    torch.set_num_threads(1)
    steps = 150 if args.fast else 600
    results = {}
    runs = (("without a guard", []), ("with LRGuard", [LRGuard(skip_batches=3, snapshot_every=20)]))
    print(f"A small causal transformer, {steps} steps of Adam warmed up to a peak LR of {args.peak_lr}: two runs.")
    for i, (name, callbacks) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] training {name} ...", flush=True)
        pl.seed_everything(0, verbose=False)
        model = TinyGPT(args.peak_lr, steps)
        losses: list[float] = []

        class Record(pl.Callback):
            def __init__(self, sink: list[float]) -> None:
                self.sink = sink

            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, idx: int) -> None:
                self.sink.append(float(outputs["loss"]))

        pl.Trainer(
            max_steps=steps,
            callbacks=[*callbacks, Record(losses)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(model)
        tail = [x for x in losses[-20:] if math.isfinite(x)]
        results[name] = sum(tail) / len(tail) if tail else math.inf
        print(f"{name:>16}: mean loss over the last 20 steps {results[name]:.3f}")
        for guard in callbacks:
            for d in guard.decisions:
                print(textwrap.fill(d.message, width=118, initial_indent=" " * 18, subsequent_indent=" " * 20))
    return results


if __name__ == "__main__":
    main()
