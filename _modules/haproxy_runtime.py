"""
Runtime control of HAProxy through its admin (stats) socket and master CLI.

A small, dependency-free client (standard library only) for the unix sockets
that the HAProxy container exposes in its run directory, bind-mounted on the
host. It replaces ``saltext-haproxy`` (which needs the unmaintained
``haproxyctl``) for what the formula needs: validating a configuration,
reloading gracefully and confirming it, reading and changing server states,
and draining servers.

HAProxy configuration this module relies on::

    global
        # admin socket: `show stat`, `set server`, `show servers state`...
        stats socket /run/haproxy/admin.sock mode 600 level admin
        # read back at start/reload: drain/maint states survive a reload
        server-state-file /run/haproxy/server-state
    defaults
        load-server-state-from-file global

and HAProxy started in master-worker mode with a master CLI:
``haproxy -W -S /run/haproxy/master.sock,mode,600 -f /etc/haproxy/haproxy.cfg``.

Socket paths are host paths. They default to the minion config (or pillar)
keys ``haproxy_runtime.admin_socket`` and ``haproxy_runtime.master_socket``,
else ``/run/mtproxy/haproxy/admin.sock`` and
``/run/mtproxy/haproxy/master.sock``. Every command can go to the admin
socket or, when only the master socket is there, to the current worker
through the master CLI (``@1 <command>``).

The file also runs as a script, so that ``file.managed`` can use it as its
``check_cmd`` (see :py:func:`validate` and :py:func:`check_cmd`)::

    python3 haproxy_runtime.py --image mtproxy-formula/haproxy:local FILE
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# _utils/mtproxy_common.py: on sys.path under Salt's loader, beside this file in config_dir/bin,
# else next to this file's folder (a script in Salt's extension modules or in the formula's tree).
if importlib.util.find_spec("mtproxy_common") is None:
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path += [os.path.join(_HERE, os.pardir, folder) for folder in ("utils", "_utils")]
from mtproxy_common import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "haproxy_runtime"

DEFAULT_ADMIN_SOCKET = "/run/mtproxy/haproxy/admin.sock"
DEFAULT_MASTER_SOCKET = "/run/mtproxy/haproxy/master.sock"
SERVER_STATES = ("ready", "drain", "maint")
# Replies of the CLI that mean a command was refused; HAProxy has no status code.
_ERROR_PREFIXES = (
    "Unknown command",
    "Permission denied",
    "Can't find the target",
    "No such ",
    "Require ",
    "Invalid ",
    "Missing ",
    "'set server",
)


def __virtual__():
    # Only sockets are needed: always load.
    return __virtualname__


# -- configuration and socket plumbing ---------------------------------------------


def _config(key: str, default: Any = None) -> Any:
    """``config.get`` when loaded by Salt, else ``default`` (tests, script use)."""
    salt_funcs = globals().get("__salt__")
    if salt_funcs is not None:
        try:
            return salt_funcs["config.get"](key, default)
        except KeyError:
            pass
    return default


def _sockets(admin_socket: str | None, master_socket: str | None) -> tuple[str | None, str | None]:
    """Resolve the socket paths: explicit arguments first, then config, then defaults.

    When only the master socket is given explicitly, worker commands go through it.
    """
    if admin_socket is None and master_socket is None:
        admin_socket = _config("haproxy_runtime.admin_socket", DEFAULT_ADMIN_SOCKET)
        master_socket = _config("haproxy_runtime.master_socket", DEFAULT_MASTER_SOCKET)
        if admin_socket and not os.path.exists(admin_socket) and master_socket and os.path.exists(master_socket):
            admin_socket = None
    return admin_socket, master_socket


def _master(master_socket: str | None) -> str:
    return master_socket or _config("haproxy_runtime.master_socket", DEFAULT_MASTER_SOCKET)


def _send(path: str, command: str, timeout: float = 10.0) -> str:
    """Send one command on a fresh connection; return the whole reply.

    The master CLI and the stats socket (outside ``prompt`` mode) answer one
    command per connection and close it; the master CLI only starts once our
    side is shut down for writing.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except TimeoutError as exc:
        raise CommandExecutionError(f"HAProxy socket {path}: no complete answer to {command!r} in {timeout} s") from exc
    except OSError as exc:
        raise CommandExecutionError(f"HAProxy socket {path}: {command!r} failed: {exc}") from exc
    finally:
        sock.close()
    return b"".join(chunks).decode(errors="replace")


def _check(reply: str, path: str, command: str, expect: str | None = None) -> str:
    """Raise when ``reply`` is an error, or does not start with ``expect``."""
    text = reply.strip()
    refused = any(text.startswith(prefix) for prefix in _ERROR_PREFIXES)
    if refused or (expect is not None and not text.startswith(expect)):
        first = text.splitlines()[0] if text else "(empty reply)"
        raise CommandExecutionError(f"HAProxy socket {path}: {command!r} refused: {first}")
    return reply


def _worker_cmd(
    command: str,
    admin_socket: str | None = None,
    master_socket: str | None = None,
    expect: str | None = None,
    timeout: float = 10.0,
) -> str:
    """Run a command in the current worker: on the admin socket, else through the master CLI as ``@1``."""
    admin_socket, master_socket = _sockets(admin_socket, master_socket)
    if admin_socket:
        return _check(_send(admin_socket, command, timeout), admin_socket, command, expect)
    if not master_socket:
        raise CommandExecutionError(f"no HAProxy socket to send {command!r} to (neither admin nor master socket)")
    return _check(_send(master_socket, f"@1 {command}", timeout), master_socket, f"@1 {command}", expect)


# -- parsers (pure functions) ------------------------------------------------------


def _parse_stat(text: str) -> list[dict[str, str]]:
    """Parse ``show stat`` CSV into one dict per line (keys from the ``# pxname,...`` header)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# "):
        return []
    names = lines[0][2:].split(",")
    return [dict(zip(names, line.split(","), strict=False)) for line in lines[1:]]


def _parse_info(text: str) -> dict[str, str]:
    """Parse ``show info`` (``Key: value`` lines)."""
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _parse_proc(text: str) -> dict[str, Any]:
    """Parse the master CLI's ``show proc`` (formats of HAProxy 2.x and 3.x).

    Returns ``{'master': {...}, 'workers': [...], 'programs': [...]}``; each
    process has ``pid``, ``type``, ``reloads``, ``uptime``, ``version``; the
    master also ``failed`` (failed reloads, when shown); workers have
    ``current`` (True for the worker that takes new connections).
    """
    names: list[str] = []
    section = "master"
    result: dict[str, Any] = {"master": None, "workers": [], "programs": []}
    for line in text.splitlines():
        if line.startswith("#<"):
            names = [re.sub(r"\W+", "_", name.strip().lower()) for name in re.findall(r"<([^>]+)>", line)]
            continue
        if line.startswith("#"):
            title = line.lstrip("# ").strip().lower()
            section = "programs" if "program" in title else "old" if "old" in title else "workers"
            continue
        if not line.strip() or not names:
            continue
        failed = re.search(r"\[failed:\s*(\d+)\]", line)
        fields = dict(zip(names, re.sub(r"\s*\[failed:\s*\d+\]", "", line).split(), strict=False))
        proc: dict[str, Any] = {
            "pid": int(fields.get("pid", 0)),
            "type": fields.get("type", ""),
            "reloads": int(fields["reloads"]) if fields.get("reloads", "").isdigit() else None,
            "uptime": fields.get("uptime"),
            "version": fields.get("version"),
        }
        if proc["type"] == "master" and result["master"] is None:
            proc["failed"] = int(failed.group(1)) if failed else None
            result["master"] = proc
        elif section == "programs":
            result["programs"].append(proc)
        else:
            proc["current"] = section == "workers"
            result["workers"].append(proc)
    # Some versions list every worker under "# workers": the current one has
    # survived the fewest reloads.
    current = [w for w in result["workers"] if w["current"]]
    if len(current) > 1:
        newest = min(current, key=lambda w: w["reloads"] if w["reloads"] is not None else 0)
        for worker in current:
            worker["current"] = worker is newest
    if result["master"] is None:
        raise ValueError("no master line in show proc output")
    return result


def _parse_reload(text: str) -> tuple[bool | None, str]:
    """Parse the master CLI's answer to ``reload``: ``(success, messages)``.

    HAProxy >= 2.7 answers ``Success=1`` or ``Success=0``, a ``--`` line and
    the startup messages; older versions answer nothing (``None``).
    """
    match = re.search(r"^Success=(\d)", text, re.MULTILINE)
    if not match:
        return None, text.strip()
    rest = text[match.end() :]
    head, sep, tail = rest.partition("\n--\n")
    return match.group(1) == "1", (tail if sep else head).strip()


def _number(fields: dict[str, str], key: str) -> int | None:
    """An integer field of HAProxy's output; None when it is empty or not a number."""
    value = fields.get(key) or ""
    return int(value) if value.lstrip("-").isdigit() else None


def _server_row(row: dict[str, str]) -> dict[str, Any]:
    def number(key: str) -> int | None:
        return _number(row, key)

    return {
        "backend": row.get("pxname"),
        "server": row.get("svname"),
        "status": row.get("status", ""),
        "scur": number("scur") or 0,
        "weight": number("weight"),
        "addr": row.get("addr") or None,
        "check_status": row.get("check_status", "").lstrip("* ") or None,
        "check_desc": row.get("check_desc") or None,
        "last_check": row.get("last_chk") or None,
        "since_change": number("lastchg"),
    }


def _server_rows(text: str, backend: str | None) -> list[dict[str, Any]]:
    """The servers in ``show stat`` (of ``backend`` only, when given)."""
    return [
        _server_row(row)
        for row in _parse_stat(text)
        if row.get("svname") not in ("FRONTEND", "BACKEND") and (not backend or row.get("pxname") == backend)
    ]


_TABLE_HEADER = re.compile(r"# table: (?P<name>[^,]+), type: (?P<type>[^,]+), size:(?P<size>\d+), used:(?P<used>\d+)")


def _parse_table(text: str) -> dict[str, dict[str, Any]]:
    """Parse ``show table [NAME]``: each table's type, size and used entries,
    and the entries listed under it (``key`` and the stored data, a rate's
    period dropped from its name: ``conn_rate(10000)`` -> ``conn_rate``)."""
    tables: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        header = _TABLE_HEADER.match(line.strip())
        if header:
            current = {
                "name": header["name"],
                "type": header["type"],
                "size": int(header["size"]),
                "used": int(header["used"]),
                "entries": [],
            }
            tables[current["name"]] = current
            continue
        if current is None or ": key=" not in line:
            continue
        entry: dict[str, Any] = {}
        for field in line.split(": ", 1)[1].split():
            name, _, value = field.partition("=")
            name = name.split("(", 1)[0]
            entry[name] = int(value) if value.lstrip("-").isdigit() and name != "key" else value
        current["entries"].append(entry)
    return tables


# Bits of srv_admin_state in `show servers state` (HAProxy's SRV_ADMF_*):
# maintenance forced, inherited, from the configuration or from a failed
# name resolution; drain forced or inherited.
_ADMIN_MAINT = 0x01 | 0x02 | 0x04 | 0x20
_ADMIN_DRAIN = 0x08 | 0x10


def _parse_admin_states(text: str) -> dict[str, str]:
    """Each server's administrative state in ``show servers state``, keyed
    ``backend/server``: ``maint``, ``drain`` or ``ready`` (what ``set server
    ... state`` sets; ``show stat`` shows a drained server that is down as DOWN)."""
    states: dict[str, str] = {}
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("# "):
            names = line[2:].split()
            continue
        fields = dict(zip(names, line.split(), strict=False))
        if not fields.get("srv_admin_state", "").isdigit():
            continue
        bits = int(fields["srv_admin_state"])
        state = "maint" if bits & _ADMIN_MAINT else "drain" if bits & _ADMIN_DRAIN else "ready"
        states[f"{fields['be_name']}/{fields['srv_name']}"] = state
    return states


def _status_matches(status: str, wanted: str) -> bool:
    # "UP 1/3" (going down) is still UP; "MAINT (via be/srv)" is still MAINT.
    status, wanted = status.strip().upper(), wanted.strip().upper()
    return status == wanted or status.split(" ")[0] == wanted


# -- public functions ------------------------------------------------------------


def validate(
    path: str | None = None,
    contents: str | None = None,
    image: str | None = None,
    binary: str | None = None,
    docker_host: str | None = None,
    timeout: float = 120,
) -> dict[str, Any]:
    """
    Check a candidate HAProxy configuration with ``haproxy -c``.

    Give the file as ``path`` or its text as ``contents``. The check runs
    with a local ``binary``, or through the HAProxy ``image`` (``docker run
    --rm --network none`` with the file's folder mounted read-only), where
    Docker is ``docker_host``, else the ``docker.url`` config, else the
    ``DOCKER_HOST`` environment. Without either, the config keys
    ``haproxy_runtime.binary`` / ``haproxy_runtime.image`` decide, else a
    ``haproxy`` on the PATH.

    Returns ``{'valid': bool, 'messages': <HAProxy's output>}``.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.validate /etc/mtproxy/haproxy/haproxy.cfg image=mtproxy-formula/haproxy:local
        salt '*' haproxy_runtime.validate contents='global' binary=/usr/sbin/haproxy
    """
    if (path is None) == (contents is None):
        raise CommandExecutionError("validate needs exactly one of path and contents")
    if image is None and binary is None:
        binary, image = _configured_checker()
    tmpdir = None
    try:
        if contents is not None:
            tmpdir = tempfile.mkdtemp(prefix="haproxy-validate-")
            path = os.path.join(tmpdir, "haproxy.cfg")
            with open(path, "w") as handle:
                handle.write(contents)
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise CommandExecutionError(f"validate: {path} is not a file")
        cmd, env = _check_command(path, image, binary, docker_host)
        return _run_check(cmd, env, in_image=bool(image), timeout=timeout)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _configured_checker() -> tuple[str | None, str | None]:
    """``(binary, image)`` that :py:func:`validate` uses when given neither:
    the config keys, else a ``haproxy`` on the PATH."""
    binary = _config("haproxy_runtime.binary")
    image = None if binary else _config("haproxy_runtime.image")
    if not binary and not image:
        binary = shutil.which("haproxy")
    if not binary and not image:
        raise CommandExecutionError("validate: no HAProxy binary or image given, and no haproxy on the PATH")
    return binary, image


def _check_command(
    path: str, image: str | None, binary: str | None, docker_host: str | None
) -> tuple[list[str], dict[str, str]]:
    """The ``haproxy -c`` command line for ``path`` and its environment: in
    the image (the file's folder mounted read-only, no network), else with the binary."""
    env = dict(os.environ)
    if not image:
        return [str(binary), "-c", "-f", path], env
    docker = shutil.which("docker")
    if not docker:
        raise CommandExecutionError("validate: the docker CLI is not on the PATH")
    folder = os.path.dirname(path)
    cmd = [docker, "run", "--rm", "--network", "none", "-v", f"{folder}:{folder}:ro"]
    cmd += [image, "haproxy", "-c", "-f", path]
    docker_host = docker_host or _config("docker.url")
    if docker_host:
        env["DOCKER_HOST"] = docker_host
    return cmd, env


def _run_check(cmd: list[str], env: dict[str, str], in_image: bool, timeout: float) -> dict[str, Any]:
    """Run the check: ``{'valid', 'messages'}``; raises when it could not give a verdict."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandExecutionError(f"validate: {' '.join(cmd)} failed: {exc}") from exc
    messages = (proc.stdout + proc.stderr).strip()
    # docker run exits 125-127 for its own failures (no image, no daemon): not a verdict on the config.
    if in_image and proc.returncode in (125, 126, 127):
        raise CommandExecutionError(f"validate: {' '.join(cmd)} exited {proc.returncode}: {messages}")
    return {"valid": proc.returncode == 0, "messages": messages}


def check_cmd(image: str | None = None, binary: str | None = None, docker_host: str | None = None) -> str:
    """
    The command line that runs :py:func:`validate` as ``check_cmd`` of ``file.managed``.

    Salt appends the temporary file's name and requires exit code 0.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.check_cmd image=mtproxy-formula/haproxy:local
    """
    parts = [sys.executable or "python3", os.path.abspath(__file__)]
    image = image if image or binary else _config("haproxy_runtime.image")
    docker_host = docker_host or (_config("docker.url") if image else None)
    if binary:
        parts += ["--binary", binary]
    elif image:
        parts += ["--image", image]
    if docker_host:
        parts += ["--docker-host", docker_host]
    return shlex.join(parts)


def show_proc(master_socket: str | None = None) -> dict[str, Any]:
    """
    The master's view of its processes (``show proc``): master, current and old workers.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.show_proc
    """
    path = _master(master_socket)
    reply = _check(_send(path, "show proc"), path, "show proc", expect="#")
    try:
        return _parse_proc(reply)
    except ValueError as exc:
        raise CommandExecutionError(f"HAProxy socket {path}: unexpected answer to 'show proc': {reply[:200]}") from exc


def info(admin_socket: str | None = None, master_socket: str | None = None) -> dict[str, Any]:
    """
    Version, pid, uptime and connection counts of the current worker (``show info``).

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.info
    """
    raw = _parse_info(_worker_cmd("show info", admin_socket, master_socket, expect="Name:"))

    def number(key: str) -> int | None:
        return _number(raw, key)

    return {
        "version": raw.get("Version"),
        "pid": number("Pid"),
        "uptime": raw.get("Uptime"),
        "uptime_sec": number("Uptime_sec"),
        "current_connections": number("CurrConns"),
        "cumulative_connections": number("CumConns"),
        "maxconn": number("Maxconn"),
        "raw": raw,
    }


def servers(
    backend: str | None = None,
    all_workers: bool = False,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, dict[str, Any]]:
    """
    Each server's status, current sessions and last check, keyed ``backend/server``.

    ``status`` is HAProxy's (``UP``, ``DOWN``, ``DRAIN``, ``MAINT``, ``no
    check``, ``UP 1/2``...), ``scur`` the current sessions. A reload leaves
    the old sessions with the old workers: with ``all_workers`` (needs the
    master socket), ``scur`` is summed over every worker and
    ``scur_by_pid`` tells them apart.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.servers
        salt '*' haproxy_runtime.servers backend=mtproxy all_workers=True
    """
    result: dict[str, dict[str, Any]] = {}
    if not all_workers:
        text = _worker_cmd("show stat", admin_socket, master_socket, expect="# pxname")
        for server in _server_rows(text, backend):
            result[f"{server['backend']}/{server['server']}"] = server
        return result

    master = _master(master_socket)
    procs = show_proc(master)
    # The current worker first: its view of states and checks is the one that counts.
    workers = sorted(procs["workers"], key=lambda w: not w["current"])
    for worker in workers:
        command = f"@!{worker['pid']} show stat"
        reply = _send(master, command)
        if reply.strip().startswith("Can't find the target"):
            continue  # an old worker that has just exited
        for server in _server_rows(_check(reply, master, command, expect="# pxname"), backend):
            key = f"{server['backend']}/{server['server']}"
            count = server["scur"]
            if key not in result:
                if not worker["current"]:
                    continue  # a server the new configuration no longer has
                result[key] = dict(server, scur=0, scur_by_pid={})
            result[key]["scur_by_pid"][worker["pid"]] = count
            result[key]["scur"] += count
    return result


def table(
    name: str,
    entries: bool = True,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any]:
    """
    A stick table of the current worker: ``type``, ``size``, ``used`` and,
    with ``entries``, each entry (``key`` and its data, e.g. ``conn_cur``).
    Without ``entries`` only the header is read (``show table``), so no key
    leaves HAProxy: use that for tables keyed on what clients send.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.table mtproxy_clients
        salt '*' haproxy_runtime.table mtproxy_replicas entries=False
    """
    command = f"show table {name}" if entries else "show table"
    found = _parse_table(_worker_cmd(command, admin_socket, master_socket)).get(name)
    if found is None:
        raise CommandExecutionError(f"HAProxy has no stick table {name}")
    if not entries:
        found.pop("entries")
    return found


def frontend(name: str, admin_socket: str | None = None, master_socket: str | None = None) -> dict[str, Any]:
    """
    A frontend's counters in the current worker: current and total sessions,
    connections denied by ``tcp-request connection`` rules (``denied_connections``)
    and sessions denied later (``denied_sessions``).

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.frontend mtproxy
    """
    text = _worker_cmd("show stat", admin_socket, master_socket, expect="# pxname")
    for row in _parse_stat(text):
        if row.get("pxname") == name and row.get("svname") == "FRONTEND":
            return {
                "scur": _number(row, "scur") or 0,
                "stot": _number(row, "stot") or 0,
                "denied_connections": _number(row, "dcon") or 0,
                "denied_sessions": _number(row, "dses") or 0,
            }
    raise CommandExecutionError(f"HAProxy has no frontend {name}")


def _one(
    backend: str,
    server: str,
    all_workers: bool = False,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any]:
    found = servers(backend, all_workers, admin_socket, master_socket).get(f"{backend}/{server}")
    if found is None:
        raise CommandExecutionError(f"HAProxy has no server {backend}/{server}")
    return found


def _all_workers(master_socket: str | None) -> bool:
    """Whether sessions can be counted in every worker: the master socket is there."""
    master = _master(master_socket)
    return bool(master and os.path.exists(master))


def server_state(
    backend: str,
    server: str,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any] | None:
    """
    One server as it is now, or None when HAProxy does not have it.

    The fields of :py:func:`servers` (``status``, ``addr``, ``scur`` summed
    over every worker when the master socket is there, as :py:func:`drain`
    counts them) and the administrative ``state``: ``ready``, ``drain`` or
    ``maint``, what :py:func:`set_state` sets (``status`` shows a drained
    server that is down as ``DOWN``).

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.server_state mtproxy_replicas mtproxy_1
    """
    found = servers(backend, _all_workers(master_socket), admin_socket, master_socket).get(f"{backend}/{server}")
    if found is None:
        return None
    text = _worker_cmd(f"show servers state {backend}", admin_socket, master_socket)
    found["state"] = _parse_admin_states(text).get(f"{backend}/{server}", "ready")
    return found


def set_state(
    backend: str,
    server: str,
    state: str,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any]:
    """
    Set a server's administrative state: ``ready``, ``drain`` or ``maint``.

    ``drain`` takes it out of balancing but keeps its sessions; ``maint``
    also stops its health checks. The change lasts until the next reload
    unless :py:func:`reload` saves the server states (``state_file``).

    Returns ``{'server': 'be/srv', 'state': state, 'status': <status now>}``.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.set_state mtproxy mtproxy_1 drain
    """
    state = str(state).lower()
    if state not in SERVER_STATES:
        raise CommandExecutionError(f"state must be one of {', '.join(SERVER_STATES)}, not {state!r}")
    command = f"set server {backend}/{server} state {state}"
    reply = _worker_cmd(command, admin_socket, master_socket)
    if reply.strip():  # HAProxy answers nothing when it did it
        raise CommandExecutionError(f"HAProxy refused {command!r}: {reply.strip()}")
    now = _one(backend, server, admin_socket=admin_socket, master_socket=master_socket)
    return {"server": f"{backend}/{server}", "state": state, "status": now["status"]}


def set_address(
    backend: str,
    server: str,
    address: str,
    port: int,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any]:
    """
    Point a server at ``address:port`` at run time (``set server be/srv addr
    A port P``), e.g. a replica that now listens elsewhere. Its health checks
    follow. Lasts until the next reload, which reads the address from the
    configuration again: write the same one there.

    Returns ``{'server': 'be/srv', 'addr': <address:port now>, 'reply': <HAProxy's answer>}``.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.set_address mtproxy_replicas mtproxy_1 192.0.2.10 6101
    """
    command = f"set server {backend}/{server} addr {address} port {int(port)}"
    reply = _worker_cmd(command, admin_socket, master_socket).strip()
    # HAProxy says what it changed ("IP changed from ...", "port changed from
    # ...") or that nothing needed to; anything else is a refusal.
    if reply and not reply.startswith(("IP changed", "port changed", "no need to change")):
        raise CommandExecutionError(f"HAProxy refused {command!r}: {reply}")
    now = _one(backend, server, admin_socket=admin_socket, master_socket=master_socket)
    return {"server": f"{backend}/{server}", "addr": now["addr"], "reply": reply}


def _poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float, interval: float):
    """Call ``fetch()`` until ``done(value)`` or ``timeout`` seconds have passed;
    returns ``(last value, done, seconds waited)``."""
    start = time.monotonic()
    while True:
        value = fetch()
        waited = time.monotonic() - start
        finished = bool(done(value))
        if finished or waited >= timeout:
            return value, finished, waited
        time.sleep(min(interval, max(0.0, timeout - waited)))


def _proc_or_none(master: str) -> dict[str, Any] | None:
    """``show proc``, or None while the master CLI does not answer (starting, re-executing)."""
    try:
        return show_proc(master)
    except CommandExecutionError:
        return None


def wait_for(
    backend: str,
    server: str,
    status: str,
    timeout: float = 30,
    checked: bool = True,
    interval: float = 0.25,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any]:
    """
    Wait until a server's status is ``status`` (``UP``, ``DOWN``, ``DRAIN``, ``MAINT``...).

    With ``checked`` (default), a server must also have a check result
    (HAProxy 3 shows servers UP before their first check). Raises
    ``CommandExecutionError`` with the last status seen after ``timeout``
    seconds; returns ``{'server', 'status', 'check_status', 'waited'}``.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.wait_for mtproxy mtproxy_1 UP timeout=20
    """

    def reached(now: dict[str, Any]) -> bool:
        unchecked = checked and (now["check_status"] or "").startswith("INI")
        return _status_matches(now["status"], status) and not unchecked

    now, done, waited = _poll(
        lambda: _one(backend, server, admin_socket=admin_socket, master_socket=master_socket),
        reached,
        timeout,
        interval,
    )
    if not done:
        raise CommandExecutionError(
            f"{backend}/{server} is not {status} after {timeout} s: {now['status']}"
            f" ({now['check_status'] or 'no check'}: {now['check_desc'] or '-'})"
        )
    return {
        "server": f"{backend}/{server}",
        "status": now["status"],
        "check_status": now["check_status"],
        "waited": round(waited, 3),
    }


def drain(
    backend: str,
    server: str,
    timeout: float = 60,
    shutdown: bool = False,
    interval: float = 0.25,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any]:
    """
    Drain a server: no new sessions, wait for the existing ones to end.

    Sets the server to ``drain``, then polls its sessions (summed over every
    worker, old ones included, when the master socket is there) until they
    reach 0 or ``timeout`` seconds pass. With ``shutdown``, whatever is left
    then is cut (``shutdown sessions server``, in every worker).

    Returns ``{'server', 'drained' (no session left), 'sessions_left' (when
    the wait ended), 'sessions_shut_down', 'waited', 'all_workers'}``.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.drain mtproxy mtproxy_1 timeout=300
        salt '*' haproxy_runtime.drain mtproxy mtproxy_1 timeout=30 shutdown=True
    """
    use_all = _all_workers(master_socket)
    set_state(backend, server, "drain", admin_socket, master_socket)

    def sessions() -> dict[str, Any]:
        return _one(backend, server, use_all, admin_socket, master_socket)

    now, _, waited = _poll(sessions, _no_sessions, timeout, interval)
    result = _drain_outcome(f"{backend}/{server}", now["scur"], waited, use_all)
    if shutdown and now["scur"]:
        _shut_down_what_is_left(now, backend, server, use_all, admin_socket, master_socket)
        result["sessions_shut_down"] = now["scur"]
        # Shut-down sessions leave the counters at once, or within a poll or two.
        _, result["drained"], _ = _poll(sessions, _no_sessions, 2.0, 0.1)
    return result


def _no_sessions(now: dict[str, Any]) -> bool:
    return now["scur"] == 0


def _drain_outcome(target: str, left: int, waited: float, all_workers: bool) -> dict[str, Any]:
    """What :py:func:`drain` returns."""
    return {
        "server": target,
        "drained": left == 0,
        "sessions_left": left,
        "sessions_shut_down": 0,
        "waited": round(waited, 3),
        "all_workers": all_workers,
    }


def _shut_down_what_is_left(
    now: dict[str, Any],
    backend: str,
    server: str,
    all_workers: bool,
    admin_socket: str | None,
    master_socket: str | None,
) -> None:
    """End a drained server's remaining sessions: in each worker that has some, or in the current one."""
    if not all_workers:
        _worker_cmd(f"shutdown sessions server {backend}/{server}", admin_socket, master_socket)
        return
    master = _master(master_socket)
    for pid, count in now.get("scur_by_pid", {}).items():
        if count:
            _shutdown_sessions(master, pid, backend, server)


def ready(
    backend: str,
    server: str,
    timeout: float = 60,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any]:
    """
    Undo a drain: set the server ``ready`` and wait until it is ``UP`` after a check.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.ready mtproxy mtproxy_1 timeout=30
    """
    set_state(backend, server, "ready", admin_socket, master_socket)
    return wait_for(backend, server, "UP", timeout, admin_socket=admin_socket, master_socket=master_socket)


def _shutdown_sessions(master: str, pid: int, backend: str, server: str) -> None:
    """End a server's sessions in one worker, old workers included."""
    command = f"@!{pid} shutdown sessions server {backend}/{server}"
    reply = _send(master, command).strip()
    if not reply or reply.startswith("Can't find the target"):
        return  # done, or the worker has exited meanwhile
    if not reply.startswith("Proxy is disabled"):
        _check(reply, master, command)
        raise CommandExecutionError(f"HAProxy socket {master}: {command!r} refused: {reply}")
    # An old worker's proxies are stopped and refuse the command: end the sessions one by one.
    marker = f" be={backend} srv={server} "
    for line in _send(master, f"@!{pid} show sess").splitlines():
        if marker in line:
            session = line.split(":", 1)[0]
            _send(master, f"@!{pid} shutdown session {session}")


def save_state(state_file: str, admin_socket: str | None = None, master_socket: str | None = None) -> str:
    """
    Save ``show servers state`` into ``state_file`` (a host path), atomically.

    HAProxy reads it at the next start or reload through ``server-state-file``
    and ``load-server-state-from-file global``.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.save_state /run/mtproxy/haproxy/server-state
    """
    text = _worker_cmd("show servers state", admin_socket, master_socket)
    if not text.strip() or not text.lstrip()[0].isdigit():
        raise CommandExecutionError(f"unexpected answer to 'show servers state': {text.strip()[:200]}")
    _write_atomic(state_file, text, 0o644)
    return state_file


def _write_atomic(path: str, text: str, mode: int) -> None:
    """Replace ``path`` with ``text`` in one step: a reader sees the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _answering_master(master: str, timeout: float) -> dict[str, Any]:
    """``show proc`` once the master CLI answers: a container started a moment
    ago (the first apply) may not have opened its socket yet."""
    proc, answered, _ = _poll(lambda: _proc_or_none(master), lambda proc: proc is not None, timeout, 0.2)
    return proc if answered else show_proc(master)  # raises with the socket's error


def reload(
    master_socket: str | None = None,
    admin_socket: str | None = None,
    state_file: str | None = None,
    timeout: float = 60,
    keep_state_file: bool = False,
    config_file: str | None = None,
    record: str | None = None,
) -> dict[str, Any]:
    """
    Reload HAProxy gracefully through the master CLI and confirm it.

    With ``config_file`` (host path of the file HAProxy reads), a confirmed
    reload is recorded in ``record`` (default: ``loaded.json`` next to the
    master socket): the file's SHA-256 and the master it was loaded by (see
    :py:func:`loaded`). A failed reload leaves the record as it was, so the
    file no longer matches it and the next check retries.

    With ``state_file`` (host path of the ``server-state-file``), the server
    states are saved first, so drain and maintenance survive the reload. The
    file is removed afterwards unless ``keep_state_file``: HAProxy reads it
    at every start, and a stale copy would bring back old drain/maint states
    at a later container restart. The new worker takes new connections; old
    workers keep theirs until they end.

    HAProxy >= 2.7 answers ``Success=1/0`` and its startup messages; older
    versions answer nothing, and the reload is confirmed through ``show
    proc`` (the master's reload counter and a new worker). On failure a
    ``CommandExecutionError`` carries HAProxy's messages: the old worker
    keeps serving.

    Returns ``{'reloaded': True, 'old_pids': [...], 'new_pid': pid,
    'reloads': n, 'messages': '...', 'state_file': path or None,
    'record': path or None}``.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.reload state_file=/run/mtproxy/haproxy/server-state
        salt '*' haproxy_runtime.reload config_file=/etc/mtproxy/haproxy/haproxy.cfg
    """
    master = _master(master_socket)
    before = _answering_master(master, timeout)
    # The file as HAProxy is about to read it.
    digest = _digest(config_file) if config_file else None
    if state_file:
        save_state(state_file, admin_socket, master_socket or master)
    try:
        result = _reload_confirmed(master, before, timeout, state_file)
    finally:
        if state_file and not keep_state_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(state_file)
    result["record"] = _record_loaded(config_file, digest, master, result, record) if config_file else None
    return result


def _reload_confirmed(master: str, before: dict[str, Any], timeout: float, state_file: str | None) -> dict[str, Any]:
    old_pids = [w["pid"] for w in before["workers"]]
    try:
        success, messages = _parse_reload(_send(master, "reload", timeout))
    except CommandExecutionError as exc:
        # HAProxy < 2.7 may drop the connection as the master re-executes itself: show proc decides.
        log.debug("no answer to reload, confirming through show proc: %s", exc)
        success, messages = None, ""
    if success is False:
        raise CommandExecutionError(
            f"HAProxy socket {master}: 'reload' failed, the old worker keeps serving:\n{messages}"
        )

    # Confirm: the master counts the reload (HAProxy < 2.7 does it after answering).
    def counted(proc: dict[str, Any] | None) -> bool:
        return bool(proc) and (proc["master"]["reloads"] or 0) > (before["master"]["reloads"] or 0)

    after, confirmed, _ = _poll(lambda: _proc_or_none(master), counted, timeout, 0.1)
    if not confirmed:
        raise CommandExecutionError(f"HAProxy socket {master}: 'reload' not confirmed by 'show proc' in {timeout} s")
    current = [w["pid"] for w in after["workers"] if w["current"]]
    new_pid = current[0] if current else None
    if success is None:
        failed_before, failed_after = before["master"].get("failed"), after["master"].get("failed")
        if failed_before is not None and failed_after is not None:
            # The failed counter grows with each failed reload and restarts at 0 after a good one.
            success = failed_after == 0 or failed_after <= failed_before
        else:
            success = new_pid is not None and new_pid not in old_pids
        if not success:
            raise CommandExecutionError(
                f"HAProxy socket {master}: 'reload' failed, the old worker keeps serving"
                " (HAProxy < 2.7 gives no reason here: validate the configuration)"
            )
    return {
        "reloaded": True,
        "old_pids": old_pids,
        "new_pid": new_pid,
        "reloads": after["master"]["reloads"],
        "version": after["master"]["version"],
        "messages": messages,
        "state_file": state_file,
    }


# -- what HAProxy confirmed it loaded ----------------------------------------------------

RECORD_NAME = "loaded.json"
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _record_path(master: str, record: str | None) -> str:
    return record or os.path.join(os.path.dirname(os.path.abspath(master)), RECORD_NAME)


def _digest(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError as exc:
        raise CommandExecutionError(f"cannot read the HAProxy config {path}: {exc}") from exc


def _master_identity(master: str) -> dict[str, Any] | None:
    """What tells this HAProxy master from any other, or None when none answers on ``master``.

    Inside its container the master may be PID 1 after every restart, so its
    own view of itself identifies nothing. Seen from here, the process that
    listens on the master CLI (``SO_PEERCRED``) has a host PID and a start
    time (clock ticks since boot) that no other process of this boot shares,
    and a reload keeps both: the master re-executes itself in place. Where
    its PID is not visible (another PID namespace), ``pid`` is None.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(master)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        sock.close()
    pid = struct.unpack("3i", creds)[0]
    try:
        with open(BOOT_ID) as handle:
            boot_id = handle.read().strip()
        with open(f"/proc/{pid}/stat") as handle:
            # Field 22; counted after the command name, which may hold spaces and parentheses.
            start = int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        log.warning("HAProxy master on %s: PID %s not visible here; its restarts go unnoticed", master, pid)
        return {"boot_id": None, "pid": None, "start": None}
    return {"boot_id": boot_id, "pid": pid, "start": start}


def _read_record(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("HAProxy load record %s is unreadable (%s): taken as no record", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _not_loaded_because(recorded: dict[str, Any] | None, digest: str, master: dict[str, Any] | None) -> str | None:
    """Why HAProxy may not run the config whose SHA-256 is ``digest``; None when it provably does."""
    if master is None:
        return "HAProxy does not answer on its master socket"
    if not recorded:
        return "no record of a config HAProxy confirmed it loaded"
    if recorded.get("sha256") != digest:
        old = str(recorded.get("sha256"))[:12]
        return f"the config changed since HAProxy last confirmed loading it (sha256 {old}… → {digest[:12]}…)"
    if master["pid"] is not None and recorded.get("master") != master:
        return "HAProxy was restarted since its last confirmed reload: what it loaded is unknown"
    return None


def _record_loaded(
    config_file: str, digest: str | None, master: str, result: dict[str, Any], record: str | None
) -> str | None:
    """Record a confirmed reload of ``config_file``; the record's path, or None when
    what HAProxy read is unknown (the file changed meanwhile, the master is gone)."""
    path = _record_path(master, record)
    identity = _master_identity(master)
    if identity is None or _digest(config_file) != digest:
        log.warning("%s changed or HAProxy went away during the reload: nothing recorded", config_file)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return None
    data = {
        "config_file": config_file,
        "sha256": digest,
        "master": identity,
        "worker": result["new_pid"],
        "reloads": result["reloads"],
        "version": result["version"],
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n", 0o600)
    return path


def loaded(
    config_file: str, master_socket: str | None = None, record: str | None = None, timeout: float = 0
) -> dict[str, Any]:
    """
    Whether HAProxy runs ``config_file`` as the file is now.

    It does when the file's SHA-256 is the one recorded at the last
    confirmed :py:func:`reload` (``record``, default ``loaded.json`` next to
    the master socket) and the master that answers is the one that loaded it.
    After a failed reload, a restart of HAProxy or with no record, it may not.
    ``timeout``: seconds to wait for a master that does not answer yet.

    Returns ``{'loaded': bool, 'reason': why not (None when loaded),
    'config_file', 'sha256': the file's now, 'record': path, 'recorded':
    the record (None when there is none), 'master_socket', 'master': the
    master now (None when none answers)}``.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.loaded /etc/mtproxy/haproxy/haproxy.cfg
    """
    master = _master(master_socket)
    path = _record_path(master, record)
    digest = _digest(config_file)
    recorded = _read_record(path)
    identity, _, _ = _poll(lambda: _master_identity(master), lambda found: found is not None, timeout, 0.2)
    reason = _not_loaded_because(recorded, digest, identity)
    return {
        "loaded": reason is None,
        "reason": reason,
        "config_file": config_file,
        "sha256": digest,
        "record": path,
        "recorded": recorded,
        "master_socket": master,
        "master": identity,
    }


def bind_conflicts(addresses: list[str]) -> list[str]:
    """
    Which of the ``ADDRESS:PORT`` listeners HAProxy could not bind because another process holds them.

    A reload whose new worker cannot bind makes HAProxy pause the running
    worker's listeners while it retries (measured: refused connections on
    the old port), so this is asked before a reload. The test binds as
    HAProxy does (``SO_REUSEPORT``, free bind): HAProxy's own listeners do
    not count, a foreign one does.

    CLI Example:

    .. code-block:: bash

        salt '*' haproxy_runtime.bind_conflicts '["0.0.0.0:8443", "127.0.0.1:8404"]'
    """
    taken = []
    for address in addresses:
        host, _, port = str(address).rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
            try:
                sock.bind((host, int(port)))
            except OSError as exc:
                taken.append(f"{address} ({exc.strerror})")
    return taken


# -- check_cmd entry point -------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check an HAProxy configuration (haproxy -c); exit 0 if valid. Usable as file.managed check_cmd."
    )
    parser.add_argument("--image", help="HAProxy image to run the check in (docker run --rm --network none)")
    parser.add_argument("--docker-host", help="Docker endpoint (else DOCKER_HOST)")
    parser.add_argument("--binary", help="local haproxy binary instead of an image")
    parser.add_argument("file")
    args = parser.parse_args(argv)
    try:
        result = validate(path=args.file, image=args.image, binary=args.binary, docker_host=args.docker_host)
    except CommandExecutionError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(result["messages"], file=sys.stdout if result["valid"] else sys.stderr)
    return 0 if result["valid"] else 1


if __name__ == "__main__":
    sys.exit(_main())
