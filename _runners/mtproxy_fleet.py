"""
Fleet checks for mtproxy-formula, run on the Salt master.

The orchestration ``mtproxy.orchestrate.rolling`` uses them to roll a change
across the cells one host at a time:

.. code-block:: bash

    salt-run mtproxy_fleet.targets                 # the minions with an mtproxy pillar
    salt-run mtproxy_fleet.wait_serving cell-1     # wait until cell-1's cell serves

The master finds this module through ``runner_dirs`` (see
examples/master.conf) or after ``salt-run saltutil.sync_runners``.
"""

from __future__ import annotations

import socket
import time
import urllib.parse
from typing import Any

import salt.client

__virtualname__ = "mtproxy_fleet"


def __virtual__():
    return __virtualname__


def _cmd(minion: str, fun: str, timeout: float = 60, **kwargs: Any) -> tuple[bool, Any]:
    """Run ``fun`` with ``kwargs`` on one minion: (True, its return) or (False, why not)."""
    with salt.client.get_local_client(__opts__["conf_file"]) as client:
        returns = client.cmd(minion, fun, kwarg=kwargs, timeout=timeout, full_return=True)
    if minion not in returns:
        return False, f"{minion} did not answer {fun} within {timeout} s"
    answer = returns[minion]
    if answer.get("retcode") or answer.get("failed"):
        return False, f"{fun} on {minion} failed: {answer.get('ret')}"
    return True, answer.get("ret")


def targets(tgt: str = "*", tgt_type: str = "glob", timeout: float = 30) -> list[str]:
    """
    The minions matching ``tgt`` that have an ``mtproxy`` pillar, sorted by id.
    Only minions that answer within ``timeout`` seconds are listed: to be sure
    every host is rolled, give the orchestration its targets by name.

    CLI Example:

    .. code-block:: bash

        salt-run mtproxy_fleet.targets
        salt-run mtproxy_fleet.targets 'G@role:proxy' tgt_type=compound
    """
    with salt.client.get_local_client(__opts__["conf_file"]) as client:
        # The pillar's key names only: its values (the secret) stay on the minions.
        returns = client.cmd(tgt, "pillar.keys", arg=["mtproxy"], tgt_type=tgt_type, timeout=timeout, full_return=True)
    return sorted(
        minion
        for minion, answer in returns.items()
        if not answer.get("retcode") and isinstance(answer.get("ret"), list) and answer["ret"]
    )


def _frontend(minion: str, address: str | None, port: int | None) -> tuple[str, int]:
    """Where clients reach ``minion``'s cell: its links' server and port (masked
    links: the secret never leaves the minion), unless given."""
    if address and port:
        return address, int(port)
    ok, links = _cmd(minion, "mtproxy.links", masked=True)
    if not ok or not isinstance(links, list) or not links:
        raise RuntimeError(f"no frontend address for {minion}: mtproxy.links said {links}")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(links[0]["tg"]).query)
    return address or query["server"][0], int(port or query["port"][0])


def probe(address: str, port: int, hold: float = 1.0, timeout: float = 5) -> str | None:
    """None when a TCP connection to ``address:port`` is accepted and stays open
    for ``hold`` seconds (a replica took it: MTProxy waits for the client to
    speak), else what went wrong."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.settimeout(hold)
            try:
                data = conn.recv(1)
            except TimeoutError:
                return None
            return None if data else f"{address}:{port} closed the connection within {hold} s"
    except OSError as exc:
        return f"{address}:{port}: {exc}"


def cell_problems(status: Any) -> list[str]:
    """What keeps a cell from serving, from its ``mtproxy.status``: HAProxy not
    running or unreadable, a replica not running or not UP after a real check,
    return-path rules missing."""
    if not isinstance(status, dict):
        return [f"mtproxy.status returned {status!r}"]
    problems = []
    haproxy = status.get("haproxy", {})
    if haproxy.get("container") != "running":
        problems.append(f"HAProxy container is {haproxy.get('container')}")
    if haproxy.get("error"):
        problems.append(f"HAProxy: {haproxy['error']}")
    replicas = status.get("replicas") or []
    if not replicas:
        problems.append("no replica")
    for replica in replicas:
        check = replica.get("check") or ""
        if replica.get("container") != "running" or replica.get("haproxy") != "UP" or not check.startswith("L4OK"):
            problems.append(
                f"{replica['name']}: container {replica.get('container')}, HAProxy {replica.get('haproxy')}"
                f" (check {check or 'none yet'})"
            )
    return_path = status.get("return_path") or {}
    if return_path.get("ok") is False:
        error = f", {return_path['error']}" if return_path.get("error") else ""
        problems.append(f"return path: missing {return_path.get('missing')}{error}")
    return problems


def wait_serving(
    minion: str,
    timeout: float = 180,
    address: str | None = None,
    port: int | None = None,
    connections: int = 3,
    hold: float = 1.0,
    interval: float = 2,
) -> dict:
    """
    Wait until ``minion``'s cell serves: ``mtproxy.status`` on the minion says
    HAProxy runs and every replica runs and is UP after a real check (and the
    return path is complete), and ``connections`` TCP connections from the
    master to the cell's frontend are each accepted and held open for ``hold``
    seconds. The frontend is the cell's public host and frontend port (its
    links), unless ``address``/``port`` are given.

    Returns ``{minion, frontend, serving, waited}``; when the cell does not
    serve within ``timeout`` seconds, also an ``Error`` naming the minion and
    what is wrong, and ``retcode`` 1 (the orchestration's state fails,
    ``salt-run`` exits 1).

    CLI Example:

    .. code-block:: bash

        salt-run mtproxy_fleet.wait_serving cell-1
        salt-run mtproxy_fleet.wait_serving cell-1 address=203.0.113.7 timeout=60
    """
    start = time.monotonic()
    report: dict[str, Any] = {"minion": minion, "serving": False}
    # The minion's own pillar may have changed since it last read it.
    _cmd(minion, "saltutil.refresh_pillar", wait=True)
    problems: list[str] = []
    while True:
        try:
            host, host_port = _frontend(minion, address, port)
            report["frontend"] = f"{host}:{host_port}"
            ok, status = _cmd(minion, "mtproxy.status")
            problems = cell_problems(status) if ok else [str(status)]
            if not problems:
                failures = [probe(host, host_port, hold=hold) for _ in range(connections)]
                problems = [f"from the master: {f}" for f in failures if f]
        except (RuntimeError, KeyError, ValueError) as exc:
            problems = [str(exc)]
        report["waited"] = round(time.monotonic() - start, 1)
        if not problems:
            report["serving"] = True
            return report
        if time.monotonic() - start + interval > timeout:
            break
        time.sleep(interval)
    report["Error"] = f"the cell on {minion} does not serve after {report['waited']} s: " + "; ".join(
        dict.fromkeys(problems)
    )
    # salt-run exits with a returned retcode; the orchestration's state fails on the Error.
    report["retcode"] = __context__["retcode"] = 1
    return report
