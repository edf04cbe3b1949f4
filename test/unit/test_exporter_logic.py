"""The cell exporter's pure logic (_modules/mtproxy_exporter.py): parsing each
flavor's stats, counters that survive a source's restart, the text format,
credentials; and the schema's rules for exporter: keys. The exporter against
a live cell: test/integration/test_exporter.py."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from modules import execution_module
from test_settings import SECRET, flavors, loader_modules, loader_stubs, mtproxy, settings  # noqa: F401 (fixture)

exporter = execution_module("mtproxy_exporter")


@pytest.fixture
def configure_loader_modules():
    """The settings modules' loader mocks, and the exporter's: each flavor's stats path is in its record."""
    return {**loader_modules(), exporter: {"__salt__": {"mtproxy_flavor.record": flavors.record}}}


SECOND = "9e2b4d6f8a0c1e3b5d7f9a1c3e5b7d9f"


def refused(**changes) -> str:
    with pytest.raises(mtproxy.SettingsError) as error:
        mtproxy.resolve(settings(**changes))
    return str(error.value)


def test_the_settings_name_stats_urls_and_hold_no_secret():
    cell = mtproxy.resolve(settings(secret=SECRET, extra_secrets=[SECOND], exporter__auth="ops:correct-horse-1"))
    config = exporter.config(cell)
    text = json.dumps(config)
    assert SECRET not in text and SECOND not in text and "correct-horse-1" not in text
    assert config["auth_sha256"] == hashlib.sha256(b"ops:correct-horse-1").hexdigest()
    assert config["users"] == ["tg", "tg2"] and config["secrets"] == 2
    assert [r["stats_url"] for r in config["replicas"]] == [
        "http://127.0.0.1:14431/stats",
        "http://127.0.0.1:14432/stats",
    ]
    assert config["return_path"].endswith("/return-path.json")
    mtg = exporter.config(mtproxy.resolve(settings(flavor="mtg", tls_domain="cdn.example.org", secret=SECRET)))
    assert mtg["replicas"][0]["stats_url"] == "http://127.0.0.1:14431/metrics"


def test_mtprotoproxy_counters_by_secret_index():
    answer = {
        "process": "p1",
        "users": {
            "tg": {"connects": 5, "curr_connects": 2, "octets": 1000, "msgs": 9},
            "tg2": {"connects": 1, "curr_connects": 0, "octets": 10, "msgs": 1},
            "gone": {"connects": 7, "curr_connects": 0, "octets": 70, "msgs": 1},
        },
    }
    parsed = exporter.parse_mtprotoproxy(json.dumps(answer), ["tg", "tg2"])
    assert parsed == {
        "process": "p1",
        "secrets": {
            0: {"connections": 2, "connections_total": 5, "bytes_total": 1000},
            1: {"connections": 0, "connections_total": 1, "bytes_total": 10},
        },
    }


def test_mtg_sums_its_client_connections_and_telegram_traffic():
    text = "\n".join(
        [
            "# TYPE mtg_client_connections gauge",
            'mtg_client_connections{ip_family="ipv4"} 3',
            'mtg_client_connections{ip_family="ipv6"} 1',
            'mtg_telegram_traffic{dc="2",direction="to_client",telegram_ip="149.154.167.51"} 1500',
            'mtg_telegram_traffic{dc="2",direction="from_client",telegram_ip="149.154.167.51"} 500',
            'mtg_domain_fronting_traffic{direction="to_client"} 99',
        ]
    )
    assert exporter.parse_mtg(text)["secrets"] == {0: {"connections": 4, "bytes_total": 2000}}


def test_official_gives_current_connections_for_a_single_secret_only():
    text = "pid\t42\ntotal_special_connections\t17\ntotal_max_special_connections\t60000\n"
    assert exporter.parse_official(text, 1) == {"process": "42", "secrets": {0: {"connections": 17}}}
    assert exporter.parse_official(text, 2)["secrets"] == {}


def test_a_counter_carries_over_a_restart_and_never_goes_backwards():
    counters = exporter.Monotonic()
    key = ("replica", "mtproxy_1", "bytes_total", 0)
    assert counters.update(key, "a", 100) == (100, False)
    assert counters.update(key, "a", 150) == (150, False)
    # A new process starts from 0; one that already counted more is still a restart.
    assert counters.update(key, "b", 20) == (170, True)
    assert counters.update(key, "c", 400) == (570, True)
    # A source that names no process: a drop is a restart.
    other = ("replica", "mtproxy_2", "bytes_total", 0)
    counters.update(other, None, 50)
    assert counters.update(other, None, 10) == (60, True)
    assert counters.update(other, None, 10) == (60, False)
    # A process id that comes back (HAProxy's master is PID 1 in every new
    # container): a drop is a restart all the same.
    master = ("haproxy", "master", "reloads")
    counters.update(master, 1, 3)
    assert counters.update(master, 1, 0) == (3, True)
    assert counters.update(master, 1, 1) == (4, False)
    assert counters.forget(lambda k: k[1] == "mtproxy_2") == {other: 60}
    assert counters.last(other) is None and counters.last(key) == 570


def test_the_text_format_has_help_and_type_once_and_escapes_labels():
    text = exporter.render(
        [
            ("mtproxy_secret_bytes_total", {"secret": "0", "replica": "mtproxy_1"}, 10),
            ("mtproxy_secret_bytes_total", {"secret": "0", "replica": "mtproxy_2"}, 2.5),
            ("mtproxy_guard_denied_total", {"stage": 'a"b\\c'}, 0),
            ("mtproxy_cell_bytes_total", {}, 123456789012.0),
            ("mtproxy_exporter_last_poll_timestamp_seconds", {}, 1796140123.456),
        ]
    )
    lines = text.splitlines()
    assert lines.count("# TYPE mtproxy_secret_bytes_total counter") == 1
    assert 'mtproxy_secret_bytes_total{secret="0",replica="mtproxy_2"} 2.5' in lines
    assert 'mtproxy_guard_denied_total{stage="a\\"b\\\\c"} 0' in lines
    # Every digit: no rounding of large counters or timestamps.
    assert "mtproxy_cell_bytes_total 123456789012" in lines
    assert "mtproxy_exporter_last_poll_timestamp_seconds 1796140123.456" in lines


def test_credentials_are_checked_against_their_digest():
    digest = hashlib.sha256(b"ops:correct-horse-1").hexdigest()

    def basic(text: str) -> str:
        return "Basic " + base64.b64encode(text.encode()).decode()

    assert exporter.authorized(None, "")
    assert exporter.authorized(basic("ops:correct-horse-1"), digest)
    assert not exporter.authorized(basic("ops:wrong"), digest)
    assert not exporter.authorized(None, digest)
    assert not exporter.authorized("Basic not-base64!", digest)


def test_a_public_exporter_needs_credentials():
    message = refused(exporter__bind="0.0.0.0")
    assert message.startswith("Pillar mtproxy:exporter:bind is '0.0.0.0': ") and "exporter:auth" in message
    message = refused(exporter__bind="0.0.0.0", exporter__auth="ops:short")
    assert message.startswith("Pillar mtproxy:exporter:auth is <hidden>: ") and "short" not in message
    cell = mtproxy.resolve(settings(exporter__bind="0.0.0.0", exporter__auth="ops:correct-horse-1"))
    assert cell["exporter"]["bind"] == "0.0.0.0"


@pytest.mark.parametrize(
    ("port", "what"),
    [(8443, "the frontend port"), (8404, "the stats port"), (4432, "used by a replica"), (14431, "used by a replica")],
)
def test_the_exporter_port_is_its_own(port, what):
    message = refused(exporter__port=port)
    assert message.startswith(f"Pillar mtproxy:exporter:port is {port}: ") and what in message
