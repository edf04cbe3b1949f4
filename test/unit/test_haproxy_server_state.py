"""The logic of the haproxy_server states (_states/haproxy_server.py): drained
and ready, against a stand-in HAProxy that keeps each server's administrative
state, status, address and sessions. The real ones run against HAProxy in
test/integration/test_zero_drop.py and test_safe_change.py. Also the parser of ``show servers state`` that
tells a drained server from a ready one."""

from __future__ import annotations

import pytest
from modules import execution_module, state_module
from salt.exceptions import CommandExecutionError

hs = state_module("haproxy_server")
hr = execution_module("haproxy_runtime")

BACKEND = "mtproxy_replicas"

# HAProxy 2.6's answer to `show servers state be` after `set server be/s1
# state maint` and `set server be/s2 state drain` (s3 as configured).
SERVERS_STATE = "\n".join(
    [
        "1",
        "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight"
        " srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state"
        " srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl"
        " srv_check_port srv_check_addr srv_agent_addr srv_agent_port",
        "2 be 1 s1 127.0.0.1 0 1 1 1 2 8 2 0 14 0 0 0 - 39991 - 0 0 - - 0",
        "2 be 2 s2 127.0.0.1 2 8 1 1 0 1 0 2 0 0 0 0 - 39992 - 0 0 - - 0",
        "2 be 3 s3 127.0.0.1 2 0 1 1 0 1 0 2 0 0 0 0 - 39993 - 0 0 - - 0",
        "",
        "",
    ]
)


def test_show_servers_state_gives_each_servers_administrative_state():
    assert hr._parse_admin_states(SERVERS_STATE) == {"be/s1": "maint", "be/s2": "drain", "be/s3": "ready"}
    assert hr._parse_admin_states("") == {}


class HAProxy:
    """Stand-in for the haproxy_runtime functions the states call; records what they were asked to do."""

    def __init__(self, answers: bool = True, fail: str | None = None, **servers: dict):
        self.answers = answers
        self.fail = fail
        self.servers = servers
        self.calls: list[tuple] = []

    def server_state(self, backend, server, admin_socket=None, master_socket=None):
        if not self.answers:
            raise CommandExecutionError("HAProxy socket /run/h/admin.sock: 'show stat' failed: No such file")
        found = self.servers.get(server)
        return dict(found) if found else None

    def _act(self, what: str, server: str, *args):
        self.calls.append((what, server, *args))
        if self.fail:
            raise CommandExecutionError(self.fail)

    def drain(self, backend, server, timeout=60, admin_socket=None, master_socket=None):
        self._act("drain", server, timeout)
        now = self.servers[server]
        left = now.pop("held", 0)  # sessions that outlast the timeout
        now.update(state="drain", status="DRAIN" if now["status"] == "UP" else now["status"], scur=left)
        return {"server": f"{backend}/{server}", "sessions_left": left, "drained": not left, "waited": 1.5}

    def set_address(self, backend, server, address, port, admin_socket=None, master_socket=None):
        self._act("set_address", server, address, port)
        self.servers[server]["addr"] = f"{address}:{port}"

    def ready(self, backend, server, timeout=60, admin_socket=None, master_socket=None):
        self._act("ready", server, timeout)
        self.servers[server].update(state="ready", status="UP")


def server(state: str = "ready", status: str = "UP", scur: int = 0, addr: str = "192.0.2.10:4431", **extra) -> dict:
    return {"state": state, "status": status, "scur": scur, "addr": addr, **extra}


@pytest.fixture
def configure_loader_modules():
    """Salt's loader dunders of the state, fresh for each test (pytest-salt-factories)."""
    return {hs: {"__salt__": {}, "__opts__": {"test": False}}}


def run(haproxy: HAProxy, fun: str, test: bool = False, **kwargs) -> dict:
    for name in ("server_state", "drain", "set_address", "ready"):
        hs.__salt__[f"haproxy_runtime.{name}"] = getattr(haproxy, name)
    hs.__opts__["test"] = test
    if fun == "ready":
        kwargs = {"address": "192.0.2.10", "port": 4431, **kwargs}
    return getattr(hs, fun)("mtproxy_1", backend=BACKEND, timeout=5, **kwargs)


# -- drained ----------------------------------------------------------------------------------


def test_drained_under_test_says_what_it_would_do_and_touches_nothing():
    haproxy = HAProxy(mtproxy_1=server(scur=3))
    ret = run(haproxy, "drained", test=True)
    assert ret["result"] is None
    assert ret["changes"] == {"state": {"old": "ready", "new": "drain"}}
    assert ret["comment"] == (
        "mtproxy_replicas/mtproxy_1 (UP) would be drained: no new clients, up to 5 s for its 3 sessions to end"
    )
    assert haproxy.calls == [] and haproxy.servers["mtproxy_1"]["state"] == "ready"


def test_drained_reports_the_state_it_changed_and_the_sessions_it_waited_for():
    haproxy = HAProxy(mtproxy_1=server(scur=3, held=1))
    ret = run(haproxy, "drained")
    assert ret["result"] is True
    assert ret["changes"] == {
        "state": {"old": "ready", "new": "drain"},
        "sessions": {"old": 3, "new": 1},
        "waited": 1.5,
    }
    assert ret["comment"] == "mtproxy_replicas/mtproxy_1 drained: no new clients; 1 session left after 1.5 s"
    assert haproxy.calls == [("drain", "mtproxy_1", 5)]
    # Run again: drained already, nothing more to change (it only gets the wait).
    again = run(haproxy, "drained")
    assert again["result"] is True and again["changes"] == {}
    assert again["comment"].startswith("mtproxy_replicas/mtproxy_1 is drained (DRAIN); no session left")


def test_drained_without_sessions_has_no_session_changes():
    ret = run(HAProxy(mtproxy_1=server()), "drained")
    assert ret["changes"] == {"state": {"old": "ready", "new": "drain"}}
    assert ret["comment"].endswith("no new clients; no session left after 1.5 s")


def test_a_drained_server_with_no_session_is_left_alone_in_both_modes():
    for test in (False, True):
        haproxy = HAProxy(mtproxy_1=server(state="drain", status="DRAIN"))
        ret = run(haproxy, "drained", test=test)
        assert ret == {
            "name": "mtproxy_1",
            "changes": {},
            "result": True,
            "comment": "mtproxy_replicas/mtproxy_1 is drained (DRAIN, no session left)",
        }
        assert haproxy.calls == []


def test_a_drained_server_that_is_down_is_told_apart_from_a_ready_one():
    # show stat says DOWN for both; only the administrative state tells them apart.
    assert run(HAProxy(mtproxy_1=server(state="drain", status="DOWN")), "drained")["changes"] == {}
    ret = run(HAProxy(mtproxy_1=server(status="DOWN")), "drained", test=True)
    assert ret["result"] is None and ret["changes"] == {"state": {"old": "ready", "new": "drain"}}


def test_a_server_in_maintenance_is_set_to_drain():
    ret = run(HAProxy(mtproxy_1=server(state="maint", status="MAINT")), "drained")
    assert ret["changes"] == {"state": {"old": "maint", "new": "drain"}}


@pytest.mark.parametrize(
    ("haproxy", "why"),
    [
        (HAProxy(answers=False), "No HAProxy answers (HAProxy socket /run/h/admin.sock: "),
        (HAProxy(), "HAProxy has no server mtproxy_replicas/mtproxy_1: nothing to drain"),
    ],
)
def test_nothing_to_drain_without_haproxy_or_without_the_server(haproxy, why):
    for test in (False, True):
        ret = run(haproxy, "drained", test=test)
        assert ret["result"] is True and ret["changes"] == {}
        assert ret["comment"].startswith(why) and ret["comment"].endswith("nothing to drain")
    assert haproxy.calls == []


def test_a_drain_haproxy_refuses_fails_the_state_with_its_reason():
    haproxy = HAProxy(
        fail="HAProxy refused 'set server mtproxy_replicas/mtproxy_1 state drain': Permission denied",
        mtproxy_1=server(),
    )
    ret = run(haproxy, "drained")
    assert ret["result"] is False and ret["changes"] == {}
    assert ret["comment"] == f"mtproxy_replicas/mtproxy_1 is not drained: {haproxy.fail}"


# -- ready ------------------------------------------------------------------------------------


def test_ready_leaves_a_server_that_is_up_where_it_should_be():
    for test in (False, True):
        haproxy = HAProxy(mtproxy_1=server())
        ret = run(haproxy, "ready", test=test)
        assert ret["result"] is True and ret["changes"] == {}
        assert ret["comment"] == "mtproxy_replicas/mtproxy_1 is at 192.0.2.10:4431 and takes new clients (UP)"
        assert haproxy.calls == []


def test_ready_under_test_announces_the_move_and_the_return_and_touches_nothing():
    haproxy = HAProxy(mtproxy_1=server(state="drain", status="DOWN", addr="192.0.2.10:6101"))
    ret = run(haproxy, "ready", test=True)
    assert ret["result"] is None
    assert ret["changes"] == {
        "addr": {"old": "192.0.2.10:6101", "new": "192.0.2.10:4431"},
        "state": {"old": "drain", "new": "ready"},
        "status": {"old": "DOWN", "new": "UP"},
    }
    assert ret["comment"] == "mtproxy_replicas/mtproxy_1 would be moved to 192.0.2.10:4431 and set ready"
    assert haproxy.calls == []


def test_ready_moves_and_takes_back_a_drained_server_then_has_nothing_to_do():
    haproxy = HAProxy(mtproxy_1=server(state="drain", status="DRAIN", addr="192.0.2.10:6101"))
    ret = run(haproxy, "ready")
    assert ret["result"] is True
    assert set(ret["changes"]) == {"addr", "state", "status"}
    assert ret["comment"] == "mtproxy_replicas/mtproxy_1 is at 192.0.2.10:4431, ready and UP"
    assert haproxy.calls == [("set_address", "mtproxy_1", "192.0.2.10", 4431), ("ready", "mtproxy_1", 5)]
    assert run(haproxy, "ready")["changes"] == {}


def test_an_ipv6_address_is_compared_as_haproxy_writes_it():
    haproxy = HAProxy(mtproxy_1=server(addr="[2001:db8::10]:4431"))
    assert run(haproxy, "ready", address="2001:db8::10")["changes"] == {}


def test_ready_without_haproxy_or_the_server_leaves_it_to_the_configuration():
    for haproxy in (HAProxy(answers=False), HAProxy()):
        ret = run(haproxy, "ready")
        assert ret["result"] is True and ret["changes"] == {}
        assert ret["comment"].endswith("its configuration adds mtproxy_1")


def test_a_server_that_does_not_come_up_fails_ready_and_keeps_what_did_change():
    haproxy = HAProxy(mtproxy_1=server(state="drain", status="DOWN", addr="192.0.2.10:6101"))
    fails = {"set_address": None, "ready": "mtproxy_replicas/mtproxy_1 is not UP after 5 s: DOWN (L4CON)"}

    def act(what, name, *args):
        haproxy.calls.append((what, name, *args))
        if fails[what]:
            raise CommandExecutionError(fails[what])

    haproxy._act = act
    ret = run(haproxy, "ready")
    assert ret["result"] is False
    assert ret["changes"] == {"addr": {"old": "192.0.2.10:6101", "new": "192.0.2.10:4431"}}
    assert ret["comment"] == f"mtproxy_replicas/mtproxy_1 is not back in HAProxy: {fails['ready']}"
