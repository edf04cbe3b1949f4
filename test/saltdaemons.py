"""A real salt-master, salt-minions and an sshd for salt-ssh, each inside a test host namespace.

The daemons run under ``nsenter --net`` in namespaces the tests create (see
testhost.py), so every connection (minion to master, salt-ssh to sshd) stays
inside them. Their configuration, keys, caches and logs live below the owning
test host's workdir; each daemon is ended by its PID.

The master's settings start from ``examples/master.conf`` (the README's
sample); only the paths are replaced by test paths.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from cell import failed
from testhost import REPO, VENV_BIN, TestHost, TestHostError, _terminate

EXAMPLES = REPO / "examples"


def example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def state_results(returns: dict, minion: str) -> dict:
    """``minion``'s state results from a ``salt``/``salt-ssh`` return; fails naming the states that failed."""
    result = returns.get(minion)
    assert isinstance(result, dict), f"{minion} returned no state results: {json.dumps(returns)[:5000]}"
    bad = failed(result)
    assert not bad, f"states failed on {minion}:\n" + json.dumps(bad, indent=1)[:20000]
    return result


class Daemon:
    """A process started with ``nsenter`` in a test host namespace, ended by PID."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise TestHostError(f"{self.proc.args} exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        # nsenter execs the daemon (same PID); the daemon ends its own children on SIGTERM.
        _terminate([self.pid], timeout=20)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _salt_paths(root: Path) -> dict:
    # Salt prepends root_dir to these (and to its defaults, such as the
    # extension modules' cache), so they are given relative to it: everything
    # stays below the test host's workdir, and socket paths stay far below
    # the 108-byte limit of a unix socket.
    return {
        "root_dir": str(root),
        "pki_dir": "/pki",
        "cachedir": "/cache",
        "sock_dir": "/sock",
        "pidfile": "/salt.pid",
        "log_file": "/salt.log",
        "log_level_logfile": "debug",
        "user": "root",
    }


class SaltMaster:
    """salt-master in ``host``'s namespace, listening on all of its addresses."""

    def __init__(self, host: TestHost, name: str = "master"):
        self.host = host
        self.root = host.workdir / name
        self.config_dir = self.root / "etc"
        self.pillar_dir = self.root / "pillar"
        for folder in (self.config_dir, self.pillar_dir):
            folder.mkdir(parents=True, exist_ok=True)
        config = example("master.conf")
        config.update(_salt_paths(self.root))
        config.update(
            {
                "id": f"{host.name}-{name}",
                "interface": "0.0.0.0",
                "file_roots": {"base": [str(REPO)]},
                # The formula's salt-ssh wrapper (_wrapper/mtproxy.py), from the checkout.
                "module_dirs": [str(REPO)],
                "runner_dirs": [str(REPO / "_runners")],
                "pillar_roots": {"base": [str(self.pillar_dir)]},
                "auto_accept": True,
                # salt-ssh keeps its key and thin here.
                "ssh_log_file": str(self.root / "ssh.log"),
            }
        )
        (self.config_dir / "master").write_text(json.dumps(config, indent=2))
        # The pillar top file is the README's sample, verbatim.
        (self.pillar_dir / "top.sls").write_text((EXAMPLES / "top.sls").read_text())
        self.pillars: dict[str, dict] = {}
        self.daemon: Daemon | None = None

    def set_pillar(self, by_minion: dict[str, dict]) -> None:
        """``mtproxy.sls``: each minion (by id) gets its own pillar (added to those set before)."""
        self.pillars.update(by_minion)
        (self.pillar_dir / "mtproxy.sls").write_text(
            "{%- set cells = " + json.dumps(self.pillars) + " %}\n{{ cells.get(grains['id'], {}) | json }}\n"
        )

    def start(self) -> SaltMaster:
        cmd = [*self.host.nsenter(), str(VENV_BIN / "salt-master"), "-c", str(self.config_dir), "-l", "warning"]
        self.daemon = Daemon(cmd, self.root / "master.out")
        return self

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()

    def salt(self, *args: str, timeout: float = 300) -> dict:
        """``salt ARGS`` from the master's namespace; returns {minion id: return}."""
        cmd = [
            str(VENV_BIN / "salt"),
            "-c",
            str(self.config_dir),
            "--out=json",
            "--static",
            "--log-level=quiet",
            f"--timeout={int(timeout)}",
            *args,
        ]
        proc = self.host.run(cmd, check=False, timeout=timeout + 60)
        try:
            return json.loads(proc.stdout) if proc.stdout.strip() else {}
        except ValueError as exc:
            raise TestHostError(f"salt printed no JSON ({proc.returncode}):\n{proc.stdout}{proc.stderr}") from exc

    def salt_run(self, *args: str, timeout: float = 900) -> tuple[int, dict]:
        """``salt-run ARGS`` from the master's namespace; returns (exit code, its JSON)."""
        cmd = [str(VENV_BIN / "salt-run"), "-c", str(self.config_dir), "--out=json", "--log-level=quiet", *args]
        proc = self.host.run(cmd, check=False, timeout=timeout)
        try:
            return proc.returncode, json.loads(proc.stdout)
        except ValueError as exc:
            raise TestHostError(f"salt-run printed no JSON ({proc.returncode}):\n{proc.stdout}{proc.stderr}") from exc

    def wait_minions(self, ids: list[str], timeout: float = 150) -> None:
        """Wait until each minion's key is accepted and it answers ``test.ping``."""
        deadline = time.monotonic() + timeout
        answered: dict = {}
        while time.monotonic() < deadline:
            if self.daemon:
                self.daemon.check_alive()
            answered = self.salt("*", "test.ping", timeout=5)
            if all(answered.get(i) is True for i in ids):
                return
            time.sleep(3)
        logs = [self.root / "master.out", *(self.host.workdir.parent / i / "minion" / "minion.out" for i in ids)]
        tails = "".join(f"\n== {p}:\n{p.read_text()[-1500:]}" for p in logs if p.exists())
        raise TestHostError(f"minions {ids} did not answer within {timeout} s: {answered}{tails}")


class SaltMinion:
    """salt-minion inside ``host``'s namespace, talking to the master at ``master_address``."""

    def __init__(self, host: TestHost, master_address: str):
        self.host = host
        self.id = host.name
        self.root = host.workdir / "minion"
        self.config_dir = self.root / "etc"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        config = _salt_paths(self.root)
        config.update(
            {
                "id": self.id,
                "master": master_address,
                # The Docker states and our modules reach this host's own dockerd.
                "docker.url": host.docker_host,
                "acceptance_wait_time": 1,
                "random_reauth_delay": 0,
            }
        )
        (self.config_dir / "minion").write_text(json.dumps(config, indent=2))
        self.daemon: Daemon | None = None

    def start(self) -> SaltMinion:
        cmd = [*self.host.nsenter(), str(VENV_BIN / "salt-minion"), "-c", str(self.config_dir), "-l", "warning"]
        self.daemon = Daemon(cmd, self.root / "minion.out")
        return self

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()


@contextlib.contextmanager
def salt_cluster(make_testhost: Callable[..., TestHost], pillar: Callable[[TestHost], dict], count: int = 2):
    """One salt-master in a test host of its own and ``count`` test hosts each with
    a salt-minion, linked to the master by veth pairs; ``pillar(host)`` is each
    host's pillar on the master. Yields (master, hosts, {host name: pillar});
    everything is stopped at the end."""
    master_host = make_testhost(docker=False)
    hosts = [make_testhost() for _ in range(count)]
    started: list[SaltMaster | SaltMinion] = []
    try:
        master = SaltMaster(master_host)
        pillars = {h.name: pillar(h) for h in hosts}
        master.set_pillar(pillars)
        started.append(master.start())
        for host in hosts:
            master_address, _ = master_host.link_to(host)
            started.append(SaltMinion(host, master_address).start())
        master.wait_minions([h.name for h in hosts])
        yield master, hosts, pillars
    finally:
        for daemon in reversed(started):
            daemon.stop()
        for host in (*hosts, master_host):
            host.stop()


SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


class Sshd:
    """OpenSSH sshd inside ``host``'s namespace on ``host.address:port``, key auth only."""

    def __init__(self, host: TestHost, port: int = 2222):
        self.host = host
        self.port = port
        self.root = host.workdir / "sshd"
        self.root.mkdir(parents=True, exist_ok=True)
        self.client_key = self.root / "client_key"
        for key in (self.root / "host_key", self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.root / "authorized_keys").write_text(Path(str(self.client_key) + ".pub").read_text())
        settings = {
            "ListenAddress": f"{host.address}:{port}",
            "HostKey": str(self.root / "host_key"),
            "AuthorizedKeysFile": str(self.root / "authorized_keys"),
            "PidFile": str(self.root / "sshd.pid"),
            "PermitRootLogin": "prohibit-password",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "UsePAM": "no",
            "StrictModes": "no",
            # Without it salt-ssh retries "Failure deploying thin" forever.
            "Subsystem": "sftp internal-sftp",
        }
        self.config = self.root / "sshd_config"
        self.config.write_text("".join(f"{k} {v}\n" for k, v in settings.items()))
        self.daemon: Daemon | None = None

    def start(self) -> Sshd:
        # sshd insists on its privilege separation directory (compiled in).
        # It stays after the test (empty, as Debian's own sshd leaves it):
        # removing it would break another test's sshd that is still running.
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        cmd = [*self.host.nsenter(), SSHD, "-D", "-e", "-f", str(self.config)]
        self.daemon = Daemon(cmd, self.root / "sshd.log")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            self.daemon.check_alive()
            probe = self.host.run(["ss", "-Htln", f"sport = :{self.port}"], check=False).stdout
            if probe.strip():
                return self
            time.sleep(0.1)
        raise TestHostError(f"sshd did not listen within 15 s: {self.daemon.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()


def salt_ssh(
    master: SaltMaster,
    client: TestHost,
    roster: Path,
    key: Path,
    *args: str,
    timeout: float = 300,
) -> dict:
    """``salt-ssh ARGS`` from ``client``'s client namespace with ``master``'s config."""
    cmd = [
        *client.nsenter(client=True),
        str(VENV_BIN / "salt-ssh"),
        "-c",
        str(master.config_dir),
        f"--roster-file={roster}",
        f"--priv={key}",
        # Accept the sshd's key: the roster keeps known_hosts in the test host.
        "--ignore-host-keys",
        "--out=json",
        "--static",
        "--log-level=quiet",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        return json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError as exc:
        raise TestHostError(f"salt-ssh printed no JSON ({proc.returncode}):\n{proc.stdout}{proc.stderr}") from exc
