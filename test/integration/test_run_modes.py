"""The formula in the run modes operators use, with real daemons.

- master and minion: one salt-master (in a namespace of its own) and a
  salt-minion inside each of two test hosts, linked to the master by veth
  pairs; pillar from the master's pillar_roots (top file: examples/top.sls),
  formula and modules from its file_roots (master config: examples/master.conf);
- salt-ssh: see test_salt_ssh_bare.py (a bare target, bootstrapped by the
  formula).

Apply wall times are printed (`-s` shows them), never asserted.
"""

from __future__ import annotations

import pytest
from cell import assert_cell_serves, cell_pillar, changed, containers, timed
from saltdaemons import salt_cluster, state_results

pytestmark = pytest.mark.integration


# -- master and minion --------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(make_testhost):
    """One master, two test hosts each with a minion; pillar: a cell per host."""
    with salt_cluster(make_testhost, cell_pillar) as running:
        yield running


def test_master_apply_deploys_every_cell(cluster):
    master, hosts, pillars = cluster
    # As the README says: sync the custom modules, then apply.
    synced = master.salt("*", "saltutil.sync_all")
    for host in hosts:
        assert "modules.haproxy_runtime" in synced[host.name]["modules"], synced
        assert "states.tproxy" in synced[host.name]["states"], synced
    returns = timed("master/minion first apply (2 minions)", master.salt, "*", "state.apply", "mtproxy")
    for host in hosts:
        state_results(returns, host.name)
        assert_cell_serves(host, pillars[host.name], 2, connections=12)
        # The pillar came from the master: every file sits in the host's workdir.
        assert (host.workdir / "etc-mtproxy" / "haproxy" / "haproxy.cfg").is_file()
    # Two cells, two secrets: each host generated its own.
    # Each host generated and kept its own secret.
    secrets = {(h.workdir / "var-lib-mtproxy" / "secret").read_text() for h in hosts}
    assert len(secrets) == 2


def test_master_second_apply_changes_nothing(cluster):
    master, hosts, _ = cluster
    returns = timed("master/minion second apply (2 minions)", master.salt, "*", "state.apply", "mtproxy")
    for host in hosts:
        assert changed(state_results(returns, host.name)) == {}


def test_cli_pillar_scales_and_targeting_changes_one_host(cluster):
    master, (one, two), _ = cluster
    # A CLI pillar merges over the master's pillar: replicas changes, the
    # paths from the master's pillar stay.
    override = 'pillar={"mtproxy": {"replicas": 3}}'
    returns = timed("master/minion scale to 3 (2 minions)", master.salt, "*", "state.apply", "mtproxy", override)
    for host in (one, two):
        state_results(returns, host.name)
        assert_cell_serves(host, cell_pillar(host, replicas=3), 3, connections=12)

    before_one = containers(one)
    returns = master.salt(two.name, "state.apply", "mtproxy", 'pillar={"mtproxy": {"replicas": 1}}')
    assert set(returns) == {two.name}
    assert changed(state_results(returns, two.name))
    assert set(containers(two)) == {"mtproxy_1", "mtproxy_haproxy"}
    assert_cell_serves(two, cell_pillar(two, replicas=1), 1, connections=12)
    # The other host was not touched: same containers, still three replicas serving.
    assert containers(one) == before_one
    assert_cell_serves(one, cell_pillar(one, replicas=3), 3, connections=12)
