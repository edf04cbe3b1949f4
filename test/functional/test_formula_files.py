"""The formula's own files: pillar.example renders the whole formula, documents
every default, and kitchen.yml names only files that exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def keys(tree: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        found.add(path)
        if isinstance(value, dict) and value:
            found |= keys(value, path + ":")
    return found


def test_pillar_example_documents_every_default():
    defaults = yaml.safe_load((REPO / "mtproxy/parameters/defaults.yaml").read_text())["mtproxy"]
    example = yaml.safe_load((REPO / "pillar.example").read_text())["mtproxy"]
    missing = keys(defaults) - keys(example)
    assert not missing, f"pillar.example lacks {sorted(missing)}"


@pytest.mark.integration
def test_formula_renders_with_pillar_example(netns_host):
    pillar = yaml.safe_load((REPO / "pillar.example").read_text())
    netns_host.salt_call("saltutil.sync_all")
    for sls in ("mtproxy", "mtproxy.clean"):
        rendered = netns_host.salt_call("state.show_sls", sls, pillar=pillar)
        assert isinstance(rendered, dict), f"{sls} did not render: {rendered}"
        ids = set(rendered)
        if sls == "mtproxy":
            assert {
                "Replica mtproxy_2 is running on port 4432",
                "HAProxy container is running",
                "Replica replies are routed back to HAProxy",
            } <= ids
        else:
            assert {"HAProxy container is removed", "Return-path rules and routes are removed"} <= ids


def state_args(rendered: dict, state_id: str) -> dict:
    """The arguments of one state in ``state.show_sls`` output."""
    for key, value in rendered[state_id].items():
        if not key.startswith("__"):
            return {k: v for item in value if isinstance(item, dict) for k, v in item.items()}
    raise AssertionError(f"{state_id} has no state function")


# Our entry point: mtprotoproxy, and its counters on port+10000 for the cell exporter.
MTPROTOPROXY_COMMAND = "/etc/mtprotoproxy/stats.py 14431 /usr/local/bin/mtprotoproxy /etc/mtprotoproxy/config.py"
# The formula's wrapper (mtproxy/files/official) with the replica's settings file.
OFFICIAL_COMMAND = "/etc/mtproxy-formula/run-mtproto-proxy.sh /etc/mtproxy-formula/settings.sh"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("flavor", "client_ip", "image", "entrypoint", "command"),
    [
        ("mtprotoproxy", "tproxy", "mtproxy-formula/mtprotoproxy:local", "python3", MTPROTOPROXY_COMMAND),
        ("mtprotoproxy", "proxy_protocol", "mtproxy-formula/mtprotoproxy:local", "python3", MTPROTOPROXY_COMMAND),
        ("official", "tproxy", "telegrammessenger/proxy:latest", "/bin/sh", OFFICIAL_COMMAND),
        ("mtg", "tproxy", "nineseconds/mtg:2", "/mtg", "run /etc/mtg/mtg.toml"),
        ("mtg", "proxy_protocol", "nineseconds/mtg:2", "/mtg", "run /etc/mtg/mtg.toml"),
    ],
)
def test_every_flavor_and_client_ip_mode_renders(netns_host, flavor, client_ip, image, entrypoint, command):
    """The whole formula as Salt renders it: each flavor's container spec, and
    kernel rules declared only in transparent mode."""
    mtproxy = {"flavor": flavor, "client_ip": client_ip, "secret": "6c2f9a41d0b83e57a4c19f0e2d7b6a35"}
    # With the PROXY protocol the replicas listen on loopback (the default there).
    backend = "198.18.0.1" if client_ip == "tproxy" else "127.0.0.1"
    mtproxy |= {"backend_address": backend, "tls_domain": "" if flavor == "official" else "www.example.com"}
    netns_host.salt_call("saltutil.sync_all")
    rendered = netns_host.salt_call("state.show_sls", "mtproxy", pillar={"mtproxy": mtproxy})
    assert isinstance(rendered, dict), f"did not render: {rendered}"
    replica = state_args(rendered, "Replica mtproxy_1 is running on port 4431")
    assert replica["image"] == image and replica["command"] == command
    assert replica.get("entrypoint") == entrypoint
    assert f"mtproxy-formula.flavor={flavor}" in replica["labels"]
    assert ("watch_action" in replica) == (flavor == "mtprotoproxy")
    config = state_args(rendered, "Replica mtproxy_1 has its config")
    assert config["mode"] == "0600" and config["show_changes"] is False
    if flavor == "official":
        wrapper = state_args(rendered, "Replica mtproxy_1 has its run-mtproto-proxy.sh")
        assert wrapper["source"] == "salt://mtproxy/files/official/run-mtproto-proxy.sh"
    transparent = client_ip == "tproxy"
    assert ("Replica replies are routed back to HAProxy" in rendered) == transparent
    assert ("Return path covers exactly the replica ports" in rendered) == transparent
    assert ("Return-path boot unit is in place" in rendered) == transparent
    assert ("Return-path rules and routes are removed" in rendered) == (not transparent)
    # The cell exporter in every mode; the return path it checks only in transparent mode.
    exporter = json.loads(state_args(rendered, "Cell exporter settings are in place")["contents"])
    assert exporter["replicas"][0]["stats_url"].startswith("http://127.0.0.1:14431/")
    assert (exporter["return_path"] is not None) == transparent
    assert "Cell exporter unit is in place" in rendered


def test_kitchen_yml_names_only_files_that_exist():
    kitchen = yaml.safe_load((REPO / "kitchen.yml").read_text())
    assert kitchen["provisioner"]["name"] == "salt_solo"
    assert kitchen["provisioner"]["is_file_root"] is True
    assert kitchen["provisioner"]["formula"] == "mtproxy"
    platforms = {p["name"] for p in kitchen["platforms"]}
    assert {"debian-11", "debian-12", "debian-13", "ubuntu-22.04", "ubuntu-24.04"} <= platforms
    suites = {s["name"]: s for s in kitchen["suites"]}
    assert {"default", "scaled"} <= set(suites)
    for suite in suites.values():
        for path in suite["provisioner"]["pillars_from_files"].values():
            assert (REPO / path).is_file(), f"suite {suite['name']} names missing {path}"
            assert "mtproxy" in yaml.safe_load((REPO / path).read_text())
    verifier = kitchen["verifier"]["command"].split()[-1]
    assert (REPO / verifier).is_file()


def test_formula_metadata():
    fields = yaml.safe_load((REPO / "FORMULA").read_text())
    for field in (
        "name",
        "os",
        "os_family",
        "version",
        "release",
        "minimum_version",
        "summary",
        "description",
        "top_level_dir",
    ):
        assert fields.get(field), f"FORMULA lacks {field}"
    assert (REPO / fields["top_level_dir"] / "init.sls").is_file()
