"""The command line as a user meets it: exit codes, one-line errors, summaries, parse output."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from agent.cli import main
from agent.pipeline import parse_file
from parsers.events import DIR_REQUEST, DIR_RESPONSE, KIND_PDU, PROTO_MODBUS
from tests.conftest import PROJECT_PCAPS, ROOT
from tests.pcapgen import write_pcap

MIXED = PROJECT_PCAPS / "mixed.pcap"


def otwatch(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def test_help_and_version():
    p = otwatch("--help", check_rc=0)
    for cmd in ("replay", "simulate", "parse"):
        assert cmd in p.stdout
    assert otwatch("--version", check_rc=0).stdout.startswith("otwatch ")
    assert otwatch(check_rc=2).stderr  # no command: usage on stderr, exit 2


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"), (b"", "empty file"), (b"GET / HTTP/1.1\r\n\r\n", "not a pcap or pcapng"),
    (b"\xd4\xc3\xb2\xa1\x02\x00", "truncated pcap header")])
@pytest.mark.parametrize("cmd", ["replay", "parse"])
def test_bad_files_give_one_line_and_exit_2(tmp_path, content, needle, cmd):
    p = tmp_path / "in.pcap"
    if content is not None:
        p.write_bytes(content)
    r = otwatch(cmd, p, check_rc=2)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_truncated_header_is_an_error(tmp_path):
    p = tmp_path / "in.pcap"
    write_pcap(p, [], [])
    p.write_bytes(p.read_bytes()[:12])
    r = otwatch("replay", p, check_rc=2)
    assert "truncated pcap header" in r.stderr and "Traceback" not in r.stderr


def test_truncated_mid_record_keeps_frames_and_says_so(tmp_path):
    data = MIXED.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) // 2 + 7])
    r = otwatch("replay", "--json", cut, check_rc=0)
    s = json.loads(r.stdout)
    assert s["frames"] > 1000 and s["files"][0]["truncated_bytes"] > 0
    r = otwatch("replay", cut, check_rc=0)
    assert "last record cut short" in r.stdout


def test_replay_json_summary_matches_parsed_events():
    s = json.loads(otwatch("replay", "--json", MIXED, check_rc=0).stdout)
    for key in ("frames", "bytes", "by_protocol", "errors", "elapsed_s"):
        assert key in s
    ev = parse_file(MIXED)
    for name, code in (("modbus", 1), ("dnp3", 2), ("iec104", 3)):
        m = ev.protocol == code
        assert s["by_protocol"][name]["pdus"] == int(np.count_nonzero(m & (ev.kind == KIND_PDU)))
        assert s["by_protocol"][name]["points"] == int(np.count_nonzero(m & (ev.kind != KIND_PDU)))
    total = sum(v["frames"] for v in s["by_protocol"].values()) + s["other_frames"]
    assert total == s["frames"]


def test_parse_jsonl_and_csv_agree(tmp_path):
    out = tmp_path / "ev.jsonl"
    otwatch("parse", MIXED, "-o", out, check_rc=0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    out_csv = tmp_path / "ev.csv"
    otwatch("parse", "--format", "csv", MIXED, "-o", out_csv, check_rc=0)
    crow = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert len(rows) == len(crow) == len(parse_file(MIXED))
    first_write = next(r for r in rows if r["is_write"] and r["kind"] == "point")
    assert first_write["protocol"] in ("modbus", "dnp3", "iec104") and first_write["value"] is not None
    assert {r["protocol"] for r in rows} == {"modbus", "dnp3", "iec104"}
    assert all(r["function_name"] and not r["function_name"].startswith("unknown") for r in rows
               if r["status"] == "ok")


def test_in_process_main_returns_codes(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "missing.pcap")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bundled_benign_traffic_is_answered():
    """Before the first attack every Modbus request of the bundled captures gets its response."""
    for name in ("modbus", "mixed"):
        labels = list(csv.DictReader(open(PROJECT_PCAPS / f"{name}.labels.csv")))
        first_attack = min(float(r["start_ts"]) for r in labels) * 1e9
        ev = parse_file(PROJECT_PCAPS / f"{name}.pcap")
        m = (ev.protocol == PROTO_MODBUS) & (ev.kind == KIND_PDU) & (ev.ts < first_attack - 5e9)
        req = np.count_nonzero(m & (ev.direction == DIR_REQUEST))
        rsp = np.count_nonzero(m & (ev.direction == DIR_RESPONSE))
        assert req > 1000 and req == rsp, (name, req, rsp)


def test_progress_bar_only_on_a_terminal_and_only_after_a_moment():
    from agent.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    quick = Progress(100, tty, delay_s=60)
    quick.update(50)
    assert tty.getvalue() == ""  # a job shorter than the delay shows nothing
    slow = Progress(100, tty, delay_s=0, interval_s=0)
    slow.update(50)
    assert "50.0%" in tty.getvalue()
    slow.close()
    assert tty.getvalue().endswith("\r")
    piped = Progress(100, pipe, delay_s=0, interval_s=0)
    piped.update(50)
    assert pipe.getvalue() == ""  # never on a pipe or file
