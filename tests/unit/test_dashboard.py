"""monitoring/dashboard.py without a browser: reading metrics.jsonl (latest incarnation per step,
torn lines, non-finite values, incremental reads), downsampling, bounded GPU/rank bins, the page's
embedded data, and the command line's errors. `write_synthetic_run` (the full metrics schema) is
shared with tests/integration/test_dashboard.py."""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import subprocess
import sys

import pytest

from monitoring import dashboard
from monitoring.dashboard import MAX_POINTS, RunData, render_html
from tests.helpers import REPO, env

SOURCES = ("libriheavy", "emilia")
CONFIG = """model:
  transformer: {num_layers: 16, hidden_size: 2048, num_attention_heads: 32, num_query_groups: 8}
  layout: llasa
parallel: {tp: 2, pp: 1, dp: 4}
data: {seq_len: 2048, paths: [s3://bucket/shards]}
train: {steps: 200000, global_batch_size: 512}
optim:
  optimizer: {lr: 0.0003}
"""


def step_record(step: int, loss: float, t: float, ranks: int = 8) -> dict:
    """A step record with every field of the schema (existing and new)."""
    st = 1.0 + 0.05 * math.sin(step / 50)
    phases = {"data": 0.05, "forward_backward": 0.7 * st, "grad_sync": 0.1, "optimizer": 0.1, "checkpoint": 0.0,
              "logging": 0.01}
    return {
        "step": step, "time": t, "consumed_samples": step * 512, "consumed_tokens": step * 1_000_000,
        "consumed_docs": step * 3000, "loss": loss, "loss_speech": loss * 1.05, "loss_text": loss * 0.8,
        "lr": 3e-4 * min(1.0, step / 2000), "grad_norm": 1.0 + 0.1 * math.cos(step), "tokens_per_s": 1e6 / st,
        "tokens_per_s_per_gpu": 1e6 / st / ranks, "tflops_per_gpu": 350.0 / st, "mfu": 0.45 / st,
        "step_time_s": st, "data_wait_s": 0.05, "pack_efficiency": 0.97, "skipped_step": False,
        "skipped_steps": 0, "loss_spikes": 0, "rollbacks": 0, "skipped_bad_sample": 0, "skipped_bad_shard": 0,
        "epoch": 0, "consumed_packs": step * 512, "nonfatal_errors": 0, "phase_s": phases,
        "audio_hours": step * 0.5, "loss_by_source": {s: loss + 0.1 * i for i, s in enumerate(SOURCES)},
        "mem": {"allocated_gb": 40.0, "reserved_gb": 60.0, "peak_gb": 65.0 + step * 1e-6, "rss_gb": 20.0},
    }


def loss_at(step: int, incarnation: int = 0) -> float:
    return 2.0 + 6.0 / math.sqrt(step) + 0.5 * incarnation


def write_synthetic_run(run_dir: str, steps: int, resume_at: int | None = None, events_every: int = 100) -> dict:
    """A run dir that follows the full metrics.jsonl schema: `steps` step records (plus, with
    `resume_at`, the steps after it logged a second time by a resumed incarnation whose loss is 0.5
    higher), every event kind, gpu events on 2 hosts x 4 GPUs (throttling and an ECC error on
    host-b:3), rank_step_times with rank 5 1.6x slow from 40% to 60% of the run, a skipped step
    with a "nan" loss, an "inf" grad norm, a torn line, config.yaml, exit and hang records.
    Returns the facts a test checks."""
    os.makedirs(os.path.join(run_dir, "exit"), exist_ok=True)
    os.makedirs(os.path.join(run_dir, "hang"), exist_ok=True)
    rng = random.Random(0)
    t0 = 1_790_000_000.0
    nan_step, inf_step = steps // 3, steps // 3 + 1
    lines = []

    def emit(rec: dict) -> None:
        lines.append(json.dumps(rec))

    def run_steps(first: int, last: int, incarnation: int) -> None:
        for s in range(first, last + 1):
            t = t0 + s + 10_000 * incarnation
            r = step_record(s, loss_at(s, incarnation), t)
            if s == nan_step:
                r.update(loss="nan", skipped_step=True, skipped_steps=1)
            if s == inf_step:
                r["grad_norm"] = "inf"
            emit(r)
            if s % events_every == 0:
                frac = s / steps
                slow = 0.4 <= frac < 0.6
                times = [1.0 + 0.01 * rng.random() for _ in range(8)]
                if slow:
                    times[5] *= 1.6
                hosts = ["host-a"] * 4 + ["host-b"] * 4
                emit({"event": "rank_step_times", "step": s, "time": t, "times_s": times, "hosts": hosts,
                      "min": min(times), "median": sorted(times)[4], "max": max(times)})
                for h, host in enumerate(("host-a", "host-b")):
                    gpus = []
                    for i in range(4):
                        throttled = host == "host-b" and i == 2 and 0.7 <= frac < 0.72
                        gpus.append({"index": i, "util_pct": 95.0 - h, "mem_used_gb": 70.0 + i, "mem_total_gb": 80.0,
                                     "power_w": 650.0 + 10 * i, "temp_c": 70.0 + (15 if throttled else 0),
                                     "sm_clock_mhz": 1700.0 if throttled else 1980.0,
                                     "throttle_reasons": ["hw_thermal_slowdown"] if throttled else ["gpu_idle"] * (s == events_every),
                                     "ecc_uncorrected": 1 if (host == "host-b" and i == 3 and frac >= 0.9) else 0})
                    emit({"event": "gpu", "time": t, "step": s, "rank": 4 * h, "host": host, "gpus": gpus})
                if slow and s % (5 * events_every) == 0:
                    emit({"event": "straggler", "step": s, "time": t, "rank": 5, "host": "host-b", "ratio": 1.6,
                          "windows": 3})
            if s % 1000 == 0:
                emit({"event": "checkpoint", "step": s, "path": f"{run_dir}/checkpoints/step_{s:08d}", "async": True,
                      "blocking_s": 0.4, "total_s": 12.0, "attempts": 1})
            if s == steps // 2:
                emit({"event": "checkpoint_failed", "step": s, "error": "OSError: [Errno 28] No space left on device </script><b>x",
                      "attempts": 3})
                emit({"event": "alert", "step": s, "time": t, "kind": "throughput_drop", "message": "tokens/s fell 30%"})
                emit({"event": "profile", "step": s, "time": t, "kind": "torch", "action": "start", "path": "/x/prof"})
                emit({"event": "rollback", "failed_step": s, "to_step": s, "path": "/ck", "skipped_steps": 1,
                      "loss_spikes": 0, "rollbacks": 1})

    run_steps(1, steps, 0)
    lines.append('{"step": 17, "loss": 1.0, "lr"')  # a torn write
    lines.append("")
    if resume_at is not None:
        emit({"event": "stop", "step": steps, "path": "/ck", "signal": "SIGTERM", "exit_code": 75})
        emit({"event": "resume", "step": resume_at, "path": f"{run_dir}/checkpoints/step_{resume_at:08d}"})
        run_steps(resume_at + 1, steps, 1)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(CONFIG)
    for rank in range(2):
        with open(os.path.join(run_dir, "exit", f"rank_{rank:05d}.json"), "w") as f:
            json.dump({"rank": rank, "host": "host-a", "pid": 100 + rank, "code": 75, "reason": "requeue",
                       "time": t0 + steps, "step": steps, "signal": "SIGTERM"}, f)
    with open(os.path.join(run_dir, "hang", "hangs.jsonl"), "w") as f:
        f.write(json.dumps({"event": "hang", "rank": 3, "host": "host-a", "step": 7, "phase": "data",
                            "seconds_since_beat": 130.0, "time": t0 + 7}) + "\n")
    return {"steps": steps, "nan_step": nan_step, "inf_step": inf_step, "resume_at": resume_at}


def load(run_dir: str) -> RunData:
    d = RunData(str(run_dir))
    d.refresh()
    return d


def append(path, *records) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def col(d: RunData, name: str) -> list[float]:
    return list(d.cols.cols[name])


# ------------------------------------------------------------------------- reading


def test_a_resumed_step_keeps_only_the_latest_incarnation(tmp_path):
    m = tmp_path / "metrics.jsonl"
    append(m, *({"step": s, "loss": 10.0 + s} for s in range(1, 11)))
    append(m, {"event": "resume", "step": 5, "path": "ck"})
    append(m, *({"step": s, "loss": 20.0 + s} for s in range(6, 9)))
    d = load(tmp_path)
    assert list(d.cols.steps) == list(range(1, 9))  # old 9 and 10 belonged to the dropped incarnation
    assert col(d, "loss") == [11.0, 12.0, 13.0, 14.0, 15.0, 26.0, 27.0, 28.0]
    assert d.records == 13


def test_a_repeated_step_without_a_resume_event_replaces_the_later_records(tmp_path):
    m = tmp_path / "metrics.jsonl"
    append(m, *({"step": s, "loss": 1.0} for s in (10, 20, 30, 40)), {"step": 20, "loss": 2.0})
    d = load(tmp_path)
    assert list(d.cols.steps) == [10, 20] and col(d, "loss") == [1.0, 2.0]


def test_a_rollback_drops_the_steps_after_the_restored_one(tmp_path):
    m = tmp_path / "metrics.jsonl"
    append(m, *({"step": s, "loss": 1.0, "skipped_step": s > 6} for s in range(1, 9)))
    append(m, {"event": "rollback", "failed_step": 9, "to_step": 5, "path": "ck"})
    d = load(tmp_path)
    assert list(d.cols.steps) == [1, 2, 3, 4, 5]
    assert [e["to_step"] for e in d.events["rollback"]] == [5]
    assert d.payload()["markers"][0] == {"kind": "rollback", "step": 9, "time": None,
                                         "msg": "rollback: step 9 broke the skip budget; restored step 5 (ck)"}


def test_torn_lines_non_finite_strings_and_late_fields(tmp_path):
    m = tmp_path / "metrics.jsonl"
    append(m, {"step": 1, "loss": "nan", "grad_norm": "inf"}, '{"step": 2, "lo', "[1, 2]", "",
           {"step": 3, "loss": 2.5, "mfu": 0.4, "phase_s": {"data": 0.1}, "mem": None})
    d = load(tmp_path)
    assert d.bad_lines == 2 and d.records == 2
    assert d.cols.nonfinite == {"loss": 1, "grad_norm": 1}
    assert col(d, "loss")[1] == 2.5 and math.isnan(col(d, "loss")[0])
    assert math.isnan(col(d, "mfu")[0]) and col(d, "mfu")[1] == 0.4  # the field appeared at step 3
    payload = d.payload()
    json.dumps(payload, allow_nan=False)  # NaN/inf never reach the page's JSON
    assert payload["steps"]["series"]["loss"]["y"] == [None, 2.5]
    assert payload["steps"]["series"]["phase.data"]["y"] == [None, 0.1]
    assert payload["summary"]["loss"] == 2.5 and payload["summary"]["bad_lines"] == 2


def test_old_key_names_and_an_empty_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    p = load(tmp_path).payload()
    assert p["steps"] == {"x": [], "bucket": 0, "series": {}} and p["summary"]["step"] is None
    append(tmp_path / "metrics.jsonl", {"step": 1, "spikes": 2})
    assert load(tmp_path).payload()["steps"]["series"]["loss_spikes"]["y"] == [2]


def test_refresh_reads_only_what_was_appended_and_waits_for_a_whole_line(tmp_path):
    m = tmp_path / "metrics.jsonl"
    append(m, {"step": 1, "loss": 1.0})
    d = load(tmp_path)
    with open(m, "a") as f:
        f.write('{"step": 2, "loss": 2.0}\n{"step": 3, "lo')  # step 3 is being written
    assert d.refresh() and list(d.cols.steps) == [1, 2]
    offset = d.offset
    d.refresh()  # nothing new but the incomplete line: nothing consumed
    assert d.offset == offset and list(d.cols.steps) == [1, 2]
    with open(m, "a") as f:
        f.write('ss": 3.0}\n')
    d.refresh()
    assert list(d.cols.steps) == [1, 2, 3] and d.bad_lines == 0 and d.records == 3
    m.write_text(json.dumps({"step": 7, "loss": 7.0}) + "\n")  # replaced (a new run in the same dir)
    d.refresh()
    assert list(d.cols.steps) == [7] and d.records == 1


# ------------------------------------------------------------------------- downsampling and bins


def test_downsampling_keeps_the_extremes_and_the_shape(tmp_path):
    n = 25_000
    m = tmp_path / "metrics.jsonl"
    with open(m, "w") as f:
        for s in range(1, n + 1):
            f.write(json.dumps({"step": s, "loss": 1.0 + (s % 7), "tokens_per_s": 5.0}) + "\n")
    f_spike = 12_345
    append(m, {"event": "resume", "step": f_spike - 1, "path": "x"}, {"step": f_spike, "loss": 100.0})
    d = load(tmp_path)
    s = d.cols.downsampled()
    x, loss = s["x"], s["series"]["loss"]
    assert len(x) == MAX_POINTS and s["bucket"] == math.ceil(f_spike / MAX_POINTS)
    assert x == sorted(x) and x[0] >= 1 and x[-1] <= f_spike
    assert max(loss["hi"]) == 100.0 and min(loss["lo"]) == 1.0  # a one-step spike survives in the band
    assert all(lo <= y <= hi for lo, y, hi in zip(loss["lo"], loss["y"], loss["hi"]))
    assert set(s["series"]["tokens_per_s"]["y"]) == {5.0}


def test_gpu_and_rank_bins_stay_bounded_and_average_right(tmp_path):
    m = tmp_path / "metrics.jsonl"
    with open(m, "w") as f:
        for s in range(0, 100_000, 20):
            gpus = [{"index": i, "util_pct": 50.0 + i, "temp_c": "nan", "throttle_reasons": []} for i in range(20)]
            f.write(json.dumps({"event": "gpu", "step": s, "host": "n1", "gpus": gpus}) + "\n")
            times = [1.0] * 300
            times[299] = 2.0
            f.write(json.dumps({"event": "rank_step_times", "step": s, "times_s": times}) + "\n")
    d = load(tmp_path)
    g = d.payload()["gpu"]
    assert dashboard.GPU_BINS // 2 <= len(g["x"]) <= dashboard.GPU_BINS
    assert g["mode"] == "aggregate" and len(g["gpus"]) == 20  # > PER_GPU_LINES: one mean line and a band
    util = g["metrics"]["util_pct"]
    assert set(util["mean"]) == {59.5} and set(util["lo"]) == {50.0} and set(util["hi"]) == {69.0}
    assert "temp_c" not in g["metrics"]  # no finite value: that panel says "no data"
    h = d.payload()["heat"]
    assert dashboard.HEAT_BINS // 2 <= len(h["x"]) <= dashboard.HEAT_BINS
    assert h["ranks"] == 300 and len(h["rows"]) <= dashboard.HEAT_ROWS
    assert set(h["rows"][-1]["ratio"]) == {2.0} and set(h["rows"][0]["ratio"]) == {1.0}  # the group holding rank 299
    assert h["labels"][-1].startswith("ranks ") and h["labels"][-1].split(" ")[1].endswith("-299")


def test_full_schema_payload(tmp_path):
    facts = write_synthetic_run(str(tmp_path), steps=3000, resume_at=2500)
    p = load(tmp_path).payload()
    S = p["steps"]["series"]
    assert p["summary"]["step"] == 3000 and p["summary"]["loss"] == pytest.approx(loss_at(3000, 1))
    assert p["steps"]["bucket"] == 2  # 3000 steps in 2000 buckets
    for name in ("loss", "loss_text", "loss_speech", "tokens_per_s_per_gpu", "mfu", "tflops_per_gpu",
                 "phase.forward_backward", "phase.grad_sync", "mem.peak_gb", "src.libriheavy", "src.emilia",
                 "audio_hours"):
        assert name in S, name
    assert p["nonfinite"] == {"loss": 1, "grad_norm": 1}
    assert p["skipped"] == [facts["nan_step"]]
    kinds = p["event_counts"]
    for k in ("checkpoint", "checkpoint_failed", "resume", "rollback", "stop", "hang", "straggler", "alert",
              "profile", "gpu", "rank_step_times"):
        assert kinds.get(k), k
    assert [(t["gpu"], t["reason"]) for t in p["gpu"]["throttle"]] == [("host-b:2", "hw_thermal_slowdown")]
    assert [(e["gpu"], e["errors"]) for e in p["gpu"]["ecc"]] == [("host-b:3", 1)]
    assert p["gpu"]["mode"] == "per_gpu" and len(p["gpu"]["metrics"]["util_pct"]) == 8
    slow = p["heat"]["rows"][5]["ratio"]
    assert max(v for v in slow if v) > 1.5 and max(v for v in p["heat"]["rows"][4]["ratio"] if v) < 1.05
    assert p["config"][0] == ["model.transformer.num_layers", "16"] and len(p["exits"]) == 2
    html = render_html(p)
    assert html.count("</script>") == 4  # the error text "</script>" of an event stayed inside its string
    data = re.search(r'<script id="dash-data" type="application/json">(.*?)</script>', html, re.S).group(1)
    assert json.loads(data)["summary"]["step"] == 3000


# ------------------------------------------------------------------------- command line


def run_cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitoring.dashboard", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def test_cli_errors_name_the_path_and_what_to_run(tmp_path):
    p = run_cli(str(tmp_path / "nope"))
    assert p.returncode == 2 and str(tmp_path / "nope") in p.stderr and "does not exist" in p.stderr
    p = run_cli(str(tmp_path))
    assert p.returncode == 2 and f"no metrics.jsonl in {tmp_path}" in p.stderr and "launch.pretrain" in p.stderr
    (tmp_path / "metrics.jsonl").write_text("")
    out = tmp_path / "sub" / "page.html"
    p = run_cli(str(tmp_path), "--out", str(out))
    assert p.returncode == 0 and out.is_file() and f"wrote {out}" in p.stdout, p.stderr


def test_serve_on_a_port_in_use_fails_clearly(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = run_cli(str(tmp_path), "--serve", "--port", str(port))
    assert p.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in p.stderr, p.stderr
