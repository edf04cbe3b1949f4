"""Declare the return path HAProxy's ``usesrc clientip`` needs (transparent proxying).

The kernel-facing work lives in the ``tproxy`` execution module; this state
only maps it onto the state contract.

.. code-block:: yaml

    Replies of the MTProxy replicas return to HAProxy:
      tproxy.present:
        - name: mtproxy
        - ports: [4431, 4432]
        - method: mark        # or sport (no iptables at all)
        - mark: 1
        - table: 100
        - family: ipv4        # ipv6 | both

    MTProxy return path is gone:
      tproxy.absent:
        - name: mtproxy
        - table: 100
"""

from __future__ import annotations

try:
    import pyroute2  # noqa: F401 (only probed: the execution module does the work)

    HAS_PYROUTE2 = True
except ImportError:
    HAS_PYROUTE2 = False

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "tproxy"


def __virtual__():
    if not HAS_PYROUTE2:
        return (False, "The tproxy state needs the pyroute2 Python library")
    if "tproxy.ensure" not in __salt__:
        return (False, "The tproxy execution module could not be loaded")
    return __virtualname__


def _summary(changes: dict, verb_done: str, verb_test: str, test: bool) -> str:
    counts = ", ".join(f"{len(v)} {'to be ' if test else ''}{k}" for k, v in changes.items())
    return f"{verb_test if test else verb_done} ({counts})"


def _converge(ret: dict, what: str, function: str, words: tuple[str, str, str], name, **kwargs) -> dict:
    """Call ``function`` (ensure or remove) and fill the state return.

    ``words``: what failing to do it is called, the comment when nothing was
    needed, and the past participle for the change.
    """
    failing, nothing, done = words
    test = bool(__opts__["test"])
    try:
        changes = __salt__[function](name, test=test, **kwargs)
    except (SaltInvocationError, TypeError) as exc:  # TypeError: an argument the function does not take
        ret["comment"] = f"Invalid arguments: {exc}"
        return ret
    except CommandExecutionError as exc:
        ret["changes"] = exc.info or {}
        ret["comment"] = f"{what} could not be {failing}: {exc.error}"
        return ret
    if not changes:
        ret["result"] = True
        ret["comment"] = f"{what} is {nothing}"
        return ret
    ret["changes"] = changes
    ret["result"] = None if test else True
    ret["comment"] = _summary(changes, f"{what} was {done}", f"{what} would be {done}", test)
    return ret


def _what(name, options: dict) -> str:
    """``Return path 'NAME' (method M, table T, FAMILY)``, with the options given."""
    shown = [f"{key} {options[key]}" for key in ("method", "table") if key in options]
    shown += [options["family"]] if "family" in options else []
    return f"Return path {name!r}" + (f" ({', '.join(shown)})" if shown else "")


def present(name, ports, **options):
    """Ensure replies from the replica ``ports`` are routed back to the local transparent proxy.

    The options and their defaults are those of the ``tproxy.ensure``
    execution function, defined there once:

    name
        Names this return path: it goes into the comment of our mangle rules.

    ports
        The replicas' TCP ports (1-65535).

    method (default ``mark``)
        ``mark``: ``ip rule fwmark MARK lookup TABLE`` plus mangle OUTPUT rules
        marking the replicas' source ports. ``sport``: one
        ``ip rule ipproto tcp sport FIRST-LAST lookup TABLE`` per contiguous
        port range, no iptables; also works for replicas at 127.0.0.1.

    mark, table, priority (default 1, 100, 100)
        Firewall mark (method mark), routing table (holding
        ``local 0.0.0.0/0 dev lo``) and priority of our ip rules (1-32765).

    family (default ``ipv4``)
        ``ipv4``, ``ipv6`` or ``both``.

    tag (default 201)
        Routing protocol number set on our rules and routes: how ``absent``
        tells them from foreign ones.

    iptables, ip6tables
        The binaries (name or path) used for the mangle rules.

    ``changes`` lists the rule strings ``added`` and ``removed``; when the
    port set, the table or the mark changes the new rules are added before
    the old ones go (ours are found by ``tag`` in every table, so a new
    ``table`` leaves nothing of ours in the old one).

    Fails, changing nothing, when rules or routes that are not ours use
    ``table`` or (method mark) ``mark``: a foreign default route in the
    table, ``ip rule fwmark MARK lookup OTHER``, a mangle rule setting the
    mark. The comment names each of them (``tproxy.foreign`` lists them too).
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    words = ("put in place", "already in place", "updated")
    return _converge(ret, _what(name, options), "tproxy.ensure", words, name, ports=ports, **options)


def absent(name, **options):
    """Ensure nothing ``present`` created for ``name`` is left.

    Removes our ip rules and routes (carrying protocol ``tag``, in any table:
    ``table`` is only checked, so a table changed since ``present`` leaves
    nothing behind) and the mangle rules whose comment names ``name``;
    foreign rules, routes and mangle rules stay. The options (``table``,
    ``family``, default ``both``, ``tag``, ``iptables``, ``ip6tables``) and
    their defaults are those of the ``tproxy.remove`` execution function.
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    words = ("removed", "already absent", "removed")
    return _converge(ret, _what(name, options), "tproxy.remove", words, name, **options)
