"""The pillar schema (_modules/mtproxy_schema.py) and the checks of
mtproxy.resolve that need host facts (ephemeral ports, foreign routing,
the secret file), with the host facts stubbed.

Every refusal names the key as ``Pillar mtproxy:<key> is <value>: <what is
allowed>``; test/integration/test_bad_input.py shows the same refusals
stopping a real apply before the host changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_settings import (  # noqa: F401 (loader mocks, autouse fixture)
    DEFAULTS,
    REPO,
    SECRET,
    configure_loader_modules,
    loader_stubs,
    mtproxy,
    schema,
    settings,
)


def refused(**changes) -> str:
    with pytest.raises(mtproxy.SettingsError) as error:
        mtproxy.resolve(settings(**changes))
    return str(error.value)


def assert_refused(changes: dict, key: str, *fragments: str) -> str:
    message = refused(**changes)
    assert message.startswith(f"Pillar mtproxy:{key} is "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def sysctls(monkeypatch, tmp_path):
    """Kernel parameters read from a fake /proc/sys: write {name: text}."""
    root = tmp_path / "proc-sys"
    monkeypatch.setattr(mtproxy, "PROC_SYSCTL", str(root))

    def write(**values: str) -> None:
        for name, text in values.items():
            path = root.joinpath(*name.split("__"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")

    write(net__ipv4__ip_local_port_range="32768\t60999", net__ipv4__ip_local_reserved_ports="")
    return write


# -- the table covers every key, and only those ---------------------------------


def leaf_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in node.items():
        key = prefix + name
        if key in schema.SCHEMA:
            keys.add(key)
        elif isinstance(value, dict):
            keys |= leaf_keys(value, key + ":")
        else:
            keys.add(key)
    return keys


@pytest.mark.parametrize("source", ["mtproxy/parameters/defaults.yaml", "pillar.example"])
def test_every_documented_key_is_in_the_schema_and_the_reverse(source):
    documented = yaml.safe_load((REPO / source).read_text())["mtproxy"]
    documented.pop("lookup", None)
    assert leaf_keys(documented) == set(schema.SCHEMA)
    # ... and the documented defaults are themselves valid.
    schema.validate(documented)


def test_values_come_out_typed_and_normalised():
    raw = settings(
        replicas="3",
        secret=SECRET.upper(),
        haproxy__timeout_connect=250,
        haproxy__timeout_client="01h",
        replica_limits__memory="1g",
        replica_environment={"WORKERS": 2},
        flavor="mtg",  # the flavor that listens on IPv6
        backend_address="2001:db8:0:0::1",
        tls_domain="WWW.Example.com",
    )
    result = schema.validate(raw)
    assert result["replicas"] == 3
    assert result["secret"] == SECRET
    assert result["haproxy"]["timeout_connect"] == "250ms"  # HAProxy's unit when none is given
    assert result["haproxy"]["timeout_client"] == "1h"
    assert result["replica_limits"]["memory"] == 1024**3
    assert result["replica_environment"] == {"WORKERS": "2"}
    assert result["backend_address"] == "2001:db8::1"
    assert result["tls_domain"] == "www.example.com"
    assert raw["replicas"] == "3"  # the input is not changed


def test_the_defaults_resolve_to_the_new_keys():
    cell = mtproxy.resolve(settings())
    assert cell["replica_limits"] == {"pids": 512, "memory": 512 * 1024**2, "nofile": 16384, "read_only": True}
    assert cell["max_connections"] == 0


# -- refusals of the schema -------------------------------------------------------


CASES = [
    # unknown keys, with the closest known one
    ({"replcas": 4}, "replcas", "did you mean mtproxy:replicas?"),
    ({"haproxy__timeout_conect": "5s"}, "haproxy:timeout_conect", "did you mean mtproxy:haproxy:timeout_connect?"),
    ({"stats_auth": "ops:x"}, "stats_auth", "did you mean mtproxy:haproxy:stats_auth?"),
    ({"tproxy__tabel": 100}, "tproxy:tabel", "did you mean mtproxy:tproxy:table?"),
    ({"replica_limits__memroy": "1g"}, "replica_limits:memroy", "did you mean mtproxy:replica_limits:memory?"),
    ({"zzz": 1}, "zzz", "no such key"),
    ({"haproxy": "on"}, "haproxy", "use a mapping with the keys"),
    # control characters, anywhere
    ({"haproxy__timeout_connect": "5s\nglobal"}, "haproxy:timeout_connect", "control character '\\n'"),
    ({"public_host": "a.example.com\n"}, "public_host", "control character"),
    ({"tls_domain": "www.example.com\t"}, "tls_domain", "control character '\\t'"),
    ({"replica_environment": {"A": "x\x00y"}}, "replica_environment", "control character '\\x00'"),
    ({"docker__packages": ["docker.io\r"]}, "docker:packages", "control character '\\r'"),
    ({"haproxy__health_check__options": "check\u2028inter 1s"}, "haproxy:health_check:options", "control"),
    ({"image": "repo/x:1\x1b[31m"}, "image", "control character"),
    # durations
    ({"haproxy__timeout_connect": "5 s"}, "haproxy:timeout_connect", "HAProxy duration"),
    ({"haproxy__timeout_client": "1w"}, "haproxy:timeout_client", "HAProxy duration"),
    ({"haproxy__timeout_server": "-1s"}, "haproxy:timeout_server", "HAProxy duration"),
    ({"haproxy__timeout_server": "0"}, "haproxy:timeout_server", "from 1ms"),
    ({"haproxy__timeout_server": "25d"}, "haproxy:timeout_server", "up to 24d"),
    ({"haproxy__timeout_connect": 1.5}, "haproxy:timeout_connect", "whole number"),
    # names and container collisions
    ({"haproxy__container": "mtproxy_2"}, "haproxy:container", "mtproxy_<n>"),
    ({"haproxy__container": "mtproxy_17"}, "haproxy:container", "mtproxy_<n>"),
    ({"haproxy__container": "my proxy"}, "haproxy:container", "letters, digits, _ . -"),
    ({"haproxy__container": "-rm"}, "haproxy:container", "starts with a letter or digit"),
    ({"docker__service": "docker;reboot"}, "docker:service", "letters, digits"),
    ({"boot__unit_name": "mtproxy-return-path"}, "boot:unit_name", "ends in .service"),
    ({"boot__watchdog_unit_name": "../x.service"}, "boot:watchdog_unit_name", "letters, digits"),
    ({"replica_environment": {"A-B": "1"}}, "replica_environment:A-B", "environment variable name"),
    ({"sysctls": {"kernel.x; rm": 1}}, "sysctls:kernel.x; rm", "kernel parameter name"),
    ({"sysctls": {"net.ipv4.ip_nonlocal_bind": "1 # x"}}, "sysctls:net.ipv4.ip_nonlocal_bind", "a number or words"),
    ({"python_packages__pkgs": ["docker; rm -rf /"]}, "python_packages:pkgs:0", "pip requirement"),
    # paths
    ({"config_dir": "/"}, "config_dir", "folder of the operating system"),
    ({"config_dir": "/etc"}, "config_dir", "folder of the operating system"),
    ({"run_dir": "/run"}, "run_dir", "folder of the operating system"),
    ({"run_dir": "/var/lib"}, "run_dir", "folder of the operating system"),
    ({"config_dir": "/usr/local"}, "config_dir", "folder of the operating system"),
    ({"config_dir": "/proc/mtproxy"}, "config_dir", "folder of the operating system"),
    ({"config_dir": "/etc/systemd/system"}, "config_dir", "folder of the operating system"),
    ({"config_dir": "etc/mtproxy"}, "config_dir", "absolute, normalised path"),
    ({"config_dir": "/etc/mtproxy/"}, "config_dir", "no trailing /"),
    ({"config_dir": "/etc/mtproxy/../ssh"}, "config_dir", "no . or .. parts"),
    ({"config_dir": "/etc//mtproxy"}, "config_dir", "normalised"),
    ({"config_dir": "//etc/mtproxy"}, "config_dir", "normalised"),
    ({"config_dir": "/etc/mt proxy"}, "config_dir", "letters, digits"),
    ({"run_dir": "/srv/a:b"}, "run_dir", "letters, digits"),
    ({"secret_file": "/etc"}, "secret_file", "folder of the operating system"),
    ({"sysctl_config": "sysctl.conf"}, "sysctl_config", "absolute"),
    ({"boot__unit_dir": "/etc"}, "boot:unit_dir", "folder of the operating system"),
    ({"boot__python": "python3"}, "boot:python", "absolute"),
    ({"config_dir": "/srv/m", "run_dir": "/srv/m/run"}, "run_dir", "nests with config_dir"),
    ({"config_dir": "/srv/m/etc", "run_dir": "/srv/m"}, "run_dir", "nests with config_dir"),
    ({"config_dir": "/srv/m", "run_dir": "/srv/m"}, "run_dir", "nests with config_dir"),
    ({"config_dir": "/srv/m", "secret_file": "/srv/m/secret"}, "secret_file", "mtproxy.clean"),
    # stats_auth
    ({"haproxy__stats_auth": "ops:pass#word1234"}, "haproxy:stats_auth", "#, quotes or backslash"),
    ({"haproxy__stats_auth": 'ops:pass"word1234'}, "haproxy:stats_auth", "quotes"),
    ({"haproxy__stats_auth": "ops:pass\\word1234"}, "haproxy:stats_auth", "backslash"),
    ({"haproxy__stats_auth": "ops:pass word1234"}, "haproxy:stats_auth", "without space"),
    ({"haproxy__stats_auth": "ops:short"}, "haproxy:stats_auth", "at least 8"),
    ({"haproxy__stats_auth": "o ps:password-1234"}, "haproxy:stats_auth", "the user a name"),
    ({"haproxy__stats_auth": "password-only"}, "haproxy:stats_auth", "user:password"),
    (
        {"haproxy__stats_bind": "0.0.0.0", "haproxy__stats_auth": "ops:elevenchars"},
        "haproxy:stats_auth",
        "at least 12 characters",
    ),
    # secrets
    ({"secret": SECRET + "\n"}, "secret", "control character"),
    ({"secret": SECRET + " "}, "secret", "whitespace, which is never stripped"),
    ({"secret": " " + SECRET}, "secret", "whitespace"),
    ({"extra_secrets": ["7a" * 15 + " 7a"]}, "extra_secrets:0", "whitespace"),
    ({"secret": SECRET[:31] + "g"}, "secret", "32 hex characters"),
    # routing tables of the kernel
    ({"tproxy__table": 254}, "tproxy:table", "main table"),
    ({"tproxy__table": 255}, "tproxy:table", "local table"),
    ({"tproxy__table": 253}, "tproxy:table", "default table"),
    # new keys
    ({"replica_limits__pids": 8}, "replica_limits:pids", "from 16 to 4194304"),
    ({"replica_limits__memory": "512x"}, "replica_limits:memory", "k, m or g"),
    ({"replica_limits__memory": "1m"}, "replica_limits:memory", "at least 6m"),
    ({"replica_limits__nofile": 100}, "replica_limits:nofile", "from 1024 to 1048576"),
    ({"replica_limits__read_only": "yes"}, "replica_limits:read_only", "true or false"),
    ({"max_connections": -1}, "max_connections", "from 0 to 1000000"),
    # other types
    ({"public_host": "not a host"}, "public_host", "DNS name"),
    ({"docker_host": "/run/docker.sock"}, "docker_host", "Docker endpoint"),
    ({"haproxy__health_check__options": "check 'x'"}, "haproxy:health_check:options", "server options"),
]


@pytest.mark.parametrize(("changes", "key", "fragment"), CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(CASES)])
def test_bad_values_are_refused_naming_key_value_and_what_is_allowed(changes, key, fragment):
    assert_refused(changes, key, fragment)


@pytest.mark.parametrize(
    "changes",
    [
        {"secret": SECRET + "\n"},
        {"secret": SECRET + " "},
        {"secret": "x" + SECRET},
        {"extra_secrets": [SECRET + "\t"]},
        {"secert": SECRET},
        {"haproxy__stats_auth": "ops:pass#word-1234"},
        {"haproxy__stats_auth": "ops:secret-password\n"},
    ],
)
def test_secrets_are_never_shown(changes):
    message = refused(**changes)
    assert "<hidden>" in message
    for value in changes.values():
        text = value[0] if isinstance(value, list) else value
        assert text.strip() not in message and "pass#word" not in message and "secret-password" not in message


def test_a_missing_key_is_a_formula_bug_named_as_such():
    raw = settings()
    del raw["haproxy"]["timeout_connect"]
    with pytest.raises(mtproxy.SettingsError, match=r"^Pillar mtproxy:haproxy:timeout_connect is None: the key is"):
        schema.validate(raw)


def test_the_lookup_key_is_layered_in_by_map_jinja_not_checked_again():
    assert "lookup" not in schema.validate({**settings(), "lookup": {"anything": 1}})


def test_unit_dir_may_be_systemds_own_folder_for_administrator_units():
    assert schema.validate(settings(boot__unit_dir="/etc/systemd/system"))["boot"]["unit_dir"] == "/etc/systemd/system"


def test_a_public_stats_page_with_a_long_enough_password_is_accepted():
    cell = mtproxy.resolve(settings(haproxy__stats_bind="0.0.0.0", haproxy__stats_auth="ops:twelve-chars"))
    assert cell["haproxy"]["stats_auth"] == "ops:twelve-chars"
    # On loopback 8 characters are enough.
    assert mtproxy.resolve(settings(haproxy__stats_auth="ops:8-chars!"))["haproxy"]["stats_auth"] == "ops:8-chars!"


# -- host facts: the ephemeral port range -------------------------------------------


def test_replica_ports_in_the_ephemeral_range_are_refused(sysctls):
    message = assert_refused({"base_port": 40000}, "base_port", "ephemeral port range 32768-60999", "reserve them")
    assert "port 40000" in message


@pytest.mark.parametrize(("key", "port"), [("haproxy__frontend_port", 50000), ("haproxy__stats_port", 32768)])
def test_haproxy_ports_in_the_ephemeral_range_are_refused(sysctls, key, port):
    assert_refused({key: port}, key.replace("__", ":"), f"port {port} lies in this host's ephemeral port range")


def test_a_range_that_starts_above_the_ports_is_accepted(sysctls):
    # The replicas' stats ports (port + 10000) lie below the range too.
    sysctls(net__ipv4__ip_local_port_range="50100 60999")
    assert mtproxy.resolve(settings(base_port=40000))["ports"] == [40000, 40001]


def test_ports_the_operator_reserved_are_accepted(sysctls):
    sysctls(net__ipv4__ip_local_reserved_ports="8080,40000-40001,50000-50001")
    assert mtproxy.resolve(settings(base_port=40000))["ports"] == [40000, 40001]
    # One port of the two reserved is not enough.
    assert_refused({"base_port": 40001}, "base_port", "port 40002")


def test_the_pillars_sysctls_count_as_the_cells(sysctls):
    reserved = {"net.ipv4.ip_nonlocal_bind": 1, "net.ipv4.ip_local_reserved_ports": "40000-40010,50000-50010"}
    assert mtproxy.resolve(settings(base_port=40000, sysctls=reserved))["ports"] == [40000, 40001]
    # proxy_protocol applies no sysctls: the host's value counts then.
    assert_refused({"base_port": 40000, "sysctls": reserved, "client_ip": "proxy_protocol"}, "base_port")


@pytest.mark.parametrize("flavor", ["mtprotoproxy", "official"])
def test_the_replicas_stats_ports_count_too(sysctls, flavor):
    # Every flavor's replica serves its local stats on port + 10000.
    assert_refused({"flavor": flavor, "base_port": 23000}, "base_port", "port 33000")


# -- address families ------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"backend_address": "0.0.0.0"}, "backend_address", "not a wildcard"),
        ({"backend_address": "224.0.0.1"}, "backend_address", "multicast"),
        ({"backend_address": "2001:db8::1"}, "backend_address", "IPv4 only here"),
        ({"flavor": "official", "backend_address": "2001:db8::1"}, "backend_address", "IPv4 only here"),
        (
            {"flavor": "mtg", "tls_domain": "a.example.com", "backend_address": "2001:db8::1"},
            "haproxy:frontend_bind",
            "cannot reach an IPv6 backend_address",
        ),
        (
            {
                "flavor": "mtg",
                "tls_domain": "a.example.com",
                "backend_address": "2001:db8::1",
                "haproxy__frontend_bind": "::",
            },
            "tproxy:family",
            "need ipv6 (or both)",
        ),
        ({"haproxy__frontend_bind": "::"}, "haproxy:frontend_bind", "from IPv6"),
        ({"tproxy__family": "ipv6"}, "tproxy:family", "need ipv4 (or both)"),
        ({"client_ip": "proxy_protocol", "backend_address": "203.0.113.10"}, "backend_address", "loopback"),
    ],
)
def test_address_combinations_that_cannot_carry_a_client_are_refused(changes, key, fragment):
    assert_refused(changes, key, fragment)


def test_address_combinations_that_work():
    mtg = {"flavor": "mtg", "tls_domain": "a.example.com"}
    v6 = mtproxy.resolve(
        settings(**mtg, backend_address="2001:db8::1", haproxy__frontend_bind="::", tproxy__family="both")
    )
    assert v6["backend_address"] == "2001:db8::1"
    # With the PROXY protocol any client family reaches a loopback replica.
    proxied = mtproxy.resolve(settings(client_ip="proxy_protocol", haproxy__frontend_bind="::"))
    assert proxied["backend_address"] == "127.0.0.1"
    # ... and the links still name the host's public address.
    assert proxied["public_host"] == "203.0.113.10"


# -- routing state that is not ours ------------------------------------------------


def test_a_table_used_by_foreign_routes_is_refused_naming_them(monkeypatch):
    calls = []

    def foreign(**kwargs):
        calls.append(kwargs)
        return ["ip route add default via 192.0.2.1 dev wan2 table 100"]

    monkeypatch.setitem(mtproxy.__salt__, "tproxy.foreign", foreign)
    message = assert_refused({}, "tproxy:table", "default via 192.0.2.1 dev wan2 table 100", "Choose a free")
    assert message.startswith("Pillar mtproxy:tproxy:table is 100: ")
    assert calls == [{"mark": 1, "table": 100, "family": "ipv4", "method": "mark"}]


def test_a_mark_used_by_a_foreign_rule_is_refused_naming_it(monkeypatch):
    monkeypatch.setitem(mtproxy.__salt__, "tproxy.foreign", lambda **kw: ["ip rule pref 50 fwmark 0x1 lookup 7"])
    assert_refused({}, "tproxy:mark", "fwmark 0x1 lookup 7")


def test_nothing_foreign_and_proxy_protocol_pass(monkeypatch):
    calls = []
    monkeypatch.setitem(mtproxy.__salt__, "tproxy.foreign", lambda **kw: calls.append(kw) or [])
    mtproxy.resolve(settings())
    mtproxy.resolve(settings(client_ip="proxy_protocol"))
    assert len(calls) == 1  # no kernel rules in proxy_protocol mode: nothing to collide with


# -- the secret file ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"not a secret\n", b"abc\n", b"\xff\xfe" + b"a" * 30, SECRET.encode() + b" \n", b"", b"\n" + SECRET.encode()],
)
def test_an_unparseable_secret_file_fails_and_is_kept(content):
    secret_file = Path(DEFAULTS["secret_file"])
    secret_file.parent.mkdir(parents=True)
    secret_file.write_bytes(content)
    message = assert_refused({}, "secret_file", "does not hold a secret", "not overwritten")
    assert str(secret_file) in message
    assert secret_file.read_bytes() == content


def test_a_kept_secret_file_is_read_with_or_without_its_newline():
    secret_file = Path(DEFAULTS["secret_file"])
    secret_file.parent.mkdir(parents=True)
    secret_file.write_text(SECRET.upper())
    assert mtproxy.resolve(settings())["secret"] == SECRET
    secret_file.write_text(SECRET + "\n")
    assert mtproxy.resolve(settings())["secret"] == SECRET


def test_a_secret_file_that_is_a_folder_fails():
    secret_file = Path(DEFAULTS["secret_file"])
    secret_file.mkdir(parents=True)
    assert_refused({}, "secret_file", "cannot be read")
