"""The formula end to end: `salt-call --local state.apply mtproxy` in a test host
deploys a cell that serves clients from the client namespace with their real
address, scales, survives a bad config and cleans up after itself."""

from __future__ import annotations

import pytest
from cell import (
    apply,
    assert_cell_serves,
    cell_pillar,
    changed,
    containers,
    failed,
    ip_rules,
    mangle_output,
    replica_names,
    servers,
    table_routes,
    wait_servers_up,
)

pytestmark = pytest.mark.integration


def current_workers(host, master_socket: str) -> list[str]:
    """PIDs of the current-generation workers in the master CLI's ``show proc``
    (old workers are listed after an ``# old workers`` line)."""
    out = host.run(["socat", "-", f"UNIX-CONNECT:{master_socket}"], input="show proc\n").stdout
    current = out.split("# old workers")[0]
    return [line.split()[0] for line in current.splitlines() if len(line.split()) > 1 and line.split()[1] == "worker"]


@pytest.fixture(scope="module")
def cell(testhost):
    pillar = cell_pillar(testhost)
    result = apply(testhost, pillar)
    return testhost, pillar, result


def test_first_apply_deploys_a_serving_cell(cell):
    host, pillar, result = cell
    assert not failed(result)
    assert_cell_serves(host, pillar, 2)
    # The apply tells the operator how to connect, secret masked.
    notes = [v["comment"] for v in result.values() if v["__id__"].startswith("Clients connect")]
    assert notes and "tg://proxy?server=" + host.address + "&port=8443&secret=dd" in notes[0]


def test_links_give_the_full_secret(cell):
    host, pillar, _ = cell
    host.salt_call("saltutil.sync_modules")
    host.write_pillar(pillar)  # execution functions read the pillar files
    links = host.salt_call("mtproxy.links")
    secret_file = host.workdir / "var-lib-mtproxy" / "secret"
    secret = secret_file.read_text().strip()
    assert oct(secret_file.stat().st_mode)[-3:] == "600"
    assert len(secret) == 32
    assert links[0]["tg"] == f"tg://proxy?server={host.address}&port=8443&secret=dd{secret}"
    assert links[0]["https"] == f"https://t.me/proxy?server={host.address}&port=8443&secret=dd{secret}"
    # The replicas serve exactly that secret.
    config = (host.workdir / "etc-mtproxy" / "replicas" / "mtproxy_1" / "config.py").read_text()
    assert f'"tg": "{secret}"' in config
    assert oct((host.workdir / "etc-mtproxy" / "replicas" / "mtproxy_1" / "config.py").stat().st_mode)[-3:] == "600"


def test_status_reports_every_replica(cell):
    host, pillar, _ = cell
    host.write_pillar(pillar)
    wait_servers_up(host, pillar, replica_names(2))
    status = host.salt_call("mtproxy.status")
    assert status["haproxy"]["container"] == "running"
    assert status["haproxy"]["error"] is None
    assert [(r["name"], r["port"], r["container"], r["haproxy"], r["check"]) for r in status["replicas"]] == [
        ("mtproxy_1", 4431, "running", "UP", "L4OK"),
        ("mtproxy_2", 4432, "running", "UP", "L4OK"),
    ]


def test_second_apply_changes_nothing(cell):
    host, pillar, _ = cell
    assert changed(apply(host, pillar)) == {}


def test_test_mode_lists_changes_and_leaves_the_host_alone(cell):
    host, _, _ = cell
    before = (
        containers(host),
        ip_rules(host),
        mangle_output(host),
        (host.workdir / "etc-mtproxy" / "haproxy" / "haproxy.cfg").read_text(),
    )
    scaled = cell_pillar(host, replicas=4)
    would = changed(apply(host, scaled, test=True))
    assert "Replica mtproxy_3 is running on port 4433" in would
    assert "HAProxy config is valid and in place" in would
    after = (
        containers(host),
        ip_rules(host),
        mangle_output(host),
        (host.workdir / "etc-mtproxy" / "haproxy" / "haproxy.cfg").read_text(),
    )
    assert after == before


def test_scale_up_reloads_haproxy_without_restarting_it(cell):
    host, pillar, _ = cell
    haproxy_before = containers(host)["mtproxy_haproxy"]["id"]
    master = pillar["mtproxy"]["run_dir"] + "/haproxy/master.sock"
    workers_before = current_workers(host, master)

    scaled = cell_pillar(host, replicas=4)
    result = apply(host, scaled)
    assert "HAProxy reloads gracefully when its config changes" in changed(result)
    assert containers(host)["mtproxy_haproxy"]["id"] == haproxy_before
    workers_after = current_workers(host, master)
    # A new worker took over; the master (same container) stayed.
    assert workers_after and not set(workers_after) & set(workers_before), (workers_before, workers_after)
    # Serving all four with the client address proves the return path covers their ports.
    assert_cell_serves(host, scaled, 4)
    assert changed(apply(host, scaled)) == {}


def test_scale_down_removes_extras_and_stale_rules(cell):
    host, _, _ = cell
    single = cell_pillar(host, replicas=1)
    apply(host, single)
    names = set(containers(host))
    assert names == {"mtproxy_1", "mtproxy_haproxy"}
    assert set(servers(host, single)) == {"mtproxy_1"}
    rules = mangle_output(host)
    for stale in ("4432", "4433", "4434"):
        assert stale not in rules
    assert not (host.workdir / "etc-mtproxy" / "replicas" / "mtproxy_2").exists()
    assert_cell_serves(host, single, 1)


def test_invalid_haproxy_config_never_goes_live(cell):
    host, _, _ = cell
    good = cell_pillar(host, replicas=1)
    live = host.workdir / "etc-mtproxy" / "haproxy" / "haproxy.cfg"
    before = live.read_text()
    # Passes the schema (a raw server option string is HAProxy's to judge), but HAProxy rejects it.
    bad = cell_pillar(host, replicas=1, haproxy={"health_check": {"options": "check inter forever"}})
    result = apply(host, bad, check=False)
    bad_states = failed(result)
    config_state = [v for v in bad_states.values() if v["__id__"] == "HAProxy config is valid and in place"]
    assert config_state, f"the config state did not fail: {list(bad_states)}"
    assert "inter" in config_state[0]["comment"].lower()
    assert live.read_text() == before
    assert_cell_serves(host, good, 1)


def test_clean_removes_everything_of_ours(cell):
    host, pillar, _ = cell
    result = apply(host, pillar, sls="mtproxy.clean")
    assert not failed(result)
    assert containers(host) == {}
    assert "lookup 100" not in ip_rules(host)
    assert "mtproxy" not in mangle_output(host)
    assert table_routes(host).strip() == ""
    assert not (host.workdir / "etc-mtproxy").exists()
    assert not (host.workdir / "run-mtproxy").exists()
    assert not (host.workdir / "sysctl.d" / "90-mtproxy.conf").exists()
