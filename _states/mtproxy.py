"""Checks of an MTProxy cell that the docker_container states cannot make.

``docker_container.running`` only sees the container state at one instant: a
replica that exits at once (its port taken, a broken config) and is restarted
by its restart policy again and again often looks ``running`` then. This
state asks the replica itself: does it accept TCP connections on its port?

.. code-block:: yaml

    Replica mtproxy_1 accepts connections on port 4431:
      mtproxy.replica_serving:
        - name: mtproxy_1
        - address: 192.0.2.10
        - port: 4431
"""

from __future__ import annotations

import socket
import time

__virtualname__ = "mtproxy"


def __virtual__():
    return __virtualname__


def _container_summary(name: str) -> str:
    try:
        state = __salt__["docker.inspect_container"](name)
    except Exception as exc:  # only for the comment
        return f"container not inspectable: {exc}"
    return f"container status {state['State'].get('Status')!r}, restarted {state.get('RestartCount', 0)} times"


def replica_serving(name, address, port, timeout=15):
    """Succeed when the replica ``name`` accepts a TCP connection on ``address:port`` within ``timeout`` seconds.

    Changes nothing. Under ``test=True`` a replica that does not answer yet
    gives ``None`` (it may be created by this very run).
    """
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    deadline = time.monotonic() + float(timeout)
    while True:
        try:
            with socket.create_connection((address, int(port)), timeout=2):
                ret["comment"] = f"Replica {name} accepts connections on {address}:{port}"
                return ret
        except OSError as exc:
            error = exc
        if __opts__["test"] or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = f"Replica {name} does not accept connections on {address}:{port} yet; checked after the run"
        return ret
    ret["result"] = False
    ret["comment"] = (
        f"Replica {name} does not accept connections on {address}:{port} after {timeout} s ({error}); "
        f"{_container_summary(name)}. See `docker logs {name}`."
    )
    return ret
