"""The update gate: before each optimizer step, score the step's loss and gradient norm and stop a bad update
before it lands.

At every optimizer step -- after backward (after accumulation; after unscaling under AMP) and before the update
-- the gate scores ``y = log(value)`` of the step's loss and of its global gradient norm against robust trailing
statistics of the steps it let through: its change from the last value let through, in units of the typical
change (``1.2533 * EMA(|dy|)``, at least ``min_noise``), the band updated with the value clipped to it (a spike
does not drag the baseline it is measured against). Scoring changes, not the distance from an average, keeps a
trending stream (a warm-up raising the gradient norm, a falling loss) inside its band. A non-finite loss or
gradient skips the update; a value more than ``threshold`` noise scales above the last one let through is an
outlier, whose update is skipped (``mode="skip"``) or, for the gradient norm, scaled down to
the band's edge (``mode="clip"``; a loss outlier is still skipped). No outlier is called during the first
``warmup_steps`` steps, and after ``max_consecutive`` outliers in a row the next one goes through and the bands
move to it: a lasting change is not an isolated bad batch, and is the detectors' to judge, whole.

A skip leaves the weights and the optimizer state exactly as they were: every gradient is set to ``None``, and
torch's optimizers then touch neither the parameters nor their state (moments, step counts, weight decay). On a
CUDA device, torch's fused Adam, AdamW and SGD skip on the device instead, through the ``found_inf`` argument they
take (how ``GradScaler`` skips an overflow step): the gate's statistics then live in tensors and nothing is read
on the host. Other optimizers on a CUDA device read the gate's verdict on the host, one sync per step.

The verdict of each step is a code (:mod:`lr_guard.skips`: ``APPLIED``, ``NON_FINITE``, ``LOSS_OUTLIER``,
``GRAD_OUTLIER``, ``CLIPPED``), handed to the guard with the step's values, so that every skip is recorded with
its reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lr_guard.detectors.base import NoiseScale, check_choice, check_number
from lr_guard.skips import APPLIED, CLIPPED, GRAD_OUTLIER, LOSS_OUTLIER, NON_FINITE, SKIPPED

__all__ = [
    "APPLIED",
    "CLIPPED",
    "GRAD_OUTLIER",
    "LOSS_OUTLIER",
    "NON_FINITE",
    "SKIPPED",
    "UpdateGate",
    "fuse_for_the_gate",
    "grad_norm",
    "grads_of",
    "host_grad_norm",
    "scale_update",
    "sharded_norm",
    "supports_found_inf",
]

_FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
_CHANGE = 1.2533 / 0.886  # a step's change has sqrt(2) times the noise of a value: 1.2533 * EMA(|dy|) in all


def grads_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads``, as a 0-d float tensor on their device (nothing is read on the host).
    Sharded gradients (``DTensor`` s, under FSDP2) give the norm over every rank's shards (:func:`sharded_norm`)."""
    if not grads:
        return torch.zeros(())
    if _is_dtensor(grads[0]):
        return sharded_norm(grads)
    norms = torch._foreach_norm(list(grads))
    return torch.linalg.vector_norm(torch.stack(norms).float())


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"  # torch.distributed.tensor, imported only where it is in use


def sharded_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of sharded gradients (``DTensor`` s) as a 0-d float tensor, the same on every rank:
    torch's ``get_total_norm`` (the norm ``clip_grad_norm_`` computes), whose ``full_tensor()`` is one all-reduce
    of one number for all the gradients."""
    total = torch.nn.utils.get_total_norm(list(grads))
    full = total.full_tensor() if _is_dtensor(total) else total  # type: ignore[attr-defined]
    return full.float().reshape(())


def host_grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """The global L2 norm of ``grads`` read on the host (CPU tensors: as cheap as a Python float), with as few
    torch calls as the number of tensors allows."""
    if not grads:
        return 0.0
    if _is_dtensor(grads[0]):
        return float(sharded_norm(grads))
    norms = torch._foreach_norm(list(grads))
    if len(norms) <= 4:
        return math.sqrt(sum(float(n) ** 2 for n in norms))
    return float(torch.linalg.vector_norm(torch.stack(norms).float()))


def supports_found_inf(optimizer: Any) -> bool:
    """torch's fused Adam, AdamW or SGD, whose step skips itself on the device when given ``found_inf``."""
    return isinstance(optimizer, _FUSED) and all(bool(g.get("fused")) for g in optimizer.param_groups)


def fuse_for_the_gate(optimizer: Any) -> bool:
    """Switch a torch Adam, AdamW or SGD left at its default implementation (``fused`` and ``foreach`` unset)
    to its fused one, which can skip a step on the device (:func:`supports_found_inf`); ``True`` if it now
    does. The update is the same, computed by torch's fused kernel (it rounds differently in the last bits).
    An optimizer whose implementation you chose (``fused=False``, ``foreach=True`` or ``False``), a subclass
    (its ``step`` may not be torch's), ``differentiable=True``, or parameters the fused kernels do not take
    are left as they are. Step counts already kept on the host move beside their parameters, as a fused
    optimizer keeps them."""
    if supports_found_inf(optimizer):
        return True
    if type(optimizer) not in _FUSED:
        return False
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    for group in optimizer.param_groups:
        if group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable"):
            return False
        if any(p.device.type not in devices or not torch.is_floating_point(p) for p in group["params"]):
            return False
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    for p, state in optimizer.state.items():
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, torch.Tensor) and step.device != p.device:
            state["step"] = step.to(p.device, torch.float32)
    optimizer._step_supports_amp_scaling = True  # as torch's constructor sets it for fused=True
    return True


class _Band:
    """Where the next value of a log stream is expected (host floats): at the last value let through, give or
    take ``threshold`` noise scales, the noise scale that of a step's change (``sqrt(2)`` times the detectors'
    :class:`NoiseScale` of the stream, ``1.2533 * EMA(|dy|)``), never below ``floor``. A stream that trends (a
    warm-up, a falling loss) moves step by step, so its changes, not its distance from a lagging average, are what
    is scored. Values enter clipped to the band: an outlier does not drag the band it is measured against."""

    __slots__ = ("floor", "n", "noise", "prev")

    def __init__(self, alpha: float, floor: float) -> None:
        self.floor = floor
        self.n = 0
        self.prev = 0.0
        self.noise = NoiseScale(alpha, math.inf)  # the band clips the values themselves

    def sigma(self) -> float:
        measured = _CHANGE * self.noise.sigma
        return measured if measured > self.floor else self.floor

    def score(self, y: float) -> float:
        return (y - self.prev) / self.sigma() if self.n >= 2 else 0.0

    def edge(self, threshold: float) -> float:
        return self.prev + threshold * self.sigma()

    def update(self, y: float, threshold: float, clip: bool = True) -> None:
        if clip and self.n >= 2:
            y = min(y, self.edge(threshold))
        if self.n:
            self.noise.update(abs(y - self.prev))
        self.prev = y
        self.n += 1

    def state(self) -> list[float]:
        return [self.n, self.prev, self.noise.mean, self.noise.weight, self.noise.count]

    def load(self, state: Sequence[float]) -> None:
        self.n, self.prev = int(state[0]), float(state[1])
        self.noise.load_dict({"mean": state[2], "weight": state[3], "count": state[4] if len(state) > 4 else 10})


class UpdateGate:
    """Scores each step's loss and gradient norm before its update, and skips (or clips) a bad one.

    Args:
        threshold: Outlier threshold, in typical changes of ``log(value)`` above the last value let through (6,
            as OLMo-core's ``SkipStepAdamW`` in standard deviations).
        warmup_steps: Steps before any outlier is called (non-finite steps are skipped from the first).
        alpha: EMA factor of the noise scale (0.98: a memory of about 50 steps).
        mode: ``"skip"`` the update of an outlier step, or ``"clip"`` an outlier gradient norm to the band's edge.
        max_consecutive: Outliers in a row that are stopped; the next one goes through.
        min_noise: The smallest noise scale of ``log(value)`` a band assumes (0.05: with ``threshold=6`` no change
            under 35% from one step to the next is an outlier, however smooth the stream).
        on_device: Keep the statistics in tensors beside the gradients and decide there (:meth:`decide_on_device`):
            ``None`` (default) on a CUDA device, ``True`` always (on CPU too: how the device path is tested).
        fuse: On the device path, switch a torch Adam, AdamW or SGD left at its default implementation to its
            fused one (:func:`fuse_for_the_gate`), so that a skip is decided and taken on the device with no host
            sync. ``False`` keeps your optimizer's implementation: the verdict is then read on the host, one
            sync per step.
        sync_fallback: On the device path, for an optimizer that cannot skip its step on the device (not torch's
            fused Adam, AdamW or SGD, or under a ``GradScaler``): ``True`` reads the verdict on the host (one sync
            per step); ``False`` lets the gate stand aside for that optimizer (no sync; the detectors still watch).
            The gate ``LRGuard()`` makes by default has ``False``: its default never syncs per step.
        use_loss: Score the loss as well as the gradient norm. Under DDP the gate scores the gradient norm alone
            (the same on every rank after the all-reduce, so every rank decides alike with no collective).
    """

    def __init__(
        self,
        threshold: float = 6.0,
        warmup_steps: int = 8,
        alpha: float = 0.98,
        mode: str = "skip",
        max_consecutive: int = 3,
        use_loss: bool = True,
        min_noise: float = 0.05,
        on_device: bool | None = None,
        fuse: bool = True,
        sync_fallback: bool = True,
    ) -> None:
        check_number("threshold", threshold, low=0.0, low_open=True)
        check_number("warmup_steps", warmup_steps, low=2, integer=True)
        check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_choice("mode", mode, ("skip", "clip"))
        check_number("max_consecutive", max_consecutive, low=0, integer=True)
        check_number("min_noise", min_noise, low=0.0, low_open=True)
        if not isinstance(use_loss, bool):
            raise TypeError(f"use_loss must be True or False, got {use_loss!r}")
        self.threshold = float(threshold)
        self.warmup_steps = int(warmup_steps)
        self.alpha = float(alpha)
        self.mode = mode
        self.max_consecutive = int(max_consecutive)
        self.use_loss = use_loss
        self.min_noise = float(min_noise)
        if on_device is not None and not isinstance(on_device, bool):
            raise TypeError(f"on_device must be None, True or False, got {on_device!r}")
        self.on_device = on_device
        if not isinstance(fuse, bool):
            raise TypeError(f"fuse must be True or False, got {fuse!r}")
        self.fuse = fuse
        if not isinstance(sync_fallback, bool):
            raise TypeError(f"sync_fallback must be True or False, got {sync_fallback!r}")
        self.sync_fallback = sync_fallback
        self.reset()

    def __repr__(self) -> str:
        return (
            f"UpdateGate(threshold={self.threshold!r}, warmup_steps={self.warmup_steps!r}, alpha={self.alpha!r}, "
            f"mode={self.mode!r}, max_consecutive={self.max_consecutive!r}, use_loss={self.use_loss!r}, "
            f"min_noise={self.min_noise!r}, on_device={self.on_device!r}, fuse={self.fuse!r}, "
            f"sync_fallback={self.sync_fallback!r})"
        )

    def reset(self) -> None:
        self._loss = _Band(self.alpha, self.min_noise)
        self._grad = _Band(self.alpha, self.min_noise)
        self._steps = 0
        self._in_a_row = 0
        self.last_scale = 1.0  # the factor the last clipped update was scaled by
        self._device_state: dict[str, torch.Tensor] | None = None  # the device path's statistics, once used

    # -- deciding on the host ----------------------------------------------------------------------------------
    def decide(self, loss: float | None, norm: float) -> int:
        """The verdict on one step (a code), given its loss (``None``: not scored) and gradient norm; the
        statistics take in the step's values (clipped)."""
        self._steps += 1
        if not math.isfinite(norm) or (loss is not None and not math.isfinite(loss)):
            return NON_FINITE
        y_loss = math.log(loss) if loss is not None and loss > 0.0 else None
        y_grad = math.log(norm) if norm > 0.0 else None
        # after max_consecutive outliers in a row the next value goes through and the bands move to it unclipped:
        # a lasting change is not one bad batch; the detectors see it whole, and the gate scores from the new level
        rebase = self._steps > self.warmup_steps and self._in_a_row >= self.max_consecutive
        armed = self._steps > self.warmup_steps and not rebase
        code = APPLIED
        if armed and y_loss is not None and self._loss.score(y_loss) > self.threshold:
            code = LOSS_OUTLIER
        elif armed and y_grad is not None and self._grad.score(y_grad) > self.threshold:
            code = GRAD_OUTLIER if self.mode == "skip" else CLIPPED
            if code == CLIPPED:
                self.last_scale = math.exp(self._grad.edge(self.threshold) - y_grad)
        self._in_a_row = self._in_a_row + 1 if code in (LOSS_OUTLIER, GRAD_OUTLIER, CLIPPED) else 0
        if y_loss is not None:
            self._loss.update(y_loss, self.threshold, clip=not rebase)
        if y_grad is not None:
            self._grad.update(y_grad, self.threshold, clip=not rebase)
        return code

    def uses_device(self, device: torch.device) -> bool:
        return self.on_device if self.on_device is not None else device.type == "cuda"

    # -- deciding on the device --------------------------------------------------------------------------------
    def decide_on_device(self, loss: torch.Tensor | None, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The verdict as tensors beside ``norm`` -- the code (a 0-d float) and the factor a clipped update is
        scaled by -- with the same rules as :meth:`decide` and nothing read on the host."""
        self._steps += 1
        device = norm.device
        state = self._device_state
        if state is not None and state["prev"].device != device:  # loaded from a checkpoint: moved once
            state = self._device_state = {k: v.to(device) for k, v in state.items()}
        if state is None:
            state = self._device_state = {
                k: torch.zeros(2, device=device) for k in ("prev", "noise", "weight", "n", "grad_only")
            } | {"in_a_row": torch.zeros((), device=device)}
            state["grad_only"][1] = 1.0  # a fill on the device: no copy from the host
        if loss is not None:
            values = torch.stack([loss.detach().float().reshape(()), norm.float()])
            scored_mask = torch.ones_like(values, dtype=torch.bool)
        else:  # the gradient norm alone (the loss slot carries a dummy 1, never scored)
            values = torch.stack([torch.ones_like(norm, dtype=torch.float32), norm.float()])
            scored_mask = state["grad_only"] > 0
        finite = torch.isfinite(values).all()
        y = torch.log(values)
        scored = torch.isfinite(y) & scored_mask  # a loss <= 0 is not scored
        measured = 1.2533 * state["noise"] / state["weight"].clamp_min(1e-30)
        sigma = torch.where(state["weight"] > 0, measured, 0.0).clamp_min(self.min_noise)
        score = torch.where((state["n"] >= 2) & scored, (y - state["prev"]) / sigma, 0.0)
        armed = state["in_a_row"] < self.max_consecutive
        rebase = ~armed  # past max_consecutive outliers in a row: the value goes through and the bands move to it
        if self._steps <= self.warmup_steps:
            armed = torch.zeros_like(armed)  # no outlier during the warm-up
        outlier = armed & finite & (score > self.threshold)
        loss_out, grad_out = outlier[0], outlier[1] & ~outlier[0]
        grad_code = float(GRAD_OUTLIER if self.mode == "skip" else CLIPPED)
        code = torch.where(grad_out, grad_code, 0.0)
        code = torch.where(loss_out, float(LOSS_OUTLIER), code)
        code = torch.where(finite, code, float(NON_FINITE))
        edge = state["prev"] + self.threshold * sigma
        scale = torch.where(grad_out, torch.exp((edge[1] - y[1]).clamp_max(0.0)), 1.0)
        state["in_a_row"] = torch.where(loss_out | grad_out, state["in_a_row"] + 1, 0.0)
        take = finite & scored  # the band takes in each finite value, clipped to it
        clipped = torch.where((state["n"] >= 2) & ~rebase, torch.minimum(y, edge), y)
        moved = take & (state["n"] >= 1)
        a = self.alpha
        noise = a * state["noise"] + (1 - a) * (clipped - state["prev"]).abs()
        state["noise"] = torch.where(moved, noise, state["noise"])
        state["weight"] = torch.where(moved, a * state["weight"] + (1 - a), state["weight"])
        state["prev"] = torch.where(take, clipped, state["prev"])
        state["n"] = state["n"] + take.float()
        return code, scale

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "loss": self._loss.state(),
            "grad": self._grad.state(),
            "steps": self._steps,
            "in_a_row": self._in_a_row,
        }
        if self._device_state is not None:
            state["device"] = {k: v.detach().cpu() for k, v in self._device_state.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loss.load(state["loss"])
        self._grad.load(state["grad"])
        self._steps = int(state.get("steps", 0))
        self._in_a_row = int(state.get("in_a_row", 0))
        if "device" in state:
            self._device_state = {k: v.clone() for k, v in state["device"].items()}  # moved at the next step


def scale_update(grads: Sequence[torch.Tensor], scale: float) -> None:
    """Scale the gradients in place (an outlier's gradient brought down to the band's edge)."""
    torch._foreach_mul_(list(grads), scale)
