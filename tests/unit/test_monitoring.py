"""Monitoring components on their own: the FLOPs formula against a hand count, peak lookup, the
throughput-drop, stall and straggler rules on real numbers, alert hooks (a real command and a
real local HTTP server), NVML absent, phase timers, the slow fault, the profiler window on CPU,
the loader's source tags and audio seconds, and the config's checks."""

from __future__ import annotations

import http.server
import json
import logging
import math
import os
import sys
import threading
import time

import pytest
import torch

from monitoring import flops, safe
from monitoring.alerts import Alerts, StallWatch, ThroughputWatch
from monitoring.gpu_stats import GpuStats, sample, throttle_names
from monitoring.straggler import BusyWindow, StragglerDetector, summary
from monitoring.timers import NOTHING, PhaseTimers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------ FLOPs


def hand_count(L, h, a, g, f, s, V, d_k):
    """Every matmul of one token's forward pass, 2 FLOPs per multiply-add, then x3 for backward."""
    q, kv = a * d_k, g * d_k
    matmuls = [
        (h, q),  # Q projection: [1, h] x [h, q]
        (h, kv),  # K
        (h, kv),  # V
        (q, h),  # output projection
        (h, f), (h, f), (f, h),  # SwiGLU: gate, up, down
    ]
    per_layer = sum(2 * k * n for k, n in matmuls)
    per_layer += a * (2 * d_k * s)  # scores: each head's query row x [d_k, s] keys
    per_layer += a * (2 * s * d_k)  # each head's probabilities [1, s] x [s, d_k] values
    lm_head = 2 * h * V
    return 3 * (L * per_layer + lm_head)


def test_flops_per_token_matches_a_hand_count_and_megatrons_closed_form():
    L, h, a, g, f, s, V = 2, 8, 2, 1, 16, 10, 32
    got = flops.flops_per_token(num_layers=L, hidden_size=h, ffn_hidden_size=f, num_attention_heads=a,
                                num_query_groups=g, seq_len=s, vocab_size=V)
    # per layer: Q 128 + K 64 + V 64 + O 128 + SwiGLU 3 x 256 + scores 160 + values 160 = 1472;
    # x 2 layers + LM head 512 = 3456 forward; x 3 with backward
    assert got == hand_count(L, h, a, g, f, s, V, d_k=h // a) == 10_368
    # Megatron-LM's num_floating_point_operations per token (dense, SwiGLU)
    q = h
    closed = 12 * L * h * h * ((1 + g / a + s / h) * q / h + 1.5 * f / h) + 6 * h * V
    assert got == pytest.approx(closed)


def test_flops_per_token_of_llasa_1b_is_9_gflop():
    # Llama-3.2-1B shape, padded LLaSA vocab 194,560, seq 2048: 6N-ish + attention
    got = flops.flops_per_token(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                                num_query_groups=8, seq_len=2048, vocab_size=194_560)
    n_dense = 16 * (2048 * 2048 * 2 + 2 * 2048 * 512 + 3 * 2048 * 8192) + 2048 * 194_560
    assert got == pytest.approx(6 * n_dense + 12 * 16 * 2048 * 2048)
    assert got == pytest.approx(9.0345e9, rel=1e-4)


def test_flops_of_a_config_use_the_padded_vocab(tmp_path):
    from megatron_tts.config import load_config, padded_vocab_size

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"))
    t = cfg.model.transformer
    got = flops.model_flops_per_token(cfg.model.transformer, cfg.data.seq_len, padded_vocab_size(cfg))
    assert got == flops.flops_per_token(
        num_layers=t.num_layers, hidden_size=t.hidden_size, ffn_hidden_size=t.ffn_hidden_size,
        num_attention_heads=t.num_attention_heads, num_query_groups=t.num_query_groups, seq_len=cfg.data.seq_len,
        vocab_size=padded_vocab_size(cfg))


@pytest.mark.parametrize("name,dtype,override,want", [
    ("NVIDIA H100 80GB HBM3", "bf16", None, 989.0),
    ("NVIDIA H100 PCIe", "bf16", None, 756.0),
    ("NVIDIA H200", "bf16", None, 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", None, 312.0),
    ("NVIDIA H100 80GB HBM3", "fp32", None, None),  # TF32 or FP32: not our guess
    ("Some Future GPU", "bf16", None, None),
    (None, "fp32", None, None),  # CPU
    (None, "fp32", 1.5, 1.5),  # the override wins, even on CPU
])
def test_peak_tflops(name, dtype, override, want):
    assert flops.peak_tflops(name, dtype, override) == want


# ------------------------------------------------------------------------------- throughput


def test_throughput_drop_alerts_once_when_the_recent_median_falls_10_percent():
    w = ThroughputWatch(drop=0.10, window=50, recent=5, min_history=10)
    base = [1000, 1012, 990, 1003, 996, 1008, 985, 1001, 994, 1010, 999, 1004]
    assert all(w.update(v) is None for v in base)
    assert w.update(400) is None  # one slow step (a checkpoint, a hiccup) is not a drop
    assert all(w.update(v) is None for v in (1001, 997, 1005, 1002, 998))
    msgs = [w.update(v) for v in (880, 870, 885, 875, 860, 870)]
    # the recent median of 5 crosses 0.9 x ~1000 at the third value below 900
    assert msgs[:2] == [None, None] and msgs[2] is not None, msgs
    assert "fell 1" in msgs[2] and "tokens/s" in msgs[2]
    assert msgs[3:] == [None] * 3  # one alert per drop
    for v in (1000, 1002, 998, 1001, 999):  # recovery re-arms
        assert w.update(v) is None
    assert not w.dropped
    assert [w.update(v) for v in (700, 700, 700)][-1] is not None  # a second drop alerts again


def test_throughput_within_10_percent_never_alerts():
    w = ThroughputWatch(drop=0.10, window=20, recent=5, min_history=10)
    vals = [1000 * (1 + 0.08 * math.sin(i)) for i in range(200)]  # +-8% wobble
    assert all(w.update(v) is None for v in vals)


# ------------------------------------------------------------------------------------ stall


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_stall_rule():
    clock, fired = Clock(), []
    w = StallWatch(stall_s=60, on_stall=lambda m, s: fired.append((m, s)), clock=clock)
    clock.t += 1000
    assert w.check() is None  # before the first step (start-up, compilation) there is no stall
    w.progress(1, 0.5)
    clock.t += 59
    assert w.check() is None
    w.phase = "forward_backward"
    clock.t += 2
    msg = w.check()
    assert msg and "no step completed for 61 s" in msg and "after step 1" in msg and "forward_backward" in msg
    clock.t += 100
    assert w.check() is None  # once per stall
    w.progress(2, 0.5)
    clock.t += 30
    w.pause(True)  # a long checkpoint save
    clock.t += 600
    assert w.check() is None
    w.pause(False)
    clock.t += 59
    assert w.check() is None  # the clock restarted after the save
    for s in range(3, 20):
        w.progress(s, 30.0)  # 30 s steps: 5 x the median is the limit
    clock.t += 149
    assert w.check() is None
    clock.t += 2
    assert "limit 150 s" in w.check()


# -------------------------------------------------------------------------------- straggler


def test_straggler_flagged_after_three_slow_windows_in_a_row():
    d = StragglerDetector(ratio=1.1, windows=3)
    # busy seconds of 4 ranks, as rank_step_times records them; rank 3 is 14-20% slower
    windows = [
        [0.212, 0.208, 0.215, 0.246],
        [0.209, 0.211, 0.214, 0.251],
        [0.210, 0.207, 0.213, 0.244],
        [0.211, 0.209, 0.212, 0.253],
    ]
    assert d.update(windows[0]) == [] and d.update(windows[1]) == []
    flags = d.update(windows[2])
    assert [(f.rank, f.windows, f.new) for f in flags] == [(3, 3, True)]
    assert flags[0].ratio == pytest.approx(0.244 / statistics_median(windows[2]))
    flags = d.update(windows[3])
    assert [(f.rank, f.windows, f.new) for f in flags] == [(3, 4, False)]  # still flagged, alerted once
    assert d.update([0.211, 0.209, 0.212, 0.230]) == []  # 1.09x: back under the threshold, streak reset
    assert d.update(windows[0]) == [] and d.update(windows[1]) == []


def test_straggler_streak_is_broken_by_one_normal_window_and_kept_over_a_missing_one():
    d = StragglerDetector(ratio=1.1, windows=3)
    slow, ok = [0.20, 0.30], [0.20, 0.21]
    assert d.update(slow) == [] and d.update(slow) == [] and d.update(ok) == []
    assert d.update(slow) == [] and d.update(slow) == []
    assert d.update([0.2, float("nan")]) == []  # a rank without a timed step: no verdict
    assert [f.rank for f in d.update(slow)] == [1]
    assert summary([0.3, float("nan"), 0.1, 0.2]) == {"min": 0.1, "median": 0.2, "max": 0.3}


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def test_busy_window_leaves_out_the_warm_up_step_and_the_waits():
    b = BusyWindow()
    b.add(5.0, 0.0)  # the first step of the process
    b.add(1.0, 0.25)
    b.add(1.2, 0.05)
    assert b.take() == pytest.approx((0.75 + 1.15) / 2)
    assert math.isnan(b.take())


# ----------------------------------------------------------------------------------- alerts


class AlertsCfg:
    def __init__(self, command=None, webhook=None, timeout_s=5.0):
        self.command, self.webhook, self.timeout_s = command, webhook, timeout_s


def test_alert_is_a_log_line_an_event_and_runs_a_real_command(tmp_path, caplog):
    out = tmp_path / "alerts.jsonl"
    script = tmp_path / "hook.py"
    script.write_text("import sys, time\ntime.sleep(3)\nopen(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')\n")
    events = []
    a = Alerts(AlertsCfg(command=f"{sys.executable} {script} {out}"), emit=events.append)
    with caplog.at_level(logging.ERROR, logger="monitoring.alerts"):
        t0 = time.perf_counter()
        a.alert("straggler", "rank 1 on node7 is 1.4x the median", step=30)
        took = time.perf_counter() - t0
    assert took < 1.5, took  # the hook (3 s) runs off the training thread; the bound leaves room for load
    assert "ALERT straggler: rank 1 on node7 is 1.4x the median" in caplog.text
    assert events[0]["event"] == "alert" and events[0]["kind"] == "straggler" and events[0]["step"] == 30
    a.close()
    got = json.loads(out.read_text())
    assert got == events[0]


def test_webhook_posts_the_record_to_a_real_server(tmp_path):
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers["Content-Type"], json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        a = Alerts(AlertsCfg(webhook=f"http://127.0.0.1:{server.server_port}/hook"))
        rec = a.alert("throughput_drop", "throughput fell 30%", step=7)
        a.close()
    finally:
        server.shutdown()
    assert received == [("application/json", rec)]


def test_failing_hooks_are_counted_and_never_raise(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(safe.NONFATAL, "total", 0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = Alerts(AlertsCfg(command=f"{sys.executable} -c 'import sys; sys.exit(3)'",
                         webhook=f"http://127.0.0.1:{port}/", timeout_s=2))
    a.alert("nonfinite", "step 3 skipped", step=3)
    a.close()
    assert safe.NONFATAL.by_name.get("alerts.command") and safe.NONFATAL.by_name.get("alerts.webhook")
    assert safe.NONFATAL.total >= 2
    b = Alerts(AlertsCfg(command="/nonexistent/notify-me"))
    b.alert("skips", "x", step=1)
    b.close()
    assert safe.NONFATAL.by_name.get("alerts.command") >= 2


# -------------------------------------------------------------------------------- GPU stats


def nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(nvml_works(), reason="NVML is available on this machine")
def test_without_nvml_gpu_stats_log_one_line_and_do_nothing(caplog):
    g = GpuStats(interval_s=0.01)
    with caplog.at_level(logging.DEBUG, logger="monitoring.gpu_stats"):
        assert g.start() is False
        time.sleep(0.05)
        assert g.take() is None
        g.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "monitoring.gpu_stats"]
    assert len(lines) == 1 and lines[0].startswith("GPU stats off: NVML unavailable"), lines
    assert not [t for t in threading.enumerate() if t.name == "megatron-tts-gpu-stats"]


class FakeNvml:
    """A stand-in for pynvml where NVML cannot run (no driver here): two GPUs, the second without
    ECC or power readings, throttled by a software power cap and thermal slowdown."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC = 0, 1, 1, 0

    class NotSupported(Exception):
        pass

    class _U:
        gpu = 97

    class _M:
        used, total = 71e9, 80e9

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._U()

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._M()

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise self.NotSupported()
        return 650_500

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x4 | 0x20 if h == 1 else 0

    def nvmlDeviceGetTemperature(self, h, kind):
        return 71

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        if h == 1:
            raise self.NotSupported()
        return 0


def test_gpu_sample_record_shape_and_throttle_names():
    recs = sample(FakeNvml(), [0, 1])
    assert recs[0] == {"index": 0, "util_pct": 97, "mem_used_gb": 71.0, "mem_total_gb": 80.0, "power_w": 650.5,
                       "temp_c": 71, "sm_clock_mhz": 1980, "throttle_reasons": [], "ecc_uncorrected": 0}
    assert recs[1]["power_w"] is None and recs[1]["ecc_uncorrected"] is None
    assert recs[1]["throttle_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]
    assert throttle_names(0x1 | 0x40 | 0x80) == ["gpu_idle", "hw_thermal_slowdown", "hw_power_brake_slowdown"]


# ------------------------------------------------------------------------------------ sinks


def test_flatten_for_the_sinks():
    from monitoring.metrics import flatten

    rec = {"step": 3, "loss": 2.5, "skipped_step": True, "phase_s": {"data": 0.1, "logging": None},
           "loss_by_source": {"demo": 2.4, "other": None}, "mem": {"rss_gb": 1.5}, "path": "x", "mfu": None}
    assert flatten(rec) == {"step": 3, "loss": 2.5, "skipped_step": 1, "phase_s/data": 0.1,
                            "loss_by_source/demo": 2.4, "mem/rss_gb": 1.5}


def test_real_offline_wandb_and_an_exception_inside_it(tmp_path, monkeypatch):
    import glob

    from monitoring.metrics import MetricsLogger, WandbSink

    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setattr(safe.NONFATAL, "total", 0)
    monkeypatch.setattr(safe.NONFATAL, "by_name", {})
    sink = WandbSink("megatron-tts-test", str(tmp_path), {"train": {"steps": 2}}, mode="offline")
    assert sink.run is not None and sink.run.settings.mode == "offline"
    logger = MetricsLogger(str(tmp_path), console=False, extra_sinks=[sink])
    logger.log({"step": 1, "loss": 2.0, "phase_s": {"data": 0.1}})
    assert safe.NONFATAL.total == 0
    sink.run.finish()  # from here on wandb itself raises (UsageError: the run is finished)
    logger.log({"step": 2, "loss": 1.9, "phase_s": {"data": 0.1}})
    logger.close()
    assert safe.NONFATAL.by_name.get("wandb.log") == 1
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]  # the source of truth
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0


# ----------------------------------------------------------------------------------- timers


def test_phase_timers_accumulate_take_and_reset():
    t = PhaseTimers(enabled=True, nvtx=True, cuda=False)
    assert not t.nvtx  # NVTX only with CUDA
    with t.phase("data"):
        time.sleep(0.02)
    with t.phase("logging"):
        pass
    with t.phase("logging"):
        time.sleep(0.01)
    with t.span("grad_sync"):
        time.sleep(0.01)
    got = t.take(("data", "grad_sync", "optimizer"))
    assert 0.02 <= got["data"] < 0.2 and 0.01 <= got["grad_sync"] < 0.2 and got["optimizer"] is None
    assert t.take(("data",)) == {"data": None}  # taken means reset
    assert t.take(("logging",))["logging"] >= 0.01  # untaken phases keep accumulating
    off = PhaseTimers(enabled=False, nvtx=True, cuda=False)
    assert off.phase("data") is NOTHING and off.span("grad_sync") is NOTHING


# ----------------------------------------------------------------------------------- faults


def test_slow_fault_parses_its_seconds_and_sleeps_at_its_phase(monkeypatch):
    from megatron_tts import faults

    specs = faults.parse("slow:rank=1,seconds=0.05;hang:rank=9")
    assert specs[0].match == {"rank": "1", "phase": "data"} and specs[0].params == {"seconds": "0.05"}
    monkeypatch.setattr(faults, "_SPECS", specs)
    t0 = time.perf_counter()
    faults.maybe_inject("forward_backward", 3, 1)
    faults.maybe_inject("data", 3, 0)
    assert time.perf_counter() - t0 < 0.04
    faults.maybe_inject("data", 3, 1)
    assert time.perf_counter() - t0 >= 0.05


# -------------------------------------------------------------------------------- profiling


class ProfCfg:
    def __init__(self, torch_steps=None, ranks=(0,), trigger_steps=2):
        self.nsys_steps, self.torch_steps, self.ranks = None, torch_steps, list(ranks)
        self.trigger_file, self.trigger_steps, self.trigger_check_s = "PROFILE", trigger_steps, 0.0


def profiler_steps(path: str) -> list[int]:
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return sorted({int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#")})


def test_torch_profiler_window_and_trigger_file_on_cpu(tmp_path):
    from monitoring.profiling import Profiler

    events = []
    p = Profiler(ProfCfg(torch_steps=[3, 5]), rank=0, run_dir=str(tmp_path), emit=events.append, cuda=False)
    x = torch.randn(64, 64)
    for step in range(1, 8):
        p.step_begin(step)
        if step == 6:  # a touch (newer than the process start) asks for the next 2 steps
            (tmp_path / "PROFILE").write_text("")
        x = x @ x.T / 64
    p.close(7)
    got = [(e["kind"], e["action"], e["step"], e["path"]) for e in events]
    first = str(tmp_path / "profile" / "torch_rank0_steps3-4.json")
    second = str(tmp_path / "profile" / "torch_rank0_steps7-7.json")
    assert got == [("torch", "start", 3, None), ("torch", "stop", 4, first),
                   ("torch", "start", 7, None), ("torch", "stop", 7, second)]
    assert profiler_steps(first) == [3, 4]
    assert profiler_steps(second) == [7]  # the run ended inside the window: a partial trace
    other = Profiler(ProfCfg(torch_steps=[3, 5]), rank=1, run_dir=str(tmp_path / "r1"), cuda=False)
    for step in range(1, 6):
        other.step_begin(step)
    other.close(5)
    assert not os.path.exists(tmp_path / "r1" / "profile")  # rank 1 is not in profiling.ranks


# ----------------------------------------------------------------------------- loader tags


def test_loader_tags_each_token_with_its_source_and_counts_audio_seconds(tmp_path):
    import shutil

    from data_pipeline.layouts import build_layout
    from data_pipeline.loader import PackedLoader
    from data_pipeline.shards import DatasetIndex, load_shard_index
    from data_pipeline.tokenizer import build_tokenizer
    from megatron_tts.config import load_config, vocab_layout

    demo = os.path.join(REPO, "data", "demo")
    other = tmp_path / "other"
    shutil.copytree(demo, other)
    index = json.loads((other / "index.json").read_text())
    index["name"] = "other"
    (other / "index.json").write_text(json.dumps(index))
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"))
    layout = build_layout("llasa", vocab_layout(cfg), cfg.model.loss_segments)
    ld = PackedLoader([demo, str(other), demo], layout=layout, tokenizer=build_tokenizer("byte", None),
                      seq_len=512, micro_batch_size=2, global_batch_size=8, num_workers=1, prefetch=0)
    try:
        assert ld.sources == ["demo", "other", "demo#2"]
        frames = {}
        rate = DatasetIndex.load(demo).codec["frame_rate"]
        for shard in sorted(os.listdir(demo)):
            if shard.endswith(".idx.json"):
                ix = load_shard_index(os.path.join(demo, shard.replace(".idx.json", ".tar")))
                frames.update({f"{ix.shard}:{s.key}": s.n_frames for s in ix.samples})
        seen = set()
        for _ in range(6):
            for b in ld.next_step():
                assert b.source.dtype == torch.int16 and b.source.shape == b.tokens.shape
                assert torch.equal(b.source < 0, b.document_ids < 0)  # -1 exactly on padding
                for r in range(b.tokens.shape[0]):
                    # one source per document
                    for d in b.document_ids[r].unique().tolist():
                        if d >= 0:
                            assert len(b.source[r][b.document_ids[r] == d].unique()) == 1
                seen |= set(b.source.unique().tolist())
                want = sum(frames[k] for row in b.sample_keys for k in row) / rate
                assert b.audio_seconds == pytest.approx(want)
        assert seen == {-1, 0, 1, 2}
        moved = b.to("cpu")
        assert torch.equal(moved.source, b.source) and moved.audio_seconds == b.audio_seconds
    finally:
        ld.close()


# ----------------------------------------------------------------------------------- config


def config_problems(overrides: list[str]) -> list[str]:
    from megatron_tts.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(os.path.join(REPO, "configs", "tiny.yaml"), overrides)
    return info.value.problems


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_nsys_window_without_cuda_is_a_config_error_with_its_fix():
    (p,) = config_problems(["profiling.nsys_steps=[10,12]"])
    assert p.startswith("profiling.nsys_steps: an Nsight Systems capture range needs CUDA")
    assert "profiling.torch_steps" in p


def test_monitoring_config_problems_are_listed_together():
    problems = config_problems([
        "profiling.torch_steps=[5,5]", "alerts.webhook=ftp://x", "alerts.throughput_drop=1.5",
        "monitoring.straggler_ratio=0.9", "logging.wandb_mode=cloud", "profiling.trigger_file=a/b",
        "alerts.command=''", "monitoring.straggler_interval=-1"])
    text = "\n".join(problems)
    for needle in ("profiling.torch_steps: expected [start, stop)", "alerts.webhook: expected an http",
                   "alerts.throughput_drop: a fraction", "monitoring.straggler_ratio: must be > 1",
                   "logging.wandb_mode: 'cloud' unknown", "profiling.trigger_file: a file name",
                   "alerts.command: empty", "monitoring.straggler_interval: must be >= 0"):
        assert needle in text, (needle, problems)
    assert len(problems) == 8


def test_profiling_ranks_beyond_the_world_and_a_round_trip(tmp_path):
    from megatron_tts.config import ConfigError, dump_yaml, load_config, validate_world

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      ["profiling.ranks=[0,3]", "profiling.torch_steps=[2,4]", "alerts.command=notify --x 1",
                       "monitoring.peak_tflops=989"])
    with pytest.raises(ConfigError, match=r"profiling.ranks: \[3\] not in this world of 2"):
        validate_world(cfg, 2)
    validate_world(cfg, 4)
    (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.profiling == cfg.profiling and again.alerts == cfg.alerts and again.monitoring == cfg.monitoring
