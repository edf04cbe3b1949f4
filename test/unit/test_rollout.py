"""Pure logic of the rollout order (mtproxy.rollout), the return-path ports
during a rollout and the listen labels. The rollout itself, on real
containers under load, is test/integration/test_safe_change.py."""

from __future__ import annotations

import pytest
from test_settings import SECRET, loader_stubs, mtproxy, settings  # noqa: F401 (autouse fixture)


def cell(**changes) -> dict:
    return mtproxy.resolve(settings(secret=SECRET, **changes))


def on(*ports: int, first: int = 1) -> list[dict]:
    """Existing replicas mtproxy_<first>.. listening on ``ports``."""
    return [
        {"name": f"mtproxy_{i}", "index": i, "address": "203.0.113.10", "port": p, "labelled": True}
        for i, p in enumerate(ports, start=first)
    ]


def order(resolved: dict, existing: list[dict]) -> list[str]:
    return [r["name"] for r in mtproxy.rollout(resolved, existing)]


def test_replicas_roll_in_index_order_when_no_port_is_taken():
    assert order(cell(replicas=3, base_port=6101), on(4431, 4432, 4433)) == ["mtproxy_1", "mtproxy_2", "mtproxy_3"]
    assert order(cell(replicas=3), []) == ["mtproxy_1", "mtproxy_2", "mtproxy_3"]


def test_a_port_shift_up_rolls_from_the_last_replica_down():
    assert order(cell(replicas=3, base_port=4432), on(4431, 4432, 4433)) == ["mtproxy_3", "mtproxy_2", "mtproxy_1"]


def test_a_port_shift_down_rolls_in_index_order():
    assert order(cell(replicas=3, base_port=4430), on(4431, 4432, 4433)) == ["mtproxy_1", "mtproxy_2", "mtproxy_3"]


def test_a_scale_up_rolls_the_new_replicas_where_their_ports_are_free():
    assert order(cell(replicas=3, base_port=4432), on(4431, 4432)) == ["mtproxy_2", "mtproxy_1", "mtproxy_3"]


def test_a_new_port_held_by_a_replica_that_is_removed_later_is_refused():
    with pytest.raises(mtproxy.SettingsError) as error:
        mtproxy.rollout(cell(replicas=2, base_port=4432), on(4431, 4432, 4433))
    message = str(error.value)
    assert message.startswith("Pillar mtproxy:base_port is 4432")
    assert "mtproxy_2 would move to port 4433, where mtproxy_3 listens" in message
    assert "change replicas and base_port in two applies" in message


def test_moves_that_form_a_cycle_are_refused():
    with pytest.raises(mtproxy.SettingsError, match=r"mtproxy:base_port.*form a cycle"):
        mtproxy.rollout(cell(replicas=2, base_port=4431), on(4432, 4431))


def test_the_return_path_covers_old_and_new_ports_during_a_rollout():
    assert mtproxy.return_path_ports(cell(replicas=2, base_port=6101), on(4431, 4432, 4433)) == [
        4431,
        4432,
        4433,
        6101,
        6102,
    ]


@pytest.mark.parametrize("address", ["203.0.113.10", "2001:db8::10"])
def test_a_listen_label_reads_back(address):
    key, value = mtproxy.listen_label(address, 6101).split("=", 1)
    assert key == mtproxy.LISTEN_LABEL
    assert mtproxy._listen(value) == (address, 6101)


def failing_docker_ps(**kwargs):
    raise RuntimeError("Error while fetching server API version: connection refused")


def test_a_docker_error_fails_the_render_when_the_engine_socket_exists(monkeypatch, tmp_path):
    socket_path = tmp_path / "docker.sock"
    socket_path.touch()
    monkeypatch.setitem(mtproxy.__salt__, "docker.ps", failing_docker_ps)
    monkeypatch.setitem(mtproxy.__salt__, "config.option", lambda key, default=None: f"unix://{socket_path}")
    with pytest.raises(mtproxy.CommandExecutionError, match=r"Cannot list the replica containers.*connection refused"):
        mtproxy.existing_replicas()


def test_no_engine_socket_yet_means_no_replicas(monkeypatch, tmp_path):
    # A fresh host with the Docker SDK but no engine: engine.sls installs it later in the run.
    monkeypatch.setitem(mtproxy.__salt__, "docker.ps", failing_docker_ps)
    monkeypatch.setitem(mtproxy.__salt__, "config.option", lambda key, default=None: f"unix://{tmp_path}/absent.sock")
    assert mtproxy.existing_replicas() == []
