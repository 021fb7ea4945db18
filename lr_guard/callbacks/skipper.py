"""Skipping an optimizer update on a live run before it lands: the policy's skips (after a rollback, and with
``skip_spikes``) and the update gate's verdicts. A skipped update drops the gradients (torch's optimizers then
touch neither the parameters nor their state) and puts back the buffers the batch's forward pass changed
(BatchNorm statistics)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from lr_guard.actions import drop_gradients, restore_buffers, save_buffers
from lr_guard.actions.gate import (
    CLIPPED,
    SKIPPED,
    UpdateGate,
    fuse_for_the_gate,
    grad_norm,
    grads_of,
    host_grad_norm,
    scale_update,
    supports_found_inf,
)
from lr_guard.callbacks.feed import ValueFeed
from lr_guard.policy import GATE, GRAD_NORM, GuardPolicy

__all__ = ["UpdateSkipper"]

log = logging.getLogger("lr_guard")


class UpdateSkipper:
    """Decides, before an optimizer step, whether its update is to be skipped, and skips it.

    The guard calls it at every step while a skip may come: skips left after a rollback, ``skip_spikes``, or an
    update gate. With ``skip_spikes`` or a gate that scores the loss, the step's loss is summed over its
    micro-batches as they are backpropagated. ``skip_spikes`` reads it before the step (one host sync per step;
    under DDP the mean over ranks, so every rank skips alike). The gate's verdict and the gradient norm go to the
    feed with the step's other values.
    """

    def __init__(self, policy: GuardPolicy, feed: ValueFeed, gate: UpdateGate | None) -> None:
        self.policy = policy
        self.feed = feed
        self.gate = gate
        self.gate_state: dict[str, Any] | None = None  # a checkpoint's gate state, loaded when the run starts
        self.reset()

    def reset(self, world_size: int = 1) -> None:
        self._has_buffers: bool | None = None  # known at the first batch: buffers do not come and go in a run
        self._buffers: dict[str, torch.Tensor] | None = None
        self._step_loss: torch.Tensor | None = None
        self._found_inf: list[Any] = []  # optimizers handed a found_inf for their coming step
        self._fused: set[int] = set()  # ids of the optimizers the gate switched to fused=True (said once)
        self._not_fusable: set[int] = set()  # ids of those it cannot switch (their verdict is read on the host)
        self._stood_aside: set[int] = set()  # ids of those the default gate does not gate on the device (said once)
        self._gate_loss = self.gate is not None and self.gate.use_loss and world_size == 1
        if self.gate is not None:
            self.gate.reset()
            if self.gate_state is not None:
                self.gate.load_state_dict(self.gate_state)
                self.gate_state = None

    @property
    def needs_loss(self) -> bool:
        """The step's loss is to be summed as it is backpropagated."""
        return self.policy.config.skip_spikes or self._gate_loss

    def batch_start(self, module: Any) -> None:
        """Keep the buffers while a skip may come."""
        if self._has_buffers is None:
            self._has_buffers = any(True for _ in module.buffers())
        if self._has_buffers and self._buffers is None:
            self._buffers = save_buffers(module)

    def backward(self, loss: torch.Tensor) -> None:
        """Sum the step's loss over its micro-batches."""
        loss = loss.detach()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss  # add: accumulation only

    def before_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        step_loss, self._step_loss = self._step_loss, None
        read = None
        if step_loss is not None and self.policy.config.skip_spikes:
            read = lambda: float(self.feed.agreed(trainer, step_loss))  # noqa: E731
        skip = self.policy.should_skip(step, read)
        grads = grads_of(optimizer) if not skip and self.gate is not None else []
        if grads:  # no gradient at all (training_step returned None): no update to score
            assert self.gate is not None
            if self.gate.uses_device(grads[0].device):
                skip = self._gate_on_device(trainer, step, step_loss, optimizer, module, grads)
            else:
                skip = self._gate(step, step_loss, grads)
        if skip and not self.policy.config.dry_run:  # a dry run only says what it would skip
            drop_gradients(optimizer)
            if self._buffers is not None:
                restore_buffers(module, self._buffers)
        self._buffers = None

    def _gate(self, step: int, step_loss: torch.Tensor | None, grads: list[torch.Tensor]) -> bool:
        """The gate's verdict on this step, read on the host, handed to the feed with the gradient norm."""
        assert self.gate is not None
        norm = host_grad_norm(grads)
        loss = float(step_loss) if step_loss is not None and self._gate_loss else None
        code = self.gate.decide(loss, norm)
        self.feed.add(step, GRAD_NORM, norm)
        self.feed.add(step, GATE, float(code))
        if code == CLIPPED:
            scale_update(grads, self.gate.last_scale)
        return code in SKIPPED

    def _gate_on_device(
        self, trainer: Any, step: int, step_loss: torch.Tensor | None, optimizer: Any, module: Any, grads: Any
    ) -> bool:
        """The gate's verdict decided beside the gradients. A fused Adam, AdamW or SGD (without a GradScaler,
        which sets ``found_inf`` itself) skips its own step on the device; the buffers are put back there too, and
        nothing is read on the host. Any other optimizer needs the verdict on the host: one read (a host sync on
        a GPU), made only with ``UpdateGate(sync_fallback=True)``; otherwise the gate stands aside for it."""
        assert self.gate is not None
        on_device = supports_found_inf(optimizer)  # checked each step: a rollback loads the groups it saved
        if not on_device and self.gate.fuse and id(optimizer) not in self._not_fusable:
            on_device = fuse_for_the_gate(optimizer)
            if not on_device:
                self._not_fusable.add(id(optimizer))
            elif id(optimizer) not in self._fused:
                self._fused.add(id(optimizer))
                log.info(
                    "lr_guard: the update gate switched %s to fused=True, so that a bad update is skipped on the "
                    "device with no host sync (UpdateGate(fuse=False) keeps your implementation)",
                    type(optimizer).__name__,
                )
        on_device = on_device and getattr(trainer.precision_plugin, "scaler", None) is None
        if not on_device and not self.gate.sync_fallback:  # the default gate never syncs: it stands aside
            if id(optimizer) not in self._stood_aside:
                self._stood_aside.add(id(optimizer))
                log.info(
                    "lr_guard: the update gate stands aside for %s: it cannot skip its step on the device (only "
                    "torch's fused Adam, AdamW and SGD can, without a GradScaler), and reading the verdict on the "
                    "host would sync every step. UpdateGate(sync_fallback=True) reads it; the detectors still "
                    "watch the loss and roll back",
                    type(optimizer).__name__,
                )
            return False
        norm = grad_norm(grads)
        loss = step_loss if self._gate_loss else None
        code, scale = self.gate.decide_on_device(loss, norm)
        self.feed.add(step, GRAD_NORM, norm)
        self.feed.add(step, GATE, code)
        if self.gate.mode == "clip":
            torch._foreach_mul_(list(grads), scale)
        skip = (code >= SKIPPED[0]) & (code <= SKIPPED[-1])
        if on_device:
            optimizer.found_inf = skip.float()  # read by the fused step: it leaves everything as it was
            self._found_inf.append(optimizer)
            if self._buffers is not None:
                restore_buffers(module, self._buffers, where=skip)
            return False
        return bool(skip)  # the fallback: the verdict read on the host

    def after_step(self) -> None:
        """The optimizer steps are done: take back the ``found_inf`` handed to them (the next step gets its own)."""
        for optimizer in self._found_inf:
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
        self._found_inf = []
