"""TensorBoard's view of a comparison by arm: one band per arm (mean ± 1 std over seeds) and each run's outcome.

:func:`write_arm_view` writes, under the comparison's folder ``OUT``:

* ``OUT/arms/<arm>/``: one TensorBoard run per arm with three series per tag (``train/loss``, the primary
  metric, ``train/grad_norm``): ``<tag>/mean``, ``<tag>/mean-std`` and ``<tag>/mean+std`` over the arm's
  finished seeds at each step (the runs the summary's means count);
* a custom-scalars layout (TensorBoard's ``custom_scalars`` plugin, the CUSTOM SCALARS tab) with one margin
  chart per tag, where each arm is a line with its ±1 std band, and one multiline chart per tag with every
  seed's curve;
* in every run's own folder, its HPARAMS session: the run's hyperparameters (``hparams.yaml``) with
  ``compare/arm``, ``compare/seed``, ``compare/status`` (finished, collapsed, diverged, failed) and
  ``compare/final_metric``; the session's status is *success* for a finished run, *failure* otherwise.

Everything is written with TensorBoard's own protos and event writer, and read back with its reader.
"""

from __future__ import annotations

import math
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_gc.compare.events import Series, read_scalars
from lightning_gc.compare.summary import FINISHED, GRAD_NORM, TRAIN_LOSS, VAL_LOSS, RunRecord

ARMS_DIR = "arms"
BAND = ("mean", "mean-std", "mean+std")
ARM_CATEGORY = "arms: mean ± 1 std over finished seeds"
RUN_CATEGORY = "runs: every seed"
SESSION_SUFFIX = ".arm-view"  # event files of the HPARAMS sessions this module writes into the run folders
MODES = ("min", "max")


def write_arm_view(out: Path, records: Sequence[RunRecord], metric: str, mode: str) -> None:
    """Write the per-arm TensorBoard view of one comparison (or one sweep point) whose runs are ``records``.

    Args:
        out: the comparison's folder (``tensorboard --logdir out`` shows the view).
        records: every run of the comparison, any status.
        metric: the primary validation metric, e.g. ``"val/acc"``.
        mode: ``"max"`` or ``"min"``: whether a higher or a lower ``metric`` is better.

    The arm series aggregate the runs whose status is ``finished`` (collapsed, diverged and failed runs are
    left out, as in the summary's means); a step counts the seeds that logged it. Writing again replaces the
    view (``out/arms`` and the sessions this function wrote before).

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> out = Path(tempfile.mkdtemp())
        >>> records = []
        >>> for seed, loss in enumerate([1.0, 3.0]):
        ...     with SummaryWriter(out / "gc" / f"seed_{seed}") as writer:
        ...         writer.add_scalar("train/loss", loss, 10)
        ...     records.append(RunRecord("gc", seed, "finished", out / "gc" / f"seed_{seed}", out / "log"))
        >>> write_arm_view(out, records, "val/acc", "max")
        >>> arm = read_scalars(out / "arms" / "gc")
        >>> [round(float(arm[f"train/loss/{name}"].values[0]), 4) for name in ("mean", "mean-std", "mean+std")]
        [2.0, 0.5858, 3.4142]
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty tag name such as 'val/acc', got {metric!r}")
    out = Path(out)
    arms_root = out / ARMS_DIR
    for record in records:
        if Path(record.run_dir).resolve().is_relative_to(arms_root.resolve()):
            raise ValueError(f"records: run {record.name} lies under {arms_root}, which the arm view writes")
    tags = list(dict.fromkeys((TRAIN_LOSS, metric, GRAD_NORM)))
    scalars = {id(r): read_scalars(r.run_dir) for r in records}
    arms = list(dict.fromkeys(r.arm for r in records))
    layout = arm_layout(tags, mode)
    if arms_root.exists():
        shutil.rmtree(arms_root)
    for arm in arms:
        finished = [scalars[id(r)] for r in records if r.arm == arm and r.status == FINISHED]
        events = [_event(0, _layout_summary(layout))]
        for tag in tags:
            band = seed_band([s[tag] for s in finished if tag in s])
            for step, values in band.items():
                events.append(_event(step, _scalars({f"{tag}/{name}": v for name, v in zip(BAND, values)})))
        _write_events(arms_root / arm, events)
    _write_sessions(records, scalars, metric, mode)


def seed_band(series: Sequence[Series]) -> dict[int, tuple[float, float, float]]:
    """Mean, mean − std and mean + std (sample std; 0 for one seed) over ``series`` at each logged step.

    A step counts the series that logged a finite value there (the last one, if a run logged the step twice).

    Example:
        >>> a = Series(np.array([0, 1]), np.array([1.0, 2.0]))
        >>> b = Series(np.array([0]), np.array([3.0]))
        >>> seed_band([a, b])
        {0: (2.0, 0.5857864376269049, 3.414213562373095), 1: (2.0, 2.0, 2.0)}
    """
    by_step: dict[int, list[float]] = {}
    for s in series:
        last = {int(step): float(value) for step, value in zip(s.steps, s.values)}
        for step, value in last.items():
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    band = {}
    for step in sorted(by_step):
        values = np.array(by_step[step], dtype=np.float64)
        mean = float(values.mean())
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        band[step] = (mean, mean - std, mean + std)
    return band


def arm_layout(tags: Sequence[str], mode: str) -> Any:
    """The custom-scalars layout: a margin chart (one band per arm) and a multiline chart (every seed) per tag.

    Example:
        >>> layout = arm_layout(["train/loss"], "min")
        >>> [c.title for c in layout.category], layout.category[0].chart[0].margin.series[0].upper
        (['arms: mean ± 1 std over finished seeds', 'runs: every seed'], 'train/loss/mean+std')
    """
    from tensorboard.plugins.custom_scalar import layout_pb2

    better = {"max": "higher is better", "min": "lower is better"}[mode]
    margins, lines = [], []
    for index, tag in enumerate(tags):
        note = f", {better}" if index == 1 else ""  # tags[1] is the primary metric
        series = layout_pb2.MarginChartContent.Series(
            value=f"{tag}/{BAND[0]}", lower=f"{tag}/{BAND[1]}", upper=f"{tag}/{BAND[2]}"
        )
        margins.append(
            layout_pb2.Chart(
                title=f"{tag}: arm mean ± 1 std{note}", margin=layout_pb2.MarginChartContent(series=[series])
            )
        )
        lines.append(
            layout_pb2.Chart(
                title=f"{tag}: every seed", multiline=layout_pb2.MultilineChartContent(tag=[f"^{re.escape(tag)}$"])
            )
        )
    return layout_pb2.Layout(
        category=[
            layout_pb2.Category(title=ARM_CATEGORY, chart=margins),
            layout_pb2.Category(title=RUN_CATEGORY, chart=lines),
        ]
    )


def run_hparams(record: RunRecord, scalars: dict[str, Series], metric: str, mode: str) -> dict[str, float | str | bool]:
    """What a run's HPARAMS session records: its ``hparams.yaml`` (flattened with ``/``) and the outcome.

    Example:
        >>> record = RunRecord("gc", 1, "diverged", Path("no/such/run"), Path("log"), diverged_at_step=36)
        >>> run_hparams(record, {"val/acc": Series(np.array([5, 9]), np.array([0.5, float("nan")]))}, "val/acc", "max")
        {'compare/arm': 'gc', 'compare/seed': 1, 'compare/status': 'diverged', 'compare/diverged_at_step': 36, 'compare/final_metric': 0.5, 'compare/best_metric': 0.5}
    """
    params: dict[str, float | str | bool] = dict(_flatten(_read_hparams_yaml(Path(record.run_dir))))
    params.update({"compare/arm": record.arm, "compare/seed": record.seed, "compare/status": record.status})
    for field in ("point", "job_id", "collapse"):  # fields compare adds to RunRecord, when present
        value = getattr(record, field, None)
        if value:
            params[f"compare/{field}"] = str(value)
    if record.diverged_at_step is not None:
        params["compare/diverged_at_step"] = record.diverged_at_step
    if record.returncode not in (None, 0):
        params["compare/returncode"] = record.returncode
    values = [float(v) for v in scalars[metric].values if math.isfinite(v)] if metric in scalars else []
    if values:
        params["compare/final_metric"] = values[-1]
        params["compare/best_metric"] = max(values) if mode == "max" else min(values)
    return params


def _write_sessions(
    records: Sequence[RunRecord], scalars: dict[int, dict[str, Series]], metric: str, mode: str
) -> None:
    """Each run's HPARAMS session, in its own folder; one experiment (the union of the columns) in every run."""
    from tensorboard.plugins.hparams import api_pb2

    params = {id(r): run_hparams(r, scalars[id(r)], metric, mode) for r in records}
    columns: dict[str, float | str | bool] = {}
    for p in params.values():
        for name, value in p.items():
            columns.setdefault(name, value)
    metrics = [
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in dict.fromkeys((metric, VAL_LOSS, TRAIN_LOSS))
    ]
    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=n, type=_data_type(v)) for n, v in columns.items()], metric_infos=metrics
    )
    for record in records:
        run_dir = Path(record.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for old in run_dir.glob(f"events.out.tfevents.*{SESSION_SUFFIX}"):
            old.unlink()  # an earlier view's session: TensorBoard would keep it, the first one it reads
        if _has_foreign_session(run_dir):
            warnings.warn(
                f"{run_dir} already holds an HPARAMS session written during training; TensorBoard keeps the first "
                f"one it reads, so the HPARAMS tab will not show this run's compare/status ({record.status})",
                stacklevel=3,
            )
        status = api_pb2.STATUS_SUCCESS if record.status == FINISHED else api_pb2.STATUS_FAILURE
        _write_events(
            run_dir,
            [
                _event(0, _hparams_summary("experiment", experiment)),
                _event(0, _hparams_summary("session_start_info", _session_start(params[id(record)], record))),
                _event(0, _hparams_summary("session_end_info", _session_end(status))),
            ],
            suffix=SESSION_SUFFIX,
        )


def _session_start(params: dict[str, float | str | bool], record: RunRecord) -> Any:
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(group_name=f"{record.arm}/seed_{record.seed}", start_time_secs=time.time())
    for name, value in params.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = float(value)
        else:
            start.hparams[name].string_value = value
    return start


def _session_end(status: int) -> Any:
    from tensorboard.plugins.hparams import plugin_data_pb2

    return plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())


def _hparams_summary(kind: str, message: Any) -> Any:
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **{kind: message})
    tag = {
        "experiment": metadata.EXPERIMENT_TAG,
        "session_start_info": metadata.SESSION_START_INFO_TAG,
        "session_end_info": metadata.SESSION_END_INFO_TAG,
    }[kind]
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
    return summary


def _data_type(value: float | str | bool) -> int:
    from tensorboard.plugins.hparams import api_pb2

    if isinstance(value, bool):
        return int(api_pb2.DATA_TYPE_BOOL)
    if isinstance(value, (int, float)):
        return int(api_pb2.DATA_TYPE_FLOAT64)
    return int(api_pb2.DATA_TYPE_STRING)


def _has_foreign_session(run_dir: Path) -> bool:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 1})
    accumulator.Reload()
    return metadata.SESSION_START_INFO_TAG in accumulator.Tags().get("tensors", [])


def _scalars(values: dict[str, float]) -> Any:
    from tensorboard.compat.proto import summary_pb2

    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values.items()])


def _event(step: int, summary: Any) -> Any:
    from tensorboard.compat.proto import event_pb2

    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary)


def _layout_summary(layout: Any) -> Any:
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.plugins.custom_scalar import metadata

    tensor = tensor_pb2.TensorProto(
        dtype=7, string_val=[layout.SerializeToString()], tensor_shape=tensor_shape_pb2.TensorShapeProto()
    )  # dtype 7: DT_STRING
    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.CONFIG_SUMMARY_TAG, metadata=metadata.create_summary_metadata(), tensor=tensor)
    return summary


def _write_events(run_dir: Path, events: Iterable[Any], suffix: str = "") -> None:
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(run_dir), filename_suffix=suffix)
    try:
        for event in events:
            writer.add_event(event)
    finally:
        writer.close()


def _read_hparams_yaml(run_dir: Path) -> dict[str, Any]:
    import yaml  # type: ignore[import-untyped]

    try:
        data = yaml.safe_load((run_dir / "hparams.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _flatten(params: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, float | str | bool]]:
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + "/")
        elif isinstance(value, (bool, int, float, str)):
            yield name, value
        elif value is not None:
            yield name, str(value)
