"""Pure logic of the rollout order (mtproxy.rollout), the return-path ports
during a rollout and the listen labels. The rollout itself, on real
containers under load, is test/integration/test_safe_change.py."""

from __future__ import annotations

import pytest
from test_settings import (  # noqa: F401 (loader mocks, autouse fixture)
    SECRET,
    configure_loader_modules,
    loader_stubs,
    mtproxy,
    settings,
)


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


# -- changes a live cell cannot take one replica at a time -------------------------


@pytest.fixture
def live_haproxy(monkeypatch, tmp_path):
    """A live HAProxy as Docker reports it: its config folder (transparent mode) and image."""
    resolved = cell(config_dir=str(tmp_path / "etc"), run_dir=str(tmp_path / "run"))
    haproxy = resolved["haproxy"]
    config = tmp_path / "etc" / "haproxy"
    config.mkdir(parents=True)
    (config / "haproxy.cfg").write_text("backend b\n    source 0.0.0.0 usesrc clientip\n")
    inspected = {
        "Image": "sha256:" + "a" * 64,
        "HostConfig": {"Binds": [f"{config}:/etc/haproxy:ro", f"{haproxy['run_dir']}:/run/haproxy:rw"]},
    }
    images = {haproxy["image"]: {"Id": "sha256:" + "a" * 64}, "other/haproxy:2": {"Id": "sha256:" + "b" * 64}}
    monkeypatch.setitem(mtproxy.__salt__, "docker.ps", lambda **kwargs: {"c1": {"Names": [f"/{haproxy['container']}"]}})
    monkeypatch.setitem(mtproxy.__salt__, "docker.inspect_container", lambda name: inspected)
    monkeypatch.setitem(mtproxy.__salt__, "docker.inspect_image", lambda name: images[name])
    return resolved, config / "haproxy.cfg"


def changed_cell(resolved: dict, **changes) -> dict:
    changed = {**resolved, "haproxy": {**resolved["haproxy"]}}
    for key, value in changes.items():
        if key.startswith("haproxy__"):
            changed["haproxy"][key[len("haproxy__") :]] = value
        else:
            changed[key] = value
    return changed


def test_the_live_cell_as_it_runs_is_accepted(live_haproxy):
    resolved, _ = live_haproxy
    mtproxy.refuse_live_restart(resolved)
    mtproxy.refuse_live_restart(changed_cell(resolved, replicas=5, base_port=6101))


def test_no_live_haproxy_means_nothing_to_refuse(monkeypatch):
    monkeypatch.setitem(mtproxy.__salt__, "docker.ps", lambda **kwargs: {})
    mtproxy.refuse_live_restart(cell(client_ip="proxy_protocol"))


def test_a_client_ip_switch_is_refused_on_a_live_cell(live_haproxy):
    resolved, _ = live_haproxy
    switched = changed_cell(resolved, client_ip="proxy_protocol")
    with pytest.raises(mtproxy.CommandExecutionError, match=r"mtproxy:client_ip is 'proxy_protocol'.*runs tproxy"):
        mtproxy.refuse_live_restart(switched)
    mtproxy.refuse_live_restart(changed_cell(switched, haproxy__allow_restart=True))


def test_a_new_haproxy_image_needs_allow_restart(live_haproxy):
    resolved, _ = live_haproxy
    other = changed_cell(resolved, haproxy__image="other/haproxy:2")
    with pytest.raises(
        mtproxy.CommandExecutionError, match=r"mtproxy:haproxy:image is 'other/haproxy:2'.*allow_restart"
    ):
        mtproxy.refuse_live_restart(other)
    mtproxy.refuse_live_restart(changed_cell(other, haproxy__allow_restart=True))


def test_a_rebuilt_image_under_the_same_name_needs_allow_restart(live_haproxy, monkeypatch):
    resolved, _ = live_haproxy
    monkeypatch.setitem(mtproxy.__salt__, "docker.inspect_image", lambda name: {"Id": "sha256:" + "c" * 64})
    with pytest.raises(mtproxy.CommandExecutionError, match=r"mtproxy:haproxy:image"):
        mtproxy.refuse_live_restart(resolved)


def test_new_folders_need_allow_restart(live_haproxy, tmp_path):
    resolved, _ = live_haproxy
    moved = mtproxy.resolve(
        settings(secret=SECRET, config_dir=str(tmp_path / "elsewhere"), run_dir=resolved["run_dir"])
    )
    with pytest.raises(mtproxy.CommandExecutionError, match=r"mtproxy:config_dir is .*elsewhere"):
        mtproxy.refuse_live_restart(moved)
    mtproxy.refuse_live_restart(changed_cell(moved, haproxy__allow_restart=True))


def test_a_renamed_haproxy_is_refused_on_a_live_cell(live_haproxy):
    resolved, _ = live_haproxy
    with pytest.raises(mtproxy.CommandExecutionError, match=r"mtproxy:haproxy:container is 'edge'.*runs as"):
        mtproxy.refuse_live_restart(changed_cell(resolved, haproxy__container="edge", haproxy__allow_restart=True))
