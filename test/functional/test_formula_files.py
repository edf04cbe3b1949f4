"""The formula's own files: pillar.example renders the whole formula, documents
every default, and kitchen.yml names only files that exist."""

from __future__ import annotations

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
