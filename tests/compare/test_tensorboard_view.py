"""The per-arm TensorBoard view, read back with TensorBoard's own reader and served by the real server."""

import json
import math
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_gc.compare.summary import RunRecord
from lightning_gc.compare.tensorboard import ARM_CATEGORY, RUN_CATEGORY, write_arm_view

STEPS = list(range(0, 60, 5))
SEEDS = (0, 1, 2)
TAGS = ("train/loss", "val/acc", "train/grad_norm")


def fake_curves(arm, seed):
    """Deterministic curves per arm and seed: GC's loss lower and its accuracy higher, seeds spread apart."""
    rng = np.random.default_rng(100 * (arm == "gc") + seed)
    steps = np.array(STEPS, dtype=np.float64)
    shift = 0.3 if arm == "gc" else 0.0
    return {
        "train/loss": 2.3 * np.exp(-steps / (25 - 10 * shift)) + 0.1 * rng.random(len(steps)),
        "val/acc": 0.1 + (0.8 + 0.1 * shift) * (1 - np.exp(-steps / 20)) + 0.02 * rng.standard_normal(len(steps)),
        "train/grad_norm": 1.0 + 0.5 * rng.random(len(steps)),
    }


def write_fake_comparison(out, diverge=("gc", 2, 30), fail=("baseline", 2)):
    """Arms baseline/gc x 3 seeds written with SummaryWriter, as compare lays them out; one GC seed diverges
    (non-finite loss from step 30 on, stopped), one baseline seed fails before logging anything."""
    records, curves = [], {}
    for arm in ("baseline", "gc"):
        for seed in SEEDS:
            run_dir = out / arm / f"seed_{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "hparams.yaml").write_text(f"model:\n  lr: 0.1\n  width: 8\nseed: {seed}\n")
            status, diverged_at, returncode = "finished", None, 0
            if (arm, seed) == fail:
                records.append(RunRecord(arm, seed, "failed", run_dir, run_dir / "train.log", returncode=1))
                continue
            values = fake_curves(arm, seed)
            last = len(STEPS)
            if (arm, seed) == diverge[:2]:
                status, diverged_at = "diverged", diverge[2]
                last = STEPS.index(diverged_at) + 1
                values["train/loss"][last - 1] = math.nan
            with SummaryWriter(run_dir) as writer:
                for i, step in enumerate(STEPS[:last]):
                    for tag in TAGS:
                        writer.add_scalar(tag, values[tag][i], step)
            curves[arm, seed] = {tag: v[:last] for tag, v in values.items()}
            records.append(
                RunRecord(arm, seed, status, run_dir, run_dir / "train.log", returncode, diverged_at_step=diverged_at)
            )
    return records, curves


def reference_band(curves, arm, tag, statuses):
    """float64 mean and sample std over the arm's finished seeds at each step (independent of the code)."""
    finished = [curves[arm, s][tag] for s in SEEDS if statuses.get((arm, s)) == "finished"]
    stacked = np.array(finished, dtype=np.float64)
    mean = stacked.mean(axis=0)
    std = np.sqrt(((stacked - mean) ** 2).sum(axis=0) / (len(finished) - 1))
    return mean, mean - std, mean + std


def _scalars(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture
def comparison(tmp_path):
    out = tmp_path / "cmp"
    records, curves = write_fake_comparison(out)
    write_arm_view(out, records, "val/acc", "max")
    return out, records, curves


def test_arm_series_are_mean_and_std_over_finished_seeds(comparison):
    out, records, curves = comparison
    statuses = {(r.arm, r.seed): r.status for r in records}
    for arm in ("baseline", "gc"):
        accumulator = _scalars(out / "arms" / arm)
        assert set(accumulator.Tags()["scalars"]) == {
            f"{t}/{n}" for t in TAGS for n in ("mean", "mean-std", "mean+std")
        }
        for tag in TAGS:
            expected = reference_band(curves, arm, tag, statuses)
            for name, reference in zip(("mean", "mean-std", "mean+std"), expected):
                events = accumulator.Scalars(f"{tag}/{name}")
                assert [e.step for e in events] == STEPS
                np.testing.assert_allclose([e.value for e in events], reference, rtol=2e-6, atol=1e-6)  # float32 events


def test_each_run_records_its_status_and_final_metric_in_its_hparams_session(comparison):
    from tensorboard.plugins.hparams import api_pb2, metadata

    out, records, curves = comparison
    for record in records:
        accumulator = _scalars(record.run_dir)
        content = accumulator.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
        start = metadata.parse_session_start_info_plugin_data(content)
        hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
        assert hparams["compare/status"] == record.status and hparams["compare/arm"] == record.arm
        assert hparams["compare/seed"] == record.seed and hparams["model/lr"] == 0.1 and hparams["model/width"] == 8
        end = metadata.parse_session_end_info_plugin_data(
            accumulator.SummaryMetadata(metadata.SESSION_END_INFO_TAG).plugin_data.content
        )
        assert end.status == (api_pb2.STATUS_SUCCESS if record.status == "finished" else api_pb2.STATUS_FAILURE)
        if record.status == "failed":
            assert "compare/final_metric" not in hparams
        else:
            accuracy = curves[record.arm, record.seed]["val/acc"]
            assert hparams["compare/final_metric"] == pytest.approx(accuracy[-1], rel=1e-6)
        if record.status == "diverged":
            assert hparams["compare/diverged_at_step"] == 30


def test_writing_again_replaces_the_view(comparison):
    out, records, _ = comparison
    write_arm_view(out, records, "val/acc", "max")
    assert len(_scalars(out / "arms" / "gc").Scalars("train/loss/mean")) == len(STEPS)  # not twice
    assert [len(list(r.run_dir.glob("*.arm-view"))) for r in records] == [1] * len(records)
    changed = [
        RunRecord(r.arm, r.seed, "collapsed", r.run_dir, r.log) if r.status == "finished" else r for r in records
    ]
    write_arm_view(out, changed, "val/acc", "max")
    assert sorted(p.name for p in (out / "arms").iterdir()) == ["baseline", "gc"]
    assert not _scalars(out / "arms" / "gc").Tags()["scalars"]  # no finished seed left: no band
    content = _scalars(records[0].run_dir).SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    from tensorboard.plugins.hparams import metadata

    assert metadata.parse_session_start_info_plugin_data(content).hparams["compare/status"].string_value == "collapsed"


def test_bad_arguments_name_themselves(tmp_path):
    records, _ = write_fake_comparison(tmp_path / "cmp")
    with pytest.raises(ValueError, match=r"mode must be one of \('min', 'max'\)"):
        write_arm_view(tmp_path / "cmp", records, "val/acc", "maximum")
    with pytest.raises(ValueError, match="metric must be a non-empty tag name"):
        write_arm_view(tmp_path / "cmp", records, "", "max")
    clash = [RunRecord("arms", 0, "finished", tmp_path / "cmp" / "arms" / "seed_0", tmp_path / "log")]
    with pytest.raises(ValueError, match="lies under"):
        write_arm_view(tmp_path / "cmp", clash, "val/acc", "max")


def add_training_time_session(run_dir):
    """What Lightning's logger (and compare's RunMonitor) write at fit start: a session without the outcome."""
    from torch.utils.tensorboard.summary import hparams

    with SummaryWriter(run_dir) as writer:
        for summary in hparams({"lr": 0.1, "compare/arm": "gc"}, {"val/acc": 0.0}):
            writer.file_writer.add_summary(summary)


def test_the_outcome_session_wins_over_one_written_during_training(tmp_path):
    from tensorboard.plugins.hparams import metadata

    records, _ = write_fake_comparison(tmp_path / "cmp")
    diverged = next(r for r in records if r.status == "diverged")
    time.sleep(1.1)  # the training-time file gets a later name than the run's first file, as in a real run
    add_training_time_session(diverged.run_dir)
    start_before = _scalars(diverged.run_dir).FirstEventTimestamp()
    write_arm_view(tmp_path / "cmp", records, "val/acc", "max")
    accumulator = _scalars(diverged.run_dir)
    content = accumulator.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
    assert metadata.parse_session_start_info_plugin_data(content).hparams["compare/status"].string_value == "diverged"
    assert accumulator.FirstEventTimestamp() == start_before  # the run keeps its place in TensorBoard's list


# --- the real TensorBoard server ----------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(opener, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}  # else werkzeug reads it as a form
    with opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(params=["false", "true"], ids=["python-reader", "rust-data-server"])
def server(tmp_path, request):
    out = tmp_path / "served"
    records, curves = write_fake_comparison(out)
    add_training_time_session(next(r.run_dir for r in records if r.status == "diverged"))
    write_arm_view(out, records, "val/acc", "max")
    comparison = out, records, curves
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(out), "--host", "127.0.0.1", "--port", str(port)]
        + ["--load_fast", request.param],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # only this local server
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                if "arms/gc" in _request(opener, f"{base}/data/runs"):
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        yield opener, base, comparison
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_custom_scalars_plugin_serves_the_layout_and_each_arms_band(server):
    opener, base, (out, records, curves) = server
    deadline = time.monotonic() + 60
    layout = {}
    while time.monotonic() < deadline and not layout:
        layout = _request(opener, f"{base}/data/plugin/custom_scalars/layout")
        time.sleep(0.5)
    categories = {c["title"]: c["chart"] for c in layout["category"]}
    assert set(categories) == {ARM_CATEGORY, RUN_CATEGORY}
    margins = {c["title"]: c["margin"]["series"] for c in categories[ARM_CATEGORY]}
    assert margins["val/acc: arm mean ± 1 std, higher is better"] == [
        {"value": "val/acc/mean", "lower": "val/acc/mean-std", "upper": "val/acc/mean+std"}
    ]
    assert len(margins) == 3 and len(categories[RUN_CATEGORY]) == 3
    statuses = {(r.arm, r.seed): r.status for r in records}
    for arm in ("baseline", "gc"):
        query = urllib.parse.urlencode({"run": f"arms/{arm}", "tag": r"val/acc/mean\+std"})
        served = _request(opener, f"{base}/data/plugin/custom_scalars/scalars?{query}")
        assert served["regex_valid"] and list(served["tag_to_events"]) == ["val/acc/mean+std"]
        upper = [event[2] for event in served["tag_to_events"]["val/acc/mean+std"]]  # [wall_time, step, value]
        np.testing.assert_allclose(upper, reference_band(curves, arm, "val/acc", statuses)[2], rtol=2e-6)
    runs = _request(opener, f"{base}/data/runs")
    assert runs[:2] == ["arms/baseline", "arms/gc"]  # TensorBoard lists runs by first event: the arms lead
    # the multiline charts match every seed's own tag
    seed_regex = categories[RUN_CATEGORY][0]["multiline"]["tag"][0]
    query = urllib.parse.urlencode({"run": "gc/seed_2", "tag": seed_regex})
    served = _request(opener, f"{base}/data/plugin/custom_scalars/scalars?{query}")
    assert list(served["tag_to_events"]) == ["train/loss"] and len(served["tag_to_events"]["train/loss"]) == 7


@pytest.mark.slow
def test_hparams_plugin_shows_each_runs_status(server):
    opener, base, (out, records, _) = server
    request = {
        "startIndex": 0,
        "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [],
    }
    deadline, groups = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(groups) < len(records):
        groups = _request(opener, f"{base}/data/plugin/hparams/session_groups", request).get("sessionGroups", [])
        time.sleep(0.5)
    by_name = {g["sessions"][0]["name"]: g for g in groups}
    assert set(by_name) == {f"{r.arm}/seed_{r.seed}" for r in records}
    for record in records:
        group = by_name[f"{record.arm}/seed_{record.seed}"]
        assert group["hparams"]["compare/status"] == record.status
        expected = "STATUS_SUCCESS" if record.status == "finished" else "STATUS_FAILURE"
        assert group["sessions"][0]["status"] == expected
    experiment = _request(opener, f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
    names = [h["name"] for h in experiment["hparamInfos"]]
    # the outcome leads the columns the HPARAMS table shows without asking
    assert names[:4] == ["compare/arm", "compare/final_metric", "compare/seed", "compare/status"]
    columns = set(names)
    assert {"compare/status", "compare/final_metric", "compare/diverged_at_step", "model/lr", "seed"} <= columns
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"val/acc", "train/loss"}
