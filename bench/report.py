"""results.md and results.png from the dict bench/run.py collects (also kept as results.json)."""

from __future__ import annotations

from pathlib import Path

from bench.stats import spread

PLOT = "results.png"


def _n(value, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def header(results: dict) -> list[str]:
    v = results.get("versions", {})
    plan = results["plan"]
    minutes = results["wall_seconds"] / 60
    lines = [
        "# Benchmarks",
        "",
        f"Measured {results['date']} by `{results['command']}` in {minutes:.1f} min "
        f"(sections: {', '.join(f'{k} {s:.0f} s' for k, s in results.get('section_seconds', {}).items())}).",
        "",
        f"- Machine: {v.get('cpus', '?')} CPUs ({v.get('cpu_model', '?')}), {v.get('memory_gib', '?')} GiB, "
        f"kernel {v.get('kernel', '?')}, {v.get('os', '?')}; shared with other work while it ran.",
        f"- Versions: HAProxy {v.get('haproxy', '?')}; Salt {v.get('salt', '?')}; Python {v.get('python', '?')}; "
        f"Docker {v.get('docker', '?')}; mtprotoproxy {v.get('mtprotoproxy', '?')}.",
        f"- Formula: {results['formula']}.",
        "- Reproduce: `make bench` (root, Debian 12; writes this file, `results.json` with every raw run, and "
        f"`{PLOT}`). `bench/run.py --quick` or `--only SECTION` for a short run.",
        "",
        "Everything runs in one test host (test/testhost.py: a network namespace with its own dockerd, "
        "open-files limit of the machine: 20000 here; clients in a second namespace over a veth pair), deployed by "
        "`salt-call --local state.apply mtproxy`. The machine is shared and noisy: read the ratios, each against "
        f"a baseline measured in the same run, not the absolute numbers. Repeated measurements: median "
        f"(min-max) of {plan['reps']} (data path: {plan.get('datapath_reps', plan['reps'])}). The load generators "
        "are small asyncio clients of ours (bench/netload.py, "
        "test/loadgen.py: raw TCP and MTProto handshakes, which wrk and other HTTP tools do not speak); they "
        "report their own CPU use and schedule lag; a client at ≥ 85 % of a core is flagged as saturated (its "
        "number is then a floor for the cell, not the cell's limit).",
        "",
        f"![benchmark summary]({PLOT})",
        "",
    ]
    if results.get("errors"):
        lines += ["**Sections that failed in this run:** " + ", ".join(results["errors"]) + " (see results.json).", ""]
    return lines


def splice_decision(wins: bool, defaults: dict) -> str:
    rule = (
        "(rule: median throughput +5 % or more and less HAProxy CPU per GiB, and no repetition-wide loss of 10 % "
        "in new connections/s or p50 latency)"
    )
    default = f"`haproxy:splice: {str(defaults.get('splice')).lower()}`"
    if not wins:
        return f"Splice does not win {rule}; the formula's default is {default}."
    return f"**Splice wins** {rule}; the formula's default is {default}."


def saturation_note(section: dict) -> list[str]:
    """Say where the client, not the cell, set a number."""
    notes = []
    for variant, data in section["variants"].items():
        for path, p in data["paths"].items():
            if p["client_saturated_runs"]:
                notes.append(
                    f"{variant}/{path}: {p['client_saturated_runs']} runs with the client at >= 85 % CPU "
                    f"(max {p['client_cpu_percent_max']:.0f} %)"
                )
    if not notes:
        return ["The client stayed below 85 % of a core in every run: it did not limit these numbers.", ""]
    return [
        "Client limits: " + "; ".join(notes) + ". Where the direct path is client-bound its rate is a floor, "
        "so cell / direct is an upper bound there.",
        "",
    ]


def datapath(section: dict, defaults: dict) -> list[str]:
    rows = []
    for variant, data in section["variants"].items():
        for path in ("direct", "cell"):
            p = data["paths"][path]
            rows.append(
                [
                    variant,
                    "client → replica" if path == "direct" else "client → HAProxy → replica",
                    spread(p["conn_per_s"], digits=0),
                    spread(p["p50_ms"], digits=3),
                    spread(p["p99_ms"], digits=3),
                    spread(p["mib_per_s"], digits=0),
                    spread(p["haproxy_cpu_s_per_gib"], digits=2) if path == "cell" else "-",
                    p["failed"],
                    f"{p['client_cpu_percent_max']:.0f} % ({p['client_saturated_runs']} saturated)",
                ]
            )
        r = data["ratios"]
        rows.append(
            [
                variant,
                "**cell ÷ direct**",
                *(f"**{spread(r[k], digits=2)}**" for k in ("conn_per_s", "p50_ms", "p99_ms", "mib_per_s")),
                "",
                "",
                "",
            ]
        )
    verdict = section["verdict"]
    vs = verdict["splice_vs_plain"]
    plain, splice = section["variants"]["no splice"], section["variants"]["splice"]
    lat = plain["paths"]["cell"]
    lines = [
        "## 1. Data path",
        "",
        "Backend: **bench/backend.py, not mtprotoproxy** (which cannot move data without Telegram): the replica "
        "containers run it from an image made of the mtprotoproxy image, with the replica's own config, so it "
        "listens on the replica ports behind the same HAProxy config and TPROXY return path. It sends one byte "
        "on accept and, on request, bulk bytes with sendfile(). Baseline: the same process on a port outside the "
        "return-path rules, reached directly. Direct and through-the-cell runs alternate, and so do the two HAProxy "
        "variants (a reload each time). HAProxy runs the "
        "formula's config as deployed, logging every connection (`option tcplog` to stdout, kept by Docker): "
        "that cost is part of the cell's numbers.",
        "",
        f"New connections/s: closed loop, {section['variants']['no splice']['runs']['cell']['rate'][0]['concurrency']} "
        "concurrent connect → first byte → close. Latency: connect() to first byte, open loop at "
        f"{lat['latency_achieved_rate']['median']:.0f}/s achieved (schedule lag ≤ "
        f"{lat['latency_schedule_lag_max_ms']:.1f} ms). Throughput: one connection, "
        f"{plain['runs']['cell']['bulk'][0]['bytes'] / 2**20:.0f} MiB; HAProxy CPU = utime+stime of its processes.",
        "",
        *_table(
            [
                "HAProxy options",
                "path",
                "new conn/s",
                "p50 ms",
                "p99 ms",
                "MiB/s (1 conn)",
                "HAProxy CPU s/GiB",
                "failed",
                "client CPU max",
            ],
            rows,
        ),
        "",
        "Splice against no splice through the cell, repetition by repetition (median, min-max): throughput x "
        f"{spread(vs['mib_per_s'], digits=2)}, HAProxy CPU per GiB x {spread(vs['haproxy_cpu_per_gib'], digits=2)}, "
        f"new connections/s x {spread(vs['conn_per_s'], digits=2)}, p50 latency x {spread(vs['p50_ms'], digits=2)}. "
        + splice_decision(verdict["splice_wins"], defaults),
        "",
        "HAProxy CPU per 1000 new connections (closed-loop runs): "
        + ", ".join(
            f"{v} {spread(d['paths']['cell']['haproxy_cpu_ms_per_1000_conn'], ' ms', digits=0)}"
            for v, d in section["variants"].items()
        )
        + ".",
        "",
        *saturation_note(section),
        f"What this means: through the cell a new connection costs "
        f"{_n(plain['ratios']['p50_ms']['median'])}x the direct median latency and one connection moves "
        f"{_n(splice['ratios']['mib_per_s']['median'])}x (splice) / {_n(plain['ratios']['mib_per_s']['median'])}x "
        "(no splice) of direct throughput; on two shared cores client, HAProxy and backend compete for the same "
        "CPU, so these ratios are the cost of the extra hop on this machine, not HAProxy's ceiling.",
        "",
    ]
    return lines


def concurrency(section: dict) -> list[str]:
    base, loaded, held = section["baseline"], section["loaded"], section["held"]
    rows = [
        ["p50 handshake → answer, ms", spread(base["p50_ms"], digits=2), spread(loaded["p50_ms"], digits=2)],
        ["p99 handshake → answer, ms", spread(base["p99_ms"], digits=2), spread(loaded["p99_ms"], digits=2)],
        [
            "probe: achieved rate / failed / client CPU max",
            f"{spread(base['achieved_rate'], '/s')} / {base['failed']} / {base['client_cpu_percent_max']:.0f} %",
            f"{spread(loaded['achieved_rate'], '/s')} / {loaded['failed']} / {loaded['client_cpu_percent_max']:.0f} %",
        ],
        [
            "HAProxy sessions / RSS",
            f"0 / {section['haproxy_rss_idle_mib']} MiB",
            f"{section['haproxy_sessions']} / {section['haproxy_rss_held_mib']} MiB",
        ],
    ]
    rows[0].append(_n(section["p50_ratio"]))
    rows[1].append(_n(section["p99_ratio"]))
    rows[2].append("")
    rows[3].append("")
    limits = section["open_files_limit"]
    probes = len(section["probes"]["baseline"])
    probe_seconds = round(section["probes"]["baseline"][0]["client"]["wall_s"])
    capped = ""
    if held["wanted"] < section["wanted"]:
        capped = (
            f" ({section['wanted']} asked: HAProxy needs two descriptors per connection and its open-files limit, "
            f"dockerd's, is {limits['haproxy']}; raising it needs CAP_SYS_RESOURCE, which this machine's sandbox "
            "does not give even to root)"
        )
    return [
        "## 2. Concurrency",
        "",
        f"Backend: the real mtprotoproxy replicas (2, handshake timeout 3600 s), HAProxy `maxconn "
        f"{section['maxconn']}`{capped}. {held['wanted']} idle connections opened through the cell at up to "
        f"{held['wanted'] / max(held['open_seconds'], 0.01):.0f}/s ({held['opened']} opened, "
        f"{held['failed_open']} failed, {held['alive_at_end']} still open at the end; holder CPU "
        f"{held['client']['cpu_percent']} %). The probe sends a valid MTProto handshake for the cell's secret and "
        "times connect() to the replica's answer (it closes: Telegram is unreachable), "
        f"{base['target_rate']:.0f}/s for {probe_seconds} s, {probes} times each; baseline = the same probe "
        "with no connection held.",
        "",
        *_table(["", "no held connections", f"{section['haproxy_sessions']} held", "held ÷ none"], rows),
        "",
        f"HAProxy memory per held connection (RSS delta of its processes ÷ sessions): "
        f"**{section['rss_kib_per_connection']} KiB**.",
        "",
        f"What this means: {section['haproxy_sessions']} idle clients cost HAProxy "
        f"{section['haproxy_rss_held_mib'] - section['haproxy_rss_idle_mib']:.0f} MiB and change a new client's "
        f"median latency by x {_n(section['p50_ratio'])}.",
        "",
    ]


def failover(section: dict) -> list[str]:
    rows = []
    for name in ("original", "ours"):
        data = section[name]
        load = data["load"]
        options = (
            "`check inter 3s fall 2 rise 2`, no redispatch"
            if name == "original"
            else "`fast` + `retries 3`, `option redispatch 1`"
        )
        for kind, k in data["kinds"].items():
            rows.append(
                [
                    f"{name}: {options}",
                    kind,
                    f"{k['down_detected']}/{k['kills']}",
                    spread(k["down_s"], " s", digits=2),
                    spread(k["failed_new_per_kill"], digits=1) + f" [{k['failed_new_total']}]",
                    k["cut_total"],
                    f"{load['new_rate']}/s, CPU {load['client'].get('cpu_percent', '?')} %",
                ]
            )
    original = section["original"]["kinds"]
    ours = section["ours"]["kinds"]
    restarted, stays = list(original)
    return [
        "## 3. Failover",
        "",
        "Backend: the real mtprotoproxy replicas (2). Under 20 new connections/s plus 40 long-lived ones "
        "(test/loadgen.py, connect-only: each new one must stay open 4 s, longer than HAProxy's 3 retries), "
        "one replica at a time, alternating, "
        "gets SIGKILL (a crash), either restarted at once by Docker's restart policy (the formula's setting) or "
        "kept dead until HAProxy marks it DOWN (the restart policy switched off for that kill, then started by "
        "hand: the case of a replica that does not come back). DOWN = HAProxy's admin socket first reports the "
        "server DOWN (polled every 20 ms, given up after 8 s). Failed new = new connections started from the "
        "kill until the next kill that were refused or closed; cut = connections held on the victim when it "
        "died. The loadgen column is per profile run. Baseline: the original design's profile.",
        "",
        *_table(
            [
                "profile",
                "kill",
                "DOWN seen",
                "DOWN after kill",
                "failed new per kill [total]",
                "cut",
                "loadgen achieved",
            ],
            rows,
        ),
        "",
        f"What this means: a replica that stays dead is marked DOWN after "
        f"{spread(ours[stays]['down_s'], ' s', digits=2)} with our profile against "
        f"{spread(original[stays]['down_s'], ' s', digits=2)} (x {_n(section['down_ratio'])}), and costs "
        f"{spread(ours[stays]['failed_new_per_kill'], digits=1)} failed new connections per kill against "
        f"{spread(original[stays]['failed_new_per_kill'], digits=1)}. A replica that Docker restarts at once is "
        f"seen DOWN by the original profile in {original[restarted]['down_detected']} of "
        f"{original[restarted]['kills']} kills; {original[restarted]['failed_new_total']} new connections failed "
        f"then with it ({ours[restarted]['failed_new_total']} with ours): HAProxy's retries to the same server "
        "can outlast a one-second restart. Connections open on the victim are cut with either profile (their "
        "clients reconnect); that includes the long-lived ones, so none outlives a run that kills both replicas.",
        "",
    ]


def operations(section: dict) -> list[str]:
    rows = []
    for label, data in section.items():
        detail = ""
        if "reloads" in data:
            detail = f"{data['reloads']} reloads, apply {spread(data['apply_s'], ' s')}"
        elif "to_4_s" in data:
            detail = f"apply to 4: {data['to_4_s']} s, to 2: {data['to_2_s']} s"
        rows.append(
            [
                label,
                f"{data['seconds']} s",
                detail,
                data["new_attempted"],
                data["new_failed"],
                f"{data['long_survived']}/{data['long_opened']}",
                f"{data['new_rate']}/s, CPU {data['client'].get('cpu_percent', '?')} %",
            ]
        )
    operations = [d for k, d in section.items() if k != "no operation"]
    failed = sum(d["new_failed"] for d in operations)
    survived, opened = sum(d["long_survived"] for d in operations), sum(d["long_opened"] for d in operations)
    return [
        "## 4. Operations under load",
        "",
        "Backend: the real mtprotoproxy replicas. Same load as section 3. Reloads: `state.apply mtproxy` "
        "toggling `haproxy:balance`, each a confirmed graceful reload. Scale: `replicas` 2 → 4 → 2 (the "
        "removed replicas drained first, `drain_timeout` 5 s). Baseline: the same load with no operation.",
        "",
        *_table(
            [
                "operation",
                "duration",
                "what ran",
                "new connections",
                "failed",
                "long-lived survived",
                "loadgen achieved",
            ],
            rows,
        ),
        "",
        f"What this means: {failed} new connections failed over all operations (against "
        f"{section['no operation']['new_failed']} with no operation), and {survived} of {opened} long-lived "
        "connections survived them.",
        "",
    ]


def salt(section: dict) -> list[str]:
    rows = [
        [key, spread(section["summary"][key], " s"), _n(section["vs_test_ping"][key])] for key in section["summary"]
    ]
    return [
        "## 5. Salt",
        "",
        "Wall time of `salt-call --local state.apply mtproxy sync_mods=all` (what an operator runs) in the test "
        "host, 2 replicas. First = on the fresh test host, then after `mtproxy.clean` (images loaded, secret "
        f"file kept; {len(section['times']['first'])} in all); replicas changes "
        "include starting or draining and removing a replica. Baseline: `salt-call --local test.ping` (Salt's "
        f"own start-up). No-change applies changed {max(section['no_change_changed_states'])} states.",
        "",
        *_table(["apply", "wall time", "÷ test.ping"], rows),
        "",
        "What this means: most of a no-change apply is Salt's own start-up and state compilation; a change adds "
        "the containers' start, the confirmed reload and, when scaling down, the drain.",
        "",
    ]


RENDER = {
    "datapath": datapath,
    "concurrency": concurrency,
    "failover": failover,
    "operations": operations,
    "salt": salt,
}
ORDER = ("datapath", "concurrency", "failover", "operations", "salt")


def _bars(ax, labels: list[str], stats: list[dict], color: str = "C0", offset: float = 0.0, width: float = 0.8):
    """Bars at the medians with min-max whiskers."""
    med = [s["median"] for s in stats]
    err = [[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]]
    ax.bar([i + offset for i in range(len(stats))], med, width, yerr=err, capsize=3, color=color)
    ax.set_xticks(range(len(labels)), labels)


def _legend(ax, entries: dict[str, str]) -> None:
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=color, label=label) for label, color in entries.items()], fontsize=8)


def _plot_datapath(ax, section: dict) -> None:
    metrics = {"conn_per_s": "new conn/s", "p50_ms": "p50 latency", "p99_ms": "p99 latency", "mib_per_s": "MiB/s"}
    colors = {}
    for i, (variant, data) in enumerate(section["variants"].items()):
        colors[variant] = f"C{i}"
        stats = [data["ratios"][k] for k in metrics]
        _bars(ax, list(metrics.values()), stats, colors[variant], offset=(i - 0.5) * 0.4, width=0.4)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_title("1. Data path: cell / direct (1 = no cost)")
    _legend(ax, colors)


def _plot_concurrency(ax, section: dict) -> None:
    labels = ["no held connections", f"{section['haproxy_sessions']} held"]
    runs = [section["baseline"], section["loaded"]]
    for i, (key, color) in enumerate((("p50_ms", "C0"), ("p99_ms", "C1"))):
        _bars(ax, labels, [r[key] for r in runs], color, offset=(i - 0.5) * 0.4, width=0.4)
    ax.set_ylabel("ms")
    ax.set_title("2. Handshake -> answer, real replicas")
    _legend(ax, {"p50": "C0", "p99": "C1"})


def _plot_failover(ax_down, ax_failed, section: dict) -> None:
    profiles = ("original", "ours")
    for i, name in enumerate(profiles):
        for j, (kind, color) in enumerate(zip(section[name]["kinds"], ("C0", "C2"), strict=True)):
            kills = [k for k in section[name]["kills"] if k["kind"] == kind]
            x = i + (j - 0.5) * 0.3
            downs = [k["down_s"] for k in kills if k["down_s"] is not None]
            ax_down.scatter([x] * len(downs), downs, color=color, zorder=3)
            ax_failed.scatter([x] * len(kills), [k["failed_new"] for k in kills], color=color, zorder=3)
    for ax in (ax_down, ax_failed):
        ax.set_xticks(range(len(profiles)), ["original profile", "ours"])
        _legend(ax, dict(zip(section["ours"]["kinds"], ("C0", "C2"), strict=True)))
    ax_down.set_yscale("log")
    ax_down.set_ylabel("s (log)")
    ax_down.set_title("3. Failover: DOWN after kill")
    ax_failed.set_title("3. Failover: failed new connections per kill")


def _plot_operations(ax, section: dict) -> None:
    labels = list(section)
    ax.bar(range(len(labels)), [d["new_attempted"] for d in section.values()], color="C0")
    ax.bar(range(len(labels)), [d["new_failed"] for d in section.values()], color="C3")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_title("4. New connections during operations")
    _legend(ax, {"attempted": "C0", "failed": "C3"})


def _plot_salt(ax, section: dict) -> None:
    stats = section["summary"]
    _bars(ax, list(stats), list(stats.values()))
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    ax.set_ylabel("s")
    ax.set_title("5. Salt apply wall time")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = results["sections"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (a, b, c), (d, e, f) = axes
    panels = {
        "datapath": lambda s: _plot_datapath(a, s),
        "concurrency": lambda s: _plot_concurrency(b, s),
        "failover": lambda s: _plot_failover(c, d, s),
        "operations": lambda s: _plot_operations(e, s),
        "salt": lambda s: _plot_salt(f, s),
    }
    for name, draw in panels.items():
        if name in sections:
            draw(sections[name])
    fig.suptitle(f"mtproxy-formula benchmarks, {results['date']}: medians, whiskers min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    lines = header(results)
    for name in ORDER:
        if name in results["sections"]:
            render = RENDER[name]
            section = results["sections"][name]
            lines += render(section, results.get("formula_defaults", {})) if name == "datapath" else render(section)
    (out / "results.md").write_text("\n".join(lines).rstrip() + "\n")
    plot(results, out / PLOT)
