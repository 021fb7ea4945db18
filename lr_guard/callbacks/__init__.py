"""The Lightning callbacks for ``pytorch_lightning`` (``lr_guard.lightning`` has the same for ``lightning.pytorch``).

Each is a thin class: the Lightning adapter lives once in :mod:`lr_guard.callbacks.core`, over the parts it wires
together (see its docstring).
"""

from pytorch_lightning import Callback

from lr_guard.callbacks.core import GuardCore
from lr_guard.callbacks.jobs import DivergenceRollbackCore, PlateauLRReducerCore

__all__ = ["DivergenceRollback", "LRGuard", "PlateauLRReducer"]


class LRGuard(GuardCore, Callback):
    __doc__ = GuardCore.__doc__


class PlateauLRReducer(PlateauLRReducerCore, Callback):
    __doc__ = PlateauLRReducerCore.__doc__


class DivergenceRollback(DivergenceRollbackCore, Callback):
    __doc__ = DivergenceRollbackCore.__doc__


for _cls in (LRGuard, PlateauLRReducer, DivergenceRollback):
    _cls.__module__ = "lr_guard"  # class_path: lr_guard.LRGuard in LightningCLI configs
