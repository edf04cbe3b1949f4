"""Secrets stay where they belong (issue 16, part 7): a live mtprotoproxy cell
is deployed, then changed in every way that reaches the replicas (a new
secret, a new environment, one replica more), and each secret is searched
for, in every encoding a client or a log could use, in what an operator or
another local user can read: the state output of each apply, the minion log
at info level, ``ps`` on the test host, and ``docker inspect`` of every
container. The official and mtg images cannot be pulled here: their state
output is searched in test mode (the same render and the same states) and
their container specs as ``mtproxy_flavor.show`` gives them."""

from __future__ import annotations

import base64
import json
import secrets

import pytest
from cell import apply, assert_cell_serves, cell_pillar, changed, containers, failed

pytestmark = pytest.mark.integration

SECRET = secrets.token_hex(16)
EXTRA = secrets.token_hex(16)
ROTATED = secrets.token_hex(16)
TAG = secrets.token_hex(16)
EVERY = [SECRET, EXTRA, ROTATED]


def forms(secret: str) -> list[str]:
    """How a secret may be written: hex either case, base64 (mtg's form) of its bytes."""
    raw = bytes.fromhex(secret)
    return [secret, secret.upper(), base64.urlsafe_b64encode(raw).decode().rstrip("="), base64.b64encode(raw).decode()]


def leaks(text: str, among: list[str] = EVERY) -> list[str]:
    return [form for secret in among for form in forms(secret) if form in text]


@pytest.fixture(scope="module")
def deployed(testhost):
    """The cell at each step, with the minion log at info level; returns
    {step: (state output text, log text)} and the host."""
    host = testhost
    config_dir = host.minion_config(log_level_logfile="info")
    log = host.salt_dir / "minion.log"
    steps = {
        "first apply": cell_pillar(host, secret=SECRET, extra_secrets=[EXTRA]),
        "secret rotated": cell_pillar(host, secret=ROTATED, extra_secrets=[EXTRA]),
        "environment changed": cell_pillar(
            host, secret=ROTATED, extra_secrets=[EXTRA], replica_environment={"TZ": "UTC"}
        ),
        "replica added": cell_pillar(
            host, secret=ROTATED, extra_secrets=[EXTRA], replica_environment={"TZ": "UTC"}, replicas=3
        ),
    }
    seen = {}
    for step, pillar in steps.items():
        log.unlink(missing_ok=True)
        result = host.salt_call(
            "state.apply", "mtproxy", "sync_mods=all", pillar=pillar, check=False, config_dir=config_dir
        )
        text = json.dumps(result)
        assert not failed(result), f"{step}: {text[:20000]}"
        # Each step must really change the replicas, or it searched nothing new.
        assert any(key.startswith("Replica mtproxy_") for key in changed(result)), f"{step}: {changed(result)}"
        # Salt opens its log file at start: a missing one is a broken test, not a quiet run.
        seen[step] = (text, log.read_text())
    return host, steps["replica added"], seen


@pytest.mark.parametrize("step", ["first apply", "secret rotated", "environment changed", "replica added"])
def test_no_secret_in_state_output_or_info_log(deployed, step):
    _, _, seen = deployed
    text, log = seen[step]
    assert "Replica mtproxy_1" in text and log, "nothing to search"
    assert leaks(text) == []
    assert leaks(log) == []


def test_the_cell_serves_the_secrets_it_hides(deployed):
    host, pillar, _ = deployed
    assert_cell_serves(host, pillar, 3)
    config = (host.workdir / "etc-mtproxy" / "replicas" / "mtproxy_3" / "config.py").read_text()
    assert ROTATED in config and EXTRA in config and SECRET not in config


def test_the_replicas_run_hardened(deployed):
    """What the kernel applies to each replica's process (seen from the host's
    /proc): no capability, no-new-privileges, and the pillar's limits."""
    host, _, _ = deployed
    for name in ("mtproxy_1", "mtproxy_2", "mtproxy_3"):
        config = json.loads(host.docker("inspect", name).stdout)[0]["HostConfig"]
        assert config["ReadonlyRootfs"] is True and config["PidsLimit"] == 512
        assert config["Memory"] == 512 * 1024 * 1024
        init = json.loads(host.docker("inspect", "-f", "{{json .State.Pid}}", name).stdout)
        # The replica is the child of docker-init.
        child = host.run(["pgrep", "-P", str(init)]).stdout.split()[0]
        status = dict(
            line.split(":\t", 1)
            for line in host.run(["cat", f"/proc/{child}/status"]).stdout.splitlines()
            if ":\t" in line
        )
        assert status["CapEff"].strip() == "0" * 16 and status["CapBnd"].strip() == "0" * 16
        assert status["NoNewPrivs"].strip() == "1"
        limits = host.run(["cat", f"/proc/{child}/limits"]).stdout
        assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [
            ["16384", "16384"]
        ]


def test_no_secret_on_any_command_line(deployed):
    """Every process of the machine, the replicas' Python included (they read
    their secrets from their 0600 config file)."""
    host, _, _ = deployed
    commands = host.run(["ps", "-eo", "args"]).stdout
    assert "mtprotoproxy" in commands or "config.py" in commands, "the replicas' processes are not visible"
    assert leaks(commands) == []


def test_no_secret_in_docker_inspect(deployed):
    host, _, _ = deployed
    names = sorted(containers(host))
    assert names == ["mtproxy_1", "mtproxy_2", "mtproxy_3", "mtproxy_haproxy"]
    inspected = host.docker("inspect", *names).stdout
    assert leaks(inspected) == []


@pytest.mark.parametrize(
    "flavor",
    [
        {"flavor": "official", "ad_tag": TAG},
        {"flavor": "mtg", "tls_domain": "www.example.com", "extra_secrets": [], "ad_tag": ""},
    ],
    ids=["official", "mtg"],
)
def test_other_flavors_keep_them_out_of_output_and_spec(deployed, flavor):
    """A switch of flavor under test=True: the would-be changes of every state
    (the replicas' environment, command and labels among them), and the spec
    that mtproxy_flavor.show prints, carry no secret."""
    host, pillar, _ = deployed
    switched = {"mtproxy": {**pillar["mtproxy"], **flavor}}
    result = apply(host, switched, test=True, check=False)
    text = json.dumps(result)
    would = changed(result)
    assert any(key.startswith("Replica mtproxy_") for key in would), text[:5000]
    assert leaks(text) == []
    host.write_pillar(switched)
    try:
        for index in ("1", "3"):
            spec = host.salt_call("mtproxy_flavor.show", index)
            assert spec["config"] and leaks(json.dumps(spec)) == []
    finally:
        host.write_pillar(pillar)
    # test mode changed nothing: the cell still runs mtprotoproxy.
    assert {c["image"] for n, c in containers(host).items() if n != "mtproxy_haproxy"} == {
        "mtproxy-formula/mtprotoproxy:local"
    }
