"""Keep HAProxy running its config file as the file is now.

A reload triggered only by a change of the file is lost when it fails at run
time (a port another process holds, the open-files limit): the next apply
sees no change and reports success, and HAProxy's next restart crash-loops on
the file. Here the reload follows a record instead.
:py:func:`haproxy_runtime.reload <_modules.haproxy_runtime.reload>` writes
the file's SHA-256 and the master that loaded it once a reload is confirmed;
this state reloads gracefully whenever the file no longer matches that record
or another master answers (a restarted or recreated container: what it loaded
is unknown). A failed reload fails the state with HAProxy's messages and
leaves the record as it was, so the next apply tries again; the old worker
keeps serving meanwhile.

.. code-block:: yaml

    HAProxy reloads gracefully when its config changes:
      haproxy_runtime.config_loaded:
        - name: /etc/mtproxy/haproxy/haproxy.cfg
        - master_socket: /run/mtproxy/haproxy/master.sock
        - admin_socket: /run/mtproxy/haproxy/admin.sock
        - state_file: /run/mtproxy/haproxy/server-state
        - record: /run/mtproxy/haproxy/loaded.json
        - timeout: 30
        - binds: ['0.0.0.0:8443', '127.0.0.1:8404']
        - watch:
          - file: HAProxy config is valid and in place
          - docker_container: HAProxy container is running
"""

from __future__ import annotations

from typing import Any

from salt.exceptions import CommandExecutionError

__virtualname__ = "haproxy_runtime"

# The arguments config_loaded takes, for mod_watch (Salt passes it the whole low chunk).
_ARGS = ("master_socket", "admin_socket", "state_file", "record", "timeout", "binds")


def __virtual__():
    if "haproxy_runtime.loaded" in __salt__:
        return __virtualname__
    return (False, "the haproxy_runtime execution module is not loaded (sync _modules)")


def _short(digest: str | None) -> str | None:
    return f"sha256:{digest[:12]}" if digest else None


def config_loaded(
    name: str,
    master_socket: str | None = None,
    admin_socket: str | None = None,
    state_file: str | None = None,
    record: str | None = None,
    timeout: float = 60,
    binds: list[str] | None = None,
) -> dict[str, Any]:
    """Reload HAProxy gracefully unless it provably runs the config file ``name`` as it is now.

    name
        Host path of the config file HAProxy reads.
    master_socket, admin_socket
        Host paths of HAProxy's master CLI and admin socket.
    state_file
        Host path of the ``server-state-file``: drain and maintenance states
        survive the reload.
    record
        Host path of the record of the last confirmed reload (default:
        ``loaded.json`` next to the master socket).
    timeout
        Seconds to wait for the master to answer (a container just started)
        and for the reload to be confirmed.
    binds
        The ``ADDRESS:PORT`` listeners of the config. When another process
        holds one, the state fails without reloading: a reload that cannot
        bind pauses the running listeners while HAProxy retries.

    Changes are ``{'old': {'config', 'workers'}, 'new': {'config', 'worker'}}``.
    """
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    test = bool(__opts__["test"])
    try:
        # Under test nothing waits: a master that does not answer yet is reported as such.
        now = __salt__["haproxy_runtime.loaded"](
            name, master_socket=master_socket, record=record, timeout=0 if test else timeout
        )
    except CommandExecutionError as exc:
        ret["result"] = None if test else False
        ret["comment"] = f"HAProxy would reload once {name} is readable: {exc}" if test else str(exc)
        return ret
    if now["loaded"] or test:
        return _loaded_or_would_reload(ret, now)
    refusal = _why_not_reload_now(now, timeout, binds or [])
    if refusal:
        ret["result"] = False
        ret["comment"] = refusal
        return ret
    sockets = {"master_socket": master_socket, "admin_socket": admin_socket}
    return _reload(ret, now, sockets, state_file=state_file, timeout=timeout, record=record)


def _loaded_or_would_reload(ret: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """Nothing to do when HAProxy runs the file as it is; else (under test) the reload that would follow."""
    recorded = now["recorded"] or {}
    if now["loaded"]:
        ret["comment"] = (
            f"HAProxy runs {ret['name']} as it is ({_short(now['sha256'])},"
            f" reload confirmed at {recorded.get('loaded_at')})"
        )
        return ret
    ret["result"] = None
    ret["changes"] = {"old": {"config": _short(recorded.get("sha256"))}, "new": {"config": _short(now["sha256"])}}
    ret["comment"] = f"HAProxy would reload gracefully: {now['reason']}"
    return ret


def _why_not_reload_now(now: dict[str, Any], timeout: float, binds: list[str]) -> str | None:
    """Why a reload that is due cannot run now (no master, a listener held by
    another process); None when it can."""
    if now["master"] is None:
        return (
            f"HAProxy does not answer on {now['master_socket']} after {timeout} s: it is not running"
            " or cannot start with this config (see its container's logs); the next apply tries again"
        )
    # A new worker that cannot bind pauses the running one's listeners while it retries: ask first.
    taken = __salt__["haproxy_runtime.bind_conflicts"](binds)
    if taken:
        return (
            f"HAProxy must reload ({now['reason']}), but another process holds {', '.join(taken)}: not reloaded;"
            " the old worker keeps serving the config it had, and the next apply tries again"
        )
    return None


def _reload(
    ret: dict[str, Any],
    now: dict[str, Any],
    sockets: dict[str, str | None],
    state_file: str | None,
    timeout: float,
    record: str | None,
) -> dict[str, Any]:
    """Reload gracefully and fill ``ret`` with the outcome: the old and the new worker, or HAProxy's messages."""
    name, reason = ret["name"], now["reason"]
    try:
        done = __salt__["haproxy_runtime.reload"](
            **sockets, state_file=state_file, timeout=timeout, config_file=name, record=record
        )
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = (
            f"HAProxy must reload ({reason}), but the reload failed; the old worker keeps serving"
            f" the config it had, and the next apply tries again.\n{exc}"
        )
        return ret
    ret["changes"] = {
        "old": {"config": _short((now["recorded"] or {}).get("sha256")), "workers": done["old_pids"]},
        "new": {"config": _short(now["sha256"]), "worker": done["new_pid"]},
    }
    ret["comment"] = f"HAProxy reloaded gracefully ({reason}); worker {done['new_pid']} takes new connections"
    if not done["record"]:
        ret["comment"] += f"; {name} changed during the reload: the next apply reloads again"
    if done["messages"]:
        ret["comment"] += f"\n{done['messages']}"
    return ret


def mod_watch(name: str, sfun: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Salt calls this when a watched state changed (the config file, the
    container) and :py:func:`config_loaded` found nothing to do. In a real
    run that verdict stands: the file is what HAProxy loaded. Under test the
    watched change has not happened yet, so a reload may follow it."""
    if __opts__["test"]:
        return {
            "name": name,
            "changes": {},
            "result": None,
            "comment": "A watched state changes in this run: HAProxy reloads then unless it runs the file as it is",
        }
    return config_loaded(name, **{key: kwargs[key] for key in _ARGS if key in kwargs})
