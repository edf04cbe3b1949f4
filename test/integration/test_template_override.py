"""An operator's own HAProxy template, looked up TOFS-style (issue 20).

``haproxy.sls`` takes ``mtproxy/files/<minion id>/haproxy.cfg.jinja`` when a
file root has it, else the formula's ``mtproxy/files/default/haproxy.cfg.jinja``
(docs/architecture.md#overriding-the-haproxy-template). Here the operator's
file root is a temporary folder layered before the checkout in the test
host's minion config, as an operator would layer theirs before the formula's.
The custom template goes live only through the same ``haproxy -c`` check as
the default one: a broken one is refused and the running config keeps
serving. The tests share one cell, in file order.
"""

from __future__ import annotations

import pytest
from cell import admin_command, admin_socket, assert_cell_serves, cell_pillar, changed, failed
from testhost import REPO

pytestmark = pytest.mark.integration

CONFIG_STATE = "HAProxy config is valid and in place"
# Rendered with the formula's context: proves the operator's template gets it too.
MARKER = "operator template of {{ mtproxy.haproxy.container }}"
RENDERED_MARKER = "operator template of mtproxy_haproxy"
BROKEN_KEYWORD = "no-such-keyword-from-the-operator"


def with_global_line(line: str) -> str:
    """The formula's default template with one more line in HAProxy's global section."""
    default = (REPO / "mtproxy" / "files" / "default" / "haproxy.cfg.jinja").read_text()
    assert default.count("\nglobal\n") == 1
    return default.replace("\nglobal\n", f"\nglobal\n    {line}\n")


def live_config(host) -> str:
    """The config file as the running HAProxy container sees it (the path after its ``-f``)."""
    args = host.docker("inspect", "--format", "{{json .Args}}", "mtproxy_haproxy").stdout
    path = args.split('"-f",')[1].split('"')[1]
    return host.docker("exec", "mtproxy_haproxy", "cat", path).stdout


def description(pillar: dict) -> str:
    """The global ``description`` HAProxy's running worker reports in ``show info``."""
    for line in admin_command(admin_socket(pillar), "show info").splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "description":
            return value.strip()
    return ""


@pytest.fixture(scope="module")
def cell(testhost, tmp_path_factory):
    """A 2-replica cell on the formula's default template, with the operator's
    file root (still without a template) layered before the checkout."""
    host = testhost
    root = tmp_path_factory.mktemp("operator-root")
    custom = root / "mtproxy" / "files" / host.name / "haproxy.cfg.jinja"
    custom.parent.mkdir(parents=True)
    # Salt keeps the file roots' listing for fileserver_list_cache_time (20 s):
    # a template added or removed within that time is not seen yet (README,
    # "Your own HAProxy template"). These applies follow each other closely.
    config_dir = host.minion_config(file_roots={"base": [str(root), str(REPO)]}, fileserver_list_cache_time=0)
    pillar = cell_pillar(host)

    def apply() -> dict:
        return host.salt_call(
            "state.apply", "mtproxy", "sync_mods=all", pillar=pillar, check=False, config_dir=config_dir
        )

    assert not failed(apply())
    assert_cell_serves(host, pillar, 2)
    assert RENDERED_MARKER not in live_config(host)
    return host, pillar, custom, apply


def test_a_custom_template_for_this_minion_goes_live(cell):
    host, pillar, custom, apply = cell
    custom.write_text(with_global_line(f"description {MARKER}"))
    result = apply()
    assert not failed(result)
    assert CONFIG_STATE in changed(result)
    assert f"description {RENDERED_MARKER}" in live_config(host)
    # HAProxy reloaded into it, and the cell serves through it.
    assert description(pillar) == RENDERED_MARKER
    assert_cell_serves(host, pillar, 2)
    assert changed(apply()) == {}


def test_a_broken_custom_template_is_refused_and_the_old_config_keeps_serving(cell):
    host, pillar, custom, apply = cell
    before = live_config(host)
    custom.write_text(with_global_line(BROKEN_KEYWORD))
    result = apply()
    refused = [state for state in failed(result).values() if state["__id__"] == CONFIG_STATE]
    assert refused, f"the config state did not fail: {list(failed(result))}"
    assert BROKEN_KEYWORD in refused[0]["comment"]
    assert live_config(host) == before
    assert description(pillar) == RENDERED_MARKER
    assert_cell_serves(host, pillar, 2)


def test_without_the_custom_template_the_default_comes_back(cell):
    host, pillar, custom, apply = cell
    custom.unlink()
    assert not failed(apply())
    config = live_config(host)
    assert RENDERED_MARKER not in config and BROKEN_KEYWORD not in config
    assert description(pillar) == ""
    assert_cell_serves(host, pillar, 2)
