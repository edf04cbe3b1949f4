"""salt-ssh against a bare host: the formula bootstraps what its modules need.

The target is a test host with a real sshd; Salt runs there with the
machine's /usr/bin/python3, which has none of the Docker SDK, pyroute2 or
saltext-dockermod (checked first), so nothing of the project's own Python is
used on the target. The commands are the README's for a fresh VPS, with the
sample roster and master config (examples/); only paths are test paths:

    salt-ssh HOST state.apply mtproxy            # before the bootstrap: refused, nothing changed
    salt-ssh HOST state.apply mtproxy.bootstrap  # the venv with the modules
    salt-ssh HOST state.apply mtproxy            # the cell
    salt-ssh HOST state.apply mtproxy            # no changes
    salt-ssh HOST mtproxy.links                  # the full links

The test's master config is examples/master.conf with test paths (its
``module_dirs``, the checkout, is what lets salt-ssh run the formula's
wrapper module, _wrapper/mtproxy.py, on this side). The bootstrap's venv lives in the test host's workdir (pillar
``mtproxy:python_packages:venv``, and the roster's ``set_path``), and pip
installs from a folder of wheels repacked from the project venv
(``python_packages:find_links``): the test host has no route to PyPI, and the
machine's own Python is never changed. The test host runs its own dockerd
(``docker:install: false``), and ``python_packages:venv_packages`` is empty
here: python3-venv is already on the machine, and a test must not run apt.
Wall times are printed (``-s``), never asserted.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from cell import assert_cell_serves, cell_pillar, changed, containers, host_snapshot, timed
from saltdaemons import EXAMPLES, SaltMaster, Sshd, salt_ssh, state_results
from testhost import TestHost
from wheelhouse import build as build_wheelhouse

pytestmark = pytest.mark.integration

SYSTEM_PYTHON = "/usr/bin/python3"
EXAMPLE_VENV = "/opt/mtproxy/venv"


def system_python_lacks_our_modules() -> None:
    for module in ("docker", "pyroute2", "saltext.dockermod"):
        probe = subprocess.run([SYSTEM_PYTHON, "-c", f"import {module}"], capture_output=True, check=False)
        assert probe.returncode != 0, f"{SYSTEM_PYTHON} can import {module}: the target would not be bare"


class Bare(NamedTuple):
    host: TestHost
    run: Callable[..., dict]
    pillar: dict
    venv: Path
    master: SaltMaster
    roster: Path
    key: Path


class PrivateDisk:
    """``host``, except that what starts in its namespace sees a tmpfs of its own at ``folder``."""

    def __init__(self, host: TestHost, folder: Path):
        self.host, self.folder = host, folder

    def __getattr__(self, name: str):
        return getattr(self.host, name)

    def nsenter(self, client: bool = False) -> list[str]:
        mount = f'mount -t tmpfs mtproxy-private {self.folder} && exec "$0" "$@"'
        return [*self.host.nsenter(client), "unshare", "--mount", "--propagation", "private", "sh", "-c", mount]


@pytest.fixture(scope="module")
def bare(make_testhost, tmp_path_factory):
    """A test host with sshd, a salt-ssh config (examples/master.conf), the sample roster and a pillar."""
    system_python_lacks_our_modules()
    host = make_testhost()
    sshd = None
    try:
        sshd = Sshd(host).start()
        # salt-ssh's config dir and pillar: no master daemon is started.
        master = SaltMaster(host)
        venv = host.workdir / "mtproxy-venv"
        sample = yaml.safe_load((EXAMPLES / "roster").read_text())
        entry = next(iter(sample.values()))
        assert entry["set_path"].startswith(EXAMPLE_VENV + "/bin:"), entry
        entry.update(
            {
                "host": host.address,
                "port": sshd.port,
                "priv": str(sshd.client_key),
                "thin_dir": str(host.workdir / "salt-thin"),
                # Host keys go to the test host's own known_hosts, never root's.
                "ssh_options": [f"UserKnownHostsFile={host.workdir / 'known_hosts'}"],
                # The sample's set_path with the test's venv: the system python3 until it exists.
                "set_path": entry["set_path"].replace(EXAMPLE_VENV, str(venv)),
            }
        )
        roster = host.workdir / "roster"
        roster.write_text(yaml.safe_dump({host.name: entry}))
        wheels = tmp_path_factory.mktemp("wheelhouse")
        build_wheelhouse(wheels, ["docker", "pyroute2", "saltext.dockermod"])
        pillar = cell_pillar(
            host,
            docker_host=host.docker_host,
            python_packages={"venv": str(venv), "venv_packages": [], "find_links": str(wheels)},
        )
        # No minion config on the target: the Docker states' endpoint comes from pillar.
        pillar["docker.url"] = host.docker_host
        master.set_pillar({host.name: pillar})

        def run(*args: str) -> dict:
            log = sshd.root / "sshd.log"
            logins = log.read_text().count("Accepted publickey")
            out = salt_ssh(master, host, roster, sshd.client_key, host.name, *args, timeout=400)
            print(f"\n[ssh logins] {' '.join(args)}: {log.read_text().count('Accepted publickey') - logins}")
            return out

        yield Bare(host, run, pillar, venv, master, roster, sshd.client_key)
    finally:
        if sshd:
            sshd.stop()
        host.stop()


def test_apply_before_bootstrap_is_refused_in_one_line_and_changes_nothing(bare):
    host, run, pillar, venv, *_ = bare
    settings = pillar["mtproxy"]
    before = host_snapshot(host, pillar)
    returns = timed("salt-ssh apply before bootstrap", run, "state.apply", "mtproxy")
    errors = returns.get(host.name)
    # A render error: a list of messages, no state ran.
    assert isinstance(errors, list) and len(errors) == 1, json.dumps(returns)[:5000]
    print(f"\n[refusal] {errors[0].splitlines()[0]}")
    assert "mtproxy is not bootstrapped on this host" in errors[0], errors[0]
    assert "run `state.apply mtproxy.bootstrap` first" in errors[0], errors[0]
    assert "Traceback" not in errors[0], errors[0]
    assert not venv.exists()
    assert not Path(settings["secret_file"]).exists()
    assert not Path(settings["config_dir"]).exists()
    assert containers(host) == {}
    assert host_snapshot(host, pillar) == before


def test_bootstrap_then_apply_serves_and_a_rerun_changes_nothing(bare):
    host, run, pillar, venv, *_ = bare
    # test=True says what the bootstrap would do, and does nothing.
    would = changed(state_results(run("state.apply", "mtproxy.bootstrap", "test=True"), host.name))
    assert set(would) == {"The formula's Python modules are in their venv"}, would
    plan = would["The formula's Python modules are in their venv"]
    assert plan["installed"] == ["docker", "pyroute2", "saltext.dockermod"], plan
    assert plan["venv"].startswith(f"created with {SYSTEM_PYTHON}"), plan  # python3.11 on Debian 12
    assert not venv.exists()

    returns = timed("salt-ssh bootstrap (bare host)", run, "state.apply", "mtproxy.bootstrap")
    done = changed(state_results(returns, host.name))
    assert set(done) == {"The formula's Python modules are in their venv"}, done
    probe = subprocess.run(
        [str(venv / "bin" / "python3"), "-c", "import docker, pyroute2, saltext.dockermod"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    system_python_lacks_our_modules()
    # The bootstrap made no secret and deployed nothing.
    assert not Path(pillar["mtproxy"]["secret_file"]).exists()
    assert containers(host) == {}

    returns = timed("salt-ssh first apply (after bootstrap)", run, "state.apply", "mtproxy")
    state_results(returns, host.name)
    assert_cell_serves(host, pillar, 2, connections=12)
    # The boot units run the venv's Python (it has pyroute2), never the bare system one.
    unit = (host.workdir / "systemd" / "mtproxy-return-path.service").read_text()
    assert f"ExecStart={venv}/bin/python3 " in unit, unit

    again = timed("salt-ssh no-change apply", run, "state.apply", "mtproxy")
    assert changed(state_results(again, host.name)) == {}

    # The README's links command: links for the deployed cell, the secret in full.
    links = timed("salt-ssh mtproxy.links", run, "mtproxy.links").get(host.name)
    assert isinstance(links, list) and links, links
    print(f"\n[links] {len(links)}: {links[0]['tg'].split('secret=')[0]}secret=...")
    deployed = host_serves(host, pillar)
    expected = f"?server={host.address}&port={deployed['port']}&secret=dd{deployed['secret']}"
    assert [(link["mode"], link["tg"], link["https"]) for link in links] == [
        ("secure", "tg://proxy" + expected, "https://t.me/proxy" + expected)
    ], links
    # The debugging view hides the secret.
    shown = run("mtproxy.settings").get(host.name)
    assert isinstance(shown, dict) and shown["secret"] == "<hidden>", shown
    assert deployed["secret"] not in json.dumps(shown)


def test_links_need_no_disk_shared_with_the_target(bare):
    """Here salt-ssh and its target share the test host's disk. A second sshd
    whose sessions have their own tmpfs holds the thin (with the copies of the
    formula's modules salt-ssh ships): the links come out the same, so salt-ssh's
    side never reads what it put on the target (as a real VPS would not let it)."""
    host, run, _, _, master, roster, key = bare
    private = host.workdir / "private"
    private.mkdir()
    sshd = Sshd(PrivateDisk(host, private), port=2223).start()
    try:
        entry = yaml.safe_load(roster.read_text())[host.name]
        entry.update({"port": sshd.port, "thin_dir": str(private / "salt-thin")})
        private_roster = host.workdir / "roster-private"
        private_roster.write_text(yaml.safe_dump({host.name: entry}))
        links = salt_ssh(master, host, private_roster, key, host.name, "mtproxy.links", timeout=400).get(host.name)
        assert links == run("mtproxy.links").get(host.name), links
        # The thin went to the tmpfs only that sshd's sessions see.
        assert not (private / "salt-thin" / "salt-call").exists()
    finally:
        sshd.stop()


def host_serves(host, pillar: dict) -> dict:
    """The frontend port HAProxy listens on and the secret the replicas serve, read on the host."""
    config = Path(pillar["mtproxy"]["config_dir"])
    bind = re.search(r"^\s*bind\s+\S+:(\d+)", (config / "haproxy" / "haproxy.cfg").read_text(), re.M)
    assert bind, "no bind line in haproxy.cfg"
    port = int(bind[1])
    assert host.run(["ss", "-Htln", f"sport = :{port}"]).stdout.strip(), f"nothing listens on {port}"
    served = re.search(r'"tg": "([0-9a-f]{32})"', (config / "replicas" / "mtproxy_1" / "config.py").read_text())
    assert served, "no secret in mtproxy_1's config"
    return {"port": port, "secret": served[1]}
