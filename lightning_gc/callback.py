"""The Lightning glue: a cached plan per optimizer, applied in ``on_before_optimizer_step``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.rank_zero import rank_zero_debug, rank_zero_info
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gc.config import ApplyTo, GCConfig, check_bool
from lightning_gc.diagnostics import DiagnosticsWriter, GCStats
from lightning_gc.layouts import REGISTRY, LayerLayout, Mode, layouts_from_specs
from lightning_gc.plan_cache import PlanCache
from lightning_gc.selection import DEFAULT_EXCLUDED_MODULES, Selection
from lightning_gc.selection_report import SelectionReport
from lightning_gc.sharding import AppliesGC, LayoutAdapter, adapter_for, warn_if_compile_unused
from lightning_gc.update import UpdateHooks, check_strategy

Report = Literal["summary", "table", "none"]
REPORTS: tuple[str, ...] = ("summary", "table", "none")


class GradientCentralization(Callback):
    r"""Gradient Centralization (Yong et al., ECCV 2020) for every optimizer step.

    Before each ``optimizer.step()`` (after gradient accumulation, AMP unscaling and DDP's all-reduce, before
    gradient clipping), each selected weight gradient ``g`` becomes ``g - g.mean(dim=(1, ..., n-1),
    keepdim=True)``: every output unit's gradient sums to zero. Only the parameters of the optimizer being
    stepped are touched, so GANs with several optimizers work as expected.

    Args:
        conv_only: centralize only convolution weights (``Conv1d/2d/3d`` and transposed), the paper's GCC variant.
        mode: ``"channel"`` (the paper: one mean per output unit) or ``"tensor"`` (one mean over the whole
            weight, as some write-ups do).
        centralize_weight_decay: centralize ``g + lambda * w`` as the paper's SGD_GC does, for optimizers with
            coupled weight decay (SGD, Adam, RMSprop, ... with ``weight_decay > 0``). Decoupled decay (AdamW)
            never enters the gradient: a warning says so and only ``g`` is centralized.
        exclude: ``fnmatch`` patterns of qualified parameter names to leave alone, e.g. ``["head.*"]``.
        exclude_modules: module classes, or class names, whose parameters are left alone. Defaults to
            embedding tables (``Embedding``, ``EmbeddingBag``); pass ``[]`` to centralize them too.
        log_diagnostics: at the trainer's logging interval, log ``gc/removed_norm_ratio``
            (``||g - GC(g)|| / ||g||``), ``gc/grad_norm`` (before GC, unscaled), ``gc/centralized_tensors`` and
            ``gc/centralized_elements``. Costs one read of the gradients on logging steps only.
        compile: also try a ``torch.compile``'d route for dense gradients: ``True`` for Inductor, or a backend
            name. It compiles once per plan (seconds), then fuses the mean and the subtraction; if compilation
            fails, one warning and the eager routes take over. Off by default, and meant for GPUs: on CPU the
            built-in fused kernel (:mod:`lightning_gc.native`, used without asking) is faster and compiles in
            a fraction of a second; with ``compile`` set, the compiled route takes precedence.
        apply_to: ``"gradient"`` (the paper: centralize ``g`` before the optimizer) or ``"update"``: after each
            optimizer step every selected weight becomes ``w_before + GC(w_after - w_before)``, the whole change
            (momentum, adaptive scaling, weight decay) centralized, so every unit's mean stays fixed for any
            optimizer; the authors' placement for adaptive optimizers (see :func:`lightning_gc.centralize_updates`).
            Through the optimizer's step hooks, registered at fit start and removed at teardown; DeepSpeed is
            refused at ``setup``; no ``gc/*`` diagnostics are logged.
        layouts: extra layer layouts, registered for every selection (see
            :func:`lightning_gc.register_layout`): mappings ``{"layer": "pkg.module.Class", "param": "weight",
            "out_dims": [1]}`` (also ``groups_attr``, ``reason``; ``out_dims: null`` leaves the parameter
            alone), so a LightningCLI config can say how its own layers store their weights.
        report: at fit start, on rank zero, log the selection ``"summary"`` (counts per decision; the full
            table at debug level), the full ``"table"``, or ``"none"``. With a ``TensorBoardLogger`` the
            table is also logged as text (``gc/selection``).

    Raises:
        ValueError: for an invalid option, naming it and the accepted values.
        UnsupportedGradientLayoutError: at ``setup`` for DeepSpeed ZeRO-3 and stage 0; at a step, for any gradient
            whose layout no adapter handles (it names the strategy and the parameter), instead of skipping it.

    Strategies: single device, DDP, ``ModelParallelStrategy`` (FSDP2, tensor parallel), ``FSDPStrategy`` (every
    sharding mode) and DeepSpeed ZeRO-1/2 are exact; see the README's support matrix.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_gc import GradientCentralization
        >>> trainer = Trainer(callbacks=[GradientCentralization(conv_only=True)], logger=False)

    Transposed convolutions keep output channels in dim 1 (weight ``(in, out // groups, *kernel)``); they are
    centralized per output channel, where the paper's official code averages over dims ``1..n-1``.
    """

    def __init__(
        self,
        conv_only: bool = False,
        mode: Mode = "channel",
        centralize_weight_decay: bool = False,
        exclude: Sequence[str] | str = (),
        exclude_modules: Sequence[str | type] = DEFAULT_EXCLUDED_MODULES,
        log_diagnostics: bool = True,
        compile: bool | str = False,
        apply_to: ApplyTo = "gradient",
        layouts: Sequence[Mapping[str, Any] | LayerLayout] = (),
        report: Report = "summary",
    ) -> None:
        check_bool(log_diagnostics, "log_diagnostics")
        if report not in REPORTS:
            raise ValueError(f"`report` must be one of {REPORTS}, got {report!r}")
        self.config = GCConfig(
            conv_only=conv_only,
            mode=mode,
            centralize_weight_decay=centralize_weight_decay,
            exclude=exclude,  # type: ignore[arg-type]  # GCConfig validates and normalizes
            exclude_modules=exclude_modules,  # type: ignore[arg-type]
            compile=compile,
            apply_to=apply_to,
        )
        self.layouts = layouts_from_specs(layouts)
        for entry in self.layouts:
            REGISTRY.add(entry)
        self.log_diagnostics = log_diagnostics
        self.report = report
        self.optimizer_steps = 0
        self._plans = PlanCache()
        self._adapter: LayoutAdapter | None = None
        self._reported = False
        self._update = UpdateHooks(self.config) if self.config.apply_to == "update" else None
        # Lightning reads `state_key` at every hook it dispatches (for the profiler's action names): made once
        self._state_key = self._generate_state_key(config=self.config.key())
        self._scaler: Any = None  # the precision plugin's GradScaler, if any (read at setup)

    @property
    def plans(self) -> list[AppliesGC]:
        """The plans in use, one per optimizer (and module) seen since ``setup``."""
        return self._plans.plans()

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._update is not None:
            check_strategy(trainer.strategy)
        self._adapter = adapter_for(trainer.strategy)
        self._scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self._plans.clear()
        warn_if_compile_unused(self.config, self._adapter, rank_zero_warn)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._update is not None:  # the update placement runs in the optimizers' own step hooks
            self._update.attach(trainer.optimizers, pl_module, rank_zero_warn, getattr(trainer.strategy, "model", None))
        if self.report == "none" or self._reported:
            return
        self._reported = True
        choices, unmatched_patterns, unmatched_modules = [], set(), set()
        for optimizer in trainer.optimizers:
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            selection: Selection | None = getattr(self._plan_for(optimizer, pl_module, trainer), "selection", None)
            if selection is not None:
                choices += selection.choices
                unmatched_patterns.update(selection.unmatched_patterns)
                unmatched_modules.update(selection.unmatched_modules)
        report = SelectionReport(tuple(choices), tuple(sorted(unmatched_patterns)), tuple(sorted(unmatched_modules)))
        if self.report == "table":
            rank_zero_info(str(report))
        else:
            rank_zero_info(report.summary())
            rank_zero_debug(report.table())
        _log_text(trainer, "gc/selection", report.markdown())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_events()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_events()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flush_events()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._flush_events()
        if self._update is not None:
            self.optimizer_steps += self._update.steps
            self._update.detach()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._update is not None:
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer in some call paths
        plan = self._plan_for(optimizer, pl_module, trainer)
        log = self.log_diagnostics and _is_log_step(trainer) and bool(trainer.loggers)
        stats = plan.apply(compute_stats=log, grad_scale=_grad_scale(self._scaler, optimizer))
        if stats.skipped:  # DeepSpeed: the hook runs per micro-batch, steps only at boundaries
            return
        self.optimizer_steps += 1
        if log:
            self._log(pl_module, trainer, optimizer, stats)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.key(), "optimizer_steps": self.optimizer_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer_steps = state_dict.get("optimizer_steps", 0)

    def _plan_for(self, optimizer: Optimizer, module: nn.Module, trainer: pl.Trainer) -> AppliesGC:
        if self._adapter is None:  # hook called without `setup`, e.g. a hand-driven loop
            self._adapter = adapter_for(trainer.strategy)
            self._scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        return self._plans.plan(self._adapter, self.config, module, optimizer, rank_zero_warn)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        writer: DiagnosticsWriter | None = self.__dict__.get("_diagnostics")
        if writer is not None:  # diagnostics held back on a batch Lightning accumulates (see DiagnosticsWriter)
            writer.flush(trainer)

    def _flush_events(self) -> None:
        writer: DiagnosticsWriter | None = self.__dict__.get("_diagnostics")
        if writer is not None:
            writer.flush_events()

    def _log(self, pl_module: pl.LightningModule, trainer: pl.Trainer, optimizer: Optimizer, stats: GCStats) -> None:
        prefix = "gc/"
        if len(trainer.optimizers) > 1:
            index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
            prefix = f"gc/optimizer{index}/"
        writer = self.__dict__.get("_diagnostics")
        if writer is None:
            writer = self.__dict__["_diagnostics"] = DiagnosticsWriter()
        writer.write(trainer, stats, prefix)


def _is_log_step(trainer: pl.Trainer) -> bool:
    """Lightning's ``_LoggerConnector.should_update_logs`` (2.6), its fit-loop case read directly.

    The connector's property finds the active loop through several of the trainer's properties and
    ``isinstance`` checks on every call; while training (where this hook runs) the loop is the fit loop, so
    the same rule reads its counter straight away. Any other state asks Lightning.
    """
    if trainer.state.stage is not RunningStage.TRAINING:
        return trainer._logger_connector.should_update_logs
    every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by the logger connector
    if every == 0:
        return False
    # `+ 1`, as Lightning: the hook runs before the step that increments the counter
    return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0 or trainer.should_stop


def _log_text(trainer: pl.Trainer, tag: str, text: str) -> None:
    """``text`` to every TensorBoard logger (Lightning hands other ranks a no-op experiment)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text, global_step=trainer.global_step)


def _grad_scale(scaler: Any, optimizer: Optimizer) -> float:
    """The loss scale still in the gradients: non-1 only for fused optimizers under fp16 AMP.

    Lightning unscales before the hook unless the optimizer unscales inside its own ``step``.
    """
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0
    return float(scaler.get_scale())
