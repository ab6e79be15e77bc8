"""``otwatch run`` live: a veth pair into a network namespace, tcpreplay at a set rate, the agent as a process.

The capture is the bundled ``mixed.pcap`` (its ICS-port frames, which is what the kernel filter
passes), cut where the first labelled attack starts: the benign part is replayed, then after a
pause the attack part.  Learning is by capture time and ends in the pause, so the learn/monitor
split falls on the same frame live and in the reference run even if tcpreplay runs late.  The
reference is the same two files read back to back through the pipeline and an engine built from the
same configuration (:func:`agent.daemon.new_engine`), which is what ``otwatch replay`` does.
Compared: the allow-list alerts (rule, entity), which depend on what was seen and in which phase,
not on the microsecond timing a replay over a veth cannot reproduce exactly.

One agent run after another on one state directory: learn + monitor + SIGTERM; restart (state back)
+ SIGKILL mid-run; restart (state back, alerts intact) + SIGHUP reload + SIGTERM; tampered state
refused.  Needs root, iproute2 and tcpreplay; skipped elsewhere.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.config import parse_text
from agent.live import ICS_PORTS
from agent.sources import read_capture
from parsers.decode import L4_TCP, L4_UDP, decode
from tests.conftest import PROJECT_PCAPS, ROOT
from tests.pcapgen import write_pcap

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tcpreplay"),
    reason="needs root, iproute2 and tcpreplay (network namespaces)")

RATE = 3000  # frames/s, tcpreplay --pps
PAUSE_S = 4.0


def split_capture(tmp: Path) -> tuple[Path, Path, int, int]:
    """benign.pcap and attacks.pcap: the ICS frames of mixed.pcap before / from the first attack,
    timestamps spaced at RATE with the pause between them (as they will arrive)."""
    b = read_capture(PROJECT_PCAPS / "mixed.pcap")
    d = decode(b)
    ok = ((d.l4 == L4_TCP) | (d.l4 == L4_UDP)) & (np.isin(d.sport, ICS_PORTS) | np.isin(d.dport, ICS_PORTS))
    with open(PROJECT_PCAPS / "mixed.labels.csv") as fh:
        first_attack = min(float(r["start_ts"]) for r in csv.DictReader(fh))
    idx = np.flatnonzero(ok)
    benign = idx[b.ts[idx] < int(first_attack * 1e9)]
    attacks = idx[b.ts[idx] >= int(first_attack * 1e9)]
    t0 = 1_800_000_000 * 10**9
    step = 10**9 // RATE
    ts1 = [t0 + i * step for i in range(len(benign))]
    ts2 = [ts1[-1] + int(PAUSE_S * 1e9) + i * step for i in range(len(attacks))]
    p1, p2 = tmp / "benign.pcap", tmp / "attacks.pcap"
    write_pcap(p1, [b.frame(i) for i in benign], ts1)
    write_pcap(p2, [b.frame(i) for i in attacks], ts2)
    return p1, p2, len(benign), len(attacks)


def config_text(tmp: Path, iface: str, **over) -> str:
    benign_s = over.pop("benign_s")
    v = {"log_level": "info", "max_bytes": "64MiB", "user": ""} | over
    return f"""
[capture]
interface = "{iface}"
[detection]
learning_clock = "capture"
learning_period = {benign_s + PAUSE_S / 2:.3f}
detectors = ["allowlist", "process"]
min_span = "0s"
[state]
directory = "{tmp}/state"
key_file = "{tmp}/keys/state.key"
checkpoint_interval = "2s"
[alerts]
log = "{tmp}/alerts/alerts.jsonl"
max_bytes = "{v['max_bytes']}"
[metrics]
listen = "127.0.0.1:0"
[daemon]
user = "{v['user']}"
log_level = "{v['log_level']}"
"""


class AgentProcess:
    """``otwatch run`` as a subprocess with its JSON-lines stderr in a file."""

    def __init__(self, config: Path, log: Path):
        self.log = log
        self.fh = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.fh)
        self.start = self.wait_for("start", timeout=60)
        self.metrics = self.start["metrics"]

    def records(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"raw": line})
        return out

    def wait_for(self, event: str, timeout: float = 30, after: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recs = [r for r in self.records()[after:] if r.get("event") == event and r.get("pid", self.proc.pid)
                    in (self.proc.pid,)]
            if recs:
                return recs[-1]
            if self.proc.poll() is not None and event not in ("stop",):
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {event!r} record within {timeout} s: {self.log.read_text()[-2000:]}")

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics, timeout=5) as r:
            assert r.status == 200
            return r.read().decode()

    def sample(self, name: str, labels: str | None = None) -> float:
        total = 0.0
        for line in self.scrape().splitlines():
            if line.startswith(name + ("{" + labels + "}" if labels else "")) and not line.startswith("#"):
                if line.split(" ")[0].split("{")[0] == name:
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_frames(self, n: int, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        got = 0.0
        while time.monotonic() < deadline:
            got = self.sample("otwatch_frames_total") + self.sample("otwatch_capture_drops_total")
            if got >= n:
                return got
            time.sleep(0.2)
        return got

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.fh.close()


@pytest.fixture
def agents():
    started: list[AgentProcess] = []
    yield started
    for a in started:
        a.kill()


def replay(ns, iface, pcap, rate=RATE):
    subprocess.run(["ip", "netns", "exec", ns, "tcpreplay", "-q", "-i", iface, f"--pps={rate}", str(pcap)],
                   check=True, capture_output=True, timeout=120)


def reference_alerts(cfg, files) -> list:
    """What ``otwatch replay`` finds on the same files with the same configuration."""
    from agent.daemon import new_engine
    from agent.pipeline import Pipeline
    from agent.sources import CaptureReader
    from parsers.reassembly import ReassemblyLimits

    pipeline = Pipeline(limits=ReassemblyLimits(max_flows=cfg.limits.max_flows,
                                                idle_timeout_s=cfg.limits.flow_idle_timeout),
                    compiled=cfg.capture.compiled_parsers)
    engine = new_engine(cfg)
    alerts = []
    for f in files:
        for batch in CaptureReader(f):
            alerts += engine.process(pipeline.process(batch))
    alerts += engine.process(pipeline.finish()) + engine.finish()
    return alerts


def alert_keys(records) -> collections.Counter:
    return collections.Counter((r["rule"]["name"], r["otwatch"]["entity"]) for r in records)


def read_alerts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tx_packets(iface: str) -> int:
    return int(Path(f"/sys/class/net/{iface}/statistics/tx_packets").read_text())


def test_run_live_learn_monitor_restart_reload(veth, tmp_path, agents):
    here, ns, there = veth
    benign, attacks, n1, n2 = split_capture(tmp_path)
    benign_s = n1 / RATE
    conf = tmp_path / "otwatch.toml"
    conf.write_text(config_text(tmp_path, here, benign_s=benign_s))
    cfg = parse_text(conf.read_text())
    log = tmp_path / "agent.log"
    alerts_path = tmp_path / "alerts" / "alerts.jsonl"
    tx_before = tx_packets(here)

    # 1. learn, then monitor; metrics answer; SIGTERM stops cleanly
    a = AgentProcess(conf, log)
    agents.append(a)
    assert a.start["mode"] == "learn" and a.start["iface"] == here and a.start["source"] == "ring"
    assert abs(a.start["learning_left_s"] - cfg.detection.learning_period) < 1e-6
    assert a.sample("otwatch_mode", 'mode="learn"') == 1.0
    replay(ns, there, benign)
    time.sleep(PAUSE_S)
    replay(ns, there, attacks)
    seen = a.wait_frames(n1 + n2)
    assert seen == n1 + n2
    assert a.sample("otwatch_mode", 'mode="monitor"') == 1.0
    assert a.stop() == 0
    stop = a.wait_for("stop")
    # every frame was seen, or its loss counted
    assert stop["received"] == n1 + n2
    assert stop["frames"] + stop["kernel_drops"] + stop["internal_drops"] == n1 + n2
    assert stop["alerts_lost"] == 0 and stop["mode"] == "monitor" and stop["checkpoints"] >= 2
    # alerts: the same as replaying the same files with the same configuration
    live = read_alerts(alerts_path)
    want = reference_alerts(cfg, [benign, attacks])
    assert stop["internal_drops"] == 0 and stop["kernel_drops"] == 0, "lost frames: alerts cannot match"
    want_keys = collections.Counter((x.rule, x.entity) for x in want)
    assert any(k[0].startswith("allowlist.") for k in want_keys)
    opened = [r for r in live if r["otwatch"]["status"] == "open"]
    assert {k: v for k, v in alert_keys(opened).items() if k[0].startswith("allowlist.")} == \
        {k: v for k, v in want_keys.items() if k[0].startswith("allowlist.")}
    # each incident: one record when it opened, one with the same event.id when it closed (clean stop)
    closed = {r["event"]["id"]: r for r in live if r["otwatch"]["status"] == "closed"}
    one_shot = {i for i, r in closed.items() if r["rule"]["name"].startswith("inventory.")}  # complete when raised
    assert one_shot and sorted(r["event"]["id"] for r in opened) == sorted(set(closed) - one_shot)
    assert all(closed[r["event"]["id"]]["otwatch"]["count"] >= r["otwatch"]["count"] for r in opened)
    assert len(live) == stop["alerts_written"]
    assert (tmp_path / "state" / "current").is_symlink()

    # 2. restart: the learned state is back (monitoring at once); SIGKILL mid-run
    b = AgentProcess(conf, log)
    agents.append(b)
    assert b.start["mode"] == "monitor" and b.start["loaded_from"].startswith(str(tmp_path / "state"))
    assert b.start["learning_left_s"] == 0
    before = len(live)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpreplay", "-q", "-i", there, f"--pps={RATE // 3}",
                             str(attacks)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while len(read_alerts(alerts_path)) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        written = alerts_path.read_bytes()
        assert len(read_alerts(alerts_path)) > before, "a restarted agent with its state back alerts at once"
        b.proc.kill()  # mid-run: tcpreplay is still sending
        b.proc.wait(10)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()

    # 3. restart after SIGKILL: every alert written before is still there, state back; SIGHUP reload
    c = AgentProcess(conf, log)
    agents.append(c)
    assert c.start["mode"] == "monitor"
    assert alerts_path.read_bytes().startswith(written)
    assert all(r["event"]["kind"] == "alert" for r in read_alerts(alerts_path))
    n_records = len(c.records())
    conf.write_text(config_text(tmp_path, here, benign_s=benign_s, log_level="debug", max_bytes="32MiB"))
    c.proc.send_signal(signal.SIGHUP)
    rel = c.wait_for("reload", after=n_records)
    assert rel["mode"] == "monitor" and "alerts.max_bytes" in rel["changed"] and "daemon.log_level" in rel["changed"]
    assert rel["needs_restart"] == []
    assert c.sample("otwatch_mode", 'mode="monitor"') == 1.0
    # a broken file on SIGHUP is refused and the running configuration kept
    conf.write_text(config_text(tmp_path, here, benign_s=benign_s).replace('learning_clock = "capture"',
                                                                         'learning_clock = "sundial"'))
    c.proc.send_signal(signal.SIGHUP)
    refused = c.wait_for("reload_refused", after=n_records)
    assert "detection.learning_clock" in refused["msg"]
    assert c.proc.poll() is None
    assert c.stop() == 0
    assert c.wait_for("stop")["mode"] == "monitor"

    # 4. a tampered checkpoint is refused and the agent learns again rather than trusting it
    conf.write_text(config_text(tmp_path, here, benign_s=benign_s))
    for ckpt in (tmp_path / "state").glob("ckpt-*"):
        meta = json.loads((ckpt / "state.json").read_text())
        meta["err_max"] = 1e9  # an attacker's edit: silence the parser-health detector
        (ckpt / "state.json").write_text(json.dumps(meta))
    d = AgentProcess(conf, log)
    agents.append(d)
    assert d.start["mode"] == "learn" and d.start["loaded_from"] is None
    refused = [r for r in d.records() if r.get("event") == "state_refused"]
    assert refused and "HMAC" in refused[0]["msg"]
    assert d.stop() == 0

    # the agent never transmitted on the capture interface
    assert tx_packets(here) == tx_before
    assert all(r.get("level") != "error" or r.get("event") in ("state_refused", "reload_refused", "alert")
               for r in d.records()), [r for r in d.records() if r.get("level") == "error"]


def test_run_drops_root_after_opening_the_socket(veth, tmp_path, agents):
    here, ns, there = veth
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"otwatch-priv-{os.getpid()}"
    base.mkdir(mode=0o755)
    try:
        conf = base / "otwatch.toml"
        text = config_text(base, here, benign_s=3600, user="nobody").replace('"capture"', '"wall"')
        conf.write_text(text)
        a = AgentProcess(conf, tmp_path / "agent.log")
        agents.append(a)
        assert a.start["user"] == "nobody" and a.start["learning_left_s"] > 3000
        status = dict(line.split(":", 1) for line in Path(f"/proc/{a.proc.pid}/status").read_text().splitlines())
        nobody = 65534
        assert [int(x) for x in status["Uid"].split()] == [nobody] * 4
        assert status["Groups"].strip() == ""
        for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(status[cap], 16) == 0, cap
        assert status["NoNewPrivs"].strip() == "1"
        # capture still works on the socket opened before the drop
        replay(ns, there, PROJECT_PCAPS / "dnp3.pcap")
        assert a.wait_frames(100, timeout=20) >= 100
        # the state key stays root's: created 0600 before the drop
        key = base / "keys" / "state.key"
        assert key.stat().st_uid == 0 and key.stat().st_mode & 0o777 == 0o600
        assert a.stop() == 0
        assert a.wait_for("stop")["frames"] > 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_run_bad_config_is_one_line_exit_2(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text('[capture]\ninterface = "eth0"\n[limits]\nmax_flows = -5\n')
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "limits.max_flows: expected an integer" in r.stderr


def test_run_missing_interface_exit_2(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(config_text(tmp_path, "otw-none0", benign_s=1))
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr.splitlines()[-1]


def test_edge_default_never_loads_numba():
    """compiled_parsers = false (the edge default) feeds chunks one by one: Numba and LLVM, ~150 MB of
    resident memory, are never loaded; true loads them and gives the same events."""
    code = (
        "import sys, json\n"
        "from agent.config import parse_text\n"
        "from agent.daemon import warm_up\n"
        "from agent.pipeline import Pipeline\n"
        "on = sys.argv[1] == 'true'\n"
        "cfg = parse_text('[capture]\\ncompiled_parsers = %s\\n' % sys.argv[1])\n"
        "warm_up(cfg)\n"
        # read the capture with struct: the live agent has no file reader (and its Numba record walk)
        "import struct\n"
        "from parsers.events import EventBatch\n"
        "from parsers.frames import FrameBatch\n"
        "data = open('pcaps/mixed.pcap', 'rb').read(); frames, ts, pos = [], [], 24\n"
        "while pos + 16 <= len(data):\n"
        "    sec, usec, incl, _ = struct.unpack_from('<IIII', data, pos)\n"
        "    frames.append(data[pos + 16: pos + 16 + incl]); ts.append(sec * 10**9 + usec * 1000); pos += 16 + incl\n"
        "p = Pipeline(compiled=cfg.capture.compiled_parsers)\n"
        "ev = EventBatch.concat([p.process(FrameBatch.from_frames(frames[i:i + 1000], ts=ts[i:i + 1000]))\n"
        "                        for i in range(0, len(frames), 1000)] + [p.finish()])\n"
        "print(json.dumps({'numba': 'numba' in sys.modules, 'rows': len(ev), 'pdus': int((ev.kind == 0).sum()),"
        " 'value_sum': float(ev.value[ev.kind == 1].sum())}))\n"
    )
    out = {}
    for flag in ("false", "true"):
        r = subprocess.run([sys.executable, "-c", code, flag], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        out[flag] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["false"]["numba"] is False
    assert out["true"]["numba"] is True
    assert {k: v for k, v in out["false"].items() if k != "numba"} == {k: v for k, v in out["true"].items()
                                                                     if k != "numba"}
    assert out["false"]["pdus"] > 10000
