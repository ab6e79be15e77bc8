"""The inventory as the live agent runs it: new assets after learning, saved and restored with the state."""

from __future__ import annotations

import csv

import pytest

from agent.inventory_stage import InventoryStage
from agent.pipeline import Pipeline
from agent.sources import CaptureReader
from models.state import StateError
from tests.conftest import PROJECT_PCAPS

MIXED = PROJECT_PCAPS / "mixed.pcap"


def first_attack_ns():
    rows = list(csv.DictReader(open(PROJECT_PCAPS / "mixed.labels.csv")))
    return min(float(r["start_ts"]) for r in rows) * 1e9, {r["src"] for r in rows}


def run(stage_factory, until_ns=None, mode_after_ns=None):
    pipeline = Pipeline()
    stage = stage_factory(pipeline)
    alerts = []
    for batch in CaptureReader(MIXED, block_size=64 << 10):
        events = pipeline.process(batch)
        mode = "monitor" if mode_after_ns is not None and batch.ts[-1] >= mode_after_ns else "learn"
        alerts += stage.observe(events, mode)
    alerts += stage.observe(pipeline.finish(), "monitor" if mode_after_ns is not None else "learn")
    return stage, alerts


def test_new_asset_after_learning_is_one_low_alert():
    attack, sources = first_attack_ns()
    stage, alerts = run(InventoryStage, mode_after_ns=attack - 10e9)
    assert [a.src for a in alerts] == ["10.20.0.66"] and "10.20.0.66" in sources
    a = alerts[0]
    assert a.rule == "inventory.new_asset" and a.severity == "low" and a.technique == "T0846"
    assert a.first_ts >= attack - 1e9 and "appeared after the baseline" in a.message
    rec = a.to_ecs()
    assert rec["source"]["ip"] == "10.20.0.66" and rec["event"]["kind"] == "alert"


def test_learning_only_raises_nothing():
    _, alerts = run(InventoryStage)
    assert alerts == []


def test_saved_inventory_comes_back_and_tampering_is_refused(tmp_path):
    stage, _ = run(InventoryStage)
    key = b"k" * 32
    stage.save(tmp_path, key)
    pipeline = Pipeline()
    back = InventoryStage.load(tmp_path, pipeline, key=key)
    assert back.inventory.assets() == stage.inventory.assets()
    assert back.inventory.conversation_keys() == stage.inventory.conversation_keys()
    with pytest.raises(StateError):
        InventoryStage.load(tmp_path, Pipeline(), key=b"x" * 32)
    assert InventoryStage.load(tmp_path / "none", Pipeline(), key=key) is None
