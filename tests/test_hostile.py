"""Hostile input, faults and privilege (issue 15): files the agent must not be turned against, keys
it must not trust, alert records it must not tear, captures that must not blow up memory."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.errors import InputError
from tests.conftest import PROJECT_PCAPS, ROOT

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership and chown checks)")


def _service_user() -> tuple[int, int]:
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def _agent(tmp_path, log_path):
    from agent.daemon import Agent

    cfg = config_mod.Config()
    cfg.alerts.log = str(log_path)
    cfg.alerts.fsync = False
    return Agent(cfg)


# --- 1. privilege --------------------------------------------------------------------------------------

@needs_root
@pytest.mark.root
def test_symlink_at_the_alert_log_path_is_not_followed(tmp_path):
    """The service user owns the log directory and plants a symlink to a root-owned file: the agent
    (still root) refuses it, and the target keeps its content, owner and mode."""
    uid, gid = _service_user()
    logdir = tmp_path / "log"
    logdir.mkdir()
    os.chown(logdir, uid, gid)
    target = tmp_path / "shadow"
    target.write_bytes(b"root:secret\n")
    os.chmod(target, 0o600)
    before = target.stat()
    (logdir / "alerts.jsonl").symlink_to(target)
    agent = _agent(tmp_path, logdir / "alerts.jsonl")
    with pytest.raises(InputError, match="symbolic link"):
        agent._open_alert_log(owner=(uid, gid))
    after = target.stat()
    assert target.read_bytes() == b"root:secret\n"
    assert (after.st_uid, after.st_gid, after.st_mode, after.st_size) == \
        (before.st_uid, before.st_gid, before.st_mode, before.st_size)
    # a hard link to it (possible where fs.protected_hardlinks is off) is refused the same way
    (logdir / "alerts.jsonl").unlink()
    os.link(target, logdir / "alerts.jsonl")
    with pytest.raises(InputError, match="hard links"):
        agent._open_alert_log(owner=(uid, gid))
    assert target.read_bytes() == b"root:secret\n" and target.stat().st_uid == 0


@needs_root
@pytest.mark.root
def test_new_alert_log_is_0640_and_given_to_the_service_user(tmp_path):
    uid, gid = _service_user()
    path = tmp_path / "log" / "alerts.jsonl"
    agent = _agent(tmp_path, path)
    agent._open_alert_log(owner=(uid, gid))
    agent.alert_log.write({"message": "x"})
    agent.alert_log.close()
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (uid, gid)
    assert path.parent.stat().st_uid == uid  # the directory made for it too
    # a file already there (here root's) keeps its owner: only what the agent created is handed over
    other = tmp_path / "root-owned.jsonl"
    other.write_text("")
    os.chmod(other, 0o600)
    agent = _agent(tmp_path, other)
    agent._open_alert_log(owner=(uid, gid))
    agent.alert_log.close()
    assert other.stat().st_uid == 0 and stat.S_IMODE(other.stat().st_mode) == 0o600


def test_fifo_at_the_alert_log_path_is_refused_without_hanging(tmp_path):
    from agent.sinks import AlertLog
    from models.safefile import UnsafeFile

    os.mkfifo(tmp_path / "alerts.jsonl")
    with pytest.raises(UnsafeFile, match="not a regular file"):
        AlertLog(tmp_path / "alerts.jsonl")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_state_key_and_basic_auth_readable_by_others_are_refused(tmp_path, mode):
    from agent.daemon import read_key
    from agent.metrics import MetricsEndpoint

    key = tmp_path / "state.key"
    key.write_text("k" * 64)
    os.chmod(key, mode)
    with pytest.raises(InputError, match=f"state.key_file: .*readable or writable by group or others.*{mode:04o}"):
        read_key(key)
    os.chmod(key, 0o600)
    assert read_key(key) == b"k" * 64
    auth = tmp_path / "auth"
    auth.write_text("prometheus:secret\n")
    os.chmod(auth, mode)
    with pytest.raises(InputError, match="basic-auth file: .*chmod 600"):
        MetricsEndpoint.start("127.0.0.1:0", auth_file=str(auth), names=("l", "t", "metrics.auth_file"))


def test_replay_state_key_lives_outside_the_state_directory(tmp_path):
    """Whoever can write DIR cannot swap in a baseline of their own with the key that blesses it."""
    from agent.cli import main
    from models import state as state_io
    from models.engine import DetectionEngine

    st = tmp_path / "st"
    rc = main(["replay", str(PROJECT_PCAPS / "dnp3.pcap"), "--learn", "990s", "--state", str(st), "--json",
               "--no-progress"])
    assert rc == 0
    kf = tmp_path / "st.key"
    assert kf.is_file() and stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert not (st / "key").exists() and not any("key" in p.name for p in st.iterdir())
    assert stat.S_IMODE((st / "state.json").stat().st_mode) == 0o640
    # the attacker's own baseline, signed with a key they put inside DIR (the old layout)
    forged = tmp_path / "forged"
    DetectionEngine(learn_seconds=1.0).save(forged, key=b"attacker" * 4)
    for name in ("state.json", "state.npz", "state.hmac"):
        (st / name).write_bytes((forged / name).read_bytes())
    (st / "key").write_bytes(b"attacker" * 4)
    os.chmod(st / "key", 0o600)
    with pytest.raises(state_io.StateError, match="HMAC"):
        DetectionEngine.load(st)
    # with the real key gone, an old-layout key in a directory others can write is not trusted
    kf.unlink()
    os.chmod(st, 0o777)
    with pytest.raises(state_io.StateError, match="no key"):
        DetectionEngine.load(st)
    # ... and in a private directory it is read (old layout, with a warning)
    os.chmod(st, 0o700)
    assert DetectionEngine.load(st).allowlist.size() == 0  # the (here: forged, empty) old-layout state
