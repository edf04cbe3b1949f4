"""Return path for transparent proxying: policy routing and mangle rules.

HAProxy's ``source 0.0.0.0 usesrc clientip`` connects to a local replica with
the client's address as source; the replica's replies must be routed back to
HAProxy's transparent socket instead of leaving the host. This module keeps
that kernel state (see docs/measurements.md §2), for the ``tproxy`` state and for
anything that must restore it later (a watchdog, a boot unit):

- always the route ``local 0.0.0.0/0 dev lo table TABLE`` (``::/0`` for IPv6);
- method ``mark``: ``ip rule fwmark MARK lookup TABLE`` and mangle OUTPUT rules
  ``-p tcp -m multiport --sports PORTS -j MARK --set-mark MARK``;
- method ``sport``: ``ip rule ipproto tcp sport FIRST-LAST lookup TABLE``, one
  per contiguous port range, no iptables at all.

Ownership: rules and routes are ours when their routing protocol field is
``tag`` (default 201), in whatever table they are (so a new ``table`` leaves
nothing of ours in the old one); mangle rules are ours when their comment is
``mtproxy-formula tproxy: NAME``. Nothing else is touched, so one ``tproxy``
state per tag.

Collisions: ``ensure`` refuses a table or mark that something not ours uses
(a rule looking up the table, a route in it, a rule matching the mark, a
mangle rule setting it); ``foreign`` lists those, changing nothing. An add
the kernel answers with EEXIST counts as done only if a re-read finds our
item there.

CLI examples::

    salt-call tproxy.check cell ports=[4431,4432]
    salt-call tproxy.ensure cell ports=[4431,4432] method=sport
    salt-call tproxy.remove cell
    salt-call tproxy.foreign 1 100

The file also runs as a script, without Salt (pyroute2 needed, and
``_utils/mtproxy_common.py`` beside it), so that a boot unit restores exactly
what the ``tproxy.present`` state would; the JSON file holds the state's
arguments (name, ports, method, mark, table, family)::

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
import importlib.util
import inspect
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

# _utils/mtproxy_common.py: on sys.path under Salt's loader, beside this file in config_dir/bin,
# else next to this file's folder (a script in Salt's extension modules or in the formula's tree).
if importlib.util.find_spec("mtproxy_common") is None:
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path += [os.path.join(_HERE, os.pardir, folder) for folder in ("utils", "_utils")]
from mtproxy_common import (
    DEFAULT_TAG,
    FAMILIES,
    METHODS,
    RESERVED_TABLES,
    RETURN_PATH_NAME,
    CommandExecutionError,
    SaltInvocationError,
)

try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    HAS_PYROUTE2 = True
except ImportError:
    HAS_PYROUTE2 = False

log = logging.getLogger(__name__)

__virtualname__ = "tproxy"
# What Salt exposes as tproxy.*: the pure helpers below stay importable for tests only.
__load__ = ["check", "ensure", "foreign", "remove"]

COMMENT_PREFIX = "mtproxy-formula tproxy: "
ALL_FAMILIES = ("ipv4", "ipv6")
AF = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
# xt_multiport holds 15 port slots; a range a:b takes two of them.
MULTIPORT_SLOTS = 15
RESERVED_TAGS = range(5)  # unspec, redirect, kernel, boot, static
MAX_PRIORITY = 32765  # below the main table's 32766
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
FR_ACT_TO_TBL = 1
# What a rule does instead of ``lookup TABLE``, and route types, as `ip` writes them.
RULE_ACTIONS = {2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
ROUTE_TYPES = {2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole", 7: "unreachable"}
ROUTE_TYPES.update({8: "prohibit", 9: "throw", 10: "nat"})
PROTOCOLS = {1: "redirect", 2: "kernel", 3: "boot", 4: "static", 9: "ra", 16: "dhcp"}
# iptables -S options whose value becomes the packet's (or the connection's) mark.
MARK_SETTERS = ("--set-xmark", "--set-mark", "--tproxy-mark")
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


def diff(want: list[Item], have: list[Item]) -> tuple[list[Item], list[Item]]:
    """(to add, to remove): what ``want`` lacks in ``have``, and what of ours is not wanted.

    Additions come in dependency order (route, rules, mangle); removals in the reverse.
    """
    left = list(have)
    add = []
    for item in want:
        if item in left:
            left.remove(item)  # one copy; duplicates of ours are removed below
        else:
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
        if comment in _comments(tokens):
            found.append(Mangle(family, tuple(tokens)))
    return found


def _comments(tokens: list[str]) -> list[str]:
    return [tokens[i + 1] for i, tok in enumerate(tokens[:-1]) if tok == "--comment"]


def sets_mark(tokens: list[str], mark: int) -> bool:
    """Whether an iptables rule (``iptables -S`` tokens) writes ``mark``: MARK, CONNMARK or TPROXY."""
    for i, tok in enumerate(tokens[:-1]):
        if tok in MARK_SETTERS:
            try:
                if int(tokens[i + 1].split("/")[0], 0) == mark:
                    return True
            except ValueError:
                continue
    return False


def foreign_mangle(lines: str, family: str, mark: int, comment: str) -> list[str]:
    """Rules from ``iptables -t mangle -S`` (any chain) that set ``mark`` without carrying ``comment``."""
    tool = "iptables" if family == "ipv4" else "ip6tables"
    found = []
    for line in lines.splitlines():
        if not line.startswith("-A "):
            continue
        tokens = shlex.split(line)
        if comment not in _comments(tokens) and sets_mark(tokens, mark):
            found.append(f"{tool} -t mangle {line}")
    return found


def _rule_table(msg) -> int:
    return msg.get_attr("FRA_TABLE") or msg["table"]


def _route_table(msg) -> int:
    return msg.get_attr("RTA_TABLE") or msg["table"]


def rule_uses(msg, table: int, mark: int | None) -> bool:
    """Whether a rule looks up ``table``, or matches packets carrying ``mark`` (if not None)."""
    if msg["action"] == FR_ACT_TO_TBL and _rule_table(msg) == table:
        return True
    fwmark = msg.get_attr("FRA_FWMARK")
    if mark is None or fwmark is None:
        return False
    mask = msg.get_attr("FRA_FWMASK")
    return mark & (FULL_MASK if mask is None else mask) == fwmark


def _prefix(address, length: int) -> str:
    return f"{address}/{length}" if length else "all"


def describe_rule_msg(msg, family: str) -> str:
    """A rule as ``ip rule`` takes it (to delete it, put ``del`` after ``rule``)."""
    attrs = dict(msg["attrs"])
    words = ["ip rule" if family == "ipv4" else "ip -6 rule", f"pref {attrs.get('FRA_PRIORITY') or 0}"]
    if msg["src_len"]:
        words.append(f"from {_prefix(attrs.get('FRA_SRC'), msg['src_len'])}")
    if msg["dst_len"]:
        words.append(f"to {_prefix(attrs.get('FRA_DST'), msg['dst_len'])}")
    if msg["tos"]:
        words.append(f"tos {msg['tos']:#x}")
    if attrs.get("FRA_FWMARK") is not None:
        mask = attrs.get("FRA_FWMASK", FULL_MASK)
        words.append(f"fwmark {attrs['FRA_FWMARK']:#x}" + ("" if mask == FULL_MASK else f"/{mask:#x}"))
    for key, word in (("FRA_IIFNAME", "iif"), ("FRA_OIFNAME", "oif"), ("FRA_IP_PROTO", "ipproto")):
        if attrs.get(key) is not None:
            words.append(f"{word} {attrs[key]}")
    for key, word in (("FRA_SPORT_RANGE", "sport"), ("FRA_DPORT_RANGE", "dport")):
        if key in attrs:
            first, last = str(attrs[key]).split(":")
            words.append(f"{word} {first}" if first == last else f"{word} {first}-{last}")
    action = msg["action"]
    if action == FR_ACT_TO_TBL:
        words.append(f"lookup {_rule_table(msg)}")
    elif action == 2:
        words.append(f"goto {attrs.get('FRA_GOTO')}")
    else:
        words.append(RULE_ACTIONS.get(action, f"action {action}"))
    proto = attrs.get("FRA_PROTOCOL")
    if proto:
        words.append(f"proto {PROTOCOLS.get(proto, proto)}")
    return " ".join(words)


def describe_route_msg(msg, family: str, ifnames: dict[int, str]) -> str:
    """A route as ``ip route`` takes it (to delete it, put ``del`` after ``route``)."""
    attrs = dict(msg["attrs"])
    words = ["ip route" if family == "ipv4" else "ip -6 route"]
    if msg["type"] in ROUTE_TYPES:
        words.append(ROUTE_TYPES[msg["type"]])
    words.append(f"{attrs.get('RTA_DST')}/{msg['dst_len']}" if msg["dst_len"] else "default")
    if attrs.get("RTA_GATEWAY"):
        words.append(f"via {attrs['RTA_GATEWAY']}")
    if attrs.get("RTA_MULTIPATH"):
        words.append("nexthop ...")
    if attrs.get("RTA_OIF"):
        words.append(f"dev {ifnames.get(attrs['RTA_OIF'], attrs['RTA_OIF'])}")
    words.append(f"table {_route_table(msg)}")
    if msg["proto"]:
        words.append(f"proto {PROTOCOLS.get(msg['proto'], msg['proto'])}")
    if attrs.get("RTA_PRIORITY"):
        words.append(f"metric {attrs['RTA_PRIORITY']}")
    return " ".join(words)


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


def _ours_netlink(ipr, family: str, tag: int) -> list[Item]:
    """Our rules and routes of ``family``, in every table."""
    items: list[Item] = []
    for msg in ipr.get_rules(family=AF[family]):
        if msg.get_attr("FRA_PROTOCOL") == tag:
            items.append(_rule_from(msg, family, _rule_table(msg), tag))
    for msg in ipr.get_routes(family=AF[family]):
        if msg["proto"] == tag and msg["type"] == RTN_LOCAL and not msg["dst_len"]:
            items.append(Route(family, _route_table(msg), tag))
    return items


def _foreign_netlink(ipr, family: str, table: int, mark: int | None, tag: int) -> list[str]:
    """Rules and routes of ``family`` not tagged ``tag`` that use ``table`` or match ``mark``."""
    found = [
        describe_rule_msg(msg, family)
        for msg in ipr.get_rules(family=AF[family])
        if msg.get_attr("FRA_PROTOCOL") != tag and rule_uses(msg, table, mark)
    ]
    routes = [msg for msg in ipr.get_routes(family=AF[family]) if _route_table(msg) == table and msg["proto"] != tag]
    if routes:
        ifnames = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        found += [describe_route_msg(msg, family, ifnames) for msg in routes]
    return found


def _read(
    ipr,
    tag: int,
    comment: str,
    binaries: dict[str, str],
    wanted: tuple[str, ...],
    need_iptables: bool,
    iptables_fatal: bool,
) -> list[Item]:
    """Our items in the kernel: rules and routes in any table, mangle rules, both families.

    Families outside ``wanted`` are only swept for leftovers of ours: if they
    cannot be read (IPv6 disabled, no ip6tables) they count as empty. Within
    ``wanted``, a missing iptables binary is an error only if ``need_iptables``
    and a failing one only if ``iptables_fatal`` (method sport works without).
    """
    have: list[Item] = []
    for family in ALL_FAMILIES:
        try:
            have += _ours_netlink(ipr, family, tag)
        except NetlinkError as exc:
            if family in wanted:
                raise CommandExecutionError(_netlink_error(exc, f"read the {family} rules and routes")) from exc
            continue
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
    return have


def _foreign(ipr, spec: Spec) -> list[str]:
    """What is not ours but uses ``spec``'s table, or (method mark) its mark, in its families."""
    mark = spec.mark if spec.method == "mark" else None
    found: list[str] = []
    for family in spec.families:
        try:
            found += _foreign_netlink(ipr, family, spec.table, mark, spec.tag)
        except NetlinkError as exc:
            raise CommandExecutionError(_netlink_error(exc, f"read the {family} rules and routes")) from exc
        binary = _binary(spec.binaries, family)
        if mark is not None and binary is not None:  # without iptables, ensure says what is missing
            found += foreign_mangle(_iptables(binary, "-S"), family, mark, comment_for(spec.name))
    return found


def _foreign_message(spec: Spec, found: list[str]) -> str:
    what = f"table {spec.table}" + (f" or mark {spec.mark:#x}" if spec.method == "mark" else "")
    return (
        f"The {what} is already used by rules or routes that are not ours (not protocol {spec.tag}): "
        + "; ".join(found)
        + f". Remove them, or choose another {'table or mark' if spec.method == 'mark' else 'table'}."
    )


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
            _check_exists(ipr, item)
            return
        raise CommandExecutionError(_netlink_error(exc, f"{verb} `{describe(item)}`")) from exc


def _check_exists(ipr, item: Route | Rule) -> None:
    """After EEXIST: fine if ``item`` is ours in the kernel (the watchdog or the state added it
    meanwhile); otherwise something foreign took its place, and that is an error naming it."""
    try:
        if item in _ours_netlink(ipr, item.family, item.tag):
            return
        found = _foreign_netlink(
            ipr, item.family, item.table, item.fwmark if isinstance(item, Rule) else None, item.tag
        )
    except NetlinkError as exc:
        raise CommandExecutionError(_netlink_error(exc, f"read back `{describe(item)}`")) from exc
    raise CommandExecutionError(
        f"Cannot add `{describe(item)}`: the kernel holds a conflicting entry that is not ours: "
        + ("; ".join(found) or "none found on a re-read")
    )


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


def _spec(name, ports, options: dict) -> Spec:
    """:func:`validate`, refusing an option it does not take; Salt's CLI adds ``__pub_*`` ones."""
    options = {key: value for key, value in options.items() if not key.startswith("__")}
    known = [key for key in inspect.signature(validate).parameters if key not in ("name", "ports")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SaltInvocationError(f"Unknown argument {', '.join(unknown)}: use {', '.join(known)}")
    return validate(name, ports, **options)


def _plan(ipr, spec: Spec) -> tuple[list[Item], list[Item]]:
    mark = spec.method == "mark"
    have = _read(ipr, spec.tag, comment_for(spec.name), spec.binaries, spec.families, mark, mark)
    return diff(desired(spec), have)


# -- public functions ------------------------------------------------------------


def check(name, ports, **options):
    """Report what is missing or stale, changing nothing.

    ``options``: method, mark, table, family, priority, tag, iptables,
    ip6tables, as :func:`ensure` takes them.

    Returns ``{"ok": bool, "missing": [rule strings], "stale": [rule strings]}``.

    CLI example::

        salt-call tproxy.check cell ports=[4431,4432]
    """
    spec = _spec(name, ports, options)
    with IPRoute() as ipr:
        to_add, to_remove = _plan(ipr, spec)
    return {
        "ok": not (to_add or to_remove),
        "missing": [describe(i) for i in to_add],
        "stale": [describe(i) for i in to_remove],
    }


def ensure(name, ports, test=False, keep_stale=False, **options):
    """Make the kernel hold exactly the rules for ``ports``: add what is missing, then remove what is stale.

    ``options`` (see :func:`validate`, and the ``tproxy.present`` state for
    what each means): ``method`` (mark or sport, default mark), ``mark``
    (1), ``table`` (100), ``family`` (ipv4, ipv6 or both; ipv4),
    ``priority`` (100), ``tag`` (201), ``iptables`` and ``ip6tables``.

    Returns ``{"added": [...], "removed": [...]}`` (keys only when not empty; with
    ``test`` what would be done, nothing is changed; with ``keep_stale`` only
    what is missing is added, as the watchdog does). Our rules and routes in
    another table than ``table`` are stale: a table change moves them.

    A table or mark that something not ours uses (see :func:`foreign`) is
    refused before anything changes, except with ``keep_stale``: the
    watchdog only puts back what was ours, and an add that collides fails anyway.

    Raises SaltInvocationError for bad arguments and CommandExecutionError for
    a refusal or when the kernel refuses (its ``info`` holds what was already done).

    CLI example::

        salt-call tproxy.ensure cell ports=[4431,4432,4433,4434] method=sport
    """
    spec = _spec(name, ports, options)
    with IPRoute() as ipr:
        found = [] if keep_stale else _foreign(ipr, spec)
        if found:
            raise CommandExecutionError(_foreign_message(spec, found))
        to_add, to_remove = _plan(ipr, spec)
        return _apply(ipr, to_add, [] if keep_stale else to_remove, spec.binaries, test)


def foreign(
    mark,
    table,
    family="ipv4",
    tag=DEFAULT_TAG,
    method="mark",
    name=RETURN_PATH_NAME,
    iptables="iptables",
    ip6tables="ip6tables",
):
    """List what is not ours (not protocol ``tag``) but uses ``table`` or ``mark``, changing nothing.

    That is: rules that look up ``table``, routes in ``table``, and with
    method ``mark`` (``mark`` not None) rules matching packets marked
    ``mark`` and mangle rules (any chain) setting it without the comment of
    ``name``'s return path. The kernel's own rules (local, main, default)
    never count. Returns human-readable strings (``ip rule ...``, ``ip route
    ...``, ``iptables -t mangle -A ...``); an empty list when nothing collides.

    CLI example::

        salt-call tproxy.foreign 1 100
        salt-call tproxy.foreign mark=None table=100 family=both method=sport
    """
    if mark is None or method == "sport":
        method, mark = "sport", 1
    spec = validate(name, [1], method, mark, table, family, tag=tag, iptables=iptables, ip6tables=ip6tables)
    with IPRoute() as ipr:
        return _foreign(ipr, spec)


def remove(name, table=100, family="both", tag=DEFAULT_TAG, iptables="iptables", ip6tables="ip6tables", test=False):
    """Remove what ``ensure`` created for ``name``: our rules and routes (in every table, by
    ``tag``; ``table`` is only checked) and our mangle rules.

    Returns ``{"removed": [...]}`` (empty dict when there was nothing).

    CLI example::

        salt-call tproxy.remove cell
    """
    name = _name_arg(name)
    families = _family_arg(family)
    _table_arg(table)
    tag = _tag_arg(tag)
    binaries = {"ipv4": iptables, "ipv6": ip6tables}
    with IPRoute() as ipr:
        have = _read(ipr, tag, comment_for(name), binaries, families, False, True)
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
