"""The retry of a failed HAProxy reload: the record of what HAProxy confirmed it
loaded (_modules/haproxy_runtime.py) and the state that reloads whenever the
config file no longer matches it (_states/haproxy_runtime.py).

The state runs here against stand-ins for the execution functions (the real
ones run against HAProxy in test/functional/test_haproxy_runtime.py and
test/integration/test_reload_retry.py); the record and the master's identity
are built from a real listening socket in this process."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
from modules import execution_module, state_module
from salt.exceptions import CommandExecutionError

hr = execution_module("haproxy_runtime")
state = state_module("haproxy_runtime")

DIGEST_A, DIGEST_B = "a" * 64, "b" * 64
MASTER = {"boot_id": "boot", "pid": 4242, "start": 1000}


@pytest.fixture
def master(tmp_path):
    """A listening unix socket standing for HAProxy's master CLI (this process is its "master")."""
    path = str(tmp_path / "master.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    yield path
    sock.close()


def own_start() -> int:
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])


# -- the record and the verdict -----------------------------------------------------------


def test_master_identity_is_the_listening_process_with_its_start_time(master, tmp_path):
    identity = hr._master_identity(master)
    assert identity == {
        "boot_id": Path(hr.BOOT_ID).read_text().strip(),
        "pid": os.getpid(),
        "start": own_start(),
    }
    assert hr._master_identity(str(tmp_path / "none.sock")) is None


@pytest.mark.parametrize(
    ("recorded", "digest", "now", "reason"),
    [
        ({"sha256": DIGEST_A, "master": MASTER}, DIGEST_A, MASTER, None),
        (None, DIGEST_A, MASTER, "no record of a config HAProxy confirmed it loaded"),
        ({}, DIGEST_A, MASTER, "no record"),
        (
            {"sha256": DIGEST_A, "master": MASTER},
            DIGEST_B,
            MASTER,
            "config changed since .* aaaaaaaaaaaa… → bbbbbbbbbbbb…",
        ),
        ({"sha256": DIGEST_A, "master": MASTER}, DIGEST_A, {**MASTER, "start": 2000}, "HAProxy was restarted"),
        ({"sha256": DIGEST_A, "master": MASTER}, DIGEST_A, {**MASTER, "boot_id": "other"}, "HAProxy was restarted"),
        ({"sha256": DIGEST_A, "master": MASTER}, DIGEST_A, None, "does not answer"),
        # A master whose PID this side cannot see: only the file counts.
        ({"sha256": DIGEST_A, "master": MASTER}, DIGEST_A, {"boot_id": None, "pid": None, "start": None}, None),
    ],
)
def test_not_loaded_because(recorded, digest, now, reason):
    found = hr._not_loaded_because(recorded, digest, now)
    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert re.search(reason, found), found


def test_a_confirmed_reload_is_recorded_root_only_and_loaded_reads_it_back(master, tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text("global\n")
    digest = hr._digest(str(config))
    confirmed = {"new_pid": 23, "reloads": 4, "version": "3.0.11"}
    path = hr._record_loaded(str(config), digest, master, confirmed, None)
    assert path == str(tmp_path / "loaded.json")  # next to the master socket by default
    assert oct(os.stat(path).st_mode)[-3:] == "600"
    record = json.loads(Path(path).read_text())
    assert record["sha256"] == digest
    assert record["master"] == hr._master_identity(master)
    assert (record["worker"], record["reloads"], record["config_file"]) == (23, 4, str(config))

    now = hr.loaded(str(config), master_socket=master)
    assert now["loaded"] is True and now["reason"] is None and now["recorded"] == record

    # The file changes: no longer loaded, until the next confirmed reload.
    config.write_text("global\n    maxconn 10\n")
    now = hr.loaded(str(config), master_socket=master)
    assert now["loaded"] is False and "config changed" in now["reason"]

    # A file that changed during the reload: what HAProxy read is unknown, no record is left.
    assert hr._record_loaded(str(config), digest, master, confirmed, None) is None
    assert not os.path.exists(path)
    assert hr.loaded(str(config), master_socket=master)["reason"].startswith("no record")


def test_an_unreadable_record_counts_as_none(master, tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text("global\n")
    (tmp_path / "loaded.json").write_text("{not json")
    assert hr.loaded(str(config), master_socket=master)["reason"].startswith("no record")


def test_loaded_names_a_missing_config_file(master, tmp_path):
    with pytest.raises(CommandExecutionError, match=r"cannot read the HAProxy config .*nothing\.cfg"):
        hr.loaded(str(tmp_path / "nothing.cfg"), master_socket=master)


# -- the state ------------------------------------------------------------------------------


class Minion:
    """Stand-ins for haproxy_runtime.loaded/reload, recording the reloads asked for."""

    def __init__(self, verdict: dict, reload_error: str | None = None, taken: list[str] | None = None):
        self.verdict = verdict
        self.reload_error = reload_error
        self.taken = taken or []
        self.reloads: list[dict] = []

    def bind_conflicts(self, addresses):
        return [taken for taken in self.taken if taken.split(" ")[0] in addresses]

    def loaded(self, config_file, master_socket=None, record=None, timeout=0):
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return {"config_file": config_file, "master_socket": "/run/h/master.sock", **self.verdict}

    def reload(self, **kwargs):
        self.reloads.append(kwargs)
        if self.reload_error:
            raise CommandExecutionError(self.reload_error)
        return {
            "old_pids": [13],
            "new_pid": 23,
            "messages": "[NOTICE] Loading success.",
            "record": "/run/h/loaded.json",
        }


@pytest.fixture
def configure_loader_modules():
    """Salt's loader dunders of the state, fresh for each test (pytest-salt-factories)."""
    return {state: {"__salt__": {}, "__opts__": {"test": False}}}


def run(minion: Minion, test: bool = False, fun: str = "config_loaded", **kwargs) -> dict:
    state.__salt__.update(
        {
            "haproxy_runtime.loaded": minion.loaded,
            "haproxy_runtime.reload": minion.reload,
            "haproxy_runtime.bind_conflicts": minion.bind_conflicts,
        }
    )
    state.__opts__["test"] = test
    return getattr(state, fun)("/etc/h/haproxy.cfg", timeout=30, state_file="/run/h/server-state", **kwargs)


LOADED = {
    "loaded": True,
    "reason": None,
    "sha256": DIGEST_A,
    "recorded": {"sha256": DIGEST_A, "loaded_at": "2025-01-01T00:00:00Z"},
    "master": MASTER,
}
CHANGED = {**LOADED, "loaded": False, "reason": "the config changed", "sha256": DIGEST_B}


def test_state_does_nothing_when_haproxy_runs_the_file():
    minion = Minion(LOADED)
    for test in (False, True):
        ret = run(minion, test=test)
        assert ret["result"] is True and ret["changes"] == {}
        assert "runs /etc/h/haproxy.cfg as it is (sha256:aaaaaaaaaaaa" in ret["comment"]
    assert minion.reloads == []


def test_state_under_test_says_a_reload_would_follow_and_reloads_nothing():
    minion = Minion(CHANGED)
    ret = run(minion, test=True)
    assert ret["result"] is None
    assert ret["changes"] == {"old": {"config": "sha256:aaaaaaaaaaaa"}, "new": {"config": "sha256:bbbbbbbbbbbb"}}
    assert ret["comment"] == "HAProxy would reload gracefully: the config changed"
    assert minion.reloads == []
    # A config file that this very run would create first.
    ret = run(Minion(CommandExecutionError("cannot read the HAProxy config")), test=True)
    assert ret["result"] is None and "would reload once /etc/h/haproxy.cfg is readable" in ret["comment"]


def test_state_reloads_with_the_record_and_reports_old_and_new():
    minion = Minion(CHANGED)
    ret = run(minion, record="/run/h/loaded.json")
    assert ret["result"] is True
    assert ret["changes"] == {
        "old": {"config": "sha256:aaaaaaaaaaaa", "workers": [13]},
        "new": {"config": "sha256:bbbbbbbbbbbb", "worker": 23},
    }
    assert "reloaded gracefully (the config changed); worker 23" in ret["comment"]
    assert "Loading success" in ret["comment"]
    assert minion.reloads == [
        {
            "master_socket": None,
            "admin_socket": None,
            "state_file": "/run/h/server-state",
            "timeout": 30,
            "config_file": "/etc/h/haproxy.cfg",
            "record": "/run/h/loaded.json",
        }
    ]


def test_a_failed_reload_fails_the_state_with_haproxys_messages():
    message = "'reload' failed, the old worker keeps serving:\n[ALERT] cannot bind socket (Address already in use)"
    minion = Minion(CHANGED, reload_error=message)
    ret = run(minion)
    assert ret["result"] is False
    assert ret["changes"] == {}
    assert "Address already in use" in ret["comment"]
    assert "the next apply tries again" in ret["comment"]
    assert len(minion.reloads) == 1


def test_a_port_another_process_holds_fails_the_state_without_a_reload():
    minion = Minion(CHANGED, taken=["0.0.0.0:8553 (Address already in use)"])
    ret = run(minion, binds=["0.0.0.0:8553", "127.0.0.1:8404"])
    assert ret["result"] is False and ret["changes"] == {}
    assert "another process holds 0.0.0.0:8553 (Address already in use): not reloaded" in ret["comment"]
    assert "the next apply tries again" in ret["comment"]
    assert minion.reloads == []


def test_bind_conflicts_counts_foreign_listeners_not_haproxys():
    def listener(reuseport: bool) -> socket.socket:
        sock = socket.socket()
        if reuseport:  # as HAProxy binds
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return sock

    with listener(False) as foreign, listener(True) as haproxy:
        foreign_at = f"127.0.0.1:{foreign.getsockname()[1]}"
        haproxy_at = f"127.0.0.1:{haproxy.getsockname()[1]}"
        taken = hr.bind_conflicts([foreign_at, haproxy_at])
    assert taken == [f"{foreign_at} (Address already in use)"]
    # Free again, and an address this host does not have yet (free bind, as HAProxy's).
    assert hr.bind_conflicts([foreign_at, "198.18.255.254:8443"]) == []


def test_no_master_fails_without_a_reload():
    minion = Minion({**CHANGED, "master": None, "reason": "HAProxy does not answer on its master socket"})
    ret = run(minion)
    assert ret["result"] is False
    assert "does not answer on /run/h/master.sock after 30 s" in ret["comment"]
    assert minion.reloads == []


def test_mod_watch_under_test_announces_a_reload_and_otherwise_checks_again():
    # Salt calls mod_watch with the whole low chunk.
    extra = {"sfun": "config_loaded", "__id__": "HAProxy reloads", "__reqs__": {}}
    ret = run(Minion(LOADED), test=True, fun="mod_watch", **extra)
    assert ret["result"] is None and ret["changes"] == {}
    minion = Minion(LOADED)
    ret = run(minion, fun="mod_watch", **extra)
    assert ret["result"] is True and ret["changes"] == {} and minion.reloads == []
