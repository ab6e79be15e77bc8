"""Baseline review: ``otwatch baseline approve|revoke`` with IDs and options in any order, on a replay's state
and on a running agent's checkpoints (the decision reaches the agent on SIGHUP and at its checkpoint, and
survives later checkpoints; a tampered review file is refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agent import config as config_mod
from agent.daemon import Agent, Checkpoints
from agent.inventory_stage import InventoryStage
from agent.pipeline import Pipeline
from models import review
from models.engine import DetectionEngine
from parsers.events import EventBatch
from tests.conftest import PROJECT_PCAPS, ROOT

KEY = b"0123456789abcdef" * 2


def otwatch(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)


def entries(*args) -> list[dict]:
    done = otwatch("baseline", "show", *args, "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(x) for x in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def learned():
    """An engine that learned the first 990 s of the bundled DNP3 capture (some entries provisional)."""
    from agent.eval import load_batches

    parts = load_batches(PROJECT_PCAPS / "dnp3.pcap")
    ev = EventBatch.concat([p for p in parts if isinstance(p, EventBatch)])
    eng = DetectionEngine(learn_seconds=None, learn_until_ns=int(ev.ts.min()) + 990 * 10**9,
                          detectors=("allowlist", "process", "cycle", "parser"))
    eng.process(ev.select(ev.ts < int(ev.ts.min()) + 1000 * 10**9))
    assert eng.mode == "monitor" and eng.allowlist.provisional_count() >= 2
    return eng


def test_replay_state_ids_and_options_in_any_order(learned, tmp_path):
    state = tmp_path / "st"
    learned.save(state)
    prov = [e["id"] for e in entries("--state", state, "--provisional")]
    assert len(prov) >= 2
    done = otwatch("baseline", "approve", "--state", state, prov[0])  # the order argparse used to refuse
    assert done.returncode == 0, done.stderr
    done = otwatch("baseline", "revoke", prov[1], "--state", state)
    assert done.returncode == 0, done.stderr
    status = {e["id"]: e["status"] for e in entries("--state", state)}
    assert status[prov[0]] == "approved" and status[prov[1]] == "revoked"
    bad = otwatch("baseline", "approve", "--state", state, "talker:ffffffffffffffff")
    assert bad.returncode == 2 and "no such baseline entry" in bad.stderr
    bad = otwatch("baseline", "approve", "--state", state, prov[0], "--bogus")
    assert bad.returncode == 2


@pytest.mark.xfail(strict=False, reason="known since checkpoints moved off the processing thread (issue 15): "
                   "the SIGHUP review is not applied to the engine in this in-process set-up; open")
def test_review_reaches_a_running_agent_and_survives_checkpoints(learned, tmp_path):
    state_dir, key_file = tmp_path / "state", tmp_path / "state.key"
    key_file.write_bytes(KEY)
    cfg = config_mod.parse_text(f'[state]\ndirectory = "{state_dir}"\nkey_file = "{key_file}"\n'
                                '[detection]\ndetectors = ["allowlist", "process", "cycle", "parser"]\n')
    agent = Agent(cfg)
    agent.checkpoints = Checkpoints(state_dir, KEY)
    agent.pipeline = Pipeline()
    agent.engine = learned
    agent.inventory = InventoryStage(agent.pipeline)
    agent.checkpoint("learning finished")
    # the agent runs on: its checkpoints are written by it, never by the review command
    other = tmp_path / "other.toml"  # a configuration whose key file is not there
    other.write_text(f'[state]\nkey_file = "{tmp_path / "missing.key"}"\n')
    without_key = otwatch("baseline", "show", "--state", state_dir, "--config", other)
    assert without_key.returncode == 2 and "state key" in without_key.stderr
    assert without_key.stderr.count("\n") == 1
    prov = [e["id"] for e in entries("--state", state_dir, "--key-file", key_file, "--provisional")]
    done = otwatch("baseline", "approve", "--state", state_dir, prov[0], "--key-file", key_file)
    assert done.returncode == 0 and "SIGHUP" in done.stdout, done.stderr
    shown = {e["id"]: e["status"] for e in entries("--state", state_dir, "--key-file", key_file)}
    assert shown[prov[0]] == "approved"  # show applies the pending decision
    status = lambda eng: {e["id"]: e["status"] for e in eng.allowlist.entries()}  # noqa: E731
    assert status(agent.engine)[prov[0]] == "provisional"  # not applied yet
    agent.reload()  # SIGHUP (started without a config file: only the review)
    assert status(agent.engine)[prov[0]] == "approved"
    done = otwatch("baseline", "revoke", "--key-file", key_file, prov[1], "--state", state_dir)
    assert done.returncode == 0, done.stderr
    for why in ("scheduled", "scheduled"):  # the next checkpoints carry both decisions
        agent.checkpoint(why)
        saved = DetectionEngine.load(agent.checkpoints.current(), key=KEY)
        assert status(saved)[prov[0]] == "approved" and status(saved)[prov[1]] == "revoked"
    # a review file changed without the key is refused: nothing applied, the agent goes on
    doc = json.loads((state_dir / review.REVIEW_FILE).read_text())
    doc["decisions"][prov[2] if len(prov) > 2 else prov[1]] = "approved"
    doc["decisions"][prov[1]] = "approved"
    (state_dir / review.REVIEW_FILE).write_text(json.dumps(doc))
    agent.reload()
    assert status(agent.engine)[prov[1]] == "revoked"
    bad = otwatch("baseline", "show", "--state", state_dir, "--key-file", key_file)
    assert bad.returncode == 2 and "HMAC" in bad.stderr
