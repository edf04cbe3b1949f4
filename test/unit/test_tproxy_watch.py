"""The watchdog loop of the tproxy script (``tproxy.py watch``), with check/ensure stubbed: when it
repairs, what it logs and what its status file says."""

from __future__ import annotations

import json
import threading

import pytest
from modules import execution_module

tproxy = execution_module("tproxy")

CONFIG = {"name": "mtproxy", "ports": [4431, 4432], "method": "sport"}
RULE = "ip rule pref 100 ipproto tcp sport 4431-4432 lookup 100 proto 201"


@pytest.fixture
def kernel(monkeypatch, tmp_path):
    """A fake kernel: ``state["missing"]`` until ensure runs; records the ensure calls."""
    state = {"missing": [RULE], "stale": ["ip rule pref 100 ipproto tcp sport 4431-4434 lookup 100 proto 201"]}
    calls = []

    def check(**config):
        assert config == CONFIG
        return {"ok": not (state["missing"] or state["stale"]), "missing": state["missing"], "stale": state["stale"]}

    def ensure(**kwargs):
        calls.append(kwargs)
        added, state["missing"] = state["missing"], []
        return {"added": added} if added else {}

    monkeypatch.setattr(tproxy, "check", check)
    monkeypatch.setattr(tproxy, "ensure", ensure)
    config = tmp_path / "return-path.json"
    config.write_text(json.dumps(CONFIG))
    return state, calls, str(config)


def test_repairs_only_what_is_missing_and_keeps_stale(kernel, capsys):
    state, calls, config = kernel
    status = tproxy.watch_once(config, {})
    assert calls == [{**CONFIG, "keep_stale": True}]
    assert status["repaired"] == [RULE] and status["last_repair"] and status["last_check"]
    # Stale rules are reported, not removed: ok stays False until the state removes them.
    assert status["ok"] is False and status["missing"] == [] and status["stale"] == state["stale"]
    assert capsys.readouterr().out == f"tproxy watch: restored 1: {RULE}\n"
    # Nothing missing: no ensure, no log line, the last repair is kept.
    last_repair = status["last_repair"]
    state["stale"] = []
    status = tproxy.watch_once(config, status)
    assert len(calls) == 1 and status["ok"] is True and status["last_repair"] == last_repair
    assert capsys.readouterr().out == ""


def test_errors_are_logged_once_and_recorded(kernel, tmp_path, capsys):
    status = {}
    for _ in range(3):
        status = tproxy.watch_once(str(tmp_path / "absent.json"), status)
    assert status["ok"] is False and "absent.json" in status["error"]
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_watch_writes_the_status_file_and_stops(kernel, tmp_path):
    _, calls, config = kernel
    status_file = tmp_path / "run" / "return-path.status"
    stop = threading.Event()
    thread = threading.Thread(target=tproxy.watch, args=(config, 0.05, str(status_file), stop))
    thread.start()
    try:
        for _ in range(100):
            if status_file.exists() and json.loads(status_file.read_text()).get("repaired"):
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    written = json.loads(status_file.read_text())
    assert written["repaired"] == [RULE] and written["interval"] == 0.05
    assert len(calls) == 1
    assert [p.name for p in status_file.parent.iterdir()] == ["return-path.status"]  # no temp files left
