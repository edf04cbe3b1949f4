"""Functional tests of _modules/haproxy_runtime.py against a real HAProxy with real backends.

The cell: in one test host, two tiny backends (asyncio echo servers that
greet with their name, on the mtprotoproxy image's Python) and the HAProxy
3.0 image in master-worker mode, all `--network host`; the admin socket and
master CLI are reached from here through the bind-mounted run directory.
Clients run in the client namespace (test/loadgen.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from modules import execution_module
from salt.exceptions import CommandExecutionError
from testhost import REPO

pytestmark = pytest.mark.integration

LOADGEN = REPO / "test" / "loadgen.py"
HAPROXY_IMAGE = "mtproxy-formula/haproxy:local"
BACKEND_IMAGE = "mtproxy-formula/mtprotoproxy:local"
FRONTEND_PORT = 8443
FRONTEND_PORT_26 = 8444
BACKENDS = {"s1": 4431, "s2": 4432}
HAPROXY_26 = "/usr/sbin/haproxy"

hr = execution_module("haproxy_runtime")

# Greets with its name, then echoes: the client sees which server it reached.
BACKEND = """\
import asyncio, sys

NAME = sys.argv[1].encode()


async def handle(reader, writer):
    writer.write(NAME + b"\\n")
    try:
        while True:
            data = await reader.read(4096)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[2]), backlog=1024)
    async with server:
        await server.serve_forever()


asyncio.run(main())
"""


def haproxy_config(address: str, run_dir: str, port: int, extra: str = "") -> str:
    servers = "\n".join(
        f"    server {name} {address}:{backend_port} check inter 500ms fall 2 rise 2"
        for name, backend_port in BACKENDS.items()
    )
    return f"""\
global
    stats socket {run_dir}/admin.sock mode 600 level admin
    server-state-file {run_dir}/server-state
    maxconn 2000

defaults
    mode tcp
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    load-server-state-from-file global

frontend fe
    bind {address}:{port}
    default_backend be

backend be
    balance leastconn
{servers}
{extra}"""


@dataclass
class Cell:
    host: object
    etc: Path
    run: Path
    port: int

    @property
    def admin(self) -> str:
        return str(self.run / "admin.sock")

    @property
    def master(self) -> str:
        return str(self.run / "master.sock")

    @property
    def state_file(self) -> str:
        return str(self.run / "server-state")

    @property
    def target(self) -> str:
        return f"{self.host.address}:{self.port}"

    def write_config(self, extra: str = "", run_dir: str = "/run/haproxy") -> None:
        (self.etc / "haproxy.cfg").write_text(haproxy_config(self.host.address, run_dir, self.port, extra))


def wait_until(predicate, timeout: float = 30, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (CommandExecutionError, OSError, AssertionError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{what} not reached in {timeout} s (last: {last!r})")


def loadgen(cell: Cell, *args: str, timeout: float = 60) -> dict:
    """Run the load generator to completion in the client namespace; return its report."""
    proc = cell.host.client_run([sys.executable, str(LOADGEN), cell.target, *args], timeout=timeout)
    return json.loads(proc.stdout)


class Background:
    """The load generator running in the client namespace until stopped (by PID)."""

    def __init__(self, cell: Cell, *args: str):
        # nsenter execs the program for a network namespace: the PID is loadgen's.
        self.proc = subprocess.Popen(
            [*cell.host.nsenter(client=True), sys.executable, str(LOADGEN), cell.target, "--duration", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> dict:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        """End it without a report (a test failed): show what it said."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate(timeout=10)
            print(f"loadgen killed; its stderr: {err}")


@contextlib.contextmanager
def background(cell: Cell, *args: str):
    gen = Background(cell, *args)
    try:
        yield gen
    finally:
        gen.kill()


def total_sessions(cell: Cell) -> int:
    return sum(s["scur"] for s in hr.servers("be", all_workers=True, master_socket=cell.master).values())


def sessions_are(cell: Cell, wanted: int):
    """A predicate for wait_until that shows the count it last saw."""

    def check():
        now = total_sessions(cell)
        assert now == wanted, f"{now} sessions"
        return True

    return check


@pytest.fixture(scope="module")
def cell(testhost) -> Cell:
    base = testhost.workdir / "haproxy_runtime"
    etc, run = base / "etc", base / "run"
    for folder in (etc, run):
        folder.mkdir(parents=True, exist_ok=True)
    (base / "backend.py").write_text(BACKEND)
    for name, port in BACKENDS.items():
        testhost.docker(
            "run", "-d", "--name", f"backend-{name}", "--network", "host", "--init",
            "-v", f"{base / 'backend.py'}:/srv/backend.py:ro", "--entrypoint", "python3",
            BACKEND_IMAGE, "/srv/backend.py", name, str(port),
        )  # fmt: skip
    c = Cell(host=testhost, etc=etc, run=run, port=FRONTEND_PORT)
    c.write_config()
    testhost.docker(
        "run", "-d", "--name", "haproxy", "--network", "host", "--init",
        "-v", f"{etc}:/etc/haproxy", "-v", f"{run}:/run/haproxy", HAPROXY_IMAGE,
    )  # fmt: skip
    wait_until(lambda: hr.info(admin_socket=c.admin), what="HAProxy admin socket")
    for name in BACKENDS:
        hr.wait_for("be", name, "UP", timeout=30, admin_socket=c.admin)
    yield c
    testhost.docker("rm", "-f", "haproxy", *(f"backend-{name}" for name in BACKENDS), check=False)


@pytest.fixture(autouse=True)
def clean_cell(request):
    """Every test starts from the good config, both servers ready and no saved state."""
    yield
    if "cell" not in request.fixturenames:
        return
    c = request.getfixturevalue("cell")
    c.write_config()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(c.state_file)
    for name in BACKENDS:
        hr.set_state("be", name, "ready", admin_socket=c.admin)
    for name in BACKENDS:
        hr.wait_for("be", name, "UP", timeout=30, admin_socket=c.admin)


# -- reading ------------------------------------------------------------------------


def test_info_and_servers_through_admin_socket_and_master_cli(cell):
    info = hr.info(admin_socket=cell.admin)
    assert info["version"].startswith("3.0")
    assert info["pid"] > 0 and info["uptime_sec"] >= 0 and info["current_connections"] == 0

    via_admin = hr.servers(admin_socket=cell.admin)
    assert set(via_admin) == {"be/s1", "be/s2"}
    for entry in via_admin.values():
        assert entry["status"] == "UP"
        assert entry["check_status"] == "L4OK"
        assert entry["scur"] == 0
    # Only the master socket: commands go to the current worker as `@1 ...`.
    via_master = hr.servers(master_socket=cell.master)
    assert {k: v["status"] for k, v in via_master.items()} == {"be/s1": "UP", "be/s2": "UP"}
    assert hr.info(master_socket=cell.master)["pid"] == info["pid"]
    procs = hr.show_proc(cell.master)
    assert [w["pid"] for w in procs["workers"] if w["current"]] == [info["pid"]]


def test_errors_name_the_socket_and_the_command(cell, tmp_path):
    missing = str(tmp_path / "nothing.sock")
    with pytest.raises(CommandExecutionError, match=rf"{missing}.*'show info'"):
        hr.info(admin_socket=missing)
    with pytest.raises(CommandExecutionError, match=rf"{cell.admin}.*set server be/nope state drain.*No such server"):
        hr.set_state("be", "nope", "drain", admin_socket=cell.admin)
    with pytest.raises(CommandExecutionError, match="ready, drain, maint"):
        hr.set_state("be", "s1", "off", admin_socket=cell.admin)
    # A worker command sent to the master itself is refused by HAProxy.
    with pytest.raises(CommandExecutionError, match=rf"{cell.master}.*show nothing"):
        hr._check(hr._send(cell.master, "show nothing"), cell.master, "show nothing")


def test_salt_call_servers_and_config_defaults(testhost, cell):
    # The socket path comes from the minion config key, as on a real minion.
    config_dir = testhost.minion_config(
        module_dirs=[str(REPO / "_modules")],
        **{"haproxy_runtime.admin_socket": cell.admin, "haproxy_runtime.master_socket": cell.master},
    )
    result = testhost.salt_call("haproxy_runtime.servers", "backend=be", config_dir=config_dir)
    assert {k: v["status"] for k, v in result.items()} == {"be/s1": "UP", "be/s2": "UP"}
    info = testhost.salt_call("haproxy_runtime.info", config_dir=config_dir)
    assert info["version"].startswith("3.0")
    drained = testhost.salt_call("haproxy_runtime.set_state", "be", "s2", "drain", config_dir=config_dir)
    assert drained == {"server": "be/s2", "state": "drain", "status": "DRAIN"}


# -- server states, drain ---------------------------------------------------------------


def test_set_state_and_wait_for(testhost, cell):
    assert hr.set_state("be", "s1", "maint", admin_socket=cell.admin)["status"] == "MAINT"
    assert hr.wait_for("be", "s1", "MAINT", timeout=5, admin_socket=cell.admin)["status"] == "MAINT"
    hr.set_state("be", "s1", "ready", admin_socket=cell.admin)
    assert hr.wait_for("be", "s1", "UP", timeout=30, admin_socket=cell.admin)["check_status"] == "L4OK"

    testhost.docker("stop", "backend-s2")
    try:
        down = hr.wait_for("be", "s2", "DOWN", timeout=30, master_socket=cell.master)
        assert down["check_status"] == "L4CON"
        with pytest.raises(CommandExecutionError, match="be/s2 is not UP after 1 s: DOWN"):
            hr.wait_for("be", "s2", "UP", timeout=1, admin_socket=cell.admin)
    finally:
        testhost.docker("start", "backend-s2")
    hr.wait_for("be", "s2", "UP", timeout=30, admin_socket=cell.admin)


def test_drain_takes_new_connections_away_at_once_and_returns_when_sessions_end(cell):
    with background(cell, "--rate", "0", "--long", "6", "--banner") as held:
        wait_until(sessions_are(cell, 6), what="6 long-lived sessions")
        on_s1 = hr.servers("be", admin_socket=cell.admin)["be/s1"]["scur"]
        assert on_s1 > 0

        result = {}
        thread = threading.Thread(
            target=lambda: result.update(hr.drain("be", "s1", timeout=120, master_socket=cell.master)), daemon=True
        )
        thread.start()
        wait_until(lambda: hr.servers("be", admin_socket=cell.admin)["be/s1"]["status"] == "DRAIN", what="DRAIN")
        # From now on no new connection reaches s1, while its sessions go on.
        burst = loadgen(cell, "--rate", "100", "--count", "30", "--banner")
        assert burst["new"]["failed"] == 0
        assert burst["new"]["banners"] == {"s2": 30}
        assert thread.is_alive(), "drain returned while s1 still had sessions"
        report = held.stop()  # the long-lived connections end
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert report["long"]["survived"] == 6
    assert result["drained"] is True
    assert result["sessions_left"] == 0
    assert result["all_workers"] is True
    assert result["waited"] < 120


def test_drain_timeout_reports_sessions_left_then_shutdown_ends_them_in_old_workers(cell):
    with background(cell, "--rate", "0", "--long", "6", "--banner") as held:
        wait_until(sessions_are(cell, 6), what="6 long-lived sessions")
        on_s1 = hr.servers("be", admin_socket=cell.admin)["be/s1"]["scur"]
        # After a reload the sessions belong to the old worker: only the master CLI sees them.
        reloaded = hr.reload(cell.master)
        assert hr.servers("be", admin_socket=cell.admin)["be/s1"]["scur"] == 0

        left = hr.drain("be", "s1", timeout=1, shutdown=False, master_socket=cell.master)
        assert left["drained"] is False
        assert left["sessions_left"] == on_s1
        assert left["sessions_shut_down"] == 0
        everywhere = hr.servers("be", all_workers=True, master_socket=cell.master)["be/s1"]
        assert everywhere["scur_by_pid"][reloaded["old_pids"][0]] == on_s1

        cut = hr.drain("be", "s1", timeout=0.5, shutdown=True, master_socket=cell.master)
        assert cut["sessions_shut_down"] == on_s1
        assert cut["drained"] is True
        report = held.stop()
    assert report["long"]["failed"] == on_s1
    assert report["long"]["survived"] == 6 - on_s1
    assert report["long"]["banners"]["s1"] == on_s1


def test_drain_state_survives_a_reload_with_the_state_file(cell):
    hr.set_state("be", "s1", "drain", admin_socket=cell.admin)
    result = hr.reload(cell.master, admin_socket=cell.admin, state_file=cell.state_file)
    assert result["reloaded"] is True
    assert hr.info(admin_socket=cell.admin)["pid"] == result["new_pid"]
    assert hr.servers("be", admin_socket=cell.admin)["be/s1"]["status"] == "DRAIN"
    burst = loadgen(cell, "--rate", "100", "--count", "20", "--banner")
    assert burst["new"]["banners"] == {"s2": 20}
    # Read by now: gone, so that no later restart brings back a stale state.
    assert not os.path.exists(cell.state_file)

    # Without a saved state, the reload forgets the drain: what state_file is for.
    hr.reload(cell.master)
    assert hr.servers("be", admin_socket=cell.admin)["be/s1"]["status"] != "DRAIN"

    # keep_state_file leaves it for HAProxy's next start.
    hr.set_state("be", "s2", "maint", admin_socket=cell.admin)
    hr.reload(cell.master, state_file=cell.state_file, keep_state_file=True)
    assert " s2 " in Path(cell.state_file).read_text()
    assert hr.servers("be", admin_socket=cell.admin)["be/s2"]["status"] == "MAINT"


# -- reload -------------------------------------------------------------------------------


def test_reload_under_load_loses_nothing(cell):
    reloads = 10
    with background(cell, "--rate", "50", "--long", "20", "--interval", "0.1", "--banner") as load:
        wait_until(lambda: total_sessions(cell) >= 20, what="20 long-lived sessions")
        first_pid = hr.info(admin_socket=cell.admin)["pid"]
        seen = {first_pid}
        for _ in range(reloads):
            result = hr.reload(cell.master, state_file=cell.state_file)
            assert result["reloaded"] is True
            assert result["new_pid"] not in result["old_pids"]
            assert "Loading success" in result["messages"]
            seen.add(result["new_pid"])
            time.sleep(1)  # let traffic flow through each new worker
        # The long-lived sessions stay with the first worker; the newest one only has new connections.
        sessions = hr.servers("be", all_workers=True, master_socket=cell.master)
        assert sum(s["scur_by_pid"].get(first_pid, 0) for s in sessions.values()) == 20
        report = load.stop()
    print(f"\nreload under load: {json.dumps(report)}")
    assert len(seen) == reloads + 1
    assert report["new"]["attempted"] > 0
    assert report["new"]["failed"] == 0, report["new"]["errors"]
    assert report["long"]["opened"] == 20
    assert report["long"]["failed"] == 0, report["long"]["errors"]
    assert report["long"]["survived"] == 20


def test_reload_with_a_broken_config_fails_with_haproxys_message_and_old_worker_serves(cell):
    before = hr.info(admin_socket=cell.admin)["pid"]
    cell.write_config(extra="    bogus_directive 1\n")
    with pytest.raises(CommandExecutionError, match=r"(?s)reload' failed.*unknown keyword 'bogus_directive'"):
        hr.reload(cell.master, state_file=cell.state_file)
    procs = hr.show_proc(cell.master)
    assert [w["pid"] for w in procs["workers"] if w["current"]] == [before]
    served = loadgen(cell, "--rate", "50", "--count", "20", "--banner")
    assert served["new"]["ok"] == 20
    # Fixed again, the next reload works.
    cell.write_config()
    assert hr.reload(cell.master)["new_pid"] != before


def master_pid(testhost) -> int:
    """Host PID of the HAProxy master: the child of the container's init."""
    init = testhost.docker("inspect", "--format", "{{.State.Pid}}", "haproxy").stdout.strip()
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    (pid,) = [int(c) for c in children if "haproxy" in Path(f"/proc/{c}/cmdline").read_text()]
    return pid


def test_reload_records_what_haproxy_confirmed_it_loaded_and_a_restart_invalidates_it(testhost, cell):
    config, record = cell.etc / "haproxy.cfg", cell.run / "loaded.json"
    with contextlib.suppress(FileNotFoundError):
        record.unlink()
    assert hr.loaded(str(config), cell.master, str(record))["reason"].startswith("no record")
    master = master_pid(testhost)

    done = hr.reload(cell.master, config_file=str(config), record=str(record))
    assert done["record"] == str(record)
    written = json.loads(record.read_text())
    assert oct(record.stat().st_mode)[-3:] == "600"
    assert written["sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()
    assert written["worker"] == done["new_pid"] == hr.info(admin_socket=cell.admin)["pid"]
    # The master is known by its host PID (inside the container it may be PID 1 each time).
    assert written["master"]["pid"] == master
    assert hr.loaded(str(config), cell.master, str(record))["loaded"] is True
    # A reload keeps the master: the next record names the same one.
    hr.reload(cell.master, config_file=str(config), record=str(record))
    assert json.loads(record.read_text())["master"] == written["master"]

    # A reload that fails leaves the record alone: the file differs from it until one succeeds.
    recorded = record.read_text()
    cell.write_config(extra="    bogus_directive 1\n")
    with pytest.raises(CommandExecutionError, match="unknown keyword 'bogus_directive'"):
        hr.reload(cell.master, config_file=str(config), record=str(record))
    assert record.read_text() == recorded
    assert "config changed" in hr.loaded(str(config), cell.master, str(record))["reason"]
    # Back to the file it loaded: nothing to do.
    cell.write_config()
    assert hr.loaded(str(config), cell.master, str(record))["loaded"] is True

    # A restarted HAProxy loaded the file again, but nothing confirmed it: not "loaded".
    testhost.docker("restart", "haproxy")
    wait_until(lambda: hr.info(admin_socket=cell.admin), what="HAProxy admin socket after the restart")
    for name in BACKENDS:
        hr.wait_for("be", name, "UP", timeout=30, admin_socket=cell.admin)
    now = hr.loaded(str(config), cell.master, str(record))
    assert now["reason"] == "HAProxy was restarted since its last confirmed reload: what it loaded is unknown"
    assert now["master"]["pid"] == master_pid(testhost) != master
    hr.reload(cell.master, config_file=str(config), record=str(record))
    assert hr.loaded(str(config), cell.master, str(record))["loaded"] is True
    record.unlink()


# -- validate ------------------------------------------------------------------------------


def test_validate_through_the_image(testhost, cell):
    good = haproxy_config(testhost.address, "/run/haproxy", FRONTEND_PORT)
    ok = hr.validate(contents=good, image=HAPROXY_IMAGE, docker_host=testhost.docker_host)
    assert ok["valid"] is True
    bad = hr.validate(contents=good + "    bogus_directive 1\n", image=HAPROXY_IMAGE, docker_host=testhost.docker_host)
    assert bad["valid"] is False
    assert "unknown keyword 'bogus_directive' in 'backend' section" in bad["messages"]
    # The live config, by path.
    assert hr.validate(str(cell.etc / "haproxy.cfg"), image=HAPROXY_IMAGE, docker_host=testhost.docker_host)["valid"]
    with pytest.raises(CommandExecutionError, match="exited 125"):
        hr.validate(contents=good, image="mtproxy-formula/none:local", docker_host=testhost.docker_host)


def test_validate_as_check_cmd(testhost, tmp_path):
    cmd = hr.check_cmd(image=HAPROXY_IMAGE, docker_host=testhost.docker_host)
    good = haproxy_config(testhost.address, "/run/haproxy", FRONTEND_PORT)
    good_file, bad_file = tmp_path / "good.cfg", tmp_path / "bad.cfg"
    good_file.write_text(good)
    bad_file.write_text(good + "    bogus_directive 1\n")
    # As file.managed runs it: "<check_cmd> <tmpfile>" in a shell; also with a Python that has no Salt.
    plain = f"/usr/bin/python3 {hr.__file__} --image {HAPROXY_IMAGE} --docker-host {testhost.docker_host}"
    env = {"PATH": os.environ["PATH"]}
    for command in (cmd, plain):
        ok = subprocess.run(f"{command} {good_file}", shell=True, capture_output=True, text=True, env=env, timeout=120)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run(f"{command} {bad_file}", shell=True, capture_output=True, text=True, env=env, timeout=120)
        assert bad.returncode == 1, bad.stderr
        assert "unknown keyword 'bogus_directive'" in bad.stderr

    # And through Salt's own file.managed: the broken config never replaces the live one.
    target = testhost.workdir / "check_cmd" / "haproxy.cfg"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(good)
    config_dir = testhost.minion_config()
    common = ("state.single", "file.managed", f"name={target}", "contents_pillar=cfg", f"check_cmd={cmd}")
    refused = testhost.salt_call(*common, pillar={"cfg": good + "    bogus_directive 1\n"}, check=False)
    (state,) = refused.values()
    assert state["result"] is False
    assert "unknown keyword 'bogus_directive'" in state["comment"]
    assert target.read_text() == good
    changed = testhost.salt_call(*common, pillar={"cfg": good + "# changed\n"}, config_dir=config_dir)
    (state,) = changed.values()
    assert state["result"] is True
    assert target.read_text().endswith("# changed\n")


# -- HAProxy 2.6: no reload status, confirmed through show proc --------------------------------


@pytest.fixture
def cell26(testhost, cell):
    """Debian 12's HAProxy 2.6 binary, run in the test host's namespace, same backends."""
    if not os.access(HAPROXY_26, os.X_OK):
        pytest.skip(f"no {HAPROXY_26}")
    base = testhost.workdir / "haproxy26"
    base.mkdir(parents=True, exist_ok=True)
    c = Cell(host=testhost, etc=base, run=base, port=FRONTEND_PORT_26)
    c.write_config(run_dir=str(base))
    log = open(base / "haproxy.log", "wb")  # noqa: SIM115 (HAProxy writes it)
    proc = subprocess.Popen(
        [*testhost.nsenter(), HAPROXY_26, "-W", "-S", c.master, "-f", str(base / "haproxy.cfg")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: hr.info(admin_socket=c.admin), what="HAProxy 2.6 admin socket")
        for name in BACKENDS:
            hr.wait_for("be", name, "UP", timeout=30, admin_socket=c.admin)
        yield c
    finally:
        # The master (nsenter exec'd it: same PID) ends its workers.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()


def test_haproxy_26_reload_is_confirmed_through_show_proc(cell26):
    assert hr.info(admin_socket=cell26.admin)["version"].startswith("2.6")
    with background(cell26, "--rate", "20", "--long", "5", "--banner") as load:
        wait_until(lambda: total_sessions(cell26) >= 5, what="5 long-lived sessions")
        pids = set()
        for _ in range(3):
            result = hr.reload(cell26.master, state_file=cell26.state_file)
            assert result["reloaded"] is True
            assert result["new_pid"] not in result["old_pids"]
            assert result["messages"] == ""  # 2.6 says nothing
            pids.add(result["new_pid"])
            assert hr.info(admin_socket=cell26.admin)["pid"] == result["new_pid"]
        report = load.stop()
    assert len(pids) == 3
    assert report["new"]["failed"] == 0, report["new"]["errors"]
    assert report["long"]["survived"] == 5

    # The state file works the same way with 2.6.
    hr.set_state("be", "s1", "drain", admin_socket=cell26.admin)
    hr.reload(cell26.master, state_file=cell26.state_file)
    assert hr.servers("be", admin_socket=cell26.admin)["be/s1"]["status"] == "DRAIN"
    hr.set_state("be", "s1", "ready", admin_socket=cell26.admin)

    # A failed reload is told by the master's failed-reload counter.
    before = hr.info(admin_socket=cell26.admin)["pid"]
    cell26.write_config(run_dir=str(cell26.run), extra="    bogus_directive 1\n")
    with pytest.raises(CommandExecutionError, match="reload' failed, the old worker keeps serving"):
        hr.reload(cell26.master)
    assert hr.info(admin_socket=cell26.admin)["pid"] == before
    assert loadgen(cell26, "--rate", "50", "--count", "10", "--banner")["new"]["ok"] == 10
    # And the counter restarts after a good one.
    cell26.write_config(run_dir=str(cell26.run))
    assert hr.reload(cell26.master)["new_pid"] != before
