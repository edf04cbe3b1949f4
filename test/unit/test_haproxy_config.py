"""The HAProxy config template's switches, rendered from resolved settings:
splice (with a pipe budget that fits the open-files limit), redispatch, and
the cell-wide guards (replay guard, per-address limits), plus the parser of
their stick tables. The integration tests run these configs in a real HAProxy
(test_guards.py for the guards)."""

from __future__ import annotations

import pytest
from modules import execution_module
from test_flavors import TEMPLATES, cell
from test_settings import (  # noqa: F401 (loader mocks, autouse fixture)
    configure_loader_modules,
    loader_stubs,
    mtproxy,
)


def rendered(**haproxy) -> list[str]:
    resolved = cell(haproxy=haproxy) if haproxy else cell()
    text = TEMPLATES.get_template("haproxy.cfg.jinja").render(mtproxy=resolved)
    return [line.strip() for line in text.splitlines()]


def descriptors_needed(lines: list[str]) -> int:
    """HAProxy's own estimate: 2 per connection, 2 per pipe (listeners aside)."""
    value = {line.split()[0]: int(line.split()[1]) for line in lines if line.split()[:1] in (["maxconn"], ["maxpipes"])}
    return 2 * value["maxconn"] + 2 * value.get("maxpipes", 0)


def test_defaults_splice_within_the_test_machines_open_files_limit():
    lines = rendered()
    assert "option splice-request" in lines and "option splice-response" in lines
    assert "maxpipes 1000" in lines
    # 20000: dockerd's open-files limit on the machines this runs on.
    assert descriptors_needed(lines) < 20000 - 100


def test_splice_off_reserves_no_pipes():
    lines = rendered(splice=False)
    assert not any("splice" in line or line.startswith("maxpipes") for line in lines)


def test_redispatch_off_is_the_original_designs_backend():
    lines = rendered(redispatch=False)
    assert "option redispatch 1" not in lines and "retries 3" not in lines
    assert "option redispatch 1" in rendered()


# -- cell-wide guards ---------------------------------------------------------------


def guarded(replay_guard: dict | None = None, client_limits: dict | None = None, cell_changes=None, **haproxy) -> str:
    """The config text with the guards' keys changed (the rest at their defaults)."""
    defaults = cell()["haproxy"]
    haproxy["replay_guard"] = {**defaults["replay_guard"], **(replay_guard or {})}
    haproxy["client_limits"] = {**defaults["client_limits"], **(client_limits or {})}
    resolved = cell(haproxy=haproxy, **(cell_changes or {}))
    return TEMPLATES.get_template("haproxy.cfg.jinja").render(mtproxy=resolved)


def section(text: str, header: str) -> list[str]:
    """The stripped, uncommented lines of the section that starts with ``header``."""
    body = text.split(f"\n{header}\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_replay_guard_is_on_by_default_with_a_stick_table_a_local_peer_and_leastconn():
    text = guarded()
    backend = section(text, "backend mtproxy_replicas")
    assert backend[:3] == [
        "balance leastconn",
        "stick-table type binary len 64 size 100000 expire 1h peers mtproxy_peers",
        "stick on req.payload(0,64)",
    ]
    # Not the hash balancing that was measured not to pin replays.
    assert not any(line.strip().startswith("balance hash") for line in text.splitlines())
    frontend = section(text, "frontend mtproxy")
    assert frontend[1:3] == ["tcp-request inspect-delay 1s", "tcp-request content accept if { req.len ge 64 }"]
    assert frontend[-1] == "default_backend mtproxy_replicas"
    # The table survives a reload: a local peer on a socket in the run folder.
    assert section(text, "peers mtproxy_peers") == ["peer mtproxy unix@/run/haproxy/peers.sock"]
    assert "localpeer mtproxy" in section(text, "global")
    # No client limits by default: no tracking at all.
    assert "track-sc0" not in text and "mtproxy_clients" not in text


def test_replay_guard_off_is_the_plain_balancer():
    text = guarded({"enabled": False})
    for absent in ("stick", "peers", "localpeer", "inspect-delay", "req.len"):
        assert absent not in text
    assert section(text, "backend mtproxy_replicas")[0] == "balance leastconn"


def test_replay_guard_with_the_proxy_protocol_and_roundrobin():
    text = guarded(
        {"inspect_delay": "3s", "size": 5000, "expire": "30m"},
        cell_changes={"client_ip": "proxy_protocol"},
        balance="roundrobin",
    )
    backend = section(text, "backend mtproxy_replicas")
    assert backend[:3] == [
        "balance roundrobin",
        "stick-table type binary len 64 size 5000 expire 30m peers mtproxy_peers",
        "stick on req.payload(0,64)",
    ]
    assert any("send-proxy-v2" in line for line in backend)
    assert "tcp-request inspect-delay 3s" in section(text, "frontend mtproxy")


def test_client_limits_track_every_address_but_the_exempt_and_reject_over_either_limit():
    text = guarded(
        {"enabled": False},
        {"max_connections": 20, "max_new": 30, "period": "1m", "exempt": ["10.1.2.3/8", "2001:db8::1"]},
    )
    assert section(text, "frontend mtproxy")[1:] == [
        "acl exempt src 10.0.0.0/8 2001:db8::1/128",
        "tcp-request connection track-sc0 src table mtproxy_clients unless exempt",
        "acl over_limit sc0_conn_cur gt 20",
        "acl over_limit sc0_conn_rate gt 30",
        "tcp-request connection sc-inc-gpc0(0) if over_limit",
        "tcp-request connection reject if over_limit",
        "default_backend mtproxy_replicas",
    ]
    assert section(text, "backend mtproxy_clients") == [
        "stick-table type ip size 100000 expire 10m store conn_cur,conn_rate(1m),gpc0",
    ]
    assert not any(
        line.startswith(("filter", "tcp-request connection silent-drop")) for line in section(text, "frontend mtproxy")
    )


def test_one_limit_alone_and_no_exempt_list():
    frontend = section(guarded(client_limits={"max_connections": 5}), "frontend mtproxy")
    assert "tcp-request connection track-sc0 src table mtproxy_clients" in frontend
    assert "acl over_limit sc0_conn_cur gt 5" in frontend
    assert not any("conn_rate" in line or "exempt" in line for line in frontend)
    # Tracking comes before the replay guard's content rules.
    assert frontend.index("tcp-request connection reject if over_limit") < frontend.index(
        "tcp-request inspect-delay 1s"
    )


def test_bandwidth_limits_per_address_in_both_directions_before_the_guard_accepts():
    text = guarded(client_limits={"bandwidth_in": 125000, "bandwidth_out": 1250000, "exempt": ["192.0.2.0/24"]})
    frontend = section(text, "frontend mtproxy")
    assert "filter bwlim-in client_upload limit 125000 key src table mtproxy_clients" in frontend
    assert "filter bwlim-out client_download limit 1250000 key src table mtproxy_clients" in frontend
    enable = [
        "tcp-request content set-bandwidth-limit client_upload unless exempt",
        "tcp-request content set-bandwidth-limit client_download unless exempt",
    ]
    assert all(line in frontend for line in enable)
    # An `accept` ends the content rules: the limits must be set before it.
    accept = frontend.index("tcp-request content accept if { req.len ge 64 }")
    assert all(frontend.index(line) < accept for line in enable)
    # Bandwidth alone tracks, but refuses nothing.
    assert "reject" not in text and "over_limit" not in text
    assert section(text, "backend mtproxy_clients") == [
        "stick-table type ip size 100000 expire 10m store conn_cur,conn_rate(10s),gpc0,bytes_in_rate(1s),"
        "bytes_out_rate(1s)"
    ]


def test_an_ipv6_frontend_tracks_ipv6_addresses():
    text = guarded(
        client_limits={"max_connections": 5}, cell_changes={"client_ip": "proxy_protocol"}, frontend_bind="::"
    )
    assert section(text, "backend mtproxy_clients")[0].startswith("stick-table type ipv6 ")


def test_show_table_as_haproxy_30_prints_it_for_the_guards_tables():
    """Output of HAProxy 3.0 with max_connections 2 after 4 connections from one address."""
    runtime = execution_module("haproxy_runtime")
    listing = (
        "# table: mtproxy_clients, type: ip, size:100000, used:1\n"
        "# table: mtproxy_replicas, type: binary, size:100000, used:2\n\n"
    )
    assert runtime._parse_table(listing) == {
        "mtproxy_clients": {"name": "mtproxy_clients", "type": "ip", "size": 100000, "used": 1, "entries": []},
        "mtproxy_replicas": {"name": "mtproxy_replicas", "type": "binary", "size": 100000, "used": 2, "entries": []},
    }
    dump = (
        "# table: mtproxy_clients, type: ip, size:100000, used:1\n"
        "0x7f7686a32a18: key=127.0.0.1 use=2 exp=597927 shard=0 gpc0=2 conn_rate(10000)=4 conn_cur=2\n\n"
    )
    assert runtime._parse_table(dump)["mtproxy_clients"]["entries"] == [
        {"key": "127.0.0.1", "use": 2, "exp": 597927, "shard": 0, "gpc0": 2, "conn_rate": 4, "conn_cur": 2}
    ]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("exempt", ["10.0.0.0/33"], r"client_limits:exempt:0 is '10\.0\.0\.0/33': use an IP network"),
        ("period", "1h", r"client_limits:period is '1h': use an HAProxy duration such as 10s or 1m, up to 10m"),
        ("max_connections", -1, r"client_limits:max_connections is -1: use an integer from 0 to 1000000"),
        ("bandwidth_out", "1m", r"client_limits:bandwidth_out is '1m': use an integer"),
    ],
)
def test_bad_limits_are_refused_naming_the_key(key, value, message):
    with pytest.raises(mtproxy.SettingsError, match="^Pillar mtproxy:haproxy:" + message):
        guarded(client_limits={key: value})


def test_a_replay_guard_wait_over_30s_is_refused():
    with pytest.raises(mtproxy.SettingsError, match=r"^Pillar mtproxy:haproxy:replay_guard:inspect_delay is '1m'"):
        guarded({"inspect_delay": "1m"})
