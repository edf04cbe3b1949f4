"""
Settings, links and status of an MTProxy cell deployed by mtproxy-formula.

:py:func:`settings` layers the formula's parameters and pillar, then calls
:py:func:`resolve` to validate them and derive the rest. ``mtproxy/map.jinja``
is that call, and the other functions work from the same settings, so the
CLI and the states never disagree.

CLI examples:

.. code-block:: bash

    salt '*' mtproxy.links
    salt '*' mtproxy.status
    salt '*' mtproxy.settings
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import logging
import os
import pathlib
import re
import secrets
import urllib.parse
from typing import Any

import mtproxy_common  # _utils: Salt puts it on sys.path while it loads modules
import salt.utils.dictupdate
import salt.utils.secret
import salt.utils.yaml
from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "mtproxy"

HEX32 = re.compile(r"[0-9a-f]{32}")
HIDDEN = mtproxy_common.HIDDEN
# Settings that are credentials: mtproxy.settings shows them as HIDDEN.
CREDENTIALS = ("secret", "secrets", "extra_secrets", "haproxy:stats_auth", "exporter:auth", "vip:password")
# Kernel parameters (net.ipv4.ip_local_port_range, ...) as files.
PROC_SYSCTL = "/proc/sys"
# Secrets that appear in examples and docs: never serve with them.
PLACEHOLDER_SECRETS = {
    "0" * 32,
    "0123456789abcdef0123456789abcdef",
    "00000000000000000000000000000001",
    "b3b34e89c9471207ad107a03b565e9a3",  # the original design's demo secret
}
BACKEND = "mtproxy_replicas"
# The HAProxy config's frontend and its per-client-address table (mtproxy/files/default/haproxy.cfg.jinja).
FRONTEND = mtproxy_common.FRONTEND
CLIENTS_TABLE = "mtproxy_clients"
REPLICA_PREFIX = "mtproxy_"
# Container labels: what a container is to the formula, and where a replica listens.
ROLE_LABEL = "mtproxy-formula.role"
LISTEN_LABEL = "mtproxy-formula.listen"
# Where the HAProxy container sees the bind-mounted folders.
HAPROXY_CONFIG_MOUNT = "/etc/haproxy"
HAPROXY_RUN_MOUNT = "/run/haproxy"

HEALTH_CHECK_PROFILES = {
    # Measured (docs/measurements.md §3): DOWN in about 1 s, 0 failed new
    # connections per replica crash; observe layer4 marks a dead server down
    # on the first failed client connection.
    "fast": "check inter 1s fastinter 250ms downinter 1s fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down",
    # The original design: DOWN after about 6 s.
    "original": "check inter 3s fall 2 rise 2",
}
# A replica's local stats port (every flavor, read by the exporter): its port + this offset.
STATS_PORT_OFFSET = 10000


def __virtual__():
    return __virtualname__


class SettingsError(CommandExecutionError):
    """A pillar value the formula cannot use; the message names the key."""


def _fail(key: str, value: Any, allowed: str) -> None:
    shown = value if value == HIDDEN else repr(value)
    raise SettingsError(f"Pillar mtproxy:{key} is {shown}: {allowed}")


def validate_secret(secret: Any, key: str = "secret") -> str:
    """``secret`` in lower case; fails (never showing it) unless it is 32 hex characters and no placeholder."""
    if not isinstance(secret, str) or not HEX32.fullmatch(secret.lower()):
        _fail(
            key,
            HIDDEN if isinstance(secret, str) else secret,
            "use 32 hex characters (16 random bytes), e.g. from `openssl rand -hex 16`, or leave it empty "
            "to generate one",
        )
    secret = secret.lower()
    if secret in PLACEHOLDER_SECRETS or len(set(secret)) < 4:
        _fail(key, HIDDEN, "this is a placeholder or trivially guessable secret; use `openssl rand -hex 16`")
    return secret


def generated_secret(path: str) -> str:
    """
    The secret generated for this host: made once and kept in ``path``
    (pillar ``mtproxy:secret_file``, 0600 in a 0700 folder) so the links stay
    valid across applies, also over salt-ssh where grains do not persist.
    Under ``test=True`` a missing secret is made up, not kept, and the
    same for the rest of the run.

    Only a missing file is generated. A file that does not hold a secret (32
    hex characters, optionally followed by a newline) fails, naming the file,
    and is left as it is: overwriting it would silently change every link.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.generated_secret /var/lib/mtproxy/secret
    """
    try:
        with open(path, "rb") as kept:
            content = kept.read()
    except FileNotFoundError:
        content = None
    except OSError as exc:
        _fail("secret_file", path, f"it cannot be read ({exc.strerror}); fix it or remove it to generate a new secret")
    if content is not None:
        try:
            secret = content.decode("ascii").removesuffix("\n")
        except UnicodeDecodeError:
            secret = ""
        if not HEX32.fullmatch(secret.lower()):
            _fail(
                "secret_file",
                path,
                "the file exists but does not hold a secret (32 hex characters and a newline); it is not "
                "overwritten: fix it, or remove it to generate a new secret (the links change then)",
            )
        return secret.lower()
    if __opts__.get("test"):
        # Not kept under test=True, but the same for the rest of the run.
        return __context__.setdefault(f"mtproxy.unkept_secret:{path}", secrets.token_hex(16))
    secret = secrets.token_hex(16)
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    # O_EXCL: a file that appeared meanwhile is never overwritten.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as kept:
        kept.write(secret + "\n")
    return secret


def primary_ipv4(key: str = "backend_address") -> str:
    """
    The host's primary IPv4 address: the address of the default route's
    interface, else the first address that is neither loopback nor a Docker
    bridge. ``key``: the pillar key to set when there is none.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.primary_ipv4
    """
    try:
        routes = __salt__["network.default_route"]("inet")
    # Salt's network module fails with a traceback of its own (not a
    # CommandExecutionError) on a host without iproute2: use the grains then.
    except (CommandExecutionError, OSError, ValueError, TypeError, KeyError, IndexError):
        routes = []
    for route in routes:
        address = __salt__["network.interface_ip"](route.get("interface", ""))
        if address:
            return address
    interfaces = __grains__.get("ip4_interfaces", {})
    for name in sorted(interfaces):
        if name == "lo" or name.startswith(("docker", "br-", "veth")):
            continue
        for address in interfaces[name]:
            if not ipaddress.ip_address(address).is_loopback:
                return address
    raise CommandExecutionError(f"Cannot find this host's primary IPv4 address: set pillar mtproxy:{key}")


def resolve(settings: dict, generate_secret: bool = True) -> dict:
    """
    Validate the layered settings (:func:`layered`) and derive what the states need.

    Every key is checked against the pillar schema first
    (``mtproxy_schema.validate``: types, ranges, names, paths, control
    characters, unknown keys); then what depends on the flavor and on this
    host: the ephemeral port range, the address families, routing tables
    and marks used by others, the secret file.

    Raises an error that names the pillar key, its value and what is allowed;
    called at render time, so nothing on the host has changed yet.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.resolve '{"replicas": 2, ...}'
    """
    settings = __salt__["mtproxy_schema.validate"](settings)
    ports = list(range(settings["base_port"], settings["base_port"] + settings["replicas"]))
    _check_stats_ports(settings, ports)
    extra_secrets = _extra_secrets(settings)
    backend_address, public_host = _addresses(settings)
    _check_ephemeral_ports(settings, ports)
    _check_foreign_routing(settings)
    secret = _main_secret(settings, extra_secrets, generate_secret)
    settings.update(
        {
            "ports": ports,
            "secret": secret,
            "secrets": [secret, *extra_secrets],
            "backend_address": backend_address,
            "public_host": public_host,
            "docker_host": settings["docker_host"] or __salt__["config.option"]("docker.url", "") or "",
        }
    )
    return _derive_paths(settings, ports)


def _check_stats_ports(settings: dict, ports: list[int]) -> None:
    # Every flavor serves its local stats there (the cell exporter reads them).
    if ports[-1] + STATS_PORT_OFFSET > 65535:
        _fail(
            "base_port",
            settings["base_port"],
            f"each replica also uses port+{STATS_PORT_OFFSET} (local stats, 127.0.0.1); "
            f"use a base_port up to {65535 - STATS_PORT_OFFSET - settings['replicas'] + 1}",
        )


def _addresses(settings: dict) -> tuple[str, str]:
    """The address the replicas listen on (checked against the families) and the host in the links."""
    client_ip = settings["client_ip"]
    # With the PROXY protocol a replica believes any header it is sent: only
    # HAProxy on this host may reach it.
    default_backend = "127.0.0.1" if client_ip == "proxy_protocol" else ""
    backend_address = settings["backend_address"] or default_backend or primary_ipv4()
    _check_families(settings, backend_address)
    public_host = settings["public_host"] or (backend_address if client_ip == "tproxy" else primary_ipv4("public_host"))
    return backend_address, public_host


def _main_secret(settings: dict, extra_secrets: list[str], generate_secret: bool) -> str:
    """``mtproxy:secret``, else the one generated and kept in secret_file (empty when not generating)."""
    secret = settings["secret"]
    if secret:
        secret = validate_secret(secret)
    elif generate_secret:
        secret = generated_secret(settings["secret_file"])
    if secret in extra_secrets:
        _fail("extra_secrets", HIDDEN, "every secret must differ from the others and from mtproxy:secret")
    return secret


def _derive_paths(settings: dict, ports: list[int]) -> dict:
    """``settings`` plus the replica list, HAProxy's folders, sockets and server options, the return path's ports."""
    config_dir, run_dir, haproxy = settings["config_dir"], settings["run_dir"], settings["haproxy"]
    haproxy_config_dir = f"{config_dir}/haproxy"
    haproxy_run_dir = f"{run_dir}/haproxy"
    settings["replica_list"] = [
        {
            "name": f"{REPLICA_PREFIX}{index}",
            "index": index,
            "port": port,
            "config_dir": f"{config_dir}/replicas/{REPLICA_PREFIX}{index}",
            # The replica's local stats (127.0.0.1 only), read by the cell exporter.
            "stats_port": port + STATS_PORT_OFFSET,
        }
        for index, port in enumerate(ports, start=1)
    ]
    health_check = haproxy["health_check"]
    haproxy.update(
        {
            "server_options": health_check["options"] or HEALTH_CHECK_PROFILES[health_check["profile"]],
            "config_dir": haproxy_config_dir,
            "config_file": f"{haproxy_config_dir}/haproxy.cfg",
            "run_dir": haproxy_run_dir,
            "master_socket": f"{haproxy_run_dir}/master.sock",
            "admin_socket": f"{haproxy_run_dir}/admin.sock",
            "state_file": f"{haproxy_run_dir}/server-state",
            "backend": BACKEND,
            "config_mount": HAPROXY_CONFIG_MOUNT,
            "run_mount": HAPROXY_RUN_MOUNT,
        }
    )
    settings["tproxy"]["ports"] = ports
    return settings


def _extra_secrets(settings: dict) -> list[str]:
    """``mtproxy:extra_secrets``, each checked (their number per flavor is the schema's: mtproxy_flavor.check)."""
    extra = settings["extra_secrets"]
    result = [validate_secret(value, f"extra_secrets:{index}") for index, value in enumerate(extra)]
    if len(set(result)) != len(result) or (settings["secret"] and settings["secret"] in result):
        _fail("extra_secrets", HIDDEN, "every secret must differ from the others and from mtproxy:secret")
    return result


def _check_families(settings: dict, backend_address: str) -> None:
    """
    Address combinations that cannot carry a client (checked once the
    backend address is known):

    - the backend address must be one a replica can listen on: not 0.0.0.0,
      ::, multicast;
    - (an IPv6 address for a flavor that listens on IPv4 only is refused by
      the schema, from the flavor's record: ``mtproxy_flavor.check``);
    - with the PROXY protocol the backend address is loopback;
    - in transparent mode HAProxy connects to a replica from the client's own
      address (usesrc clientip), so the clients and the replicas must be of
      one family: frontend_bind's family (:: counts as IPv6) equals the
      backend address's, and tproxy:family routes that family's replies.
    """
    backend = ipaddress.ip_address(backend_address)
    key = "backend_address"
    if backend.is_unspecified or backend.is_multicast:
        _fail(key, backend_address, "use an address of this host the replicas listen on, not a wildcard or multicast")
    if settings["client_ip"] == "proxy_protocol":
        if not backend.is_loopback:
            _fail(
                key,
                backend_address,
                "with client_ip proxy_protocol a replica trusts the PROXY header it is sent, so it must not be "
                "reachable from outside the host: use a loopback address such as 127.0.0.1 (the default)",
            )
        return
    frontend = ipaddress.ip_address(settings["haproxy"]["frontend_bind"])
    if frontend.version != backend.version:
        _fail(
            "haproxy:frontend_bind",
            settings["haproxy"]["frontend_bind"],
            f"in transparent mode (client_ip tproxy) HAProxy connects to the replicas from the client's own "
            f"address, which cannot reach an IPv{backend.version} backend_address ({backend_address}) from "
            f"IPv{frontend.version}: bind an IPv{backend.version} address, or use client_ip proxy_protocol",
        )
    family = settings["tproxy"]["family"]
    if family != "both" and family != f"ipv{backend.version}":
        _fail(
            "tproxy:family",
            family,
            f"the replies of an IPv{backend.version} backend_address ({backend_address}) need "
            f"ipv{backend.version} (or both) return-path rules",
        )


def _sysctl(settings: dict, name: str) -> str | None:
    """A kernel parameter as the cell will have it: the pillar's (transparent mode sets it), else the host's."""
    configured = settings["sysctls"].get(name)
    if configured is not None and settings["client_ip"] == "tproxy":
        return str(configured)
    try:
        with open(os.path.join(PROC_SYSCTL, *name.split("."))) as handle:
            return handle.read()
    except OSError:
        return None


def _port_set(text: str) -> set[int]:
    """Ports of ``ip_local_reserved_ports`` text: ``8080,9000-9100``."""
    ports: set[int] = set()
    for item in text.replace(" ", "").strip().split(","):
        low, _, high = item.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            ports.update(range(int(low), int(high or low) + 1))
    return ports


def _check_ephemeral_ports(settings: dict, ports: list[int]) -> None:
    """
    Refuse a listening port inside the host's ephemeral range
    (``net.ipv4.ip_local_port_range``) that ``ip_local_reserved_ports`` does
    not reserve. The kernel picks the source ports of outbound connections
    there: a replica could find its port taken, and the return path (which
    matches replies by source port) would capture the host's own connections.

    The formula refuses rather than reserving them itself: the reserved list
    is one global setting shared with everything else on the host, which the
    formula cannot merge with or take back safely; the operator keeps it
    (pillar ``sysctls`` can set it, and is honoured here).
    """
    text = _sysctl(settings, "net.ipv4.ip_local_port_range")
    if not text or len(text.split()) != 2 or not all(word.isdigit() for word in text.split()):
        return
    low, high = (int(word) for word in text.split())
    reserved = _port_set(_sysctl(settings, "net.ipv4.ip_local_reserved_ports") or "")
    listening = [("base_port", port) for port in ports]
    # Every flavor's replica also serves its local stats on port + offset.
    listening += [("base_port", port + STATS_PORT_OFFSET) for port in ports]
    listening += [(f"haproxy:{key}", settings["haproxy"][key]) for key in ("frontend_port", "stats_port")]
    for key, port in listening:
        if low <= port <= high and port not in reserved:
            _fail(
                key,
                _lookup(settings, key),
                f"port {port} lies in this host's ephemeral port range {low}-{high} "
                "(net.ipv4.ip_local_port_range), where the kernel picks the source ports of outbound "
                "connections: the port could be taken, and the return path would catch the host's own "
                f"connections. Use ports below {low}, or reserve them in net.ipv4.ip_local_reserved_ports",
            )


def _check_foreign_routing(settings: dict) -> None:
    """Refuse a routing table or mark that rules, routes or mangle rules not of this formula use."""
    tproxy = settings["tproxy"]
    if settings["client_ip"] != "tproxy" or "tproxy.foreign" not in __salt__:
        return
    found = __salt__["tproxy.foreign"](
        mark=tproxy["mark"], table=tproxy["table"], family=tproxy["family"], method=tproxy["method"]
    )
    if not found:
        return
    by_mark = all("fwmark" in item or "mangle" in item for item in found)
    key = "tproxy:mark" if by_mark else "tproxy:table"
    _fail(
        key,
        tproxy["mark"] if by_mark else tproxy["table"],
        f"table {tproxy['table']} or mark {tproxy['mark']} is already used by rules or routes that are not this "
        f"formula's: {'; '.join(found)}. Choose a free tproxy:table and tproxy:mark, or remove them",
    )


def _lookup(settings: dict, key: str) -> Any:
    node: Any = settings
    for part in key.split(":"):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def listen_label(address: str, port: int) -> str:
    """The label that says where a replica container listens: a change of it replaces the container."""
    host = f"[{address}]" if ":" in address else address
    return f"{LISTEN_LABEL}={host}:{int(port)}"


def _listen(value: str | None) -> tuple[str, int] | None:
    """``(address, port)`` of a listen label's value; None when it is not one."""
    host, _, port = (value or "").rpartition(":")
    if not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _engine_socket_exists() -> bool:
    """Whether the Docker endpoint Salt uses is a unix socket that exists (or not a unix socket at all)."""
    url = __salt__["config.option"]("docker.url", "") or os.environ.get("DOCKER_HOST", "")
    url = url or "unix:///var/run/docker.sock"
    if not url.startswith("unix://"):
        return True  # a TCP endpoint: its absence is an error worth showing
    return os.path.exists(url[len("unix://") :])


def _labelled(role: str) -> list[dict]:
    """The containers (``docker ps`` entries) labelled ``mtproxy-formula.role=<role>``, running or not.

    None when the Docker modules are not loaded yet (a first run on a fresh
    host), or when there is no engine socket at all. Any other Docker error is
    raised: "none" would be a guess.
    """
    if "docker.ps" not in __salt__:
        return []
    try:
        found = __salt__["docker.ps"](all=True, filters={"label": f"{ROLE_LABEL}={role}"})
    except Exception as exc:  # any Docker failure but "no engine at all": refuse to guess
        if not _engine_socket_exists():
            # A fresh host with the Docker SDK but no engine yet: engine.sls installs it.
            log.info("mtproxy: no Docker engine socket yet, so no %s containers: %s", role, exc)
            return []
        raise CommandExecutionError(
            f"Cannot list the {role} containers (label {ROLE_LABEL}={role}) through Docker: {exc}"
        ) from exc
    return list(found.values())


def existing_replicas(base_port: int | None = None, backend_address: str | None = None) -> list[dict]:
    """
    The replica containers that exist now, running or not, in replica order:
    the containers labelled ``mtproxy-formula.role=replica`` (not their
    names: a container of another role is never taken for a replica). Each is
    ``{'name', 'index', 'address', 'port', 'labelled'}``; ``address`` and
    ``port`` say where it really listens (its ``mtproxy-formula.listen``
    label). A container made before that label existed is taken to listen on
    ``backend_address`` and ``base_port`` + index - 1 (``labelled``: False).

    Empty when the Docker modules are not loaded yet (a first run on a fresh
    host). Any other Docker error is raised: "no replicas" would be a guess.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.existing_replicas
    """
    replicas = []
    for container in _labelled("replica"):
        names = [n.lstrip("/") for n in container.get("Names") or []]
        name = next((n for n in names if re.match(rf"^{REPLICA_PREFIX}\d+$", n)), None)
        if name is None:
            log.warning("mtproxy: container %s has label %s=replica but no replica name", names, ROLE_LABEL)
            continue
        index = int(name[len(REPLICA_PREFIX) :])
        listen = _listen((container.get("Labels") or {}).get(LISTEN_LABEL))
        if listen is None and base_port is not None:
            listen = (backend_address or "", int(base_port) + index - 1)
        address, port = listen if listen else ("", None)
        replicas.append(
            {
                "name": name,
                "index": index,
                "address": address,
                "port": port,
                "labelled": LISTEN_LABEL in (container.get("Labels") or {}),
            }
        )
    return sorted(replicas, key=lambda r: r["index"])


def refuse_live_restart(cell: dict) -> None:
    """
    Refuse, naming the key, what a live cell cannot take one replica at a
    time. Called while replicas.sls renders, so nothing has changed yet.

    - ``client_ip``: HAProxy sends PROXY headers to every server or to none,
      and a transparent connection cannot reach a loopback replica: halfway
      through a rollout every client of the switched replicas would fail.
      Refused unless ``haproxy:allow_restart`` is true for that apply.
    - Whatever recreates the HAProxy container (``haproxy:image``, also a
      rebuilt image under the same name, ``config_dir``, ``run_dir``): it cuts
      every connection HAProxy holds. Refused unless
      ``haproxy:allow_restart`` is true for that apply.
    - ``haproxy:container`` (a rename): the new container could not bind the
      frontend while the old one holds it. Refused on a live cell.
    """
    live = _live_haproxy(cell["haproxy"])
    if live is None or cell["haproxy"].get("allow_restart"):
        return
    container, binds, loaded = live
    _refuse_client_ip_switch(cell, loaded)
    _refuse_other_folders(cell, binds)
    _refuse_other_image(cell["haproxy"], container)


def _live_haproxy(haproxy: dict) -> tuple[dict, dict[str, str], str] | None:
    """
    The live HAProxy container (inspected), its bind mounts (host folder ->
    where HAProxy sees it) and the config it loaded; None without one.
    Refuses a rename (``haproxy:container``), allowed restart or not.
    """
    live = _labelled("haproxy")
    if not live:
        return None
    names = [n.lstrip("/") for n in live[0].get("Names") or []]
    if haproxy["container"] not in names:
        _fail(
            "haproxy:container",
            haproxy["container"],
            f"the cell's HAProxy runs as {names[0] if names else live[0].get('Id', '?')[:12]}; a renamed HAProxy "
            "could not bind the frontend while the live one holds it: keep the name, or remove the cell first "
            "(mtproxy.clean with the old name)",
        )
    container = __salt__["docker.inspect_container"](names[0])
    binds = dict(bind.split(":")[:2] for bind in (container.get("HostConfig") or {}).get("Binds") or [])
    config_folder = next((host for host, inside in binds.items() if inside == HAPROXY_CONFIG_MOUNT), None)
    try:
        loaded = pathlib.Path(config_folder or "/nonexistent", "haproxy.cfg").read_text(encoding="utf-8")
    except OSError:
        loaded = ""
    return container, binds, loaded


def _refuse_client_ip_switch(cell: dict, loaded: str) -> None:
    if not loaded:
        return
    live_mode = "proxy_protocol" if "send-proxy-v2" in loaded else "tproxy"
    if live_mode != cell["client_ip"]:
        _fail(
            "client_ip",
            cell["client_ip"],
            f"the live cell runs {live_mode}, and a switch cannot roll one replica at a time (HAProxy sends "
            "PROXY headers to every replica or to none): new connections fail until the last replica and "
            "HAProxy are switched. Set mtproxy:haproxy:allow_restart: true for this apply to accept that",
        )


def _refuse_other_folders(cell: dict, binds: dict[str, str]) -> None:
    haproxy = cell["haproxy"]
    for key, folder in (("config_dir", haproxy["config_dir"]), ("run_dir", haproxy["run_dir"])):
        if binds and folder not in binds:
            _fail(
                key,
                cell[key],
                "the live HAProxy container mounts another folder, and a new one means a new container, which "
                "cuts every connection it holds: keep it, or set mtproxy:haproxy:allow_restart: true for this apply",
            )


def _refuse_other_image(haproxy: dict, container: dict) -> None:
    try:
        wanted = __salt__["docker.inspect_image"](haproxy["image"])["Id"]
    except Exception:  # not here: the state's pull fails before it touches the container
        return
    if container.get("Image") != wanted:
        _fail(
            "haproxy:image",
            haproxy["image"],
            f"it is {wanted[:19]}, the live HAProxy runs {str(container.get('Image'))[:19]}; replacing the container "
            "cuts every connection it holds: set mtproxy:haproxy:allow_restart: true for this apply to accept that",
        )


def rollout(cell: dict, existing: list[dict]) -> list[dict]:
    """
    The replicas of ``cell`` (resolved settings) in the order they are
    replaced, one at a time: a replica whose new port another existing
    replica still listens on goes after that one (a base_port raised by less
    than the replica count rolls from the last replica down). Refused, naming
    ``mtproxy:base_port``, when no order works: the port is held by a replica
    this apply removes (only after the rollout), or the moves form a cycle.
    """
    held = {r["port"]: r["name"] for r in existing if r["port"] is not None}
    wanted = {r["name"] for r in cell["replica_list"]}
    pending = list(cell["replica_list"])
    order: list[dict] = []
    while pending:
        free = [r for r in pending if held.get(r["port"], r["name"]) == r["name"]]
        if not free:
            # Follow the chain of waits to what blocks it: a replica to be removed, or a cycle.
            blocked, seen = pending[0], set()
            holder = held[blocked["port"]]
            while holder in wanted and holder not in seen:
                seen.add(holder)
                blocked = next(r for r in pending if r["name"] == holder)
                holder = held[blocked["port"]]
            why = (
                f"which is removed only after the rollout (replicas {len(existing)} -> {cell['replicas']}); "
                "change replicas and base_port in two applies"
                if holder not in wanted
                else "and the replicas' moves form a cycle; first apply a base_port whose ports no replica uses now"
            )
            used = ", ".join(str(port) for port in sorted(held))
            _fail(
                "base_port",
                cell["base_port"],
                f"replica {blocked['name']} would move to port {blocked['port']}, where {holder} listens, {why} "
                f"(ports in use: {used})",
            )
        replica = free[0]
        order.append(replica)
        pending.remove(replica)
        held = {port: name for port, name in held.items() if name != replica["name"]}
        held[replica["port"]] = replica["name"]
    return order


def return_path_ports(cell: dict, existing: list[dict]) -> list[int]:
    """The ports the return path covers during an apply: the cell's new ports
    and those existing replicas really listen on, so neither the replicas
    still on an old port nor the new ones lose their clients' replies."""
    return sorted(set(cell["ports"]) | {r["port"] for r in existing if r["port"] is not None})


def return_path(cell: dict, existing: list[dict] | None = None) -> dict:
    """
    The return path of ``cell`` (resolved settings), built in one place
    (``_utils/mtproxy_common.py``) for the states and for :func:`status`:
    the ``arguments`` of ``tproxy.present`` (and of the boot unit's settings
    file), the boot and watchdog units' files and commands. With ``existing``
    (:func:`existing_replicas`), the ports are :func:`return_path_ports`.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.return_path "$(salt-call --out=json mtproxy.settings show_secrets=True)"
    """
    return mtproxy_common.return_path(cell, None if existing is None else return_path_ports(cell, existing))


def settings(show_secrets: bool = False, tplroot: str = "mtproxy", bootstrapping: bool = False) -> dict:
    """
    The cell's settings, exactly as the states see them (``mtproxy/map.jinja``
    is this call): :func:`layered`, then ``mtproxy_bootstrap.resolve``, which
    refuses in one line an apply that must wait for ``mtproxy.bootstrap`` and
    then validates and derives them (:func:`resolve`). A bad pillar value
    fails here, naming its key, before anything on the host changes.

    A generated secret is kept in ``secret_file``, so every call gives the
    same one (under ``test=True`` the one made up is reused for the whole run).

    show_secrets
        Return the secrets and the stats and exporter passwords as they are,
        for the states and the other functions. By default they show as
        ``<hidden>``: the debugging view (template-formula's ``_mapdata``).
    tplroot
        The formula's folder on the Salt file server.
    bootstrapping
        Set while ``mtproxy.bootstrap`` renders: no refusal, no secret made.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.settings
    """
    cell = __salt__["mtproxy_bootstrap.resolve"](layered(tplroot), bootstrapping=bootstrapping)
    return cell if show_secrets else masked_settings(cell)


def layered(tplroot: str = "mtproxy") -> dict:
    """
    The settings before validation, layered the template-formula way:
    ``parameters/defaults.yaml`` < ``parameters/os_family/<os_family>.yaml``
    (Debian's when the family has none) < pillar ``mtproxy:lookup`` < pillar
    ``mtproxy``. The files come from the Salt file server
    (``salt://<tplroot>/parameters/``), as the states' own files do.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.layered
    """
    family = __salt__["grains.get"]("os_family") or "Debian"
    os_family = _parameters(tplroot, f"os_family/{family}.yaml", missing_ok=True)
    if os_family is None:
        os_family = _parameters(tplroot, "os_family/Debian.yaml")
    # __pillar__, not pillar.get: Salt 3008's pillar.get masks every value outside a template.
    pillar = salt.utils.secret.expose(copy.deepcopy(__pillar__.get("mtproxy") or {}))
    lookup = pillar.pop("lookup", None) or {}
    return _merged(_parameters(tplroot, "defaults.yaml") or {}, os_family or {}, lookup, pillar)


def _parameters(tplroot: str, name: str, missing_ok: bool = False) -> dict | None:
    """The ``mtproxy`` key of ``salt://<tplroot>/parameters/<name>``; None when missing_ok and it is missing."""
    url = f"salt://{tplroot}/parameters/{name}"
    text = __salt__["cp.get_file_str"](url)
    if text is False or text is None:
        if missing_ok:
            return None
        raise CommandExecutionError(f"Cannot read {url}: is the formula on the Salt file server (file_roots)?")
    return (salt.utils.yaml.safe_load(text) or {}).get("mtproxy") or {}


def _merged(*layers: dict) -> dict:
    """
    ``layers`` merged in order, the later winning: mappings key by key, anything
    else (lists too) replaced. Salt's own recurse merge (``slsutil.merge``'s).
    """
    return functools.reduce(salt.utils.dictupdate.merge_recurse, layers, {})


def masked_settings(cell: dict) -> dict:
    """
    ``cell`` (resolved settings) with its credentials shown as ``<hidden>``
    (:data:`CREDENTIALS`; an empty one stays empty), and any other text
    that contains one masked as in :func:`mask`.
    """
    cell = copy.deepcopy(cell)
    hidden: list[str] = []
    for key in CREDENTIALS:
        parent, _, name = key.rpartition(":")
        node = _lookup(cell, parent) if parent else cell
        value = node.get(name) if isinstance(node, dict) else None
        if not value:
            continue
        values = value if isinstance(value, list) else [value]
        hidden += [item for item in values if isinstance(item, str) and item]
        node[name] = [HIDDEN] * len(value) if isinstance(value, list) else HIDDEN
    return _masked_text(cell, hidden)


def _masked_text(node: Any, hidden: list[str]) -> Any:
    if isinstance(node, dict):
        return {key: _masked_text(value, hidden) for key, value in node.items()}
    if isinstance(node, list):
        return [_masked_text(value, hidden) for value in node]
    return mask(node, hidden) if isinstance(node, str) else node


def build_links(host: str, port: int, secrets: str | list[str], modes: list[str], tls_domain: str = "") -> list[dict]:
    """
    Client links: one per secret and mode, ``classic`` (the bare secret),
    ``secure`` (``dd``: random padding) and ``tls`` (``ee``: fake-TLS, the
    secret followed by the domain in hex).
    """
    prefixes = {"classic": "", "secure": "dd", "tls": "ee"}
    links = []
    for index, secret in enumerate([secrets] if isinstance(secrets, str) else secrets):
        for mode in modes:
            client_secret = prefixes[mode] + secret + (tls_domain.encode().hex() if mode == "tls" else "")
            query = urllib.parse.urlencode({"server": host, "port": port, "secret": client_secret})
            links.append(
                {
                    "secret": index,
                    "mode": mode,
                    "tg": f"tg://proxy?{query}",
                    "https": f"https://t.me/proxy?{query}",
                }
            )
    return links


def mask(text: str, secrets: str | list[str]) -> str:
    """Hide the secrets in ``text``, keeping the first 4 characters of each as a hint."""
    for secret in [secrets] if isinstance(secrets, str) else secrets:
        if secret:
            text = text.replace(secret, secret[:4] + "…" + "*" * 8)
    return text


def links(masked: bool = False, cell: dict | None = None) -> list[dict]:
    """
    The links clients use to connect, for the cell's public host (with
    ``mtproxy:vip`` enabled: each floating address instead) and frontend
    port (``tg://`` and ``https://t.me``): one per address, secret and mode
    (``secret`` is the secret's index: 0 is ``mtproxy:secret``, then
    ``mtproxy:extra_secrets``).

    masked
        Hide the secret (for logs and state output).
    cell
        The resolved settings (``mtproxy.settings show_secrets=True``), when
        the caller has them already.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.links
    """
    cell = cell or settings(show_secrets=True)
    vip = cell["vip"]
    # Every floating address reaches a serving cell: DNS carries them all.
    hosts = [entry["address"] for entry in vip["addresses"]] if vip["enabled"] else [cell["public_host"]]
    port = cell["haproxy"]["frontend_port"]
    result = [
        link for host in hosts for link in build_links(host, port, cell["secrets"], cell["modes"], cell["tls_domain"])
    ]
    if masked:
        for link in result:
            for key in ("tg", "https"):
                link[key] = mask(link[key], cell["secrets"])
    return result


def status() -> dict:
    """
    Per replica: container state, HAProxy status and current sessions; plus
    the HAProxy container's state and the stats URL; plus the return path:
    ``ok`` and ``missing``/``stale`` rules (``tproxy.check`` with the cell's
    settings) and, when the watchdog runs, its last check, last repair and
    what it repaired; plus the guards: entries in the replay table and, with
    client limits, connections refused and the addresses with the most
    connections (counts only, never a key of the replay table).

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.status
    """
    cell = settings(show_secrets=True)
    haproxy = cell["haproxy"]
    servers, haproxy_error = _haproxy_servers(haproxy)
    return {
        "haproxy": {
            "container": _container_state(haproxy["container"]),
            "frontend": f"{haproxy['frontend_bind']}:{haproxy['frontend_port']}",
            "stats_url": f"http://{haproxy['stats_bind']}:{haproxy['stats_port']}/stats",
            "error": haproxy_error,
        },
        "replicas": _replica_status(cell, servers),
        "return_path": _return_path(cell),
        "guards": _guards(cell),
        # Per secret (by index): sessions now, sessions and bytes since each replica started.
        "secrets": __salt__["mtproxy_exporter.secrets"](cell),
    }


def _haproxy_servers(haproxy: dict) -> tuple[dict[str, dict], str | None]:
    """The replicas' servers in HAProxy's backend, by name, from every worker; or the error that hid them."""
    try:
        found = __salt__["haproxy_runtime.servers"](
            backend=BACKEND,
            all_workers=True,
            admin_socket=haproxy["admin_socket"],
            master_socket=haproxy["master_socket"],
        )
    except CommandExecutionError as exc:
        return {}, str(exc)
    return {server["server"]: server for server in found.values()}, None


def _container_state(name: str) -> str:
    try:
        return __salt__["docker.state"](name)
    except CommandExecutionError:
        return "absent"


def _replica_status(cell: dict, servers: dict[str, dict]) -> list[dict]:
    """Each replica, the pillar's and those that exist, with its container and HAProxy server state."""
    # Where each replica listens now (its label), else where the pillar puts it.
    ports = {r["name"]: r["port"] for r in cell["replica_list"]}
    ports.update({r["name"]: r["port"] for r in existing_replicas(cell["base_port"], cell["backend_address"])})
    replicas = []
    for name in sorted(ports, key=lambda n: int(n[len(REPLICA_PREFIX) :])):
        server = servers.get(name, {})
        replicas.append(
            {
                "name": name,
                "port": ports[name],
                "container": _container_state(name),
                "haproxy": server.get("status", "not configured"),
                "sessions": server.get("scur", 0),
                "check": server.get("check_status", ""),
            }
        )
    return replicas


TOP_ADDRESSES = 10


def _guards(cell: dict) -> dict:
    """What the cell-wide guards do (counts only): the replay table's fill, and per-address
    limits' refusals with the addresses holding the most connections."""
    haproxy = cell["haproxy"]
    sockets = {"admin_socket": haproxy["admin_socket"], "master_socket": haproxy["master_socket"]}
    limits = haproxy["client_limits"]
    report: dict[str, Any] = {
        "replay_guard": {"enabled": haproxy["replay_guard"]["enabled"]},
        "client_limits": {
            "enabled": bool(
                limits["max_connections"] or limits["max_new"] or limits["bandwidth_in"] or limits["bandwidth_out"]
            )
        },
    }
    try:
        if report["replay_guard"]["enabled"]:
            # Header only: the keys are clients' handshakes.
            replays = __salt__["haproxy_runtime.table"](BACKEND, entries=False, **sockets)
            report["replay_guard"].update(entries=replays["used"], size=replays["size"])
        if report["client_limits"]["enabled"]:
            clients = __salt__["haproxy_runtime.table"](CLIENTS_TABLE, **sockets)
            front = __salt__["haproxy_runtime.frontend"](FRONTEND, **sockets)
            top = sorted(clients["entries"], key=lambda e: (-e.get("conn_cur", 0), -e.get("gpc0", 0), e["key"]))
            report["client_limits"].update(
                # Since the current HAProxy worker started (a reload starts it again).
                rejected=front["denied_connections"],
                addresses=clients["used"],
                size=clients["size"],
                top=[
                    {
                        "address": entry["key"],
                        "connections": entry.get("conn_cur", 0),
                        "new_per_period": entry.get("conn_rate", 0),
                        "rejected": entry.get("gpc0", 0),
                    }
                    for entry in top[:TOP_ADDRESSES]
                ],
            )
    except CommandExecutionError as exc:
        report["error"] = str(exc)
    return report


def _return_path(cell: dict) -> dict:
    """The return path of ``cell`` (resolved settings): rules present, the watchdog's last repair."""
    if cell["client_ip"] != "tproxy":
        return {"ok": None, "used": False, "client_ip": cell["client_ip"]}
    paths = return_path(cell)
    report: dict[str, Any] = {"ok": None, "used": True, "missing": [], "stale": []}
    try:
        if "tproxy.check" not in __salt__:
            raise CommandExecutionError("the tproxy module is not available (pyroute2 missing?)")
        result = __salt__["tproxy.check"](**paths["arguments"])
        report.update(ok=result["ok"], missing=result["missing"], stale=result["stale"])
    except Exception as exc:  # SaltInvocationError too: report it, never fail status
        report.update(ok=False, error=str(exc))
    try:
        with open(paths["status"]) as handle:
            watchdog = json.load(handle)
        report["watchdog"] = {
            key: watchdog.get(key) for key in ("last_check", "last_repair", "repaired", "ok", "error", "pid")
        }
    except (OSError, ValueError, AttributeError):
        report["watchdog"] = None
    return report
