"""Isolated test hosts for mtproxy-formula.

A test host is a network namespace with its own dockerd (own data root, exec
root and socket, no bridge, no iptables), joined by a veth pair to a client
namespace. Addresses come from 198.18.0.0/15 and neither namespace has a
default route: whatever runs inside (MTProxy tries to reach Telegram) has
nowhere to go. Nothing in the machine's root namespace is changed.

Every host records what it started in ``STATE_ROOT/<name>/state.json``, so a
later ``sweep`` can end exactly those processes (by PID) and remove the
namespaces and mounts, even after an interrupted run.

Used by the pytest fixtures and from the shell::

    python3 test/testhost.py up demo      # start a host, load the images
    python3 test/testhost.py run demo -- docker ps
    python3 test/testhost.py down demo
    python3 test/testhost.py sweep        # end every host of ours
    python3 test/testhost.py check-clean  # exit 1 if anything of ours is left
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(os.environ.get("MTPF_VENV_BIN", REPO / ".venv" / "bin"))
STATE_ROOT = Path(os.environ.get("MTPF_STATE_ROOT", "/var/tmp/mtpf"))
IMAGE_DIR = Path(os.environ.get("MTPF_IMAGE_DIR", REPO / "build" / "images"))
PREFIX = "mtpf-"
# Test hosts take 198.18.<index>.0/24; the host side is .1, the client .2.
NETWORK = "198.18"
# Links between test hosts (link_to) take 198.19.<index>.0/24.
LINK_NETWORK = "198.19"
MAX_INDEX = 250


class TestHostError(RuntimeError):
    pass


def _run(args: list[str], check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    proc = subprocess.run(args, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise TestHostError(
            f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout or ''}{proc.stderr or ''}"
        )
    return proc


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM the given PIDs, SIGKILL what is left after ``timeout``."""
    pids = [p for p in pids if _alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a process this session started, SIGKILL it after ``timeout`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _veth(*ends: tuple[str, str, str]) -> None:
    """A veth pair between two namespaces: each end is (namespace, interface, address/24).

    Both ends are created inside the namespaces: the root namespace never sees them.
    """
    (netns_a, if_a, _), (netns_b, if_b, _) = ends
    _run(["ip", "-n", netns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", netns_b])
    for netns, ifname, addr in ends:
        _run(["ip", "-n", netns, "addr", "add", f"{addr}/24", "dev", ifname])
        _run(["ip", "-n", netns, "link", "set", ifname, "up"])


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path)
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point == prefix or mount_point.startswith(prefix + "/"):
                found.append(mount_point)
    return sorted(set(found), key=len, reverse=True)


@dataclass
class TestHost:
    """One isolated host; see the module docstring."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    index: int
    # The process that created the host: sweep() leaves hosts of live owners
    # alone; 0 marks a host kept on purpose (the demo) until `down`.
    owner_pid: int = field(default_factory=os.getpid)
    dockerd_pid: int | None = None
    containerd_pids: list[int] = field(default_factory=list)
    # Salt's file root (the formula to deploy); None: this checkout.
    formula_root: str | None = None

    # -- names and addresses ------------------------------------------------
    @property
    def netns(self) -> str:
        return self.name

    @property
    def client_netns(self) -> str:
        return f"{self.name}-c"

    @property
    def workdir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def docker_sock(self) -> Path:
        return self.workdir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.docker_sock}"

    @property
    def address(self) -> str:
        """The test host's own address, as clients see it."""
        return f"{NETWORK}.{self.index}.1"

    @property
    def client_address(self) -> str:
        return f"{NETWORK}.{self.index}.2"

    @property
    def host_if(self) -> str:
        return "eth-host"

    @property
    def client_if(self) -> str:
        return "eth-client"

    # -- state file -----------------------------------------------------------
    def _save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "state.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, name: str) -> TestHost:
        state = json.loads((STATE_ROOT / name / "state.json").read_text())
        return cls(**state)

    @classmethod
    def create(cls, label: str) -> TestHost:
        """Reserve a name and a free subnet index for a new host."""
        name = label if label.startswith(PREFIX) else PREFIX + label
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        with open(STATE_ROOT / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if name in netns_list() or (STATE_ROOT / name).exists():
                raise TestHostError(f"test host {name} exists already: run `testhost.py down {name}` first")
            used = set()
            for state in STATE_ROOT.glob("*/state.json"):
                try:
                    used.add(json.loads(state.read_text())["index"])
                except (OSError, ValueError, KeyError):
                    continue
            index = next(i for i in range(1, MAX_INDEX + 1) if i not in used)
            host = cls(name=name, index=index)
            host._save()
        return host

    # -- running things inside ------------------------------------------------
    def nsenter(self, client: bool = False) -> list[str]:
        netns = self.client_netns if client else self.netns
        return ["nsenter", f"--net=/run/netns/{netns}"]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["DOCKER_HOST"] = self.docker_host
        env.update(extra or {})
        return env

    def run(self, args: list[str], check: bool = True, timeout: float = 120, env=None, **kwargs):
        """Run a command in the test host, with its dockerd as DOCKER_HOST."""
        return _run(self.nsenter() + list(args), check=check, timeout=timeout, env=self.env(env), **kwargs)

    def client_run(self, args: list[str], check: bool = True, timeout: float = 120, **kwargs):
        """Run a command in the client namespace."""
        return _run(self.nsenter(client=True) + list(args), check=check, timeout=timeout, **kwargs)

    def docker(self, *args: str, check: bool = True, timeout: float = 120):
        return _run(["docker", "-H", self.docker_host, *args], check=check, timeout=timeout)

    def link_to(self, other: TestHost) -> tuple[str, str]:
        """Join this host's namespace to ``other``'s by a veth pair; return (this address, other's).

        The link takes 198.19.<other.index>.0/24: this side .1, ``other`` .2.
        Both ends are created inside the namespaces and go with either of them.
        """
        mine, theirs = f"{LINK_NETWORK}.{other.index}.1", f"{LINK_NETWORK}.{other.index}.2"
        _veth((self.netns, f"link{other.index}", mine), (other.netns, f"link{self.index}", theirs))
        return mine, theirs

    # -- salt-call inside the host ----------------------------------------------
    @property
    def salt_dir(self) -> Path:
        return self.workdir / "salt"

    def minion_config(self, **overrides) -> Path:
        """Write a masterless minion config for this host; return its folder.

        The repository (or :attr:`formula_root`) is the file root (so ``salt://mtproxy`` is the formula),
        pillar comes from ``salt/pillar`` below the host's workdir, and the
        Docker modules talk to this host's dockerd.
        """
        config_dir = self.salt_dir / "etc"
        pillar_dir = self.salt_dir / "pillar"
        for folder in (config_dir, pillar_dir):
            folder.mkdir(parents=True, exist_ok=True)
        config = {
            "id": self.name,
            "file_client": "local",
            # Salt prepends root_dir to these and to its own defaults (such as
            # the extension modules' cache): given relative to it, everything
            # stays below the workdir and unix socket paths stay short.
            "root_dir": str(self.salt_dir),
            "pki_dir": "/pki",
            "cachedir": "/cache",
            "sock_dir": "/sock",
            "pidfile": "/minion.pid",
            "log_file": "/minion.log",
            "log_level_logfile": "debug",
            "file_roots": {"base": [self.formula_root or str(REPO)]},
            "pillar_roots": {"base": [str(pillar_dir)]},
            "docker.url": self.docker_host,
        }
        config.update(overrides)
        (config_dir / "minion").write_text(json.dumps(config, indent=2))
        return config_dir

    def write_pillar(self, data: dict) -> None:
        """Make ``data`` the host's pillar (a top file assigns it to every minion)."""
        pillar_dir = self.salt_dir / "pillar"
        pillar_dir.mkdir(parents=True, exist_ok=True)
        (pillar_dir / "top.sls").write_text("base:\n  '*':\n    - test_pillar\n")
        (pillar_dir / "test_pillar.sls").write_text(json.dumps(data, indent=2))

    def salt_call(
        self,
        *args: str,
        pillar: dict | None = None,
        check: bool = True,
        timeout: float = 600,
        config_dir: Path | None = None,
    ) -> dict:
        """``salt-call --local ARGS`` inside the host; returns the parsed ``local`` result.

        With ``check``, a non-zero exit raises (``--retcode-passthrough``).
        """
        config_dir = config_dir or self.minion_config()
        cmd = [
            str(VENV_BIN / "salt-call"),
            "--local",
            "--config-dir",
            str(config_dir),
            "--out=json",
            "--retcode-passthrough",
            "--log-level=quiet",
            *args,
        ]
        if pillar is not None:
            cmd.append("pillar=" + json.dumps(pillar))
        proc = self.run(cmd, check=False, timeout=timeout)
        if not proc.stdout.strip():
            # --out=json always prints a result: salt-call itself failed.
            raise TestHostError(
                f"salt-call {' '.join(args)} printed nothing (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        try:
            result = json.loads(proc.stdout)["local"]
        except ValueError as exc:
            raise TestHostError(f"salt-call printed no JSON ({proc.returncode}):\n{proc.stdout}{proc.stderr}") from exc
        if check and proc.returncode != 0:
            raise TestHostError(
                f"salt-call {' '.join(args)} exited {proc.returncode}:\n"
                f"{json.dumps(result, indent=1)[:20000]}\n{proc.stderr[-4000:]}"
            )
        return result

    # -- life cycle -----------------------------------------------------------
    def start(self, docker: bool = True, load_images: bool = True) -> TestHost:
        """Create the namespaces; with ``docker``, start dockerd and load the images."""
        try:
            self._make_network()
            if docker:
                self._start_dockerd()
                if load_images:
                    self.load_images()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_network(self) -> None:
        for netns in (self.netns, self.client_netns):
            _run(["ip", "netns", "add", netns])
            _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        _veth((self.netns, self.host_if, self.address), (self.client_netns, self.client_if, self.client_address))

    def _start_dockerd(self) -> None:
        for sub in ("data", "exec"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        config = self.workdir / "daemon.json"
        # An empty config: the machine's /etc/docker/daemon.json is not read.
        config.write_text("{}\n")
        log = open(self.workdir / "dockerd.log", "ab")  # noqa: SIM115 (dockerd keeps it)
        cmd = [
            *self.nsenter(),
            "dockerd",
            "--data-root",
            str(self.workdir / "data"),
            "--exec-root",
            str(self.workdir / "exec"),
            "--host",
            self.docker_host,
            "--pidfile",
            str(self.workdir / "dockerd.pid"),
            "--config-file",
            str(config),
            "--cgroup-parent",
            self.name,
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
        ]
        # nsenter execs dockerd (no fork for a net namespace): same PID.
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        self.dockerd_pid = proc.pid
        self._save()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TestHostError(
                    f"dockerd of {self.name} exited {proc.returncode}: "
                    f"{(self.workdir / 'dockerd.log').read_text()[-2000:]}"
                )
            if self.docker_sock.exists() and self.docker("version", check=False, timeout=10).returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise TestHostError(f"dockerd of {self.name} did not answer within 60 s")
        self.containerd_pids = [int(p) for p in _run(["pgrep", "-P", str(proc.pid)], check=False).stdout.split()]
        self._save()

    def load_images(self, image_dir: Path = IMAGE_DIR) -> list[str]:
        """Import every built image (build/images/*.json) into this host's dockerd."""
        manifests = sorted(image_dir.glob("*.json"))
        if not manifests:
            raise TestHostError(f"no images in {image_dir}: run `make images` first")
        loaded = []
        procs = []
        for manifest_path in manifests:
            manifest = json.loads(manifest_path.read_text())
            image = manifest["image"]
            if self.docker("image", "inspect", image, check=False).returncode == 0:
                continue
            cmd = ["docker", "-H", self.docker_host, "import"]
            for change in manifest["changes"]:
                cmd += ["--change", change]
            cmd += [str(image_dir / manifest["tarball"]), image]
            procs.append((image, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        for image, proc in procs:
            out, _ = proc.communicate(timeout=300)
            if proc.returncode != 0:
                raise TestHostError(f"docker import of {image} failed: {out}")
            loaded.append(image)
        return loaded

    def restart_dockerd(self) -> None:
        """Stop this host's dockerd (by PID, as a service manager would) and start
        it again with the same arguments and data root: containers and images stay."""
        _terminate([self.dockerd_pid], timeout=30)
        _terminate(list(self.containerd_pids), timeout=10)
        # dockerd leaves <exec-root>/netns/default mounted when it exits.
        for mount_point in mounts_under(self.workdir / "exec"):
            if _run(["umount", mount_point], check=False).returncode != 0:
                _run(["umount", "-l", mount_point], check=False)
        self._start_dockerd()

    def stop(self) -> None:
        """Tear everything down; safe to call on a half-started host, twice."""
        if _alive(self.dockerd_pid):
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
            _terminate([self.dockerd_pid], timeout=20)
        # What is left in our namespaces is ours: containerd, shims, strays.
        leftovers = list(self.containerd_pids)
        for netns in (self.netns, self.client_netns):
            if netns in netns_list():
                leftovers += netns_pids(netns)
        _terminate(leftovers, timeout=10)
        # dockerd leaves <exec-root>/netns/default and overlay mounts behind.
        for mount_point in mounts_under(self.workdir):
            if _run(["umount", mount_point], check=False).returncode != 0:
                _run(["umount", "-l", mount_point], check=False)
        for netns in (self.netns, self.client_netns):
            if netns in netns_list():
                _run(["ip", "netns", "del", netns], check=False)
        self._remove_cgroups()
        if self.workdir.is_dir() and self.workdir.parent == STATE_ROOT:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _remove_cgroups(self) -> None:
        # --cgroup-parent makes <controller>/<name>; rmdir works once empty.
        for group in sorted(Path("/sys/fs/cgroup").glob(f"*/{self.name}"), key=lambda p: -len(p.parts)):
            for sub in sorted(group.rglob("*"), key=lambda p: -len(p.parts)):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                group.rmdir()


@dataclass
class Segment:
    """One Ethernet segment shared by several test hosts and a client, as hosts
    on one LAN: a bridge in ``switch``'s namespace (a test host without
    dockerd), a veth from each member host (``ifname`` on its side), and one
    from ``switch``'s client namespace, the client. Addresses come from
    198.19.<switch.index>.0/24 (the switch's own index: no link_to takes it):
    members .1, .2, ... in the order they join, the client .100. Nothing has
    a route out; it all goes with the namespaces.
    """

    switch: TestHost
    ifname: str = "seg0"
    members: list[TestHost] = field(default_factory=list)

    BRIDGE = "br0"

    def __post_init__(self) -> None:
        _run(["ip", "-n", self.switch.netns, "link", "add", self.BRIDGE, "type", "bridge"])
        _run(["ip", "-n", self.switch.netns, "link", "set", self.BRIDGE, "up"])
        self._plug(self.switch.client_netns, self.ifname, self.client_address, "pc")

    def address(self, number: int) -> str:
        """Address ``number`` (1..254) of the segment."""
        return f"{LINK_NETWORK}.{self.switch.index}.{number}"

    @property
    def client_address(self) -> str:
        return self.address(100)

    def port(self, member: TestHost) -> str:
        """The bridge port (in the switch's namespace) of ``member``'s link."""
        return f"p{member.index}"

    def _plug(self, netns: str, ifname: str, address: str, port: str) -> None:
        switch = self.switch.netns
        _run(["ip", "-n", netns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", switch])
        _run(["ip", "-n", switch, "link", "set", port, "master", self.BRIDGE])
        _run(["ip", "-n", switch, "link", "set", port, "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", ifname])
        _run(["ip", "-n", netns, "link", "set", ifname, "up"])

    def join(self, member: TestHost) -> str:
        """Plug ``member`` in; return its address on the segment."""
        self.members.append(member)
        address = self.address(len(self.members))
        self._plug(member.netns, self.ifname, address, self.port(member))
        return address

    def set_link(self, member: TestHost, up: bool) -> None:
        """Pull ``member``'s cable (its port goes down: it loses carrier) or plug it back."""
        _run(["ip", "-n", self.switch.netns, "link", "set", self.port(member), "up" if up else "down"])


def sweep(force: bool = False) -> list[str]:
    """End the test hosts that an interrupted run left behind.

    A host whose creating process still runs belongs to a live session (a
    parallel test run, a demo) and is left alone, unless ``force``.
    """
    ended = []
    live = set()
    if STATE_ROOT.is_dir():
        for state in sorted(STATE_ROOT.glob("*/state.json")):
            try:
                host = TestHost.load(state.parent.name)
            except (OSError, ValueError, TypeError):
                continue
            kept = host.owner_pid == 0 or (host.owner_pid != os.getpid() and _alive(host.owner_pid))
            if kept and not force:
                live.update({host.netns, host.client_netns})
                continue
            host.stop()
            ended.append(host.name)
    # A namespace of ours whose state file is gone: delete it after ending
    # what runs inside (it can only be ours).
    for netns in netns_list():
        if netns.startswith(PREFIX) and netns not in live:
            _terminate(netns_pids(netns), timeout=10)
            _run(["ip", "netns", "del", netns], check=False)
            ended.append(netns)
    return ended


def leftovers(owner: int | None = None) -> list[str]:
    """What of ours still exists: namespaces, dockerds, mounts, state dirs.

    With ``owner``, only what the hosts created by that process left.
    """
    names = None
    if owner is not None:
        names = set()
        for state in STATE_ROOT.glob("*/state.json"):
            try:
                host = TestHost.load(state.parent.name)
            except (OSError, ValueError, TypeError):
                continue
            if host.owner_pid == owner:
                names.update({host.name, host.client_netns})

    def ours(text: str) -> bool:
        return names is None or any(name in text for name in names)

    found = [f"network namespace {n}" for n in netns_list() if n.startswith(PREFIX) and ours(n)]
    out = _run(["pgrep", "-a", "dockerd"], check=False).stdout
    found += [f"dockerd: {line}" for line in out.splitlines() if str(STATE_ROOT) in line and ours(line)]
    found += [f"mount {m}" for m in mounts_under(STATE_ROOT) if ours(m)]
    if STATE_ROOT.is_dir():
        found += [f"state dir {d}" for d in STATE_ROOT.iterdir() if d.is_dir() and ours(str(d))]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a test host and load the images")
    up.add_argument("name")
    up.add_argument("--keep", action="store_true", help="keep it until `down` (sweep leaves it alone)")
    down = sub.add_parser("down", help="tear a test host down")
    down.add_argument("name")
    run = sub.add_parser("run", help="run a command inside a test host")
    run.add_argument("name")
    run.add_argument("--client", action="store_true", help="in the client namespace instead")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    sweep_parser = sub.add_parser("sweep", help="tear down test hosts whose creator is gone")
    sweep_parser.add_argument("--force", action="store_true", help="also hosts of live processes")
    sub.add_parser("check-clean", help="exit 1 if anything of ours is left")
    args = parser.parse_args(argv)

    name = getattr(args, "name", "")
    if name and not name.startswith(PREFIX):
        name = PREFIX + name
    if args.command == "up":
        host = TestHost.create(name)
        if args.keep:
            host.owner_pid = 0
            host._save()
        host.start()
        print(
            json.dumps(
                {
                    "name": host.name,
                    "address": host.address,
                    "client_address": host.client_address,
                    "docker_host": host.docker_host,
                }
            )
        )
    elif args.command == "down":
        if (STATE_ROOT / name / "state.json").exists():
            TestHost.load(name).stop()
    elif args.command == "run":
        host = TestHost.load(name)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        prefix = host.nsenter(client=args.client)
        return subprocess.call(prefix + cmd, env=host.env())
    elif args.command == "sweep":
        for ended in sweep(force=args.force):
            print(f"ended {ended}")
    elif args.command == "check-clean":
        left = leftovers()
        for item in left:
            print(f"left behind: {item}", file=sys.stderr)
        return 1 if left else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
