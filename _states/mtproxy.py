"""Checks of an MTProxy cell that the docker_container states cannot make.

``docker_container.running`` only sees the container state at one instant: a
container that exits at once (its port taken, a broken config, a bad image)
and is restarted by its restart policy again and again often looks
``running`` then. This state asks the service itself: does it accept TCP
connections on its port? When it does not, the comment names the container
and shows its last log lines.

``in_haproxy`` takes a replica back into HAProxy after its replacement: at
its new address and port (at run time; the config file follows after the
whole rollout), ready, UP.

.. code-block:: yaml

    Replica mtproxy_1 accepts connections on port 4431:
      mtproxy.serving:
        - name: mtproxy_1
        - address: 192.0.2.10
        - port: 4431
"""

from __future__ import annotations

import socket
import time

try:
    from salt.exceptions import CommandExecutionError
except ImportError:  # imported without Salt

    class CommandExecutionError(Exception):  # type: ignore[no-redef]
        pass


__virtualname__ = "mtproxy"

# How many of the container's last log lines a failure shows.
LOG_LINES = 15


def __virtual__():
    return __virtualname__


def _container_summary(name: str) -> str:
    try:
        state = __salt__["docker.inspect_container"](name)
    except Exception as exc:  # only for the comment
        return f"container not inspectable: {exc}"
    summary = f"container status {state['State'].get('Status')!r}, restarted {state.get('RestartCount', 0)} times"
    try:
        logs = __salt__["docker.logs"](name, tail=LOG_LINES)
    except Exception as exc:  # only for the comment
        logs = f"(no logs: {exc})"
    if isinstance(logs, str) and logs.strip():
        summary += f"; its last log lines:\n{logs.rstrip()}"
    return summary


def serving(name, address, port, timeout=15):
    """Succeed when the container ``name`` accepts a TCP connection on ``address:port`` within ``timeout`` seconds.

    Changes nothing. Under ``test=True`` a container that does not answer yet
    gives ``None`` (it may be created by this very run). On failure the
    comment names the container, its state and its last log lines.
    """
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    deadline = time.monotonic() + float(timeout)
    while True:
        try:
            with socket.create_connection((address, int(port)), timeout=2):
                ret["comment"] = f"{name} accepts connections on {address}:{port}"
                return ret
        except OSError as exc:
            error = exc
        if __opts__["test"] or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = f"{name} does not accept connections on {address}:{port} yet; checked after the run"
        return ret
    ret["result"] = False
    ret["comment"] = (
        f"{name} does not accept connections on {address}:{port} after {timeout} s ({error}); "
        f"{_container_summary(name)}"
    )
    return ret


def _endpoint(address: str, port: int) -> str:
    """``address:port`` as HAProxy's ``show stat`` writes a server's ``addr``."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def in_haproxy(name, backend, address, port, timeout=60, admin_socket=None, master_socket=None):
    """Server ``name`` of ``backend`` sends to ``address:port``, takes new clients and is UP after a check.

    A replica that moved (port or address) is pointed at its new place at run
    time; one left drained (by the drain before its replacement, or by a
    rollout that stopped) is set ready. HAProxy that does not run, or does
    not have the server yet, is not an error: it takes the server from its
    configuration. Changes nothing when all is so already.
    """
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    sockets = {"admin_socket": admin_socket, "master_socket": master_socket}
    try:
        server = __salt__["haproxy_runtime.servers"](backend, **sockets).get(f"{backend}/{name}")
    except CommandExecutionError as exc:
        ret["comment"] = f"No HAProxy answers ({exc}); it takes {name} from its configuration when it starts"
        return ret
    if server is None:
        ret["comment"] = f"HAProxy has no server {backend}/{name} yet; its configuration adds it"
        return ret
    wanted = _endpoint(address, port)
    # Anything but UP needs taking back: DRAIN, MAINT, and DOWN, which is also
    # what a drained server shows until its check passes (the container
    # serves by now: the state before this one made sure).
    drained = server["status"].upper().split(" ")[0] != "UP"
    moved = server["addr"] != wanted
    if not moved and not drained:
        ret["comment"] = f"{backend}/{name} is at {wanted} and takes new clients ({server['status']})"
        return ret
    if moved:
        ret["changes"]["addr"] = {"old": server["addr"], "new": wanted}
    if drained:
        ret["changes"]["status"] = {"old": server["status"], "new": "UP"}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = f"{backend}/{name} would be " + (f"moved to {wanted} and " if moved else "") + "set ready"
        return ret
    try:
        if moved:
            __salt__["haproxy_runtime.set_address"](backend, name, address, port, **sockets)
        __salt__["haproxy_runtime.ready"](backend, name, timeout=timeout, **sockets)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = f"{backend}/{name} is not back in HAProxy: {exc}"
        return ret
    ret["comment"] = f"{backend}/{name} is " + (f"at {wanted}, " if moved else "") + "ready and UP"
    return ret
