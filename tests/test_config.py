"""The configuration file: defaults, one-line errors naming the key, `otwatch config check|show`,
the example file in deploy/, and the state checkpoints' safety (HMAC, atomic swap)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from agent.config import Config, load, parse_text, to_toml
from agent.daemon import Checkpoints, read_key
from agent.errors import InputError
from tests.conftest import ROOT


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


def test_defaults_suit_a_substation():
    c = Config()
    assert c.capture.ports == [502, 2404, 20000] and c.capture.promiscuous
    assert c.metrics.listen.startswith("127.0.0.1:")  # loopback unless configured
    assert c.detection.learning_period == 7 * 86400 and c.detection.learning_clock == "wall"
    assert c.daemon.user == "otwatch"
    ring = c.capture.ring_blocks * c.capture.ring_block_size
    assert ring <= 64 << 20  # leaves room in a 150 MB budget


@pytest.mark.parametrize("text, message", [
    ('[capture]\nintreface = "eth0"\n', "capture.intreface: unknown key (expected one of: interface, ports"),
    ('[captur]\ninterface = "eth0"\n', "captur: unknown section (expected one of: capture, detection"),
    ('[capture]\nports = [502, 70000]\n', "capture.ports: expected a list of port numbers 1-65535, got [502, 70000]"),
    ('[capture]\nports = "502"\n', 'capture.ports: expected a list of port numbers 1-65535, got "502"'),
    ('[capture]\ninterface = "eth0/x"\n', "capture.interface: expected an interface name"),
    ('[capture]\nring_block_size = 5000\n', "capture.ring_block_size: expected a size"),
    ('[detection]\nlearning_period = "7 days"\n', "detection.learning_period: expected a duration"),
    ('[detection]\nlearning_clock = "moon"\n', "detection.learning_clock: expected one of 'wall', 'capture'"),
    ('[detection]\ndetectors = ["allowlist", "magic"]\n', "detection.detectors: expected a list of detector names"),
    ('[alerts]\nfsync = "yes"\n', 'alerts.fsync: expected true or false, got "yes"'),
    ('[limits]\nmax_flows = 3\n', "limits.max_flows: expected an integer from 16 to 10,000,000, got 3"),
    ('[limits]\nmax_flows = true\n', "limits.max_flows: expected an integer"),
    ('[metrics]\nlisten = "localhost:99999"\n', "metrics.listen: expected HOST:PORT"),
    ('[metrics]\nlisten = "not a host:80"\n', "metrics.listen: expected HOST:PORT"),
    ('[metrics]\ntls_cert = "/x.pem"\n', "metrics.tls_cert: expected tls_cert and tls_key together"),
    ('[capture]\nsnaplen = 65535\nring_block_size = "64KiB"\n', "capture.ring_block_size: expected at least snaplen"),
    ("capture = 3\n", "capture: expected a [capture] table"),
    ('[capture\n', "not valid TOML"),
])
def test_bad_values_are_one_line_errors_naming_the_key(text, message):
    with pytest.raises(InputError) as e:
        parse_text(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_error_names_the_line(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[capture]\ninterface = "eth1"\n\n[limits]\nmax_flows = "many"\n')
    with pytest.raises(InputError, match=r"c\.toml: limits\.max_flows: .* \(line 5\)$"):
        load(p)


def test_units():
    c = parse_text('[detection]\nlearning_period = "36h"\nmin_span = 90\n[alerts]\nmax_bytes = "16MiB"\n'
                   '[state]\ncheckpoint_interval = "2m"\n')
    assert (c.detection.learning_period, c.detection.min_span, c.alerts.max_bytes, c.state.checkpoint_interval) == \
        (36 * 3600.0, 90.0, 16 << 20, 120.0)


def test_show_round_trips_and_check(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[capture]\ninterface = "eth2"\nports = [20000, 502]\n[metrics]\nlisten = ""\n')
    r = run_cli("config", "show", "--config", str(p))
    assert r.returncode == 0, r.stderr
    shown = tomllib.loads(r.stdout)
    assert shown["capture"]["interface"] == "eth2" and shown["capture"]["ports"] == [502, 20000]
    assert shown["metrics"]["listen"] == "" and shown["state"]["directory"] == "/var/lib/otwatch"
    assert parse_text(r.stdout) == load(p)
    j = json.loads(run_cli("config", "show", "--json", "--config", str(p)).stdout)
    assert j["capture"]["interface"] == "eth2"
    r = run_cli("config", "check", "--config", str(p))
    assert r.returncode == 2 and "no such network interface 'eth2'" in r.stderr  # check looks at this machine
    p.write_text(good_config(tmp_path))
    r = run_cli("config", "check", "--config", str(p))
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, f"{p}: ok", "")


def good_config(tmp_path, extra: str = "") -> str:
    """A configuration `run` accepts on this machine: loopback, state and logs under tmp_path."""
    return (f'[capture]\ninterface = "lo"\nports = []\n[state]\ndirectory = "{tmp_path}/state"\n'
            f'key_file = "{tmp_path}/key/state.key"\n[alerts]\nlog = "{tmp_path}/log/alerts.jsonl"\n'
            f'[daemon]\nuser = ""\n{extra}' + ("" if "[metrics]" in extra else '[metrics]\nlisten = ""\n'))


def test_check_bad_file_exit_2_with_line(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(good_config(tmp_path, 'log_level = "loud"\n'))
    r = run_cli("config", "check", "--config", str(p))
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[1] == f"{p}: 1 error(s)"
    assert lines[0] == (f"error: {p}:11: daemon.log_level: expected one of 'debug', 'info', 'warning', 'error', "
                        'got "loud"')
    r = run_cli("config", "check", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "no such config file" in r.stderr


def test_check_lists_every_problem_run_would_meet(tmp_path):
    p = tmp_path / "c.toml"
    (tmp_path / "state").mkdir()
    p.write_text("\n".join([
        "[capture]", 'interface = ""', "ports = [502, 2404, 20000]",  # 2, 3 (warning: content detection)
        "[detection]", "alert_cooldown = nan", "learning_period = inf",  # 5, 6
        "[state]", f'directory = "{tmp_path}/state"', f'key_file = "{tmp_path}/state/state.key"',  # 9
        "[metrics]", 'listen = "0.0.0.0:10502"', f'auth_file = "{tmp_path}/none"',  # 11 (warning), 12
        "[daemon]", 'user = "no-such-otwatch-user"', ""]))  # 14
    r = run_cli("config", "check", "--config", str(p))
    assert r.returncode == 2
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    warnings = [x for x in r.stderr.splitlines() if x.startswith("warning: ")]
    want = {2: "capture.interface", 5: "detection.alert_cooldown", 6: "detection.learning_period",
            9: "state.key_file", 12: "metrics.auth_file", 14: "daemon.user"}
    got = {int(x.split(":")[2]): x.split(": ")[2].split(":")[0] for x in errors}
    assert got == want, errors
    assert {int(x.split(":")[2]) for x in warnings} == {3, 11}
    assert any("20001" in w and "content detection" in w for w in warnings)
    with pytest.raises(InputError, match="alert_cooldown"):  # run refuses the file: one line, the first
        load(p)


def test_env_config_path(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[capture]\ninterface = "eth9"\n')
    r = run_cli("config", "show", "--json", env=dict(os.environ, OTWATCH_CONFIG=str(p)))
    assert json.loads(r.stdout)["capture"]["interface"] == "eth9"


def test_example_config_is_the_defaults():
    example = ROOT / "deploy" / "otwatch.toml"
    text = example.read_text()
    cfg = parse_text(text)
    assert cfg == Config()
    # every key is documented in the example with its help line
    assert to_toml(Config(), comments=True).count("#") <= text.count("#")


# -- checkpoints ----------------------------------------------------------------------------------------
def _engine():
    from agent.daemon import _modbus_frames
    from agent.pipeline import Pipeline
    from models.engine import DetectionEngine
    from parsers.frames import FrameBatch

    frames, ts = _modbus_frames(60)
    eng = DetectionEngine(learn_seconds=3.0, detectors=("allowlist", "process", "cycle"))
    p = Pipeline()
    eng.process(p.process(FrameBatch.from_frames(frames, ts=ts)))
    eng.process(p.finish())
    assert eng.mode == "monitor"
    return eng


def test_checkpoint_round_trip_and_tamper(tmp_path):
    from models.engine import DetectionEngine

    key = read_key(tmp_path / "keys" / "state.key")
    assert (tmp_path / "keys" / "state.key").stat().st_mode & 0o777 == 0o600
    assert read_key(tmp_path / "keys" / "state.key") == key  # read back, not replaced
    eng = _engine()
    cp = Checkpoints(tmp_path / "state", key)
    first = cp.write(lambda d, k: eng.save(d, key=k))
    second = cp.write(lambda d, k: eng.save(d, key=k))
    third = cp.write(lambda d, k: eng.save(d, key=k))
    assert cp.current() == third and cp.previous() == second and not first.exists()  # two kept
    assert not (tmp_path / "state" / "key").exists()  # the key is never written beside the state
    back = DetectionEngine.load(cp.current(), key=key)
    assert back.mode == "monitor" and back.allowlist.size() == eng.allowlist.size() > 0
    # tampered arrays: refused
    npz = third / "state.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    from models.state import StateError

    with pytest.raises(StateError, match="HMAC"):
        DetectionEngine.load(third, key=key)
    # another key: refused
    with pytest.raises(StateError):
        DetectionEngine.load(second, key=b"x" * 32)


def test_agent_falls_back_to_previous_then_learning(tmp_path):
    from agent.daemon import Agent

    cfg = parse_text(f'[state]\ndirectory = "{tmp_path}/state"\nkey_file = "{tmp_path}/k"\n'
                     '[detection]\ndetectors = ["allowlist", "process", "cycle"]\n')
    key = read_key(Path(cfg.state.key_file))
    eng = _engine()
    agent = Agent(cfg)
    agent.checkpoints = Checkpoints(cfg.state.directory, key)
    older = agent.checkpoints.write(lambda d, k: eng.save(d, key=k))
    newer = agent.checkpoints.write(lambda d, k: eng.save(d, key=k))
    (newer / "state.json").write_text("{}")  # damaged newest: the one before is used
    assert agent.load_state().mode == "monitor" and agent.loaded_from == older
    (older / "state.hmac").write_text("0" * 64)
    agent.loaded_from = None
    e = agent.load_state()
    assert e.mode == "learn" and agent.loaded_from is None


def test_crash_during_checkpoint_keeps_the_current_one(tmp_path):
    key = b"k" * 32
    eng = _engine()
    cp = Checkpoints(tmp_path, key)
    good = cp.write(lambda d, k: eng.save(d, key=k))

    def dies(d, k):
        (Path(d) / "state.json").write_text("{partial")
        raise OSError("power cut")

    with pytest.raises(OSError):
        cp.write(dies)
    assert cp.current() == good
    from models.engine import DetectionEngine

    assert DetectionEngine.load(cp.current(), key=key).mode == "monitor"
    # the next checkpoint removes the half-written one; the good one stays as the fallback
    nxt = cp.write(lambda d, k: eng.save(d, key=k))
    assert cp.current() == nxt and cp.previous() == good
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [good.name, nxt.name]


def test_key_inside_state_directory_is_refused(tmp_path):
    from agent.daemon import Agent

    cfg = parse_text(f'[capture]\ninterface = "lo"\n[state]\ndirectory = "{tmp_path}"\n'
                     f'key_file = "{tmp_path}/k"\n[daemon]\nuser = ""\n')
    with pytest.raises(InputError, match="state.key_file: expected a path outside state.directory"):
        Agent(cfg).open()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian: systemd)")
def test_systemd_unit_verifies(tmp_path):
    unit = ROOT / "deploy" / "otwatch.service"
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if "otwatch.service" in line and "Command /usr/bin/otwatch" not in line
                and "is not executable" not in line]
    assert not problems, r.stdout + r.stderr
    text = unit.read_text()
    for needed in ("AmbientCapabilities=CAP_NET_RAW", "CapabilityBoundingSet=CAP_NET_RAW", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "StateDirectory=otwatch", "ProtectHome=yes", "PrivateTmp=yes",
                   "RestrictAddressFamilies=AF_UNIX AF_PACKET AF_INET AF_INET6", "User=otwatch",
                   "ExecReload=/bin/kill -HUP $MAINPID", "LoadCredential=state.key:"):
        assert needed in text, needed
    assert np.all([line.strip() == "" or "=" in line or line.startswith(("[", "#"))
                   for line in text.splitlines()])


def test_syslog_copy_of_each_alert(tmp_path):
    """alerts.syslog sends every alert also as an RFC 5424 message (here to a UDP socket of ours)."""
    import socket

    from agent.daemon import Agent
    from models.alerts import Alert

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    port = rx.getsockname()[1]
    cfg = parse_text(f'[alerts]\nlog = "{tmp_path}/alerts.jsonl"\nsyslog = "udp://127.0.0.1:{port}"\n'
                     'syslog_facility = "local3"\n')
    agent = Agent(cfg)
    agent._open_alert_log()
    try:
        agent._write_alert(Alert(rule="allowlist.new_talker", detector="allowlist", severity="medium",
                                 first_ts=1_700_000_000_000_000_000, last_ts=1_700_000_000_000_000_000,
                                 src="10.0.0.66", dst="10.0.0.20", protocol="modbus", entity="e",
                                 message="10.0.0.66 talked to 10.0.0.20"))
        msg = rx.recv(65535).decode()
    finally:
        agent.alert_log.close()
        rx.close()
    # <PRI> = local3 (19) * 8 + warning (4) for a medium alert; RFC 5424 version 1; MSGID is the rule
    assert msg.startswith("<156>1 ") and " allowlist.new_talker " in msg and "10.0.0.66 talked to" in msg
    assert json.loads((tmp_path / "alerts.jsonl").read_text())["rule"]["name"] == "allowlist.new_talker"


@pytest.mark.parametrize("url", ["udp://nohostport", "http://x:514", "unix:dev/log", "tcp://h:99999"])
def test_bad_syslog_target_is_refused(url):
    with pytest.raises(InputError, match="alerts.syslog"):
        parse_text(f'[alerts]\nsyslog = "{url}"\n')


def test_agent_resumes_learning_from_a_checkpoint_taken_while_learning(tmp_path):
    """A power cut during learning: the agent's checkpoint holds learning so far, and the restarted
    agent goes on learning to the same end (wall clock) instead of starting again."""
    import time

    from agent.daemon import Agent, _modbus_frames, new_engine
    from agent.pipeline import Pipeline
    from parsers.frames import FrameBatch

    cfg = parse_text(f'[state]\ndirectory = "{tmp_path}/state"\nkey_file = "{tmp_path}/k"\n'
                     '[detection]\ndetectors = ["allowlist", "process", "cycle"]\nlearning_period = "2h"\n')
    key = read_key(Path(cfg.state.key_file))
    eng = new_engine(cfg)
    frames, _ = _modbus_frames(60)
    now = time.time_ns()
    p = Pipeline()
    eng.process(p.process(FrameBatch.from_frames(frames, ts=[now + i * 10**8 for i in range(len(frames))])))
    assert eng.mode == "learn" and eng.allowlist.size() > 0
    agent = Agent(cfg)
    agent.checkpoints = Checkpoints(cfg.state.directory, key)
    where = agent.checkpoints.write(lambda d, k: eng.save_progress(d, key=k))
    back = agent.load_state()
    assert agent.loaded_from == where and back.mode == "learn"
    assert back.learn_until_ns == eng.learn_until_ns and back.allowlist.size() == eng.allowlist.size()


@pytest.mark.parametrize("extra, key", [
    ('[detection]\nalert_cooldown = nan\n', "detection.alert_cooldown"),
    ('[metrics]\nlisten = "127.0.0.1:0"\ntls_cert = "/nonexistent/cert.pem"\ntls_key = "/nonexistent/key.pem"\n',
     "metrics.tls_cert"),
    ("", "state.key_file"),
    ("", "daemon.user"),
])
def test_check_and_run_refuse_the_same_files(tmp_path, extra, key):
    """What `run` refuses at start, `config check` reports (naming the same key)."""
    if key == "daemon.user" and os.geteuid() != 0:
        pytest.skip("run drops to daemon.user only when started as root")
    text = good_config(tmp_path, extra)
    if key == "state.key_file":
        text = text.replace(f"{tmp_path}/key/state.key", f"{tmp_path}/state/state.key")
    if key == "daemon.user":
        text = text.replace('user = ""', 'user = "no-such-otwatch-user"')
    p = tmp_path / "c.toml"
    p.write_text(text)
    checked = run_cli("config", "check", "--config", str(p))
    assert checked.returncode == 2 and key in checked.stderr, checked.stderr
    ran = run_cli("run", "--config", str(p))
    assert ran.returncode == 2 and key.split(".")[0] + "." in ran.stderr.splitlines()[-1], ran.stderr
