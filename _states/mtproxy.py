"""Checks of an MTProxy cell that the docker_container states cannot make.

``docker_container.running`` only sees the container state at one instant: a
container that exits at once (its port taken, a broken config, a bad image)
and is restarted by its restart policy again and again often looks
``running`` then. This state asks the service itself: does it accept TCP
connections on its port? When it does not, the comment names the container
and shows its last log lines.

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
