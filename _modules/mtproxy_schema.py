"""
The pillar schema of mtproxy-formula: every key under ``mtproxy:`` with its
type and constraint, in one table (:data:`SCHEMA`).

``mtproxy.resolve`` (through ``mtproxy.settings``, at render time) runs
:py:func:`validate` first, so a bad value fails the render, naming the key,
the value (secrets as ``<hidden>``) and what is allowed, before anything on
the host changes. Values come out typed and normalised: integers as ints,
durations with their HAProxy unit, sizes in bytes, secrets in lower case;
an empty ``image`` or ``modes`` as the flavor's defaults.

Pure logic: no host access (the host-dependent checks, such as the
ephemeral port range, are in ``mtproxy.resolve``). What each flavor supports
comes from its record, through ``mtproxy_flavor.names`` and
``mtproxy_flavor.check``.

CLI example:

.. code-block:: bash

    salt '*' mtproxy_schema.keys
"""

from __future__ import annotations

import difflib
import ipaddress
import os.path
import re
from collections.abc import Callable
from typing import Any

from mtproxy_common import FAMILIES, HIDDEN, METHODS, MODES, RESERVED_TABLES  # _utils: on sys.path under Salt's loader
from salt.exceptions import CommandExecutionError

__virtualname__ = "mtproxy_schema"

REPLICA_NAME = re.compile(r"mtproxy_[0-9]+")
# Docker's container-name rule, also safe as a word in HAProxy and YAML.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# C0 and C1 controls (newline, tab, NUL, escape, ...) and the Unicode line
# and paragraph separators: any of them can start a new line in a config.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
HEX32 = re.compile(r"[0-9a-fA-F]{32}")
DURATION = re.compile(r"([0-9]+)(us|ms|s|m|h|d)?")
DURATION_MS = {"us": 0.001, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# HAProxy keeps timeouts in milliseconds as a signed 32-bit int.
MAX_DURATION_MS = 2**31 - 1
DNS_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}", re.IGNORECASE)
IMAGE_REF = re.compile(
    r"(?:[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)
# Paths are written unquoted into SLS files, unit files and bind specs
# (`path:mount:ro`): no space, colon, quote or `#`.
PATH_CHARACTERS = re.compile(r"/[A-Za-z0-9_.+@/-]*")
# Folders of the operating system. The formula owns config_dir and run_dir
# (it writes anything there, and mtproxy.clean deletes them): neither may be
# one of these, and no path the formula writes may be one of them either.
SYSTEM_FOLDERS = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/etc/default",
        "/etc/docker",
        "/etc/init.d",
        "/etc/network",
        "/etc/salt",
        "/etc/ssh",
        "/etc/ssl",
        "/etc/sysctl.d",
        "/etc/systemd",
        "/etc/systemd/system",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/lib/systemd",
        "/lib/systemd/system",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/run/docker",
        "/run/systemd",
        "/run/user",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/usr/bin",
        "/usr/include",
        "/usr/lib",
        "/usr/lib/systemd",
        "/usr/lib/systemd/system",
        "/usr/lib64",
        "/usr/libexec",
        "/usr/local",
        "/usr/local/bin",
        "/usr/local/etc",
        "/usr/local/lib",
        "/usr/local/sbin",
        "/usr/local/share",
        "/usr/sbin",
        "/usr/share",
        "/usr/src",
        "/var",
        "/var/backups",
        "/var/cache",
        "/var/lib",
        "/var/lib/apt",
        "/var/lib/docker",
        "/var/lib/dpkg",
        "/var/lib/salt",
        "/var/local",
        "/var/lock",
        "/var/log",
        "/var/mail",
        "/var/opt",
        "/var/run",
        "/var/spool",
        "/var/tmp",
    }
)
# Kernel file systems: nothing of ours goes anywhere below them.
KERNEL_FOLDERS = ("/proc", "/sys", "/dev")


class SettingsError(CommandExecutionError):
    """A pillar value the formula cannot use; the message names the key."""


def __virtual__():
    return __virtualname__


def _shown(value: Any) -> str:
    return value if value == HIDDEN else repr(value)


def fail(key: str, value: Any, allowed: str) -> None:
    raise SettingsError(f"Pillar mtproxy:{key} is {_shown(value)}: {allowed}")


Check = Callable[[str, Any], Any]


class Spec:
    """How one key is checked: ``check(key, value)`` returns the normalised value or fails."""

    def __init__(self, check: Check, kind: str, hidden: bool = False):
        self.check = check
        self.kind = kind
        self.hidden = hidden


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        return int(value)
    return None


def Int(low: int, high: int, excluded: dict[int, str] | None = None) -> Spec:
    allowed = f"use an integer from {low} to {high}"

    def check(key: str, value: Any) -> int:
        number = _integer(value)
        if number is None or not low <= number <= high:
            fail(key, value, allowed)
        if excluded and number in excluded:
            fail(
                key,
                value,
                f"{number} is the kernel's {excluded[number]} table; {allowed}, other than {sorted(excluded)}",
            )
        return number  # type: ignore[return-value]

    return Spec(check, f"integer {low}..{high}")


def Bool() -> Spec:
    def check(key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            fail(key, value, "use true or false")
        return value

    return Spec(check, "true or false")


def Choice(*options: str) -> Spec:
    def check(key: str, value: Any) -> str:
        if value not in options:
            fail(key, value, "use one of " + ", ".join(options))
        return value

    return Spec(check, " | ".join(options))


def FlavorName() -> Spec:
    """A flavor with a record in ``mtproxy_flavor`` (its FLAVORS: the one place flavors are named)."""

    def check(key: str, value: Any) -> str:
        names = __salt__["mtproxy_flavor.names"]()
        if value not in names:
            fail(key, value, "use one of " + ", ".join(names))
        return value

    return Spec(check, "a flavor (salt-call mtproxy_flavor.names)")


def Text(
    pattern: re.Pattern | str, allowed: str, empty: bool = True, lower: bool = False, hidden: bool = False
) -> Spec:
    """A string that fully matches ``pattern``; with ``empty`` also "" (or null)."""
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern

    def check(key: str, value: Any) -> str:
        if value is None and empty:
            return ""
        if isinstance(value, str) and value == "" and empty:
            return ""
        if not isinstance(value, str) or not regex.fullmatch(value):
            fail(key, HIDDEN if hidden else value, allowed + (", or leave it empty" if empty else ""))
        return value.lower() if lower else value

    return Spec(check, allowed.removeprefix("use "), hidden)


def Name(suffix: str = "") -> Spec:
    allowed = "use a name of letters, digits, _ . - that starts with a letter or digit"
    if suffix:
        allowed += f" and ends in {suffix}"

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or not NAME.fullmatch(value) or not value.endswith(suffix):
            fail(key, value, allowed)
        return value

    return Spec(check, "name [A-Za-z0-9_.-]+" + (f" ending in {suffix}" if suffix else ""))


def ContainerName() -> Spec:
    name = Name()

    def check(key: str, value: Any) -> str:
        value = name.check(key, value)
        if REPLICA_NAME.fullmatch(value):
            fail(key, value, "replicas are named mtproxy_<n>; give HAProxy a name outside that pattern")
        return value

    return Spec(check, name.kind + ", not mtproxy_<n>")


def Path(empty: bool = False, system_ok: frozenset[str] = frozenset()) -> Spec:
    """An absolute, normalised path outside the folders of the operating system (but ``system_ok``)."""
    allowed = "use an absolute, normalised path (no trailing /, no . or .. parts) of letters, digits and _ . + @ - /"

    def check(key: str, value: Any) -> str:
        if empty and value in (None, ""):
            return ""
        if (
            not isinstance(value, str)
            or not PATH_CHARACTERS.fullmatch(value)
            or os.path.normpath(value) != value
            or value.startswith("//")
        ):
            fail(key, value, allowed)
        if value in system_ok:
            return value
        if value in SYSTEM_FOLDERS or any(value == k or value.startswith(k + "/") for k in KERNEL_FOLDERS):
            fail(key, value, "this is a folder of the operating system; use a folder of its own, such as /etc/mtproxy")
        return value

    return Spec(check, "absolute path, not a system folder" + (", or empty" if empty else ""))


def Duration() -> Spec:
    allowed = (
        "use an HAProxy duration: a whole number with an optional unit us, ms, s, m, h or d (no unit: ms), "
        "such as 5s or 1h, from 1ms up to 24d"
    )

    def check(key: str, value: Any) -> str:
        number = _integer(value)
        if number is not None:
            value_text = f"{number}ms"
        elif isinstance(value, str):
            value_text = value
        else:
            fail(key, value, allowed)
        match = DURATION.fullmatch(value_text)
        if not match:
            fail(key, value, allowed)
        milliseconds = int(match[1]) * DURATION_MS[match[2] or "ms"]
        if not 1 <= milliseconds <= MAX_DURATION_MS:
            fail(key, value, allowed)
        return f"{int(match[1])}{match[2] or 'ms'}"

    return Spec(check, "HAProxy duration")


def Address(empty: bool = False) -> Spec:
    allowed = "use an IP address such as 0.0.0.0 or 127.0.0.1"

    def check(key: str, value: Any) -> str:
        if empty and value in (None, ""):
            return ""
        try:
            return str(ipaddress.ip_address(value))
        except (ValueError, TypeError):
            fail(key, value, allowed + (", or leave it empty" if empty else ""))
        return ""

    return Spec(check, "IP address" + (" or empty" if empty else ""))


def Network() -> Spec:
    """An IP network in CIDR notation (host bits allowed: 10.1.2.3/8 is 10.0.0.0/8); a bare address is a /32 or /128."""
    allowed = "use an IP network such as 10.0.0.0/8 or 2001:db8::/32, or one address"

    def check(key: str, value: Any) -> str:
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except (ValueError, TypeError):
            fail(key, value, allowed)
        return ""

    return Spec(check, "IP network (CIDR)")


def DurationUpTo(limit: str) -> Spec:
    """:py:func:`Duration`, at most ``limit`` (e.g. a rate period within its table's expiry)."""
    duration = Duration()
    match = DURATION.fullmatch(limit)
    limit_ms = int(match[1]) * DURATION_MS[match[2] or "ms"]

    def check(key: str, value: Any) -> str:
        text = duration.check(key, value)
        number = DURATION.fullmatch(text)
        if int(number[1]) * DURATION_MS[number[2]] > limit_ms:
            fail(key, value, f"use an HAProxy duration such as 10s or 1m, up to {limit}")
        return text

    return Spec(check, f"HAProxy duration up to {limit}")


def Host() -> Spec:
    allowed = "use a DNS name such as proxy.example.com or an IP address, or leave it empty"

    def check(key: str, value: Any) -> str:
        if value in (None, ""):
            return ""
        if isinstance(value, str):
            try:
                return str(ipaddress.ip_address(value))
            except ValueError:
                if DNS_NAME.fullmatch(value):
                    return value.lower()
        fail(key, value, allowed)
        return ""

    return Spec(check, "DNS name or IP address, or empty")


def Secret(empty: bool = False) -> Spec:
    allowed = "use 32 hex characters (16 random bytes), e.g. from `openssl rand -hex 16`"

    def check(key: str, value: Any) -> str:
        if empty and value in (None, ""):
            return ""
        if isinstance(value, str) and re.search(r"\s", value):
            fail(key, HIDDEN, f"it contains whitespace, which is never stripped from a secret; {allowed}")
        if not isinstance(value, str) or not HEX32.fullmatch(value):
            fail(key, HIDDEN if isinstance(value, str) else value, allowed + (", or leave it empty" if empty else ""))
        return value.lower()

    return Spec(check, "32 hex characters" + (", or empty: generated" if empty else ""), hidden=True)


def StatsAuth() -> Spec:
    """user:password; the length rule that depends on stats_bind is in :py:func:`_cross_checks`."""
    allowed = (
        'use "user:password": the user a name of letters, digits, _ . -, the password at least 8 characters '
        "(12 when stats_bind is not loopback) without space, #, quotes or backslash, which HAProxy treats "
        "specially; or leave it empty"
    )

    def check(key: str, value: Any) -> str:
        if value in (None, ""):
            return ""
        if not isinstance(value, str) or ":" not in value:
            fail(key, HIDDEN, allowed)
        user, password = value.split(":", 1)
        if not NAME.fullmatch(user) or not re.fullmatch(r"[!-~]{8,}", password) or re.search(r"[#\"'\\]", password):
            fail(key, HIDDEN, allowed)
        return value

    return Spec(check, "user:password", hidden=True)


def Size() -> Spec:
    """A Docker memory size; normalised to bytes. Docker's minimum is 6 MiB."""
    allowed = "use a size in bytes, or a number with k, m or g such as 512m, of at least 6m"

    def check(key: str, value: Any) -> int:
        number = _integer(value)
        if number is None:
            match = re.fullmatch(r"([0-9]+)([kmgKMG]?)", value) if isinstance(value, str) else None
            if not match:
                fail(key, value, allowed)
            number = int(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")
        if number < 6 * 1024**2:
            fail(key, value, allowed)
        return number

    return Spec(check, "size (bytes, or 512m)")


def ListOf(item: Spec, maximum: int = 64) -> Spec:
    allowed = f"use a list (up to {maximum}) of {item.kind}"

    def check(key: str, value: Any) -> list:
        if value is None:
            return []
        if not isinstance(value, list) or len(value) > maximum:
            fail(key, HIDDEN if item.hidden else value, allowed)
        return [item.check(f"{key}:{index}", element) for index, element in enumerate(value)]

    return Spec(check, f"list of {item.kind}", item.hidden)


def MapOf(name: re.Pattern, name_allowed: str, value: Spec) -> Spec:
    def check(key: str, mapping: Any) -> dict:
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            fail(key, mapping, f"use a mapping of {name_allowed} to {value.kind}")
        result = {}
        for entry, item in mapping.items():
            if not isinstance(entry, str) or not name.fullmatch(entry):
                fail(f"{key}:{entry}", item, f"{entry!r} is not {name_allowed}")
            result[entry] = value.check(f"{key}:{entry}", item)
        return result

    return Spec(check, f"mapping of {name_allowed} to {value.kind}")


def Scalar(pattern: str, allowed: str) -> Spec:
    """An int, float or string (kept as text, e.g. for environment variables)."""
    regex = re.compile(pattern)

    def check(key: str, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not regex.fullmatch(str(value)):
            fail(key, value, allowed)
        return str(value)

    return Spec(check, allowed.removeprefix("use "))


def SysctlValue() -> Spec:
    allowed = "use a number or words of letters, digits, _ . , : / - separated by single spaces"

    def check(key: str, value: Any) -> int | str:
        number = _integer(value)
        if number is not None and not isinstance(value, str):
            return number
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.,:/-]+( [A-Za-z0-9_.,:/-]+)*", value):
            fail(key, value, allowed)
        return value

    return Spec(check, "sysctl value")


# Linux interface names: up to 15 characters, no space, slash or colon.
INTERFACE = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
# Salt minion ids own virtual addresses (mtproxy:vip:addresses:<n>:owner).
MINION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,252}")
# VRRP PASS authentication carries up to 8 characters; keepalived reads # and ! as comments.
VRRP_PASSWORD = re.compile(r"[A-Za-z0-9_.+=@%^*~-]{1,8}")


def VipAddress() -> Spec:
    """One floating address: {address: IPv4, router_id: 1..255, owner: minion id}."""
    fields = {
        "address": Spec(_vip_ipv4, "IPv4 address"),
        "router_id": Int(1, 255),
        "owner": Text(MINION_ID, "use the minion id of the host that holds it normally", empty=False),
    }
    allowed = "use a mapping {address: <IPv4>, router_id: <1..255>, owner: <minion id>}"

    def check(key: str, value: Any) -> dict:
        if not isinstance(value, dict) or set(value) != set(fields):
            fail(key, value, allowed)
        return {name: spec.check(f"{key}:{name}", value[name]) for name, spec in fields.items()}

    return Spec(check, "{address, router_id, owner}")


def _vip_ipv4(key: str, value: Any) -> str:
    try:
        address = ipaddress.IPv4Address(value)
    except (ValueError, TypeError):
        address = None
    if address is None or address.is_loopback or address.is_multicast or address.is_unspecified:
        fail(key, value, "use an IPv4 unicast address such as 203.0.113.100 (not loopback, multicast or 0.0.0.0)")
    return str(address)


_SECRET_KEYS = ("secret", "extra_secrets", "haproxy:stats_auth", "exporter:auth", "vip:password")

# Every pillar key under mtproxy: (parts joined by ':'), with its type and
# constraint. Constraints between keys are in _cross_checks.
SCHEMA: dict[str, Spec] = {
    "replicas": Int(1, 1000),
    "max_replicas": Int(1, 1000),
    "drain_timeout": Int(0, 86400),
    "base_port": Int(1, 65535),
    "flavor": FlavorName(),
    "client_ip": Choice("tproxy", "proxy_protocol"),
    "secret": Secret(empty=True),
    "secret_file": Path(),
    "extra_secrets": ListOf(Secret(), maximum=15),
    "modes": ListOf(Choice(*MODES), maximum=len(MODES)),
    "tls_domain": Text(DNS_NAME, "use a DNS name such as www.example.com", lower=True),
    "ad_tag": Text(HEX32, "use the 32 hex characters @MTProxybot gave you", lower=True),
    "handshake_timeout": Int(0, 86400),
    "image": Text(IMAGE_REF, "use an image reference such as mtproxy-formula/mtprotoproxy:local or repo/name:tag"),
    "replica_environment": MapOf(
        re.compile(r"[A-Za-z_][A-Za-z0-9_]*"),
        "an environment variable name",
        Scalar(r"[^\x00]*", "use a string or a number"),
    ),
    "replica_limits:pids": Int(16, 4194304),
    "replica_limits:memory": Size(),
    "replica_limits:nofile": Int(1024, 1048576),
    "replica_limits:read_only": Bool(),
    "max_connections": Int(0, 1000000),
    "public_host": Host(),
    "backend_address": Address(empty=True),
    "docker_host": Text(
        r"(unix|tcp|ssh|npipe|http|https)://[A-Za-z0-9_.:@/\[\]%-]+",
        "use a Docker endpoint such as unix:///run/docker.sock",
    ),
    "config_dir": Path(),
    "run_dir": Path(),
    "sysctl_config": Path(),
    "docker:install": Bool(),
    "docker:service": Name(),
    "docker:packages": ListOf(Text(r"[a-z0-9][a-z0-9+.-]+", "use a Debian package name", empty=False)),
    "python_packages:install": Bool(),
    "python_packages:target": Choice("auto", "salt", "venv"),
    "python_packages:venv": Path(),
    "python_packages:venv_packages": ListOf(Text(r"[a-z0-9][a-z0-9+.-]+", "use a Debian package name", empty=False)),
    "python_packages:find_links": Text(
        r"(/|https?://)[A-Za-z0-9_.:@/%+~-]*", "use an absolute folder or an http(s) URL of wheels, or empty"
    ),
    "python_packages:pkgs": ListOf(
        Text(
            r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?([<>=!~]=?[A-Za-z0-9.*+!-]+)?(,[<>=!~]=?[A-Za-z0-9.*+!-]+)*",
            "use a pip requirement such as docker or docker>=7",
            empty=False,
        )
    ),
    "sysctls": MapOf(re.compile(r"[a-z0-9_]+([./][A-Za-z0-9_-]+)+"), "a kernel parameter name", SysctlValue()),
    "tproxy:method": Choice(*METHODS),
    "tproxy:mark": Int(1, 0xFFFFFFFF),
    "tproxy:table": Int(1, 0xFFFFFFFE, excluded=RESERVED_TABLES),
    "tproxy:family": Choice(*FAMILIES),
    "haproxy:image": Text(IMAGE_REF, "use an image reference such as mtproxy-formula/haproxy:local", empty=False),
    "haproxy:container": ContainerName(),
    "haproxy:frontend_bind": Address(),
    "haproxy:frontend_port": Int(1, 65535),
    "haproxy:stats_bind": Address(),
    "haproxy:stats_port": Int(1, 65535),
    "haproxy:stats_auth": StatsAuth(),
    "haproxy:balance": Choice("leastconn", "roundrobin"),
    "haproxy:maxconn": Int(1, 1000000),
    "haproxy:splice": Bool(),
    "haproxy:redispatch": Bool(),
    "haproxy:timeout_connect": Duration(),
    "haproxy:timeout_client": Duration(),
    "haproxy:timeout_server": Duration(),
    "haproxy:health_check:profile": Choice("fast", "original"),
    # Raw `default-server` options: words only, nothing HAProxy parses as a
    # comment, quote or escape.
    "haproxy:health_check:options": Text(
        r"[A-Za-z0-9_.,:/=+-]+( [A-Za-z0-9_.,:/=+-]+)*",
        "use HAProxy server options as words separated by single spaces",
    ),
    "haproxy:reload_timeout": Int(1, 3600),
    "haproxy:allow_restart": Bool(),
    # Cell-wide guards (the HAProxy template): replays go to the replica that
    # saw the original; limits per client address across every replica.
    "haproxy:replay_guard:enabled": Bool(),
    "haproxy:replay_guard:inspect_delay": DurationUpTo("30s"),
    "haproxy:replay_guard:size": Int(1000, 10_000_000),
    "haproxy:replay_guard:expire": Duration(),
    "haproxy:client_limits:max_connections": Int(0, 1_000_000),
    "haproxy:client_limits:max_new": Int(0, 1_000_000),
    "haproxy:client_limits:period": DurationUpTo("10m"),
    "haproxy:client_limits:bandwidth_in": Int(0, 10**12),
    "haproxy:client_limits:bandwidth_out": Int(0, 10**12),
    "haproxy:client_limits:exempt": ListOf(Network(), maximum=256),
    "haproxy:client_limits:table_size": Int(1000, 10_000_000),
    # Unit files go where systemd looks for the administrator's units.
    "boot:unit_dir": Path(system_ok=frozenset({"/etc/systemd/system", "/run/systemd/system"})),
    "boot:unit_name": Name(suffix=".service"),
    "boot:enable": Bool(),
    "boot:python": Path(empty=True),
    "boot:watchdog_unit_name": Name(suffix=".service"),
    "boot:watch_interval": Int(1, 3600),
    # The cell exporter (mtproxy/exporter): one Prometheus endpoint per cell.
    "exporter:enable": Bool(),
    "exporter:bind": Address(),
    "exporter:port": Int(1, 65535),
    "exporter:auth": StatsAuth(),
    "exporter:interval": Int(1, 3600),
    "exporter:unit_name": Name(suffix=".service"),
    # Floating addresses (mtproxy/vip): keepalived moves each between hosts by VRRP.
    "vip:enabled": Bool(),
    "vip:interface": Text(INTERFACE, "use a network interface name such as eth0"),
    "vip:addresses": ListOf(VipAddress(), maximum=255),
    "vip:prefix_length": Int(1, 32),
    "vip:priority": Int(1, 254),
    "vip:backup_priority": Int(1, 254),
    "vip:advert_int": Int(1, 255),
    "vip:preempt_delay": Int(0, 1000),
    "vip:check_interval": Int(1, 60),
    "vip:check_fall": Int(1, 60),
    "vip:check_rise": Int(1, 60),
    "vip:peers": ListOf(Spec(_vip_ipv4, "IPv4 address"), maximum=64),
    "vip:password": Text(VRRP_PASSWORD, "use 1 to 8 letters, digits or _ . + = @ % ^ * ~ -", hidden=True),
    "vip:image": Text(IMAGE_REF, "use an image reference such as mtproxy-formula/keepalived:local", empty=False),
    "vip:container": ContainerName(),
}
# Mappings of keys above (haproxy, haproxy:health_check, ...).
_GROUPS = {":".join(key.split(":")[:depth]) for key in SCHEMA for depth in range(1, key.count(":") + 1)}


def keys() -> dict[str, str]:
    """
    Every pillar key under ``mtproxy:`` and what it accepts.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy_schema.keys
    """
    return {key: spec.kind for key, spec in SCHEMA.items()}


def _control_character(value: Any) -> str | None:
    """The first control character in any string of ``value`` (keys and values, nested)."""
    if isinstance(value, str):
        found = CONTROL.search(value)
        return found[0] if found else None
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return None
    for item in items:
        found = _control_character(item)
        if found:
            return found
    return None


def _unknown(key: str, value: Any) -> None:
    known = [
        k
        for k in (*SCHEMA, *_GROUPS)
        if k.count(":") == key.count(":") and k.rsplit(":", 1)[0] == key.rsplit(":", 1)[0]
    ]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6) or difflib.get_close_matches(
        key.rsplit(":", 1)[-1], [k for k in SCHEMA], n=1, cutoff=0.6
    )
    close = close or [k for k in SCHEMA if k.rsplit(":", 1)[-1] == key.rsplit(":", 1)[-1]][:1]
    hint = f"did you mean mtproxy:{close[0]}?" if close else "see pillar.example for the keys"
    shown = (
        HIDDEN
        if (close and close[0] in _SECRET_KEYS) or (isinstance(value, str) and re.search(r"[0-9a-fA-F]{16}", value))
        else value
    )
    fail(key, shown, f"mtproxy has no such key; {hint}")


def _walk(node: dict, prefix: str, result: dict) -> None:
    for name, value in node.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or (key not in SCHEMA and key not in _GROUPS):
            _unknown(str(key), value)
        spec = SCHEMA.get(key)
        if spec is not None:
            character = _control_character(value)
            if character:
                fail(
                    key,
                    HIDDEN if spec.hidden else value,
                    f"it contains the control character {character!r}; no value may contain newlines, tabs, "
                    "NUL or other control characters",
                )
            result[name] = spec.check(key, value)
            continue
        if not isinstance(value, dict):
            members = sorted(k.removeprefix(key + ":") for k in SCHEMA if k.startswith(key + ":"))
            fail(key, value, "use a mapping with the keys " + ", ".join(members))
        result[name] = {}
        _walk(value, key + ":", result[name])


def _get(settings: dict, key: str) -> Any:
    node: Any = settings
    for part in key.split(":"):
        node = node[part]
    return node


def _nested(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer + "/")


def _cross_checks(settings: dict) -> None:
    """Constraints between keys that need no host facts."""
    replicas = settings["replicas"]
    if replicas > settings["max_replicas"]:
        fail("replicas", replicas, f"use an integer from 1 to {settings['max_replicas']} (max_replicas)")
    base_port = settings["base_port"]
    last = base_port + replicas - 1
    if last > 65535:
        fail(
            "base_port",
            base_port,
            f"with {replicas} replicas the last port would be {last}; use a base_port that leaves room below 65536",
        )
    haproxy = settings["haproxy"]
    for key in ("frontend_port", "stats_port"):
        if base_port <= haproxy[key] <= last:
            fail(
                f"haproxy:{key}",
                haproxy[key],
                f"it lies in the replica port range {base_port}-{last}; choose another port",
            )
    if haproxy["frontend_port"] == haproxy["stats_port"]:
        fail("haproxy:stats_port", haproxy["stats_port"], "it is the frontend port too; give each role its own port")

    loopback = ipaddress.ip_address(haproxy["stats_bind"]).is_loopback
    if not loopback and not haproxy["stats_auth"]:
        fail(
            "haproxy:stats_bind",
            haproxy["stats_bind"],
            "the stats page is public on this address; "
            'set haproxy:stats_auth ("user:password") or bind it to 127.0.0.1',
        )
    if not loopback and len(haproxy["stats_auth"].split(":", 1)[1]) < 12:
        fail(
            "haproxy:stats_auth",
            HIDDEN,
            f"the stats page is public on {haproxy['stats_bind']}: use a password of at least 12 characters",
        )

    _exporter_checks(settings, last)
    _vip_checks(settings)

    config_dir, run_dir = settings["config_dir"], settings["run_dir"]
    if _nested(config_dir, run_dir) or _nested(run_dir, config_dir):
        fail("run_dir", run_dir, f"it is or nests with config_dir {config_dir}; give each a folder of its own")
    for key in ("secret_file", "sysctl_config", "boot:unit_dir"):
        path = _get(settings, key)
        for owner_key, owner in (("config_dir", config_dir), ("run_dir", run_dir)):
            if _nested(owner, path) or _nested(path, owner):
                fail(
                    key,
                    path,
                    f"it lies in (or holds) {owner_key} {owner}, which the formula owns and mtproxy.clean "
                    "deletes; keep it outside",
                )


def _exporter_checks(settings: dict, last_port: int) -> None:
    """The exporter's port is its own; off loopback it needs credentials, as the stats page does."""
    exporter, haproxy = settings["exporter"], settings["haproxy"]
    port, base_port = exporter["port"], settings["base_port"]
    taken = {haproxy["frontend_port"]: "the frontend port", haproxy["stats_port"]: "the stats port"}
    if port in taken or base_port <= port <= last_port or base_port + 10000 <= port <= last_port + 10000:
        used = taken.get(port, "used by a replica (its port, or its local stats on port+10000)")
        fail("exporter:port", port, f"it is {used}; choose another port")
    if not ipaddress.ip_address(exporter["bind"]).is_loopback:
        password = exporter["auth"].split(":", 1)[1] if exporter["auth"] else ""
        if len(password) < 12:
            fail(
                "exporter:auth" if exporter["auth"] else "exporter:bind",
                HIDDEN if exporter["auth"] else exporter["bind"],
                f'the exporter is public on {exporter["bind"]}: set exporter:auth ("user:password", a password of '
                "at least 12 characters) or bind it to 127.0.0.1",
            )


def _vip_checks(settings: dict) -> None:
    """Floating addresses: each once, router IDs unique on the segment, owners above backups."""
    vip = settings["vip"]
    seen: dict[str, str] = {}
    for index, entry in enumerate(vip["addresses"]):
        for field in ("address", "router_id"):
            earlier = seen.setdefault(f"{field}={entry[field]}", f"vip:addresses:{index}")
            if earlier != f"vip:addresses:{index}":
                fail(f"vip:addresses:{index}:{field}", entry[field], f"{earlier} has it too; give each its own")
    for index, peer in enumerate(vip["peers"]):
        if f"address={peer}" in seen:
            fail(f"vip:peers:{index}", peer, "it is a virtual address; list the hosts' own addresses")
    if vip["backup_priority"] >= vip["priority"]:
        fail(
            "vip:backup_priority",
            vip["backup_priority"],
            f"use an integer from 1 to {vip['priority'] - 1}, below vip:priority (the owner's)",
        )
    if not vip["enabled"]:
        return
    if not vip["interface"]:
        fail("vip:interface", vip["interface"], "vip is enabled: name the interface on the hosts' shared segment")
    if not vip["addresses"]:
        fail("vip:addresses", vip["addresses"], "vip is enabled: list at least one {address, router_id, owner}")
    bind = settings["haproxy"]["frontend_bind"]
    if bind != "0.0.0.0":
        fail(
            "haproxy:frontend_bind",
            bind,
            "with vip enabled HAProxy must accept clients on the virtual addresses too: use 0.0.0.0",
        )


def validate(settings: dict) -> dict:
    """
    Check every key of the layered settings (``mtproxy.settings``: defaults,
    pillar) against :data:`SCHEMA` and return them typed and normalised.

    Fails with an error that names the key (``mtproxy:...``), the value
    (secrets as ``<hidden>``) and what is allowed: for an unknown key (with
    the closest known one), a missing key, a control character anywhere, a
    value of the wrong type or out of its range, for combinations of keys
    that cannot work together, and for what the flavor cannot do.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy_schema.validate '{"replicas": 2, ...}'
    """
    if not isinstance(settings, dict):
        raise SettingsError(f"Pillar mtproxy is {settings!r}: use a mapping of settings (see pillar.example)")
    settings = {k: v for k, v in settings.items() if k != "lookup"}  # layered in already by mtproxy.settings
    result: dict = {}
    _walk(settings, "", result)
    for key in SCHEMA:
        try:
            _get(result, key)
        except KeyError:
            fail(key, None, f"the key is missing; the formula's defaults.yaml declares {SCHEMA[key].kind}")
    _cross_checks(result)
    _flavor_checks(result)
    return result


def _flavor_checks(settings: dict) -> None:
    """What the flavor cannot honour (its record in ``mtproxy_flavor``), and the
    image and modes it serves when the pillar leaves them empty."""
    found = __salt__["mtproxy_flavor.check"](settings)
    if found["refused"]:
        fail(*found["refused"])
    settings.update(image=found["image"], modes=found["modes"])
