"""Return path for transparent proxying: policy routing and mangle rules.

HAProxy's ``source 0.0.0.0 usesrc clientip`` connects to a local replica with
the client's address as source; the replica's replies must be routed back to
HAProxy's transparent socket instead of leaving the host. This module keeps
that kernel state (see DESIGN.md §2), for the ``tproxy`` state and for
anything that must restore it later (a watchdog, a boot unit):

- always the route ``local 0.0.0.0/0 dev lo table TABLE`` (``::/0`` for IPv6);
- method ``mark``: ``ip rule fwmark MARK lookup TABLE`` and mangle OUTPUT rules
  ``-p tcp -m multiport --sports PORTS -j MARK --set-mark MARK``;
- method ``sport``: ``ip rule ipproto tcp sport FIRST-LAST lookup TABLE``, one
  per contiguous port range, no iptables at all.

Ownership: rules and routes are ours when their routing protocol field is
``tag`` (default 201) and they point at ``table``; mangle rules are ours when
their comment is ``mtproxy-formula tproxy: NAME``. Nothing else is touched,
so one ``tproxy`` state per table.

CLI examples::

    salt-call tproxy.check cell ports=[4431,4432]
    salt-call tproxy.ensure cell ports=[4431,4432] method=sport
    salt-call tproxy.remove cell

The file also runs as a script, without Salt (pyroute2 needed), so that a boot
unit restores exactly what the ``tproxy.present`` state would; the JSON file
holds the state's arguments (name, ports, method, mark, table, family)::

    python3 tproxy.py ensure --config /etc/mtproxy/return-path.json
    python3 tproxy.py check --config /etc/mtproxy/return-path.json

``watch`` is the watchdog unit's loop: every ``--interval`` seconds ``check``,
and when something is missing ``ensure`` (additions only: stale items are
reported, and left to the state, whose newer arguments the file may lag
behind), one log line per repair and a JSON status file (``--status``)::

    python3 tproxy.py watch --config /etc/mtproxy/return-path.json --interval 3 \\
        --status /run/mtproxy/return-path.status
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from typing import NamedTuple

try:
    from salt.exceptions import CommandExecutionError, SaltInvocationError
except ImportError:  # run as a script (the boot unit): no Salt needed

    class CommandExecutionError(Exception):  # type: ignore[no-redef]
        def __init__(self, message="", info=None):
            super().__init__(message)
            self.error = message
            self.info = info

    class SaltInvocationError(Exception):  # type: ignore[no-redef]
        pass


try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    HAS_PYROUTE2 = True
except ImportError:
    HAS_PYROUTE2 = False

log = logging.getLogger(__name__)

__virtualname__ = "tproxy"
# What Salt exposes as tproxy.*: the pure helpers below stay importable for tests only.
__load__ = ["check", "ensure", "remove"]

DEFAULT_TAG = 201  # routing protocol number that marks our rules and routes
COMMENT_PREFIX = "mtproxy-formula tproxy: "
METHODS = ("mark", "sport")
FAMILIES = {"ipv4": ("ipv4",), "ipv6": ("ipv6",), "both": ("ipv4", "ipv6")}
ALL_FAMILIES = ("ipv4", "ipv6")
AF = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
# xt_multiport holds 15 port slots; a range a:b takes two of them.
MULTIPORT_SLOTS = 15
RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
RESERVED_TAGS = range(5)  # unspec, redirect, kernel, boot, static
MAX_PRIORITY = 32765  # below the main table's 32766
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
FR_ACT_TO_TBL = 1
IPPROTO_TCP = 6
FULL_MASK = 0xFFFFFFFF
FRA_SPORT_MASK = 28
# Bounds one iptables call (it waits for the xtables lock with -w): a watchdog
# iteration never hangs on a stuck firewall tool.
IPTABLES_TIMEOUT = 30
EEXIST = 17
# Rule attributes our rules carry (or the kernel adds with neutral values).
KNOWN_RULE_ATTRS = {
    "FRA_TABLE",
    "FRA_PRIORITY",
    "FRA_PROTOCOL",
    "FRA_FWMARK",
    "FRA_FWMASK",
    "FRA_IP_PROTO",
    "FRA_SPORT_RANGE",
    "FRA_SUPPRESS_PREFIXLEN",
    "FRA_SUPPRESS_IFGROUP",
}


def __virtual__():
    if not HAS_PYROUTE2:
        return (False, "The tproxy module needs the pyroute2 Python library")
    return __virtualname__


# -- what the kernel state is made of -----------------------------------------


class Route(NamedTuple):
    """``local <any> dev lo table TABLE``, tagged with our protocol number."""

    family: str
    table: int
    tag: int


class Rule(NamedTuple):
    """An ip rule to TABLE, selecting by fwmark or by TCP source port range."""

    family: str
    priority: int
    table: int
    tag: int
    fwmark: int | None = None
    sport: tuple[int, int] | None = None
    # Selectors we never set (a tagged rule edited by hand): never desired.
    extra: str = ""


class Mangle(NamedTuple):
    """A mangle OUTPUT rule, as the tokens ``iptables -S`` prints after ``-A OUTPUT``."""

    family: str
    tokens: tuple[str, ...]


Item = Route | Rule | Mangle


class Spec(NamedTuple):
    """Validated arguments of ``ensure``/``check``."""

    name: str
    ports: tuple[int, ...]
    method: str
    mark: int
    table: int
    families: tuple[str, ...]
    priority: int
    tag: int
    binaries: dict[str, str]


# -- pure logic ------------------------------------------------------------


def port_ranges(ports: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted, deduplicated ports as contiguous ranges: [4431, 4432, 4440] -> [(4431, 4432), (4440, 4440)]."""
    ranges: list[tuple[int, int]] = []
    for port in sorted(set(ports)):
        if ranges and port == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], port)
        else:
            ranges.append((port, port))
    return ranges


def multiport_groups(ranges: list[tuple[int, int]], slots: int = MULTIPORT_SLOTS) -> list[list[tuple[int, int]]]:
    """Split ranges into groups that each fit one ``-m multiport`` match."""
    groups: list[list[tuple[int, int]]] = []
    used = slots
    for first, last in ranges:
        cost = 1 if first == last else 2
        if used + cost > slots:
            groups.append([])
            used = 0
        groups[-1].append((first, last))
        used += cost
    return groups


def multiport_arg(group: list[tuple[int, int]]) -> str:
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in group)


def comment_for(name: str) -> str:
    return COMMENT_PREFIX + name


def mangle_tokens(group: list[tuple[int, int]], mark: int, comment: str) -> tuple[str, ...]:
    # Exactly as `iptables -S` prints it back, so reading and wanting compare equal.
    return (
        "-p",
        "tcp",
        "-m",
        "multiport",
        "--sports",
        multiport_arg(group),
        "-m",
        "comment",
        "--comment",
        comment,
        "-j",
        "MARK",
        "--set-xmark",
        f"{mark:#x}/{FULL_MASK:#x}",
    )


def _int_arg(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise SaltInvocationError(f"{what} must be a number from {low} to {high}, not {value!r}")
    try:
        # Marks are often written in hex (0x1), ports and tables in decimal.
        number = int(value, 16) if isinstance(value, str) and value.lower().startswith("0x") else int(value)
    except (TypeError, ValueError):
        raise SaltInvocationError(f"{what} must be a number from {low} to {high}, not {value!r}") from None
    if not low <= number <= high:
        raise SaltInvocationError(f"{what} must be from {low} to {high}, not {number}")
    return number


def _name_arg(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise SaltInvocationError("Name must be a non-empty string")
    # The name goes into an iptables comment (at most 256 bytes, printed quoted by -S).
    if len(name.encode()) > 200 or not name.isprintable() or any(c in name for c in "\"'\\"):
        raise SaltInvocationError(
            f"Name {name!r} cannot be used in an iptables comment: "
            "use at most 200 printable characters without quotes or backslashes"
        )
    return name


def _family_arg(family) -> tuple[str, ...]:
    if family not in FAMILIES:
        raise SaltInvocationError(f"Unknown family {family!r}: use one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _tag_arg(tag) -> int:
    tag = _int_arg(tag, "Tag (routing protocol number)", 0, 255)
    if tag in RESERVED_TAGS:
        raise SaltInvocationError(f"Tag {tag} is a routing protocol number the kernel uses: pick one from 5 to 255")
    return tag


def _table_arg(table) -> int:
    table = _int_arg(table, "Table", 1, FULL_MASK)
    if table in RESERVED_TABLES:
        raise SaltInvocationError(f"Table {table} is the kernel's {RESERVED_TABLES[table]} table: pick another one")
    return table


def validate(
    name,
    ports,
    method="mark",
    mark=1,
    table=100,
    family="ipv4",
    priority=100,
    tag=DEFAULT_TAG,
    iptables="iptables",
    ip6tables="ip6tables",
) -> Spec:
    """Check and normalise the arguments; raise SaltInvocationError naming what is wrong."""
    name = _name_arg(name)
    if isinstance(ports, (int, str)) and not isinstance(ports, bool):
        ports = [ports]
    if not ports:
        raise SaltInvocationError("No ports given: ports must list at least one replica port")
    if not isinstance(ports, (list, tuple, set)):
        raise SaltInvocationError(f"Ports must be a list of port numbers, not {ports!r}")
    numbers = tuple(sorted({_int_arg(p, "Port", 1, 65535) for p in ports}))
    if method not in METHODS:
        raise SaltInvocationError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}")
    return Spec(
        name=name,
        ports=numbers,
        method=method,
        mark=_int_arg(mark, "Mark", 1, FULL_MASK),
        table=_table_arg(table),
        families=_family_arg(family),
        priority=_int_arg(priority, "Priority", 1, MAX_PRIORITY),
        tag=_tag_arg(tag),
        binaries={"ipv4": iptables, "ipv6": ip6tables},
    )


def desired(spec: Spec) -> list[Item]:
    """Everything the kernel must hold for ``spec``."""
    items: list[Item] = []
    ranges = port_ranges(spec.ports)
    for family in spec.families:
        items.append(Route(family, spec.table, spec.tag))
        if spec.method == "mark":
            items.append(Rule(family, spec.priority, spec.table, spec.tag, fwmark=spec.mark))
            comment = comment_for(spec.name)
            items += [Mangle(family, mangle_tokens(g, spec.mark, comment)) for g in multiport_groups(ranges)]
        else:
            items += [Rule(family, spec.priority, spec.table, spec.tag, sport=r) for r in ranges]
    return items


def _kind_order(item: Item) -> int:
    return {Route: 0, Rule: 1, Mangle: 2}[type(item)]


def diff(
    want: list[Item], have: list[Item], satisfied: frozenset[Item] | set[Item] = frozenset()
) -> tuple[list[Item], list[Item]]:
    """(to add, to remove): what ``want`` lacks in ``have``, and what of ours is not wanted.

    ``satisfied`` holds wanted items that exist but are not ours (a route the
    operator added by hand): neither added nor removed. Additions come in
    dependency order (route, rules, mangle); removals in the reverse.
    """
    left = list(have)
    add = []
    for item in want:
        if item in left:
            left.remove(item)  # one copy; duplicates of ours are removed below
        elif item not in satisfied:
            add.append(item)
    add.sort(key=_kind_order)
    left.sort(key=_kind_order, reverse=True)
    return add, left


def describe(item: Item) -> str:
    """A human-readable rule string for ``changes`` and comments."""
    if isinstance(item, Route):
        dst = "0.0.0.0/0" if item.family == "ipv4" else "::/0"
        ip = "ip" if item.family == "ipv4" else "ip -6"
        return f"{ip} route local {dst} dev lo table {item.table} proto {item.tag}"
    if isinstance(item, Rule):
        ip = "ip rule" if item.family == "ipv4" else "ip -6 rule"
        selector = [ip, f"pref {item.priority}"]
        if item.fwmark is not None:
            selector.append(f"fwmark {item.fwmark:#x}")
        if item.sport is not None:
            first, last = item.sport
            selector.append(f"ipproto tcp sport {first}" if first == last else f"ipproto tcp sport {first}-{last}")
        if item.extra:
            selector.append(item.extra)
        return " ".join([*selector, f"lookup {item.table} proto {item.tag}"])
    tool = "iptables" if item.family == "ipv4" else "ip6tables"
    return f"{tool} -t mangle -A OUTPUT {shlex.join(item.tokens)}"


def parse_mangle(lines: str, family: str, comment: str) -> list[Mangle]:
    """Our rules from ``iptables -t mangle -S OUTPUT`` output: those carrying exactly ``comment``."""
    found = []
    for line in lines.splitlines():
        if not line.startswith("-A OUTPUT "):
            continue
        tokens = shlex.split(line)[2:]
        marks = [tokens[i + 1] for i, tok in enumerate(tokens[:-1]) if tok == "--comment"]
        if comment in marks:
            found.append(Mangle(family, tuple(tokens)))
    return found


# -- kernel side ---------------------------------------------------------------


def _netlink_error(exc: Exception, action: str) -> str:
    code = getattr(exc, "code", None)
    if code in (1, 13):  # EPERM, EACCES
        return (
            f"No permission to {action} through netlink ({exc}): "
            "the tproxy state must run as root or with CAP_NET_ADMIN"
        )
    return f"Netlink refused to {action}: {exc}"


def _binary(spec_binaries: dict[str, str], family: str) -> str | None:
    return shutil.which(spec_binaries[family])


def _iptables(binary: str, *args: str) -> str:
    try:
        proc = subprocess.run(
            [binary, "-w", "-t", "mangle", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=IPTABLES_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandExecutionError(
            f"{binary} -t mangle {shlex.join(args)} did not finish within {IPTABLES_TIMEOUT} s"
        ) from exc
    if proc.returncode != 0:
        raise CommandExecutionError(
            f"{binary} -t mangle {shlex.join(args)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def _read(
    ipr,
    table: int,
    tag: int,
    comment: str,
    binaries: dict[str, str],
    wanted: tuple[str, ...],
    need_iptables: bool,
    iptables_fatal: bool,
) -> tuple[list[Item], set[Item]]:
    """Our items in the kernel (both families), and the wanted routes present but not ours.

    Families outside ``wanted`` are only swept for leftovers of ours: if they
    cannot be read (IPv6 disabled, no ip6tables) they count as empty. Within
    ``wanted``, a missing iptables binary is an error only if ``need_iptables``
    and a failing one only if ``iptables_fatal`` (method sport works without).
    """
    have: list[Item] = []
    satisfied: set[Item] = set()
    for family in ALL_FAMILIES:
        try:
            rules = ipr.get_rules(family=AF[family])
            routes = ipr.get_routes(family=AF[family], table=table)
            lo = ipr.link_lookup(ifname="lo")
        except NetlinkError as exc:
            if family in wanted:
                raise CommandExecutionError(_netlink_error(exc, f"read the {family} rules and routes")) from exc
            continue
        for msg in rules:
            if msg.get_attr("FRA_PROTOCOL") != tag or (msg.get_attr("FRA_TABLE") or msg["table"]) != table:
                continue
            have.append(_rule_from(msg, family, table, tag))
        for msg in routes:
            if (msg.get_attr("RTA_TABLE") or msg["table"]) != table or msg["type"] != RTN_LOCAL or msg["dst_len"]:
                continue
            if msg["proto"] == tag:
                have.append(Route(family, table, tag))
            elif msg.get_attr("RTA_OIF") in lo:
                satisfied.add(Route(family, table, tag))
        binary = _binary(binaries, family)
        if binary is None:
            if need_iptables and family in wanted:
                raise CommandExecutionError(
                    f"The {binaries[family]} binary was not found: install iptables (method mark needs it) "
                    "or use method sport"
                )
            continue
        try:
            have += parse_mangle(_iptables(binary, "-S", "OUTPUT"), family, comment)
        except CommandExecutionError:
            if iptables_fatal and family in wanted:
                raise
            log.warning("tproxy: cannot read the %s mangle table, skipped", family, exc_info=True)
    return have, satisfied


def _rule_from(msg, family: str, table: int, tag: int) -> Rule:
    attrs = dict(msg["attrs"])
    fwmark = attrs.get("FRA_FWMARK")
    sport = None
    if "FRA_SPORT_RANGE" in attrs:
        first, last = (int(x) for x in str(attrs["FRA_SPORT_RANGE"]).split(":"))
        sport = (first, last)
    extra = [f"{k}={v}" for k, v in attrs.items() if k not in KNOWN_RULE_ATTRS and k != "UNKNOWN"]
    # Attributes pyroute2 cannot decode come as UNKNOWN; FRA_SPORT_MASK (28) is
    # one, added by newer kernels to a single-port sport rule: neutral for us.
    unknown = [v["header"]["type"] for k, v in msg["attrs"] if k == "UNKNOWN"]
    extra += [f"attr{t}" for t in unknown if t != FRA_SPORT_MASK]
    extra += [f"{k}={msg[k]}" for k in ("src_len", "dst_len", "tos", "flags") if msg[k]]
    if msg["action"] != FR_ACT_TO_TBL:
        extra.append(f"action={msg['action']}")
    if fwmark is not None and attrs.get("FRA_FWMASK", FULL_MASK) != FULL_MASK:
        extra.append(f"fwmask={attrs['FRA_FWMASK']:#x}")
    ip_proto = attrs.get("FRA_IP_PROTO")
    if (sport is None and ip_proto) or (sport is not None and ip_proto != IPPROTO_TCP):
        extra.append(f"ipproto={ip_proto}")
    for key in ("FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP"):
        if attrs.get(key, FULL_MASK) != FULL_MASK:
            extra.append(f"{key}={attrs[key]}")
    # pyroute2 reports the kernel's priority 0 as None.
    priority = attrs.get("FRA_PRIORITY") or 0
    return Rule(family, priority, table, tag, fwmark=fwmark, sport=sport, extra=" ".join(sorted(extra)))


def _netlink_args(item: Route | Rule, lo: int) -> dict:
    if isinstance(item, Route):
        args = {"family": AF[item.family], "type": "local", "table": item.table, "proto": item.tag, "oif": lo}
        if item.family == "ipv4":
            return {**args, "dst": "0.0.0.0/0", "scope": RT_SCOPE_HOST}
        return {**args, "dst": "::", "dst_len": 0}
    args = {"family": AF[item.family], "priority": item.priority, "table": item.table, "protocol": item.tag}
    if item.fwmark is not None:
        # No fwmask: the kernel then matches the whole mark (like `ip rule`), and a
        # delete does not compare masks, so it also finds a hand-edited rule of ours.
        args["fwmark"] = item.fwmark
    if item.sport is not None:
        args.update(ip_proto=IPPROTO_TCP, sport_range=f"{item.sport[0]}:{item.sport[1]}")
    return args


def _change(ipr, verb: str, item: Item, binaries: dict[str, str]) -> None:
    if isinstance(item, Mangle):
        binary = _binary(binaries, item.family)
        if binary is None:
            raise CommandExecutionError(f"The {binaries[item.family]} binary was not found: install iptables")
        _iptables(binary, "-A" if verb == "add" else "-D", "OUTPUT", *item.tokens)
        return
    lo = ipr.link_lookup(ifname="lo")[0]
    call = ipr.route if isinstance(item, Route) else ipr.rule
    try:
        call(verb, **_netlink_args(item, lo))
    except NetlinkError as exc:
        if verb == "add" and getattr(exc, "code", None) == EEXIST:
            return  # added meanwhile by the watchdog or the state: the kernel holds it
        raise CommandExecutionError(_netlink_error(exc, f"{verb} `{describe(item)}`")) from exc


def _apply(
    ipr, add: list[Item], remove: list[Item], binaries: dict[str, str], test: bool = False
) -> dict[str, list[str]]:
    """Add first, then remove: no current replica port is ever without a return path.
    With ``test``, only say what would be done. Returns the non-empty of ``added``/``removed``."""
    done: dict[str, list[str]] = {"added": [], "removed": []}
    for verb, items, key in (("add", add, "added"), ("delete", remove, "removed")):
        for item in items:
            if not test:
                try:
                    _change(ipr, verb, item, binaries)
                except CommandExecutionError as exc:
                    raise CommandExecutionError(exc.error, info=_changes(done)) from exc
                log.info("tproxy: %s %s", key, describe(item))
            done[key].append(describe(item))
    return _changes(done)


def _changes(done: dict[str, list[str]]) -> dict[str, list[str]]:
    return {key: value for key, value in done.items() if value}


def _plan(ipr, spec: Spec) -> tuple[list[Item], list[Item]]:
    mark = spec.method == "mark"
    have, satisfied = _read(ipr, spec.table, spec.tag, comment_for(spec.name), spec.binaries, spec.families, mark, mark)
    return diff(desired(spec), have, satisfied)


# -- public functions ------------------------------------------------------------


def check(
    name,
    ports,
    method="mark",
    mark=1,
    table=100,
    family="ipv4",
    priority=100,
    tag=DEFAULT_TAG,
    iptables="iptables",
    ip6tables="ip6tables",
):
    """Report what is missing or stale, changing nothing.

    Returns ``{"ok": bool, "missing": [rule strings], "stale": [rule strings]}``.

    CLI example::

        salt-call tproxy.check cell ports=[4431,4432]
    """
    spec = validate(name, ports, method, mark, table, family, priority, tag, iptables, ip6tables)
    with IPRoute() as ipr:
        to_add, to_remove = _plan(ipr, spec)
    return {
        "ok": not (to_add or to_remove),
        "missing": [describe(i) for i in to_add],
        "stale": [describe(i) for i in to_remove],
    }


def ensure(
    name,
    ports,
    method="mark",
    mark=1,
    table=100,
    family="ipv4",
    priority=100,
    tag=DEFAULT_TAG,
    iptables="iptables",
    ip6tables="ip6tables",
    test=False,
    keep_stale=False,
):
    """Make the kernel hold exactly the rules for ``ports``: add what is missing, then remove what is stale.

    Returns ``{"added": [...], "removed": [...]}`` (keys only when not empty; with
    ``test`` what would be done, nothing is changed; with ``keep_stale`` only
    what is missing is added, as the watchdog does). Raises
    SaltInvocationError for bad arguments and CommandExecutionError when the
    kernel refuses (its ``info`` holds what was already done).

    CLI example::

        salt-call tproxy.ensure cell ports=[4431,4432,4433,4434] method=sport
    """
    spec = validate(name, ports, method, mark, table, family, priority, tag, iptables, ip6tables)
    with IPRoute() as ipr:
        to_add, to_remove = _plan(ipr, spec)
        return _apply(ipr, to_add, [] if keep_stale else to_remove, spec.binaries, test)


def remove(name, table=100, family="both", tag=DEFAULT_TAG, iptables="iptables", ip6tables="ip6tables", test=False):
    """Remove what ``ensure`` created for ``name``: our rules and route in ``table``, our mangle rules.

    Returns ``{"removed": [...]}`` (empty dict when there was nothing).

    CLI example::

        salt-call tproxy.remove cell
    """
    name = _name_arg(name)
    families = _family_arg(family)
    table, tag = _table_arg(table), _tag_arg(tag)
    binaries = {"ipv4": iptables, "ipv6": ip6tables}
    with IPRoute() as ipr:
        have, _ = _read(ipr, table, tag, comment_for(name), binaries, families, False, True)
        _, stale = diff([], [item for item in have if item.family in families])
        return _apply(ipr, [], stale, binaries, test)


# -- boot unit and watchdog entry point --------------------------------------------


def _load_config(path: str) -> dict:
    with open(path) as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise SaltInvocationError(f"{path} must hold a JSON object")
    return config


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _write_status(path: str, status: dict) -> None:
    """Write ``status`` as JSON to ``path`` atomically (a reader sees the old or the new file)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".return-path.", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(status, handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def watch_once(config_path: str, status: dict) -> dict:
    """One watchdog iteration: ``check``; if something is missing, ``ensure`` (additions only).

    Updates and returns ``status`` (ok, missing, stale, error, last_check, and on
    a repair last_repair and repaired). Bounded work: one read of the kernel
    state, at most one ``ensure``.
    """
    status["last_check"] = _now()
    try:
        config = _load_config(config_path)
        result = check(**config)
        if result["missing"]:
            done = ensure(**config, keep_stale=True)
            repaired = done.get("added", [])
            status.update(last_repair=_now(), repaired=repaired)
            print(f"tproxy watch: restored {len(repaired)}: {'; '.join(repaired)}", flush=True)
            result = check(**config)
        status.update(ok=result["ok"], missing=result["missing"], stale=result["stale"], error=None)
    except (OSError, ValueError, TypeError, SaltInvocationError, CommandExecutionError) as exc:
        if status.get("error") != str(exc):  # one line per new error, not one per interval
            print(f"tproxy watch: {exc}", file=sys.stderr, flush=True)
        status.update(ok=False, error=str(exc))
    return status


def watch(config_path: str, interval: float, status_path: str | None, stop: threading.Event) -> int:
    """Run :func:`watch_once` every ``interval`` seconds until ``stop`` is set."""
    status: dict = {"ok": None, "last_check": None, "last_repair": None, "repaired": [], "error": None}
    print(f"tproxy watch: checking {config_path} every {interval:g} s", flush=True)
    while not stop.is_set():
        watch_once(config_path, status)
        if status_path:
            try:
                _write_status(status_path, {**status, "pid": os.getpid(), "interval": interval})
            except OSError as exc:
                print(f"tproxy watch: cannot write {status_path}: {exc}", file=sys.stderr, flush=True)
        stop.wait(interval)
    print("tproxy watch: stopped", flush=True)
    return 0


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check, restore or watch the return-path rules described by a JSON file "
        "(the tproxy.present arguments)."
    )
    parser.add_argument("action", choices=("ensure", "check", "watch"))
    parser.add_argument("--config", required=True, help="JSON file: name, ports, method, mark, table, family")
    parser.add_argument("--interval", type=float, default=3.0, help="watch: seconds between checks")
    parser.add_argument("--status", help="watch: JSON status file, rewritten after every check")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not HAS_PYROUTE2:
        print("tproxy: the pyroute2 Python library is missing", file=sys.stderr)
        return 2
    if args.action == "watch":
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        return watch(args.config, args.interval, args.status, stop)
    try:
        config = _load_config(args.config)
        result = (ensure if args.action == "ensure" else check)(**config)
    except (OSError, ValueError, TypeError, SaltInvocationError, CommandExecutionError) as exc:
        print(f"tproxy {args.action}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 1 if args.action == "check" and not result["ok"] else 0


if __name__ == "__main__":
    sys.exit(_main())
