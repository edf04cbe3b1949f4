"""Bad pillars against a live cell: each is refused at render, naming the key,
and the host is unchanged (containers and their ids, the files under
config_dir and run_dir with their digests, ip rules, the routes of the
tproxy table, mangle rules). One cell, deployed once, takes every case.

Plus the other side: every pillar the schema accepts renders configs that
parse (haproxy -c in the HAProxy image, mtprotoproxy's Python config, mtg's
TOML)."""

from __future__ import annotations

import json
import secrets
import sys
import tomllib
from pathlib import Path

import pytest
from cell import apply, assert_cell_serves, cell_pillar, changed, host_snapshot
from hypothesis import HealthCheck, given, reject
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

SECRET = secrets.token_hex(16)
# Refusals name the key first; secrets never appear.
CASES: list[tuple[str, dict, str]] = [
    # unknown keys
    ("unknown-key", {"replcas": 4}, "replcas is 4: mtproxy has no such key; did you mean mtproxy:replicas?"),
    ("unknown-nested-key", {"haproxy": {"timeout_conect": "5s"}}, "haproxy:timeout_conect"),
    (
        "key-at-the-wrong-level",
        {"stats_auth": "ops:password-12345"},
        "stats_auth is <hidden>: mtproxy has no such key; did you mean mtproxy:haproxy:stats_auth?",
    ),
    # control characters
    (
        "newline-in-timeout",
        {"haproxy": {"timeout_connect": "5s\nglobal\n stats socket ipv4@0.0.0.0:9999"}},
        "haproxy:timeout_connect",
    ),
    ("newline-in-public-host", {"public_host": "a.example.com\nevil:\n  cmd.run: []"}, "public_host"),
    ("tab-in-domain", {"tls_domain": "www.example.com\t"}, "tls_domain"),
    ("nul-in-environment", {"replica_environment": {"A": "x\u0000y"}}, "replica_environment"),
    (
        "newline-in-options",
        {"haproxy": {"health_check": {"options": "check\nbind :1"}}},
        "haproxy:health_check:options",
    ),
    # durations
    ("duration-with-space", {"haproxy": {"timeout_connect": "5 s"}}, "haproxy:timeout_connect"),
    ("duration-unknown-unit", {"haproxy": {"timeout_client": "1w"}}, "haproxy:timeout_client"),
    ("duration-negative", {"haproxy": {"timeout_server": "-1s"}}, "haproxy:timeout_server"),
    ("duration-too-long", {"haproxy": {"timeout_server": "30d"}}, "haproxy:timeout_server"),
    # names and collisions
    ("haproxy-named-as-a-replica", {"haproxy": {"container": "mtproxy_2"}}, "haproxy:container is 'mtproxy_2'"),
    ("container-name-with-space", {"haproxy": {"container": "my proxy"}}, "haproxy:container"),
    ("unit-name-without-suffix", {"boot": {"unit_name": "return-path"}}, "boot:unit_name"),
    ("stats-user-bad", {"haproxy": {"stats_auth": "o ps:password-12345"}}, "haproxy:stats_auth is <hidden>"),
    ("sysctl-name-bad", {"sysctls": {"kernel.x y": 1}}, "sysctls:kernel.x y"),
    # paths
    ("config-dir-root", {"config_dir": "/"}, "config_dir is '/'"),
    ("config-dir-etc", {"config_dir": "/etc"}, "config_dir is '/etc'"),
    ("run-dir-run", {"run_dir": "/run"}, "run_dir is '/run'"),
    ("run-dir-var-lib", {"run_dir": "/var/lib"}, "run_dir is '/var/lib'"),
    ("config-dir-relative", {"config_dir": "etc/mtproxy"}, "config_dir"),
    ("config-dir-dotdot", {"config_dir": "/etc/mtproxy/../ssh"}, "config_dir"),
    ("config-dir-trailing-slash", {"config_dir": "/srv/mtproxy/"}, "config_dir"),
    ("run-dir-inside-config-dir", {"run_dir": "{config_dir}/run"}, "run_dir"),
    ("secret-file-inside-config-dir", {"secret_file": "{config_dir}/secret"}, "secret_file"),
    ("unit-dir-etc", {"boot": {"unit_dir": "/etc"}}, "boot:unit_dir"),
    ("boot-python-relative", {"boot": {"python": "python3"}}, "boot:python"),
    # stats_auth
    ("stats-password-hash", {"haproxy": {"stats_auth": "ops:pass#word-1234"}}, "haproxy:stats_auth is <hidden>"),
    ("stats-password-quote", {"haproxy": {"stats_auth": "ops:pass'word-1234"}}, "haproxy:stats_auth"),
    ("stats-password-space", {"haproxy": {"stats_auth": "ops:pass word-1234"}}, "haproxy:stats_auth"),
    (
        "stats-password-short-public",
        {"haproxy": {"stats_bind": "0.0.0.0", "stats_auth": "ops:elevenchars"}},
        "haproxy:stats_auth is <hidden>",
    ),
    ("public-stats-without-auth", {"haproxy": {"stats_bind": "0.0.0.0"}}, "haproxy:stats_bind is '0.0.0.0'"),
    # secrets
    ("secret-trailing-newline", {"secret": SECRET + "\n"}, "secret is <hidden>"),
    ("secret-trailing-space", {"secret": SECRET + " "}, "secret is <hidden>: it contains whitespace"),
    ("secret-short", {"secret": "abc"}, "secret is <hidden>"),
    ("extra-secret-with-space", {"extra_secrets": [" " + secrets.token_hex(16)]}, "extra_secrets:0 is <hidden>"),
    # ports: the ephemeral range of the test host (Linux default 32768-60999)
    ("base-port-ephemeral", {"base_port": 40000}, "base_port is 40000: port 40000 lies in this host's ephemeral"),
    ("frontend-port-ephemeral", {"haproxy": {"frontend_port": 50000}}, "haproxy:frontend_port is 50000"),
    ("frontend-in-replica-range", {"haproxy": {"frontend_port": 4432}}, "haproxy:frontend_port is 4432"),
    # address families
    ("ipv6-frontend-ipv4-backend", {"haproxy": {"frontend_bind": "::"}}, "haproxy:frontend_bind is '::'"),
    ("tproxy-family-ipv6-ipv4-backend", {"tproxy": {"family": "ipv6"}}, "tproxy:family is 'ipv6'"),
    ("ipv6-backend-mtprotoproxy", {"backend_address": "2001:db8::1"}, "backend_address is '2001:db8::1'"),
    (
        "proxy-protocol-public-backend",
        {"client_ip": "proxy_protocol", "backend_address": "{address}"},
        "backend_address is '{address}'",
    ),
    # kernel routing tables
    ("tproxy-table-main", {"tproxy": {"table": 254}}, "tproxy:table is 254"),
    # the earlier cases (issue 8)
    ("replicas-0", {"replicas": 0}, "replicas is 0"),
    ("replicas-not-int", {"replicas": "two"}, "replicas is 'two'"),
    ("unknown-balance", {"haproxy": {"balance": "random"}}, "haproxy:balance is 'random'"),
    ("unknown-method", {"tproxy": {"method": "dnat"}}, "tproxy:method is 'dnat'"),
    ("not-an-image", {"image": "Bad Image!"}, "image is 'Bad Image!'"),
    # new keys
    ("pids-too-low", {"replica_limits": {"pids": 1}}, "replica_limits:pids is 1"),
    ("memory-bad-unit", {"replica_limits": {"memory": "1x"}}, "replica_limits:memory is '1x'"),
    # valid pillars that a live cell cannot take one replica at a time
    ("client-ip-switch-on-a-live-cell", {"client_ip": "proxy_protocol"}, "client_ip is 'proxy_protocol'"),
    ("haproxy-rename-on-a-live-cell", {"haproxy": {"container": "edge"}}, "haproxy:container is 'edge'"),
    ("config-dir-move-on-a-live-cell", {"config_dir": "{config_dir}-moved"}, "config_dir is '{config_dir}-moved'"),
]


def expand(value, host, pillar):
    """Fill {config_dir} and {address} in a case's strings."""
    fields = {"config_dir": pillar["mtproxy"]["config_dir"], "address": host.address}
    if isinstance(value, str):
        return value.format(**fields)
    if isinstance(value, dict):
        return {k: expand(v, host, pillar) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, host, pillar) for v in value]
    return value


@pytest.fixture(scope="module")
def cell(testhost):
    host = testhost
    pillar = cell_pillar(host, secret=SECRET)
    apply(host, pillar)
    return host, pillar, host_snapshot(host, pillar)


def assert_refused_unchanged(host, pillar: dict, before: dict, overrides: dict, expected: str) -> str:
    """Apply ``pillar`` with ``overrides``; the render must fail with ``expected`` and change nothing."""
    mtproxy = {**pillar["mtproxy"]}
    for key, value in overrides.items():
        mtproxy[key] = (
            {**mtproxy[key], **value} if isinstance(value, dict) and isinstance(mtproxy.get(key), dict) else value
        )
    # Modules are synced: the cell's deploy did it.
    result = host.salt_call("state.apply", "mtproxy", pillar={"mtproxy": mtproxy}, check=False)
    text = json.dumps(result)
    # A render error: no state ran at all.
    assert not isinstance(result, dict) or not any("__id__" in v for v in result.values() if isinstance(v, dict)), text[
        :5000
    ]
    assert f"Pillar mtproxy:{expected}" in text, text[:5000]
    assert SECRET not in text
    assert host_snapshot(host, pillar) == before
    return text


@pytest.mark.parametrize(("overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_pillar_is_refused_before_the_host_changes(cell, overrides, expected):
    host, pillar, before = cell
    assert_refused_unchanged(host, pillar, before, expand(overrides, host, pillar), expand(expected, host, pillar))


def test_a_foreign_route_in_the_table_is_refused_naming_it(cell):
    """A multi-WAN host's default route in table 100: not ours, so the apply stops
    before touching anything (the route stays, and so does our cell)."""
    host, pillar, _ = cell
    route = ["ip", "route", "add", "unreachable", "203.0.113.0/24", "table", "100"]
    host.run(route)
    try:
        before = host_snapshot(host, pillar)
        text = assert_refused_unchanged(host, pillar, before, {}, "tproxy:table is 100")
        assert "203.0.113.0/24" in text
    finally:
        host.run(["ip", "route", "del", "unreachable", "203.0.113.0/24", "table", "100"])


def test_an_unparseable_secret_file_fails_and_is_kept(cell):
    host, _, before = cell
    generated = cell_pillar(host)  # secret '': read from secret_file
    secret_file = Path(generated["mtproxy"]["secret_file"])
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    secret_file.write_text("not a secret\n")
    try:
        text = assert_refused_unchanged(host, generated, before, {}, f"secret_file is '{secret_file}'")
        assert "not overwritten" in text
        assert secret_file.read_text() == "not a secret\n"
    finally:
        secret_file.unlink()


def test_the_cell_still_serves(cell):
    host, pillar, before = cell
    assert host_snapshot(host, pillar) == before
    assert_cell_serves(host, pillar, 2, connections=10)


# -- every accepted pillar renders configs that parse ---------------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_flavors import TEMPLATES, flavors, python_config  # noqa: E402
from test_settings import DEFAULTS, configure_loader_modules, mtproxy, settings  # noqa: E402, F401 (loader mocks)

WORD = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True)
PASSWORD = st.from_regex(r"[!$-&(-\[\]-~]{12,24}", fullmatch=True)  # printable, no space # " ' \
DURATION = st.builds(lambda n, u: f"{n}{u}", st.integers(1, 1000), st.sampled_from(["", "us", "ms", "s", "m", "h"]))
PILLARS = st.fixed_dictionaries(
    {
        "replicas": st.integers(1, 6),
        "base_port": st.integers(1024, 20000),
        "flavor": st.sampled_from(["mtprotoproxy", "official", "mtg"]),
        "client_ip": st.sampled_from(["tproxy", "proxy_protocol"]),
        "tls_domain": st.sampled_from(["", "www.example.com", "a-b.example.org"]),
        "ad_tag": st.sampled_from(["", secrets.token_hex(16)]),
        "handshake_timeout": st.integers(0, 600),
        "haproxy__container": WORD,
        "haproxy__frontend_bind": st.ip_addresses(v=4).map(str),
        "haproxy__frontend_port": st.integers(21000, 30000),
        "haproxy__stats_bind": st.sampled_from(["127.0.0.1", "0.0.0.0", "::1"]),
        "haproxy__stats_auth": st.one_of(st.just(""), st.builds(lambda u, p: f"{u}:{p}", WORD, PASSWORD)),
        "haproxy__balance": st.sampled_from(["leastconn", "roundrobin"]),
        "haproxy__maxconn": st.integers(1, 100000),
        "haproxy__splice": st.booleans(),
        "haproxy__redispatch": st.booleans(),
        "haproxy__timeout_connect": st.one_of(DURATION, st.integers(1, 10**6)),
        "haproxy__timeout_client": DURATION,
        "haproxy__timeout_server": DURATION,
        "haproxy__health_check__profile": st.sampled_from(["fast", "original"]),
    }
)


def test_every_accepted_pillar_renders_configs_that_parse(testhost, monkeypatch):
    """Random pillars within the schema: those it accepts render an HAProxy
    config that `haproxy -c` (the image the cell runs) accepts, a Python config
    that runs, a TOML file that parses. (haproxy:health_check:options is a raw
    string passed to HAProxy: the apply's own `haproxy -c` guards it.)"""
    host = testhost
    monkeypatch.setitem(mtproxy.__opts__, "test", True)  # no secret file kept
    folder = host.workdir / "rendered-configs"
    folder.mkdir(exist_ok=True)
    accepted = []

    @hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(PILLARS)
    def collect(changes):
        try:
            cell = mtproxy.resolve(settings(secret=secrets.token_hex(16), **changes))
        except mtproxy.SettingsError:
            reject()
        index = len(accepted)
        # Salt's Jinja keeps the template's last newline; jinja2's default drops it.
        text = TEMPLATES.get_template("haproxy.cfg.jinja").render(mtproxy=cell)
        (folder / f"{index}.cfg").write_text(text + "\n")
        spec = flavors.replica(cell, cell["replica_list"][-1])
        if cell["flavor"] == "mtprotoproxy":
            assert python_config(spec["config"])["PORT"] == cell["ports"][-1]
        elif cell["flavor"] == "mtg":
            assert tomllib.loads(spec["config"])["bind-to"].endswith(f":{cell['ports'][-1]}")
        accepted.append(changes)

    assert DEFAULTS
    collect()
    assert len(accepted) >= 30, f"only {len(accepted)} accepted pillars: the strategy is too wide"
    script = 'for f in /cfgs/*.cfg; do haproxy -c -q -f "$f" >/dev/null 2>&1 || echo "$f"; done'
    image = DEFAULTS["haproxy"]["image"]
    proc = host.docker(
        "run", "--rm", "--network", "none", "-v", f"{folder}:/cfgs:ro", "--entrypoint", "/bin/sh", image, "-c", script
    )
    bad = [Path(line).stem for line in proc.stdout.split()]
    assert not bad, "haproxy -c refused: " + json.dumps([accepted[int(i)] for i in bad[:5]], indent=1)


def test_a_new_haproxy_image_is_refused_until_a_restart_is_allowed(cell):
    """A new HAProxy image means a new container, which cuts every connection
    HAProxy holds: refused on the live cell, applied with haproxy:allow_restart."""
    host, pillar, before = cell
    image = "mtproxy-formula/haproxy:rebuilt"
    host.docker("commit", "mtproxy_haproxy", image)
    old_id = host.docker("inspect", "-f", "{{.Id}}", "mtproxy_haproxy").stdout.strip()
    assert_refused_unchanged(host, pillar, before, {"haproxy": {"image": image}}, f"haproxy:image is '{image}'")
    allowed = {"mtproxy": {**pillar["mtproxy"], "haproxy": {"image": image, "allow_restart": True}}}
    apply(host, allowed)
    assert host.docker("inspect", "-f", "{{.Id}}", "mtproxy_haproxy").stdout.strip() != old_id
    assert_cell_serves(host, allowed, 2, connections=10)
    assert changed(apply(host, allowed)) == {}
