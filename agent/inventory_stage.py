"""The asset inventory inside a running pipeline: kept current, saved with the agent's state, and new
assets reported once learning is over.

One source of truth: the inventory (``models/inventory.py``) records every asset and conversation.
A *conversation* that appears after learning is already an alert of the allow-list
(``allowlist.new_talker``, it keys talkers the same way), so this stage raises alerts only for a new
*asset* (an address never seen during learning, including hosts that speak no ICS protocol), at
low severity, so each finding is reported once.
"""

from __future__ import annotations

from pathlib import Path

from models import state as state_io
from models.alerts import Alert
from models.inventory import AssetInventory, InventoryLimits

INVENTORY_DIR = "inventory"


class InventoryStage:
    def __init__(self, pipeline, limits: InventoryLimits | None = None, inventory: AssetInventory | None = None):
        self.pipeline = pipeline
        self.inventory = inventory if inventory is not None else AssetInventory(limits)
        self.inventory.attach(pipeline)

    @property
    def learning(self) -> bool:
        return self.inventory.learning

    def observe(self, events, mode: str) -> list[Alert]:
        """Take one event batch; once ``mode`` is "monitor", return alerts for assets new since."""
        inv = self.inventory
        inv.observe_events(events)
        if mode != "monitor":
            return []
        if inv.learning:
            inv.end_learning()
            return []
        return [self._alert(item["record"]) for item in inv.pop_new() if item["kind"] == "asset"]

    @staticmethod
    def _alert(rec: dict) -> Alert:
        roles = ", ".join(f"{r['protocol']} {r['role']}" for r in rec.get("roles", [])) or "no ICS protocol"
        mac = f" (MAC {', '.join(rec['macs'])})" if rec.get("macs") else ""
        first = int(float(rec.get("first_seen") or 0) * 1e9)
        last = int(float(rec.get("last_seen") or 0) * 1e9)
        return Alert(rule="inventory.new_asset", detector="inventory", severity="low", first_ts=first, last_ts=last,
                     src=rec["address"], dst="", protocol=(rec["roles"][0]["protocol"] if rec.get("roles") else "other"),
                     entity=f"asset:{rec['address']}", technique="T0846",
                     message=f"new asset {rec['address']}{mac} appeared after the baseline was learned: {roles}",
                     fields={"macs": rec.get("macs", []), "vlans": rec.get("vlans", []), "ics": rec.get("ics")},
                     status="closed")  # a one-shot finding: complete when raised

    def refresh(self) -> dict:
        """Copy device identities from the parsers and return the counts for the metrics."""
        self.inventory.refresh_identities()
        return self.inventory.counts()

    def save(self, directory, key: bytes | None = None) -> None:
        state_io.save(Path(directory) / INVENTORY_DIR, {}, self.inventory.to_dict(), key=key)

    @classmethod
    def load(cls, directory, pipeline, key: bytes | None = None,
             limits: InventoryLimits | None = None) -> "InventoryStage | None":
        """The saved inventory, or None when the checkpoint has none (older state)."""
        where = Path(directory) / INVENTORY_DIR
        if not state_io.exists(where):
            return None
        _arrays, meta = state_io.load(where, key=key)
        inv = AssetInventory.from_dict(meta, book=pipeline.book, limits=limits)
        return cls(pipeline, limits, inv)
