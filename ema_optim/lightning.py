"""Lightning integration: validate, test and predict on the EMA weights.

Return an :class:`~ema_optim.EMAOptimizer` from ``configure_optimizers``; Lightning's
checkpoints then carry the shadows (they are optimizer state), and ``ckpt_path=`` resumes
them exactly. Add :class:`EMASwap` to the Trainer's callbacks to run the evaluation loops on
the EMA weights::

    import lightning.pytorch as pl
    from ema_optim import EMAOptimizer
    from ema_optim.lightning import EMASwap

    class Lit(pl.LightningModule):
        def configure_optimizers(self):
            return EMAOptimizer(torch.optim.AdamW(self.parameters(), lr=1e-3), decay=0.999)

    trainer = pl.Trainer(callbacks=[EMASwap()])
    trainer.fit(Lit(), train_loader, val_loader)   # validation metrics are the EMA model's
    trainer.test(ckpt_path="best")                 # the EMA of the best checkpoint

``EMASwap`` needs Lightning (``pip install "ema_optim[lightning]"``). Lightning is imported
on first use of ``EMASwap`` (``ImportError`` if it is missing), so this module itself imports
without it; the core package never imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from torch.optim import Optimizer

from .optimizer import EMAOptimizer

if TYPE_CHECKING:
    import lightning.pytorch as pl


__all__ = ["EMASwap"]  # noqa: F822 - built on first access by __getattr__ below

_NO_OPTIMIZER_STATES = object()  # a checkpoint was loaded, but it holds no optimizer state


class _EMASwap:
    """Run validation, test and predict on the EMA weights of every ``EMAOptimizer``.

    The swap is entered in ``on_{validation,test,predict}_start`` and left in the matching
    ``*_end`` hook, so everything in between (``*_step``, ``*_epoch_end``, logged metrics,
    ``EarlyStopping`` and the metric ``ModelCheckpoint`` monitors) sees the EMA model.
    Lightning runs ``ModelCheckpoint`` after the other callbacks, so checkpoints are saved
    with the training weights back in place. If the loop raises (or is interrupted), the
    training weights are restored in ``on_exception``, bit for bit.

    With ``trainer.validate/test/predict(ckpt_path=...)`` the shadows come from that
    checkpoint's optimizer state, to match the weights Lightning loads from it: the state is
    loaded into the Trainer's optimizers after a ``fit``, or into the ones
    ``configure_optimizers()`` builds when the Trainer has none. Before the
    first optimizer step there are no shadows yet and the swap changes nothing (so the
    sanity check runs on the initial weights).

    Args:
        validate: swap during validation (also the sanity check and ``trainer.validate``).
        test: swap during ``trainer.test``.
        predict: swap during ``trainer.predict``.

    Raises:
        RuntimeError: (when a swapped loop starts) no ``EMAOptimizer`` is found, or a loaded
            checkpoint has no optimizer state to take the EMA weights from.
    """

    def __init__(self, validate: bool = True, test: bool = True, predict: bool = True) -> None:
        self.stages = {"validate": validate, "test": test, "predict": predict}
        self._stack: Optional[contextlib.ExitStack] = None
        self._checkpoint_states: Any = None  # optimizer_states of a checkpoint loaded to evaluate

    # ------------------------------------------------------------------ hooks

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module, "test")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module, "predict")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._exit()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._exit()  # a no-op unless a loop ended without its *_end hook

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        # fit(ckpt_path=...) restores the optimizers itself; validate/test/predict(ckpt_path=...)
        # restore the model only, so the checkpoint's shadows are kept for _enter().
        if trainer.state.fn != "fit":
            self._checkpoint_states = checkpoint.get("optimizer_states", _NO_OPTIMIZER_STATES)

    # ------------------------------------------------------------------ swap

    def _enter(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._exit()
        if not self.stages[stage]:
            return
        optimizers = self._ema_optimizers(trainer, pl_module, stage)
        stack = contextlib.ExitStack()
        try:
            for opt in optimizers:
                stack.enter_context(opt.swap_ema_weights())
        except BaseException:
            stack.close()  # undo the swaps already made
            raise
        self._stack = stack

    def _exit(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _ema_optimizers(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> list[EMAOptimizer]:
        optimizers = list(trainer.optimizers)
        states, self._checkpoint_states = self._checkpoint_states, None
        if states is _NO_OPTIMIZER_STATES:
            raise RuntimeError(
                f"EMASwap: the checkpoint passed to trainer.{stage}(ckpt_path=...) holds no optimizer state "
                "(saved with save_weights_only=True?), so it has no EMA weights; save full checkpoints, "
                "or remove EMASwap to evaluate the training weights"
            )
        if states is not None:
            if not optimizers:  # a Trainer that has not run fit(): build optimizers to hold the shadows
                optimizers = _flatten_optimizers(pl_module.configure_optimizers())
            if len(states) != len(optimizers):
                raise RuntimeError(
                    f"EMASwap: the checkpoint holds {len(states)} optimizer states, "
                    f"configure_optimizers() gives {len(optimizers)} optimizers"
                )
            for opt, state in zip(optimizers, states):
                if isinstance(opt, EMAOptimizer):
                    opt.load_state_dict(state)
        ema = [opt for opt in optimizers if isinstance(opt, EMAOptimizer)]
        if not ema:
            where = (
                f"trainer.optimizers holds {[type(o).__name__ for o in optimizers]}"
                if optimizers
                else f"the Trainer has no optimizers (trainer.{stage}() was called without a previous fit() "
                "and without ckpt_path=)"
            )
            raise RuntimeError(
                f"EMASwap found no EMAOptimizer: {where}. Return "
                "EMAOptimizer(torch.optim.AdamW(self.parameters()), decay=...) from configure_optimizers, "
                f"call trainer.{stage}(ckpt_path=...) with a checkpoint saved by such a run, "
                "or remove EMASwap from the callbacks."
            )
        return ema


def __getattr__(name: str) -> Any:
    # PEP 562: EMASwap subclasses lightning's Callback, so it is built on first access.
    if name == "EMASwap":
        cls = _build_ema_swap()
        globals()["EMASwap"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_ema_swap() -> type:
    try:
        import lightning.pytorch as lightning_pytorch
    except ImportError as error:
        raise ImportError(
            "ema_optim.lightning.EMASwap needs Lightning; install it with: pip install 'ema_optim[lightning]'"
        ) from error

    class EMASwap(_EMASwap, lightning_pytorch.Callback):
        __doc__ = _EMASwap.__doc__

    EMASwap.__module__ = __name__
    EMASwap.__qualname__ = "EMASwap"  # Callback.state_key, the key of its checkpoint entry
    return EMASwap


def _flatten_optimizers(conf: Any) -> list[Optimizer]:
    """The optimizers of a configure_optimizers() return value, in Lightning's order."""
    if isinstance(conf, Optimizer):
        return [conf]  # a proxy such as LightningOptimizer shares the real optimizer's runtime
    if isinstance(conf, Mapping):
        return _flatten_optimizers(conf.get("optimizer"))
    if isinstance(conf, (list, tuple)):
        return [opt for item in conf for opt in _flatten_optimizers(item)]
    return []  # LR schedulers, None
