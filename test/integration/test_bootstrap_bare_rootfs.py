"""mtproxy.bootstrap on a truly bare Debian 12 host: the apt half too.

test_salt_ssh_bare.py proves the venv half on a target that shares the
machine's root filesystem, so there the bootstrap must leave apt alone. Here
the target is a fresh copy of a bare bookworm root (images/bare-bookworm:
minbase with systemd, openssh-server, python3 and iproute2; docker.io and
python3-venv not installed) booted with systemd as PID 1 in namespaces of
its own (PID, mount, UTS, IPC, cgroup) inside a test host's network
namespace: a small VPS. Its own sshd (ssh.service) takes root's key, as
after ``ssh-copy-id``; salt-ssh from the client namespace applies
``mtproxy.bootstrap`` with the default ``docker`` and ``python_packages``
settings and the sample roster (examples/roster) with the project's Python
nowhere on the target. Asserted is what the operator would see: docker.io
and python3-venv installed (dpkg), docker.service started by the state and
its dockerd answering, the venv importing the modules, Debian's python3
untouched, and a second bootstrap with no changes.

What stands in for a VPS, and why:

- apt's source is the local repository the recipe put in the root (no route
  out); its package lists start empty, as on a fresh image.
- /usr/sbin/policy-rc.d forbids maintainer scripts to start services, so
  the dockerd that answers is the one ``service.running`` started.
- The kernel is the machine's: /proc/sys is read-only except /proc/sys/net
  (the namespace's own), /sys is read-only, and of the cgroups only the root's
  own subtree of the ``name=systemd`` hierarchy is writable. Every mount is
  made in the root's own mount namespace and goes with it.
- The cell is not deployed here (test_salt_ssh_bare.py does that): with
  the cgroup controllers read-only, this dockerd answers but runs no container.
- Host keys go to the test host's known_hosts; the machine's sshd and root's
  known_hosts are never used.

Wall times are printed (``-s``), never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cell import changed, timed
from saltdaemons import SaltMaster, example, salt_ssh, state_results
from testhost import REPO, TestHost, TestHostError, _run
from wheelhouse import build as build_wheelhouse

pytestmark = pytest.mark.integration

ROOTFS_DIR = REPO / "build" / "rootfs"
BUILD_COMMAND = "images/build.sh bare-bookworm build/rootfs"
VENV = "/opt/mtproxy/venv"
WHEELHOUSE = "/srv/wheelhouse"
MODULES = ("docker", "pyroute2", "saltext.dockermod")
PACKAGES = ("docker.io", "python3-venv")
BOOTSTRAP_STATES = {
    "Docker engine is installed",
    "Docker engine is running and enabled at boot",
    "Debian can make the venv of the formula's Python modules",
    "The formula's Python modules are in their venv",
}

# PID 1 of the new namespaces: the mounts a container manager makes, then systemd.
BOOT = """set -e
R={root}
mount --bind $R $R
mount -t proc proc $R/proc
mount --bind $R/proc/sys $R/proc/sys
mount -o remount,bind,ro $R/proc/sys
mount --bind $R/proc/sys/net $R/proc/sys/net
mount -o remount,bind,rw $R/proc/sys/net
mount -t sysfs -o ro sysfs $R/sys
mount -t tmpfs -o mode=0755 cgroup $R/sys/fs/cgroup
mkdir $R/sys/fs/cgroup/systemd
mount -t cgroup -o none,name=systemd cgroup $R/sys/fs/cgroup/systemd
for c in {controllers}; do
    mkdir $R/sys/fs/cgroup/$c
    mount --bind /sys/fs/cgroup/$c $R/sys/fs/cgroup/$c
    mount -o remount,bind,ro $R/sys/fs/cgroup/$c
done
mount -o remount,ro $R/sys/fs/cgroup
mount -t tmpfs -o mode=0755 dev $R/dev
for n in null zero full random urandom tty; do
    touch $R/dev/$n
    mount --bind /dev/$n $R/dev/$n
done
touch $R/dev/console
mount --bind {console} $R/dev/console
mkdir $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
ln -s pts/ptmx $R/dev/ptmx
ln -s /proc/self/fd $R/dev/fd
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t tmpfs tmpfs $R/tmp
export container=mtpf
exec chroot $R /lib/systemd/systemd
"""


def rootfs_tarball() -> Path:
    manifest = ROOTFS_DIR / "bare-bookworm.json"
    if not manifest.exists():
        raise TestHostError(f"no bare root filesystem in {ROOTFS_DIR}: run `{BUILD_COMMAND}` first")
    return ROOTFS_DIR / json.loads(manifest.read_text())["tarball"]


class BareHost:
    """A fresh copy of the bare root, booted with systemd as PID 1 in ``host``'s network namespace.

    Ended by its PID 1 (the kernel ends the rest of its PID namespace, and its
    mounts go with its mount namespace); host.stop() removes the copy and the
    cgroup (``name=systemd`` hierarchy, named after the host).
    """

    def __init__(self, host: TestHost):
        self.host = host
        self.path = host.workdir / "rootfs"
        self.cgroup = Path("/sys/fs/cgroup/systemd") / host.name
        self.console = host.workdir / "console.log"
        self.pid1: int | None = None
        self.launcher: subprocess.Popen | None = None

    def boot(self, authorized_key: str) -> BareHost:
        self.path.mkdir(parents=True)
        _run(["tar", "-C", str(self.path), "--numeric-owner", "-xf", str(rootfs_tarball())], timeout=300)
        ssh = self.path / "root" / ".ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(authorized_key)  # what ssh-copy-id leaves
        policy = self.path / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\n# Maintainer scripts start nothing: only the states do.\nexit 101\n")
        policy.chmod(0o755)
        # No getty on its console.
        (self.path / "etc" / "systemd" / "system" / "console-getty.service").symlink_to("/dev/null")
        # The v1 controllers, read-only; no cgroup2 ("unified"): systemd runs in legacy mode.
        skip = {"systemd", "unified"}
        controllers = [c.name for c in Path("/sys/fs/cgroup").iterdir() if c.name not in skip and c.is_mount()]
        self.cgroup.mkdir()
        # Its console is a file: what systemd prints while it boots.
        self.console.touch()
        boot = BOOT.format(root=self.path, console=self.console, controllers=" ".join(sorted(controllers)))
        unshare = ["unshare", "--mount", "--uts", "--ipc", "--pid", "--cgroup", "--fork", "--propagation", "private"]
        cmd = [
            *["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"', "sh"],
            *self.host.nsenter(),
            *[*unshare, "sh", "-c", boot],
        ]
        log = open(self.host.workdir / "boot.log", "ab")  # noqa: SIM115 (the launcher keeps it)
        self.launcher = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        state = ""
        while time.monotonic() < deadline and state not in ("running", "degraded"):
            if self.launcher.poll() is not None:
                raise TestHostError(
                    f"the bare host did not boot: {(self.host.workdir / 'boot.log').read_text()}"
                    f"{self.console.read_text()[-3000:]}"
                )
            children = _run(["pgrep", "-P", str(self.launcher.pid)], check=False).stdout.split()
            if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "systemd":
                self.pid1 = int(children[0])
                state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            time.sleep(0.5)
        if state not in ("running", "degraded"):
            raise TestHostError(f"the bare host's systemd is {state!r} after 120 s: {self.console.read_text()[-3000:]}")
        return self

    def run(self, args: list[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a command inside the bare host (every namespace of its PID 1, and its root)."""
        return _run(["nsenter", "-t", str(self.pid1), "-a", "-r", "-w", *args], check=check, timeout=timeout)

    def installed(self, package: str) -> bool:
        status = self.run(["dpkg-query", "-W", "-f=${Status}", package], check=False).stdout
        return status == "install ok installed"

    def stop(self) -> None:
        if self.launcher and self.launcher.poll() is None:
            # The kernel ends a PID namespace with its PID 1.
            os.kill(self.pid1 or self.launcher.pid, signal.SIGKILL)
            self.launcher.wait(timeout=30)


def state_changes(returns: dict, name: str) -> dict:
    result = returns.get(name)
    # Every state first (with -s), the failed ones too.
    for state in result.values() if isinstance(result, dict) else ():
        print(f"\n[state] {state.get('__id__')}: {state.get('result')}, {state.get('comment')}"[:600])
    return changed(state_results(returns, name))


@pytest.fixture(scope="module")
def bare_host(make_testhost):
    """A test host (no dockerd of ours) whose namespace holds a freshly booted bare Debian 12."""
    host = make_testhost(docker=False)
    bare = BareHost(host)
    try:
        key = host.workdir / "client_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        timed("bare host copy and boot", bare.boot, Path(f"{key}.pub").read_text())
        for package in PACKAGES:
            assert not bare.installed(package), f"{package} is installed on the bare host already"
        for module in MODULES:
            assert bare.run(["python3", "-c", f"import {module}"], check=False).returncode != 0, module
        build_wheelhouse(bare.path / WHEELHOUSE.lstrip("/"), list(MODULES))
        master = SaltMaster(host)
        entry = next(iter(example("roster").values()))
        entry.update(
            {
                "host": host.address,
                "priv": str(key),
                # Host keys go to the test host's own known_hosts, never root's.
                "ssh_options": [f"UserKnownHostsFile={host.workdir / 'known_hosts'}"],
            }
        )
        assert entry["set_path"].startswith(f"{VENV}/bin:"), entry
        roster = host.workdir / "roster"
        roster.write_text(yaml.safe_dump({host.name: entry}))
        # The defaults (docker:install, python3-venv, the venv in /opt), but wheels instead of PyPI.
        master.set_pillar({host.name: {"mtproxy": {"python_packages": {"find_links": WHEELHOUSE}}}})

        def run(*args: str) -> dict:
            return salt_ssh(master, host, roster, key, host.name, *args, timeout=900)

        yield host, bare, run
    finally:
        bare.stop()
        host.stop()


def dockerd_pid(bare: BareHost) -> int | None:
    """The machine's PID of docker.service's dockerd when it answers on the bare host's socket, else None."""
    if bare.run(["docker", "version", "--format", "{{.Server.Version}}"], check=False).returncode != 0:
        return None
    procs = bare.cgroup / "system.slice" / "docker.service" / "cgroup.procs"
    pids = [int(p) for p in procs.read_text().split()]
    return next((p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "dockerd"), None)


def test_bootstrap_installs_and_starts_docker_with_apt_and_a_rerun_changes_nothing(bare_host):
    host, bare, run = bare_host
    assert dockerd_pid(bare) is None
    # test=True says what the bootstrap would do, and does nothing.
    would = state_changes(run("state.apply", "mtproxy.bootstrap", "test=True"), host.name)
    assert set(would) == BOOTSTRAP_STATES, would
    assert not any(bare.installed(package) for package in PACKAGES)
    assert not (bare.path / VENV.lstrip("/")).exists()
    assert dockerd_pid(bare) is None

    returns = timed("salt-ssh bootstrap (bare host, apt)", run, "state.apply", "mtproxy.bootstrap")
    done = state_changes(returns, host.name)
    assert set(done) == BOOTSTRAP_STATES, done
    assert "docker.io" in done["Docker engine is installed"], done
    assert "python3-venv" in done["Debian can make the venv of the formula's Python modules"], done
    for package in PACKAGES:
        assert bare.installed(package), f"{package} is not installed on the bare host"
    assert bare.run(["systemctl", "is-enabled", "docker"]).stdout.strip() == "enabled"
    pid = dockerd_pid(bare)
    assert pid, bare.run(["journalctl", "-u", "docker", "--no-pager"], check=False).stdout[-3000:]
    # The bare host's dockerd lives in the test host's network namespace.
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{host.netns}").st_ino
    probe = bare.run([f"{VENV}/bin/python3", "-c", "import " + ", ".join(MODULES)], check=False)
    assert probe.returncode == 0, probe.stderr
    # Debian's python3 itself was not touched (PEP 668).
    assert bare.run(["python3", "-c", "import docker"], check=False).returncode != 0

    again = timed("salt-ssh bootstrap no-change rerun", run, "state.apply", "mtproxy.bootstrap")
    assert state_changes(again, host.name) == {}
    assert dockerd_pid(bare) == pid
