"""One HAProxy server at a time: drained before its replica is replaced or
removed, ready again once the replica serves.

Each state reads the server through
:py:func:`haproxy_runtime.server_state <_modules.haproxy_runtime.server_state>`
(its administrative state ``ready``, ``drain`` or ``maint``, its status, its
address and its sessions in every worker), compares it with what is wanted,
says under ``test=True`` what it would do without doing it, and acts only when
the server differs: a second run reports no changes. A server HAProxy does
not have, or no HAProxy answering at all, is left to HAProxy's configuration:
nothing to drain, nothing to take back.

.. code-block:: yaml

    Replica mtproxy_1 is drained before it is replaced:
      haproxy_server.drained:
        - name: mtproxy_1
        - backend: mtproxy_replicas
        - timeout: 30
        - master_socket: /run/mtproxy/haproxy/master.sock
        - admin_socket: /run/mtproxy/haproxy/admin.sock
        - prereq:
          - docker_container: Replica mtproxy_1 is running on port 4431

    Replica mtproxy_1 is back in HAProxy:
      haproxy_server.ready:
        - name: mtproxy_1
        - backend: mtproxy_replicas
        - address: 192.0.2.10
        - port: 4431
        - timeout: 30
"""

from __future__ import annotations

from typing import Any

from salt.exceptions import CommandExecutionError

__virtualname__ = "haproxy_server"


def __virtual__():
    if "haproxy_runtime.server_state" in __salt__:
        return __virtualname__
    return (False, "the haproxy_runtime execution module is not loaded (sync _modules)")


def _start(
    name: str, backend: str, admin_socket: str | None, master_socket: str | None
) -> tuple[dict[str, Any], dict[str, str | None], dict[str, Any] | None, str]:
    """A state's return to fill, the socket arguments, and the server as
    HAProxy has it now (None, and why there is none, when there is none)."""
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    sockets = {"admin_socket": admin_socket, "master_socket": master_socket}
    try:
        server = __salt__["haproxy_runtime.server_state"](backend, name, **sockets)
    except CommandExecutionError as exc:
        return ret, sockets, None, f"No HAProxy answers ({exc})"
    if server is None:
        return ret, sockets, None, f"HAProxy has no server {backend}/{name}"
    return ret, sockets, server, ""


def _endpoint(address: str, port: int) -> str:
    """``address:port`` as HAProxy's ``show stat`` writes a server's ``addr``."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _sessions(count: int) -> str:
    return "1 session" if count == 1 else f"{count} sessions"


def drained(
    name: str,
    backend: str,
    timeout: float = 60,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any]:
    """Server ``name`` of ``backend`` takes no new clients, and the ones it
    has get up to ``timeout`` seconds to end.

    Sets the server's administrative state to ``drain`` and waits until its
    sessions (in every worker, old ones included, when the master socket is
    there) reach 0 or ``timeout`` passes; what is left then keeps running.
    A server that is drained already only gets the wait.

    Changes: ``{'state': {'old': 'ready', 'new': 'drain'}}`` and, when it had
    sessions, ``'sessions': {'old': <at the start>, 'new': <left at the
    end>}`` and ``'waited'`` (seconds).
    """
    ret, sockets, server, missing = _start(name, backend, admin_socket, master_socket)
    if server is None:
        ret["comment"] = f"{missing}: nothing to drain"
        return ret
    target, before = f"{backend}/{name}", server["scur"]
    if server["state"] == "drain" and not before:
        ret["comment"] = f"{target} is drained ({server['status']}, no session left)"
        return ret
    if __opts__["test"]:
        return _would_drain(ret, target, server, timeout)
    try:
        done = __salt__["haproxy_runtime.drain"](backend, name, timeout=timeout, **sockets)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = f"{target} is not drained: {exc}"
        return ret
    left = done["sessions_left"]
    outcome = (
        f"{_sessions(left)} left after {done['waited']} s" if left else f"no session left after {done['waited']} s"
    )
    if server["state"] == "drain":
        ret["comment"] = f"{target} is drained ({server['status']}); {outcome}"
        return ret
    ret["changes"]["state"] = {"old": server["state"], "new": "drain"}
    if before:
        ret["changes"].update(sessions={"old": before, "new": left}, waited=done["waited"])
    ret["comment"] = f"{target} drained: no new clients; {outcome}"
    return ret


def _would_drain(ret: dict[str, Any], target: str, server: dict[str, Any], timeout: float) -> dict[str, Any]:
    """What :py:func:`drained` would do (under test)."""
    wait = f"up to {timeout} s for its {_sessions(server['scur'])} to end"
    if server["state"] == "drain":
        ret["comment"] = f"{target} is drained ({server['status']}); it would get {wait}"
        return ret
    ret["result"] = None
    ret["changes"]["state"] = {"old": server["state"], "new": "drain"}
    ret["comment"] = f"{target} ({server['status']}) would be drained: no new clients, {wait}"
    return ret


def ready(
    name: str,
    backend: str,
    address: str,
    port: int,
    timeout: float = 60,
    admin_socket: str | None = None,
    master_socket: str | None = None,
) -> dict[str, Any]:
    """Server ``name`` of ``backend`` sends to ``address:port``, takes new
    clients and is UP after a check.

    A replica that moved (port or address) is pointed at its new place at
    run time (the config file follows after the whole rollout); one left
    drained, by the drain before its replacement or by a rollout that
    stopped, is set ready. HAProxy that does not run, or does not have the
    server yet, is not an error: it takes the server from its configuration.

    Changes: ``addr``, ``state`` (administrative: to ``ready``) and
    ``status`` (to ``UP``), each when it differed.
    """
    ret, sockets, server, missing = _start(name, backend, admin_socket, master_socket)
    if server is None:
        ret["comment"] = f"{missing}; its configuration adds {name}"
        return ret
    target, wanted = f"{backend}/{name}", _endpoint(address, port)
    ret["changes"] = _ready_changes(server, wanted)
    moved = "addr" in ret["changes"]
    if not ret["changes"]:
        ret["comment"] = f"{target} is at {wanted} and takes new clients ({server['status']})"
        return ret
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = f"{target} would be " + (f"moved to {wanted} and " if moved else "") + "set ready"
        return ret
    done: dict[str, Any] = {}
    try:
        if moved:
            __salt__["haproxy_runtime.set_address"](backend, name, address, port, **sockets)
            done["addr"] = ret["changes"]["addr"]
        __salt__["haproxy_runtime.ready"](backend, name, timeout=timeout, **sockets)
    except CommandExecutionError as exc:
        ret["changes"] = done
        ret["result"] = False
        ret["comment"] = f"{target} is not back in HAProxy: {exc}"
        return ret
    ret["comment"] = f"{target} is " + (f"at {wanted}, " if moved else "") + "ready and UP"
    return ret


def _ready_changes(server: dict[str, Any], wanted: str) -> dict[str, Any]:
    """What taking ``server`` back changes. Anything but UP needs it: DRAIN,
    MAINT, and DOWN, which is also what a drained server shows until its
    check passes (the replica serves by now: the state before makes sure)."""
    changes: dict[str, Any] = {}
    if server["addr"] != wanted:
        changes["addr"] = {"old": server["addr"], "new": wanted}
    if server["state"] != "ready":
        changes["state"] = {"old": server["state"], "new": "ready"}
    if server["status"].upper().split(" ")[0] != "UP":
        changes["status"] = {"old": server["status"], "new": "UP"}
    return changes
