"""lr_guard's callbacks for the ``lightning`` package (``import lightning.pytorch as pl``).

The type-checked ``trainer.callbacks`` of ``lightning.pytorch``'s ``LightningCLI`` accepts only classes built on
``lightning.pytorch.Callback``, so these are the same classes as ``lr_guard.LRGuard`` & co. on that namespace's
base (one implementation). They need the ``lightning`` package: ``pip install 'lr_guard[lightning]'``::

    from lr_guard.lightning import LRGuard
    trainer = lightning.pytorch.Trainer(callbacks=[LRGuard()])
"""

try:
    from lightning.pytorch import Callback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"lr_guard.lightning needs the 'lightning' package ({err}): install lr_guard's 'lightning' extra "
        "(pip install 'lr_guard[lightning]'), or, with pytorch_lightning, use lr_guard.LRGuard instead"
    ) from err

from lr_guard.callbacks.core import GuardCore
from lr_guard.callbacks.jobs import DivergenceRollbackCore, PlateauLRReducerCore

__all__ = ["DivergenceRollback", "LRGuard", "PlateauLRReducer"]


class LRGuard(GuardCore, Callback):
    __doc__ = GuardCore.__doc__


class PlateauLRReducer(PlateauLRReducerCore, Callback):
    __doc__ = PlateauLRReducerCore.__doc__


class DivergenceRollback(DivergenceRollbackCore, Callback):
    __doc__ = DivergenceRollbackCore.__doc__
