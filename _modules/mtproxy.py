"""
Settings, links and status of an MTProxy cell deployed by mtproxy-formula.

``mtproxy/map.jinja`` layers the formula's parameters and pillar, then calls
:py:func:`resolve` to validate them and derive the rest. The other functions
work from the same settings (:py:func:`settings` renders map.jinja), so the
CLI and the states never disagree.

CLI examples:

.. code-block:: bash

    salt '*' mtproxy.links
    salt '*' mtproxy.status
    salt '*' mtproxy.settings
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import urllib.parse
from typing import Any

try:
    from salt.exceptions import CommandExecutionError
except ImportError:  # imported without Salt, e.g. by unit tests of pure logic

    class CommandExecutionError(Exception):  # type: ignore[no-redef]
        pass


log = logging.getLogger(__name__)

__virtualname__ = "mtproxy"

HEX32 = re.compile(r"^[0-9a-f]{32}$")
# Secrets that appear in examples and docs: never serve with them.
PLACEHOLDER_SECRETS = {
    "0" * 32,
    "0123456789abcdef0123456789abcdef",
    "00000000000000000000000000000001",
    "b3b34e89c9471207ad107a03b565e9a3",  # the original design's demo secret
}
BACKEND = "mtproxy_replicas"
REPLICA_PREFIX = "mtproxy_"
# Where the HAProxy container sees the bind-mounted folders.
HAPROXY_CONFIG_MOUNT = "/etc/haproxy"
HAPROXY_RUN_MOUNT = "/run/haproxy"
REPLICA_CONFIG_MOUNT = "/etc/mtprotoproxy"
# Written by the return-path watchdog (mtproxy/watchdog.sls) in run_dir.
WATCHDOG_STATUS = "return-path.status"

HEALTH_CHECK_PROFILES = {
    # Measured (DESIGN.md section 3): DOWN in about 1 s, 0 failed new
    # connections per replica crash; observe layer4 marks a dead server down
    # on the first failed client connection.
    "fast": "check inter 1s fastinter 250ms downinter 1s fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down",
    # The original design: DOWN after about 6 s.
    "original": "check inter 3s fall 2 rise 2",
}
# What each MTProxy implementation can do (DESIGN.md section 7). A setting a
# flavor cannot honour is refused at render time, naming the key.
FLAVORS: dict[str, dict[str, Any]] = {
    # alexbers/mtprotoproxy, built locally (images/mtprotoproxy).
    "mtprotoproxy": {
        "image": "mtproxy-formula/mtprotoproxy:local",
        "client_ip": ("tproxy", "proxy_protocol"),
        "modes": ("classic", "secure", "tls"),
        "max_secrets": 16,
        "ad_tag": True,
    },
    # telegrammessenger/proxy: the original design's image (C, upstream
    # frozen since 2019): no PROXY protocol, no fake-TLS.
    "official": {
        "image": "telegrammessenger/proxy:latest",
        "client_ip": ("tproxy",),
        "modes": ("classic", "secure"),
        "max_secrets": 16,
        "ad_tag": True,
    },
    # 9seconds/mtg v2: fake-TLS only, one secret, no ad tag by design.
    "mtg": {
        "image": "nineseconds/mtg:2",
        "client_ip": ("tproxy", "proxy_protocol"),
        "modes": ("tls",),
        "max_secrets": 1,
        "ad_tag": False,
    },
}
CLIENT_IP = ("tproxy", "proxy_protocol")
MODES = ("classic", "secure", "tls")
# The official image's local stats port: replica port + this offset.
OFFICIAL_STATS_OFFSET = 10000
BALANCE = ("leastconn", "roundrobin")
TPROXY_METHODS = ("mark", "sport")
FAMILIES = ("ipv4", "ipv6", "both")
IMAGE_REF = re.compile(
    r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)


def __virtual__():
    return __virtualname__


class SettingsError(CommandExecutionError):
    """A pillar value the formula cannot use; the message names the key."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise SettingsError(f"Pillar mtproxy:{key} is {value!r}: {allowed}")


def _integer(settings: dict, key: str, low: int, high: int) -> int:
    value = _lookup(settings, key)
    if isinstance(value, bool) or (not isinstance(value, int) and not (isinstance(value, str) and value.isdigit())):
        _fail(key, value, f"use an integer from {low} to {high}")
    number = int(value)
    if not low <= number <= high:
        _fail(key, value, f"use an integer from {low} to {high}")
    return number


def _lookup(settings: dict, key: str) -> Any:
    node: Any = settings
    for part in key.split(":"):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _text(settings: dict, key: str, allowed: str) -> str:
    """A string setting; empty (or unset) gives ""."""
    value = _lookup(settings, key)
    if value in (None, ""):
        return ""
    if not isinstance(value, str):
        _fail(key, value, allowed)
    return value


def _flag(settings: dict, key: str) -> bool:
    value = _lookup(settings, key)
    if not isinstance(value, bool):
        _fail(key, value, "use true or false")
    return value


def _choice(settings: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = _lookup(settings, key)
    if value not in allowed:
        _fail(key, value, "use one of " + ", ".join(allowed))
    return value


def validate_secret(secret: Any, key: str = "secret") -> str:
    if not isinstance(secret, str) or not HEX32.match(secret.lower()):
        _fail(
            key,
            "<hidden>" if isinstance(secret, str) else secret,
            "use 32 hex characters (16 random bytes), e.g. from `openssl rand -hex 16`, or leave it empty "
            "to generate one",
        )
    secret = secret.lower()
    if secret in PLACEHOLDER_SECRETS or len(set(secret)) < 4:
        _fail(key, "<hidden>", "this is a placeholder or trivially guessable secret; use `openssl rand -hex 16`")
    return secret


def generated_secret(path: str) -> str:
    """
    The secret generated for this host: made once and kept in ``path``
    (pillar ``mtproxy:secret_file``, 0600 in a 0700 folder) so the links stay
    valid across applies, also over salt-ssh where grains do not persist.
    Under ``test=True`` a missing secret is made up but not kept.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.generated_secret /var/lib/mtproxy/secret
    """
    try:
        with open(path, encoding="ascii") as kept:
            secret = kept.read().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        secret = ""
    if HEX32.match(secret):
        return secret
    secret = secrets.token_hex(16)
    if not __opts__.get("test"):
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as kept:
            kept.write(secret + "\n")
    return secret


def primary_ipv4() -> str:
    """
    The host's primary IPv4 address: the address of the default route's
    interface, else the first address that is neither loopback nor a Docker
    bridge.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.primary_ipv4
    """
    try:
        routes = __salt__["network.default_route"]("inet")
    except CommandExecutionError:
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
    raise CommandExecutionError("Cannot find this host's primary IPv4 address: set pillar mtproxy:backend_address")


def resolve(settings: dict, generate_secret: bool = True) -> dict:
    """
    Validate the layered settings (map.jinja) and derive what the states need.

    Raises an error that names the pillar key, its value and what is allowed;
    called at render time, so nothing on the host has changed yet.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.resolve '{"replicas": 2, ...}'
    """
    settings = dict(settings)
    max_replicas = _integer(settings, "max_replicas", 1, 1000)
    replicas = _integer(settings, "replicas", 1, max_replicas)
    _integer(settings, "drain_timeout", 0, 86400)
    _integer(settings, "handshake_timeout", 0, 86400)
    environment = settings.get("replica_environment") or {}
    if not isinstance(environment, dict) or not all(isinstance(k, str) and k for k in environment):
        _fail("replica_environment", environment, "use a mapping of variable names to values")
    settings["replica_environment"] = {k: str(v) for k, v in environment.items()}
    base_port = _integer(settings, "base_port", 1, 65535)
    if base_port + replicas - 1 > 65535:
        _fail(
            "base_port",
            base_port,
            f"with {replicas} replicas the last port would be {base_port + replicas - 1}; "
            "use a base_port that leaves room below 65536",
        )
    ports = list(range(base_port, base_port + replicas))
    haproxy = dict(settings.get("haproxy") or {})
    frontend_port = _integer(settings, "haproxy:frontend_port", 1, 65535)
    stats_port = _integer(settings, "haproxy:stats_port", 1, 65535)
    for key, port in (("haproxy:frontend_port", frontend_port), ("haproxy:stats_port", stats_port)):
        if port in ports:
            _fail(key, port, f"it lies in the replica port range {ports[0]}-{ports[-1]}; choose another port")
    if frontend_port == stats_port:
        _fail("haproxy:stats_port", stats_port, "it is the frontend port too; give each role its own port")
    _choice(settings, "haproxy:balance", BALANCE)
    _integer(settings, "haproxy:maxconn", 1, 1000000)
    _flag(settings, "haproxy:splice")
    _flag(settings, "haproxy:redispatch")
    _integer(settings, "boot:watch_interval", 1, 3600)
    tproxy = dict(settings.get("tproxy") or {})
    _choice(settings, "tproxy:method", TPROXY_METHODS)
    _choice(settings, "tproxy:family", FAMILIES)
    _integer(settings, "tproxy:mark", 1, 0xFFFFFFFF)
    _integer(settings, "tproxy:table", 1, 0xFFFFFFFF - 1)
    flavor = _choice(settings, "flavor", tuple(FLAVORS))
    capabilities = FLAVORS[flavor]
    client_ip = _choice(settings, "client_ip", CLIENT_IP)
    if client_ip not in capabilities["client_ip"]:
        _fail(
            "client_ip",
            client_ip,
            f"flavor {flavor} does not accept the PROXY protocol; use tproxy, or flavor mtprotoproxy or mtg",
        )
    settings["image"] = _text(settings, "image", "use an image reference") or capabilities["image"]
    if flavor == "official" and ports[-1] + OFFICIAL_STATS_OFFSET > 65535:
        _fail(
            "base_port",
            base_port,
            f"flavor official also uses port+{OFFICIAL_STATS_OFFSET} (local stats) for each replica; "
            f"use a base_port up to {65535 - OFFICIAL_STATS_OFFSET - replicas + 1}",
        )
    for key in ("image", "haproxy:image"):
        image = _lookup(settings, key)
        if not isinstance(image, str) or not IMAGE_REF.match(image):
            _fail(key, image, "use an image reference such as mtproxy-formula/mtprotoproxy:local or repo/name:tag")
    for key in ("haproxy:frontend_bind", "haproxy:stats_bind"):
        _address(settings, key)
    stats_auth = _text(settings, "haproxy:stats_auth", 'use "user:password"')
    if stats_auth and not re.match(r"^[A-Za-z0-9._-]+:[^\s]{8,}$", stats_auth):
        _fail("haproxy:stats_auth", "<hidden>", 'use "user:password" with a password of 8 or more non-space characters')
    if not ipaddress.ip_address(haproxy["stats_bind"]).is_loopback and not stats_auth:
        _fail(
            "haproxy:stats_bind",
            haproxy["stats_bind"],
            'the stats page is public on this address; set haproxy:stats_auth ("user:password") '
            "or bind it to 127.0.0.1",
        )

    server_options = _text(settings, "haproxy:health_check:options", "use HAProxy server options as one string")
    if not server_options:
        profile = _choice(settings, "haproxy:health_check:profile", tuple(HEALTH_CHECK_PROFILES))
        server_options = HEALTH_CHECK_PROFILES[profile]

    secret = settings.get("secret") or ""
    if secret:
        secret = validate_secret(secret)
    elif generate_secret:
        secret_file = _text(settings, "secret_file", "use an absolute path")
        if not secret_file.startswith("/"):
            _fail("secret_file", secret_file, "use an absolute path such as /var/lib/mtproxy/secret")
        secret = generated_secret(secret_file)
    all_secrets = [secret, *_extra_secrets(settings, flavor, capabilities["max_secrets"], secret)]
    tls_domain = _text(settings, "tls_domain", "use a DNS name such as www.example.com, or leave it empty")
    if tls_domain and not re.match(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$", tls_domain):
        _fail("tls_domain", tls_domain, "use a DNS name such as www.example.com, or leave it empty")
    if tls_domain and "tls" not in capabilities["modes"]:
        _fail("tls_domain", tls_domain, f"flavor {flavor} has no fake-TLS; leave it empty")
    modes = _modes(settings, flavor, capabilities["modes"], tls_domain)
    if settings.get("handshake_timeout") and flavor != "mtprotoproxy":
        _fail("handshake_timeout", settings["handshake_timeout"], f"flavor {flavor} has no such setting; use 0")
    ad_tag = _text(settings, "ad_tag", "use the 32 hex characters @MTProxybot gave you, or leave it empty").lower()
    if ad_tag and not HEX32.match(ad_tag):
        _fail("ad_tag", ad_tag, "use the 32 hex characters @MTProxybot gave you, or leave it empty")
    if ad_tag and not capabilities["ad_tag"]:
        _fail("ad_tag", ad_tag, f"flavor {flavor} has no ad tag (promoted channel); leave it empty")

    backend_address = _text(settings, "backend_address", "use an IP address of this host") or primary_ipv4()
    _address({"backend_address": backend_address}, "backend_address")
    public_host = _text(settings, "public_host", "use a host name or address") or backend_address
    docker_host = settings.get("docker_host") or __salt__["config.option"]("docker.url", "") or ""

    config_dir = settings["config_dir"].rstrip("/")
    run_dir = settings["run_dir"].rstrip("/")
    haproxy_config_dir = f"{config_dir}/haproxy"
    haproxy_run_dir = f"{run_dir}/haproxy"
    replica_list = [
        {
            "name": f"{REPLICA_PREFIX}{index}",
            "index": index,
            "port": port,
            "config_dir": f"{config_dir}/replicas/{REPLICA_PREFIX}{index}",
            # The official image's local stats (127.0.0.1 only).
            "stats_port": port + OFFICIAL_STATS_OFFSET,
        }
        for index, port in enumerate(ports, start=1)
    ]
    haproxy.update(
        {
            "server_options": server_options,
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
    tproxy["ports"] = ports
    settings.update(
        {
            "replicas": replicas,
            "base_port": base_port,
            "ports": ports,
            "replica_list": replica_list,
            "replica_config_mount": REPLICA_CONFIG_MOUNT,
            "flavor": flavor,
            "client_ip": client_ip,
            "secret": secret,
            "secrets": all_secrets,
            "modes": modes,
            "ad_tag": ad_tag,
            "tls_domain": tls_domain,
            "backend_address": backend_address,
            "public_host": public_host,
            "docker_host": docker_host,
            "config_dir": config_dir,
            "run_dir": run_dir,
            "haproxy": haproxy,
            "tproxy": tproxy,
        }
    )
    return settings


def _extra_secrets(settings: dict, flavor: str, max_secrets: int, secret: str) -> list[str]:
    extra = settings.get("extra_secrets") or []
    if not isinstance(extra, list):
        _fail("extra_secrets", "<hidden>", "use a list of secrets, each 32 hex characters")
    if extra and max_secrets == 1:
        _fail("extra_secrets", "<hidden>", f"flavor {flavor} serves one secret per instance; leave it empty")
    if len(extra) + 1 > max_secrets:
        _fail("extra_secrets", f"<{len(extra)} secrets>", f"flavor {flavor} takes up to {max_secrets - 1} more")
    result = [validate_secret(value, f"extra_secrets:{index}") for index, value in enumerate(extra)]
    if len(set(result)) != len(result) or secret in result:
        _fail("extra_secrets", "<hidden>", "every secret must differ from the others and from mtproxy:secret")
    return result


def _modes(settings: dict, flavor: str, allowed: tuple[str, ...], tls_domain: str) -> list[str]:
    """The client protocols served: explicit, or padded plus fake-TLS when a domain is set."""
    modes = settings.get("modes") or []
    if not modes:
        modes = [mode for mode in ("secure", "tls") if mode in allowed and (mode != "tls" or tls_domain)]
        modes = modes or list(allowed)
    if not isinstance(modes, list) or not all(isinstance(mode, str) for mode in modes):
        _fail("modes", modes, f"use a list of {', '.join(MODES)}")
    for mode in modes:
        if mode not in allowed:
            _fail("modes", modes, f"flavor {flavor} serves {', '.join(allowed)}")
    if "tls" in modes and not tls_domain:
        _fail("tls_domain", tls_domain, "mode tls (fake-TLS) needs a domain such as www.example.com")
    return [mode for mode in MODES if mode in modes]


def _address(settings: dict, key: str) -> str:
    value = _lookup(settings, key)
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        _fail(key, value, "use an IP address such as 0.0.0.0 or 127.0.0.1")
    return ""


def existing_replicas() -> list[str]:
    """
    Names of the replica containers (``mtproxy_<n>``) that exist now, running
    or not, in replica order. Empty when the Docker modules are not loaded yet
    (a first run on a fresh host).

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.existing_replicas
    """
    if "docker.list_containers" not in __salt__:
        return []
    try:
        names = __salt__["docker.list_containers"](all=True)
    except Exception as exc:  # the engine is not up yet: nothing exists
        log.debug("mtproxy: cannot list containers: %s", exc)
        return []
    replicas = [n for n in names if re.match(rf"^{REPLICA_PREFIX}\d+$", n)]
    return sorted(replicas, key=lambda n: int(n[len(REPLICA_PREFIX) :]))


def settings() -> dict:
    """
    The cell's resolved settings, exactly as the states see them (rendered
    from mtproxy/map.jinja). The secret is included: treat the output as
    sensitive.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.settings
    """
    template = (
        "{%- set tpldir = 'mtproxy' %}{%- from 'mtproxy/map.jinja' import mtproxy with context %}{{ mtproxy | json }}"
    )
    rendered = __salt__["slsutil.renderer"](string=template, default_renderer="jinja|json")
    return rendered


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


def links(masked: bool = False) -> list[dict]:
    """
    The links clients use to connect, for the cell's public host and
    frontend port (``tg://`` and ``https://t.me``): one per secret and mode
    (``secret`` is the secret's index: 0 is ``mtproxy:secret``, then
    ``mtproxy:extra_secrets``).

    masked
        Hide the secret (for logs and state output).

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.links
    """
    cell = settings()
    result = build_links(
        cell["public_host"], cell["haproxy"]["frontend_port"], cell["secrets"], cell["modes"], cell["tls_domain"]
    )
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
    what it repaired.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy.status
    """
    cell = settings()
    haproxy = cell["haproxy"]
    servers: dict[str, dict] = {}
    haproxy_error = None
    try:
        for server in __salt__["haproxy_runtime.servers"](
            backend=BACKEND,
            all_workers=True,
            admin_socket=haproxy["admin_socket"],
            master_socket=haproxy["master_socket"],
        ).values():
            servers[server["server"]] = server
    except CommandExecutionError as exc:
        haproxy_error = str(exc)

    def container_state(name: str) -> str:
        try:
            return __salt__["docker.state"](name)
        except CommandExecutionError:
            return "absent"

    names = sorted(
        {r["name"] for r in cell["replica_list"]} | set(existing_replicas()),
        key=lambda n: int(n[len(REPLICA_PREFIX) :]),
    )
    replicas = []
    for name in names:
        server = servers.get(name, {})
        replicas.append(
            {
                "name": name,
                "port": cell["base_port"] + int(name[len(REPLICA_PREFIX) :]) - 1,
                "container": container_state(name),
                "haproxy": server.get("status", "not configured"),
                "sessions": server.get("scur", 0),
                "check": server.get("check_status", ""),
            }
        )
    return {
        "haproxy": {
            "container": container_state(haproxy["container"]),
            "frontend": f"{haproxy['frontend_bind']}:{haproxy['frontend_port']}",
            "stats_url": f"http://{haproxy['stats_bind']}:{haproxy['stats_port']}/stats",
            "error": haproxy_error,
        },
        "replicas": replicas,
        "return_path": _return_path(cell),
    }


def _return_path(cell: dict) -> dict:
    """The return path of ``cell`` (resolved settings): rules present, the watchdog's last repair."""
    if cell["client_ip"] != "tproxy":
        return {"ok": None, "used": False, "client_ip": cell["client_ip"]}
    tproxy = cell["tproxy"]
    report: dict[str, Any] = {"ok": None, "used": True, "missing": [], "stale": []}
    try:
        if "tproxy.check" not in __salt__:
            raise CommandExecutionError("the tproxy module is not available (pyroute2 missing?)")
        result = __salt__["tproxy.check"](
            name="mtproxy",
            ports=tproxy["ports"],
            method=tproxy["method"],
            mark=tproxy["mark"],
            table=tproxy["table"],
            family=tproxy["family"],
        )
        report.update(ok=result["ok"], missing=result["missing"], stale=result["stale"])
    except Exception as exc:  # SaltInvocationError too: report it, never fail status
        report.update(ok=False, error=str(exc))
    path = os.path.join(cell["run_dir"], WATCHDOG_STATUS)
    try:
        with open(path) as handle:
            watchdog = json.load(handle)
        report["watchdog"] = {
            key: watchdog.get(key) for key in ("last_check", "last_repair", "repaired", "ok", "error", "pid")
        }
    except (OSError, ValueError, AttributeError):
        report["watchdog"] = None
    return report
