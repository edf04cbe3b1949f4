"""The fleet runner's pure parts (_runners/mtproxy_fleet.py): what keeps a cell
from serving according to its ``mtproxy.status``, and the master's TCP probe
against listeners on loopback."""

from __future__ import annotations

import socket
import threading

import pytest

from _runners import mtproxy_fleet


def status(**overrides) -> dict:
    serving = {
        "haproxy": {"container": "running", "error": None},
        "replicas": [
            {"name": f"mtproxy_{i}", "container": "running", "haproxy": "UP", "check": "L4OK"} for i in (1, 2)
        ],
        "return_path": {"ok": True, "missing": []},
    }
    serving.update(overrides)
    return serving


def test_a_serving_cell_has_no_problem():
    assert mtproxy_fleet.cell_problems(status()) == []
    # PROXY-protocol mode: no return path to check.
    assert mtproxy_fleet.cell_problems(status(return_path={"ok": None, "used": False})) == []


@pytest.mark.parametrize(
    ("replica", "expected"),
    [
        ({"container": "exited", "haproxy": "DOWN", "check": "L4CON"}, "mtproxy_2: container exited, HAProxy DOWN"),
        ({"container": "running", "haproxy": "DRAIN", "check": "L4OK"}, "HAProxy DRAIN"),
        # HAProxy 3.0 says UP before the first check has run.
        ({"container": "running", "haproxy": "UP", "check": "INI"}, "(check INI)"),
        ({"container": "absent", "haproxy": "not configured", "check": ""}, "(check none yet)"),
    ],
)
def test_a_replica_not_up_after_a_real_check_is_named(replica, expected):
    replicas = status()["replicas"]
    replicas[1] = {"name": "mtproxy_2", **replica}
    problems = mtproxy_fleet.cell_problems(status(replicas=replicas))
    assert len(problems) == 1 and expected in problems[0], problems


def test_haproxy_down_no_replica_or_a_broken_return_path_are_problems():
    problems = mtproxy_fleet.cell_problems(
        status(
            haproxy={"container": "absent", "error": "no admin socket"},
            replicas=[],
            return_path={"ok": False, "missing": ["ip rule"]},
        )
    )
    assert problems == [
        "HAProxy container is absent",
        "HAProxy: no admin socket",
        "no replica",
        "return path: missing ['ip rule']",
    ]
    assert mtproxy_fleet.cell_problems("'mtproxy.status' is not available.") == [
        "mtproxy.status returned \"'mtproxy.status' is not available.\""
    ]


@pytest.fixture
def listener():
    """A loopback listener; ``close_at_once`` makes it close each accepted connection."""
    server = socket.create_server(("127.0.0.1", 0))
    behaviour = {"close_at_once": False}
    held = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if behaviour["close_at_once"]:
                conn.close()
            else:
                held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], behaviour
    server.close()
    for conn in held:
        conn.close()


def test_the_probe_wants_a_connection_held_open(listener):
    port, behaviour = listener
    assert mtproxy_fleet.probe("127.0.0.1", port, hold=0.3) is None
    behaviour["close_at_once"] = True
    assert "closed the connection" in mtproxy_fleet.probe("127.0.0.1", port, hold=0.3)


def test_the_probe_names_a_refused_port():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    assert "refused" in mtproxy_fleet.probe("127.0.0.1", port, hold=0.3)
