"""results.md and results.png from the dict bench/run.py collects (also kept as results.json)."""

from __future__ import annotations

from pathlib import Path

from bench.stats import spread, summary

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
    real = results["sections"].get("realpath")
    later = [k for k, run in results.get("section_runs", {}).items() if run["date"] != results["date"]]
    own = {k: s for k, s in results.get("section_seconds", {}).items() if k not in later}
    guard = results["sections"].get("replay_guard")
    real_reps = "; ".join(
        ([f"real data path: {len(real['runs']['direct']['rtt'])}"] if real else [])
        + ([f"replay guard: {len(guard['runs']['leastconn']['sessions'])}"] if guard else [])
    )
    lines = [
        "# Benchmarks",
        "",
        f"Measured {results['date']} by `{results['command']}` in {minutes:.1f} min "
        f"(sections: {', '.join(f'{k} {s:.0f} s' for k, s in own.items())}).",
        "",
        f"- Machine: {v.get('cpus', '?')} CPUs ({v.get('cpu_model', '?')}), {v.get('memory_gib', '?')} GiB, "
        f"kernel {v.get('kernel', '?')}, {v.get('os', '?')}; shared with other work while it ran.",
        f"- Versions: HAProxy {v.get('haproxy', '?')}; Salt {v.get('salt', '?')}; Python {v.get('python', '?')}; "
        f"Docker {v.get('docker', '?')}; mtprotoproxy {v.get('mtprotoproxy', '?')}.",
        f"- Formula: {results['formula']}.",
        *later_runs(results),
        "- Reproduce: `make bench` (root, Debian 12; writes this file, `results.json` with every raw run, and "
        f"`{PLOT}`). `bench/run.py --quick` or `--only SECTION` for a short run.",
        "",
        "Everything runs in one test host (test/testhost.py: a network namespace with its own dockerd, "
        "open-files limit of the machine: 20000 here; clients in a second namespace over a veth pair), deployed by "
        "`salt-call --local state.apply mtproxy`. The machine is shared and noisy: read the ratios, each against "
        f"a baseline measured in the same run, not the absolute numbers. Repeated measurements: median "
        f"(min-max) of {plan['reps']} (data path: {plan.get('datapath_reps', plan['reps'])}"
        f"{'; ' + real_reps if real_reps else ''}). The load generators are small asyncio clients of ours "
        "(bench/netload.py, bench/mtload.py, "
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


def later_runs(results: dict) -> list[str]:
    """Sections measured in a later run and merged in (bench/run.py --merge)."""
    later: dict[tuple, list[str]] = {}
    for name, run in results.get("section_runs", {}).items():
        if run["date"] != results["date"]:
            later.setdefault((run["date"], run["command"], run["formula"]), []).append(name)
    seconds = results.get("section_seconds", {})
    return [
        f"- Sections {', '.join(f'{n} ({seconds.get(n, 0):.0f} s)' for n in names)}: measured {date} by "
        f"`{command}` (formula {formula}), merged into these results; their ratios compare setups of that run "
        "only."
        for (date, command, formula), names in later.items()
    ]


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
        "that cost is part of the cell's numbers. Runs since the replay guard (section 7) have it off here: this "
        "backend speaks first, so the guard would hold each connection for its inspect delay.",
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


PARALLEL_KEY = "throughput_16"
PROCESSES = ("client", "HAProxy", "replicas", "stand-in")
# Issue 17's targets: figures to report, not assertions.
TARGETS = {
    "16 sessions, cell with 1 replica ≥ 0.9x direct throughput": (
        "cell 1 ÷ direct",
        "throughput_16_mib_per_s",
        ">=",
        0.9,
    ),
    "packet round trip p50 ≤ 1.5x direct": ("cell 1 ÷ direct", "rtt_p50_ms", "<=", 1.5),
    "cell CPU per GiB (HAProxy + replica) ≤ 1.15x a lone replica's (16 sessions)": (
        "cell 1 ÷ direct",
        "throughput_16_relay_cpu_per_gib",
        "<=",
        1.15,
    ),
}


def _noise(stats: dict) -> str:
    """Whether paired ratios show a difference beyond this run's noise."""
    if not stats.get("n"):
        return "n/a"
    span = f"{stats['min']:.2f}\u2013{stats['max']:.2f} over the repetitions"
    if stats["min"] <= 1 <= stats["max"]:
        return f"{span}: within this run's noise"
    return f"{span}: every repetition {'above' if stats['min'] > 1 else 'below'} 1"


def _other_realpath_runs(section: dict) -> list[str]:
    """Later runs of the section on the same machine, kept in results.json (not merged): the noise between runs."""
    lines = []
    for run in section.get("other_runs", []):
        one, two = run["ratios"]["cell 1 ÷ direct"], run["ratios"]["cell 2 ÷ cell 1"]
        busy = {s: summary(v)["median"] for s, v in run["cores_busy_16"].items()}
        lines.append(
            f"- {run['date']}: cell 1 ÷ direct: 16 sessions {_n(one[f'{PARALLEL_KEY}_mib_per_s']['median'])}, "
            f"1 session {_n(one['throughput_1_mib_per_s']['median'])}, sessions/s "
            f"{_n(one['sessions_per_s']['median'])}, round trip p50 {_n(one['rtt_p50_ms']['median'])}, relay CPU/GiB "
            f"{_n(one[f'{PARALLEL_KEY}_relay_cpu_per_gib']['median'])}; cell 2 ÷ cell 1, 16 sessions "
            f"{_n(two[f'{PARALLEL_KEY}_mib_per_s']['median'])}; cores busy with 16 sessions: "
            + ", ".join(f"{s} {v:.2f}" for s, v in busy.items())
            + "."
        )
    if not lines:
        return []
    return [
        "The same section run again later in the same hour (raw runs not kept; medians of their repetitions), "
        "while other work took more of the machine (fewer cores busy with our processes). The run above is the "
        "one where our processes had the most of the two cores:",
        "",
        *lines,
        "",
    ]


def _other_guard_runs(section: dict) -> list[str]:
    lines = [
        f"- {run['date']}: guard ÷ leastconn sessions/s "
        f"{spread(run['guard_vs_leastconn']['sessions_per_s'], digits=2)}, p50 "
        f"{spread(run['guard_vs_leastconn']['p50_ms'], digits=2)}; most off an even share: "
        + ", ".join(f"{v} {d.get('max', 0):.0f} %" for v, d in run["max_deviation_pct"].items())
        + "."
        for run in section.get("other_runs", [])
    ]
    if not lines:
        return []
    return ["Runs later in the same hour (5 repetitions each, a busier machine):", "", *lines, ""]


def _target_lines(ratios: dict) -> list[str]:
    lines = []
    for text, (pair, key, op, bound) in TARGETS.items():
        value = ratios[pair][key].get("median")
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        lines.append(f"- {text}: {spread(ratios[pair][key], digits=2)}x, **{'met' if met else 'not met'}**.")
    return lines


def realpath(section: dict) -> list[str]:
    setups, ratios = section["setups"], section["ratios"]
    rows = []
    for name, s in setups.items():
        rows.append(
            [
                name,
                spread(s["throughput_1"]["mib_per_s"], digits=0),
                spread(s[PARALLEL_KEY]["mib_per_s"], digits=0),
                spread(s["sessions_per_s"], digits=0),
                spread(s["rtt_p50_ms"], digits=3),
                spread(s["rtt_p99_ms"], digits=3),
                spread(s[PARALLEL_KEY]["cpu_s_per_gib"]["relay"], digits=2),
                f"{s['throughput_1']['mismatches'] + s[PARALLEL_KEY]['mismatches'] + s['rtt_mismatches']}"
                f" / {s['sessions_failed']}",
                f"{s['client_cpu_percent_max']:.0f} % ({s['client_saturated_runs']} saturated)",
            ]
        )
    for pair, r in ratios.items():
        rows.append(
            [
                f"**{pair}**",
                *(
                    f"**{spread(r[k], digits=2)}**"
                    for k in (
                        "throughput_1_mib_per_s",
                        f"{PARALLEL_KEY}_mib_per_s",
                        "sessions_per_s",
                        "rtt_p50_ms",
                        "rtt_p99_ms",
                        f"{PARALLEL_KEY}_relay_cpu_per_gib",
                    )
                ),
                "",
                "",
            ]
        )
    cpu_rows = []
    busy: dict[str, dict] = {}
    for kind, label in (("throughput_1", "1 session"), (PARALLEL_KEY, "16 sessions")):
        for name, s in setups.items():
            per = s[kind]["cpu_s_per_gib"]
            total = sum(per[k]["median"] for k in PROCESSES)
            busy[name] = summary(sum(r["cpu_s"].values()) / r["seconds"] for r in section["runs"][name][kind])
            cpu_rows.append(
                [
                    label,
                    name,
                    *(spread(per[k], digits=2) for k in PROCESSES),
                    f"{total:.2f}",
                    f"{100 * (per['HAProxy']['median'] + per['replicas']['median']) / total:.0f} %",
                    spread(busy[name], digits=2),
                ]
            )
    one = setups["cell, 1 replica"]
    two = setups["cell, 2 replicas"]
    runs = section["runs"]["direct"]
    seconds = runs["throughput_1"][0]["seconds"]
    size = runs["throughput_1"][0]["size"]
    window = f"{runs['throughput_1'][0].get('window', 1 << 20) / 2**20:.0f} MiB"
    reps = len(runs["rtt"])
    standin = section["standin"]
    r1, r2 = ratios["cell 1 ÷ direct"], ratios["cell 2 ÷ cell 1"]
    return [
        "## 6. Real data path",
        "",
        "Real traffic: real mtprotoproxy replicas relay MTProto sessions to a stand-in Telegram data centre "
        "(test/standin_dc.py, in the test host) that decrypts every byte and echoes it back re-encrypted; the "
        "replicas run the test-only image derived from the local one (`" + section["image"] + "`: its data-centre "
        "list names the stand-in; never a formula default). The client is our raw one (bench/mtload.py on "
        "test/mtproto.py's `Session`, `dd` padded intermediate; not Telethon, whose loop adds tens of ms per "
        "round trip). Setups: **direct** = a replica container like the cell's (same image, config, limits) on a "
        "port outside the return-path rules, reached straight from the client namespace; **cell, 1 replica** = "
        "the cell's frontend with the second replica in maintenance (admin socket), **cell, 2 replicas** = both "
        "ready; the cell runs the formula's defaults (splice, replay guard, `option tcplog`). One deploy; within "
        f"each of {reps} repetitions every measurement runs for the three setups in rotated order, and the ratios "
        "are paired by repetition (median, min-max).",
        "",
        "Section 1 (the synthetic backend) stays beside this one: there the backend costs almost nothing "
        "(sendfile, no cipher), so it isolates HAProxy's own relay cost at GiB/s and decides options such as "
        "splice; here the three Python processes that run AES-CTR over every byte bound the throughput to a few "
        "hundred MiB/s, which hides such differences but shows what a user of the cell gets.",
        "",
        f"Throughput: {size // 1024} KiB packets for {seconds:.0f} s, up to {window} in flight per session (an "
        "earlier run with 1 MiB held one session through the cell to 0.63x direct: there the client's window, "
        "not the relay, set the pace), bytes echoed back byte-exact per second (each crosses the relay twice). "
        "Sessions/s: closed loop, 16 workers "
        "each connect, handshake, round-trip one 16-byte packet (the handshake then completed all the way to the "
        f"data centre), close. Round trip: one session, {runs['rtt'][0]['count']} packets of 64 bytes one at a "
        "time. CPU = utime+stime from /proc/PID/stat of each process (all threads) over the run; relay = "
        "HAProxy + replicas.",
        "",
        *_table(
            [
                "setup",
                "MiB/s, 1 session",
                "MiB/s, 16 sessions",
                "sessions/s",
                "round trip p50 ms",
                "p99 ms",
                "relay CPU s/GiB (16)",
                "mismatches / failed",
                "client CPU max",
            ],
            rows,
        ),
        "",
        "CPU seconds per GiB echoed (2 GiB cross the relay, one each way), by process (median, min-max); "
        "relay share = (HAProxy + replicas) ÷ total; cores "
        "busy = all four groups' CPU seconds ÷ the run's seconds (of the machine's 2):",
        "",
        *_table(
            ["load", "setup", "client", "HAProxy", "replicas", "stand-in", "total", "relay share", "cores busy"],
            cpu_rows,
        ),
        "",
        f"Stand-in totals over the section: {standin['sessions']} sessions, {standin['bytes_in'] / 2**30:.1f} GiB "
        f"echoed, {standin['bad_init']} bad inits.",
        "",
        "Targets (issue 17; figures, not assertions), cell with 1 replica against direct:",
        "",
        *_target_lines(ratios),
        "",
        *_other_realpath_runs(section),
        "What this means: through the cell, 16 sessions move "
        f"{_n(r1[f'{PARALLEL_KEY}_mib_per_s']['median'])}x and one session "
        f"{_n(r1['throughput_1_mib_per_s']['median'])}x of the direct throughput, a packet's round trip takes "
        f"{_n(r1['rtt_p50_ms']['median'])}x (p50), and the relay spends "
        f"{_n(r1[f'{PARALLEL_KEY}_relay_cpu_per_gib']['median'])}x "
        f"the CPU per GiB. Most CPU goes to the three Python processes that run AES-CTR over every byte (client, "
        f"replica, stand-in); HAProxy with splice takes {_n(one[PARALLEL_KEY]['cpu_s_per_gib']['HAProxy']['median'])} "
        f"s/GiB against the replica's {_n(one[PARALLEL_KEY]['cpu_s_per_gib']['replicas']['median'])}. A second "
        f"replica gives 16 sessions x {_n(r2[f'{PARALLEL_KEY}_mib_per_s']['median'])} "
        f"({spread(two[PARALLEL_KEY]['mib_per_s'], digits=0)} against "
        f"{spread(one[PARALLEL_KEY]['mib_per_s'], digits=0)} MiB/s) and new sessions/s x "
        f"{_n(r2['sessions_per_s']['median'])}. "
        "What the ratios can show on 2 shared cores: the cost of the extra hop (HAProxy's CPU per GiB, its "
        "latency, its share of the throughput) with everything else equal, as the setups run seconds apart on the "
        "same machine. What they cannot show: the capacity N replicas add. With 16 sessions the client, HAProxy, "
        f"replicas and stand-in together keep {spread(busy['cell, 1 replica'], digits=2)} of the 2 cores busy "
        f"(direct: {spread(busy['direct'], digits=2)}), besides the other work on the machine: the cores are "
        "full, so a second replica process can only take CPU from the others, and 2 ÷ 1 near 1 says the machine "
        "is saturated, not that replicas do not scale. Showing that needs more cores than the client and the data "
        "centre use, or those on other machines. For the same reason cell ÷ direct throughput partly measures "
        "how much CPU HAProxy takes from the Python processes, not only HAProxy's own speed.",
        "",
    ]


def replay_guard(section: dict) -> list[str]:
    rows = []
    for name, v in section["variants"].items():
        rows.append(
            [
                name,
                spread(v["sessions_per_s"], digits=0),
                spread(v["p50_ms"], digits=2),
                spread(v["p99_ms"], digits=2),
                spread(v["max_deviation_pct"], " %", digits=1),
                spread(v["haproxy_cpu_ms_per_session"], digits=3),
                v["failed"],
                f"{v['client_cpu_percent_max']:.0f} %",
            ]
        )
    r = section["guard_vs_leastconn"]
    rows.append(
        [
            "**guard ÷ leastconn**",
            f"**{spread(r['sessions_per_s'], digits=2)}**",
            f"**{spread(r['p50_ms'], digits=2)}**",
            f"**{spread(r['p99_ms'], digits=2)}**",
            "",
            "",
            "",
            "",
        ]
    )
    runs = section["runs"]["leastconn"]
    open_run = runs["open"][0]
    sessions = sum(sum(s.values()) for v in section["runs"].values() for s in v["spread"])
    guard = section["variants"]["leastconn + replay guard"]
    return [
        "## 7. Replay guard",
        "",
        f"Real mtprotoproxy replicas ({section['replicas']}, the test-only image) and the stand-in data centre, "
        "as in section 6. `leastconn` alone against `leastconn` with the replay guard (`haproxy:replay_guard`, "
        "the default: HAProxy waits for the client's first 64 bytes and sticks them in a table, so a replayed "
        "handshake reaches the replica that saw the original). The clients send their 64-byte handshake and "
        "first packet at once, as real clients do, so the guard's inspect-delay never runs out. Sessions/s: "
        f"closed loop, {runs['sessions'][0]['concurrency']} workers connect, handshake, round-trip one packet, "
        f"close. Latency: open loop, {open_run['target_rate']:.0f} new sessions/s for "
        f"{open_run['client']['wall_s']:.0f} s, connect() to the first echoed packet. Spread: each replica's "
        "share of the sessions of a repetition (HAProxy's per-server session count), as the largest distance "
        "from an even share. The variants alternate (ABBA, one reload each); ratios are paired by repetition.",
        "",
        *_table(
            [
                "balancing",
                "sessions/s",
                "connect → echo p50 ms",
                "p99 ms",
                "spread: max off even",
                "HAProxy CPU ms/session",
                "failed",
                "client CPU max",
            ],
            rows,
        ),
        "",
        f"What this means: with the guard, new sessions/s are x {_n(r['sessions_per_s']['median'])} "
        f"({_noise(r['sessions_per_s'])}) and the median connect latency x {_n(r['p50_ms']['median'])} "
        f"({_noise(r['p50_ms'])}) of leastconn alone, over {sessions} sessions in all (with the guard HAProxy "
        "connects to a replica only once the client's first 64 bytes are in, not at accept); the spread over "
        f"{section['replicas']} replicas stays within {guard['max_deviation_pct'].get('max', 0):.0f} % of even "
        f"(leastconn alone: {section['variants']['leastconn']['max_deviation_pct'].get('max', 0):.0f} %; "
        "leastconn picks the replica for every fresh handshake; the table only matters for one seen before).",
        "",
        *_other_guard_runs(section),
    ]


VIP_COLUMNS = [
    "A lost by",
    "address moved",
    "clients back",
    "failed new",
    "address back",
    "failed new on return",
    "MASTER on return",
]


def vip(section: dict) -> list[str]:
    rows = [
        [
            case,
            spread(stats["address_moved_s"], " s"),
            spread(stats["clients_back_s"], " s"),
            spread(stats["failed_new"], "", 0),
            spread(stats["address_back_s"], " s"),
            spread(stats.get("failed_new_on_return", {}), "", 0),
            _n(stats["masters_on_return"].get("max"), 0),
        ]
        for case, stats in section["summary"].items()
    ]
    return [
        "## 8. Floating addresses",
        "",
        "Two test hosts, each with a 2-replica cell and `mtproxy.vip` (keepalived, defaults: adverts every 1 s, "
        "cell check every 1 s, 2 failures to give up, `preempt_delay` 5 s), and a client on one bridge. "
        "Host A's cell is stopped (HAProxy) or its link cut, then restored, while the client opens a new "
        "connection to A's address every 50 ms (0.5 s timeout). Address moved: until B holds it; clients "
        "back: from the cut until a new connection succeeds again; address back: from the restore until A "
        "holds it again; MASTER on return: state changes to MASTER both hosts logged after the restore "
        "(1 = one move back, no flapping); failed new on return: new connections that failed after the restore.",
        "",
        *_table(VIP_COLUMNS, rows),
        "",
        "What this means: a stopped cell gives its address up after the check fails twice (about 2 s), during "
        "which A refuses new connections; a host that disappears is noticed after 3 missed adverts (about 3.6 s), "
        "during which new connections time out. The return costs no new connection.",
        "",
    ]


RENDER = {
    "datapath": datapath,
    "concurrency": concurrency,
    "failover": failover,
    "operations": operations,
    "salt": salt,
    "realpath": realpath,
    "replay_guard": replay_guard,
    "vip": vip,
}
ORDER = ("datapath", "concurrency", "failover", "operations", "salt", "realpath", "replay_guard", "vip")


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


def _plot_realpath(ax_ratio, ax_cpu, section: dict) -> None:
    metrics = {
        "throughput_1_mib_per_s": "MiB/s 1",
        f"{PARALLEL_KEY}_mib_per_s": "MiB/s 16",
        "sessions_per_s": "sessions/s",
        "rtt_p50_ms": "RTT p50",
        f"{PARALLEL_KEY}_relay_cpu_per_gib": "relay CPU/GiB",
    }
    colors = {}
    for i, pair in enumerate(("cell 1 ÷ direct", "cell 2 ÷ cell 1")):
        colors[pair] = f"C{i}"
        stats = [section["ratios"][pair][k] for k in metrics]
        _bars(ax_ratio, list(metrics.values()), stats, colors[pair], offset=(i - 0.5) * 0.4, width=0.4)
    ax_ratio.axhline(1, color="grey", lw=0.8)
    ax_ratio.tick_params(axis="x", labelsize=8)
    ax_ratio.set_title("6. Real data path: ratios (1 = equal)")
    _legend(ax_ratio, colors)
    setups = list(section["setups"])
    bottom = [0.0] * len(setups)
    parts = {"client": "C0", "HAProxy": "C3", "replicas": "C2", "stand-in": "C7"}
    for part, color in parts.items():
        values = [section["setups"][s][PARALLEL_KEY]["cpu_s_per_gib"][part]["median"] for s in setups]
        ax_cpu.bar(range(len(setups)), values, bottom=bottom, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax_cpu.set_xticks(range(len(setups)), setups, fontsize=8)
    ax_cpu.set_ylabel("CPU s per GiB")
    ax_cpu.set_title("6. Where the CPU goes (16 sessions)")
    _legend(ax_cpu, parts)


def _plot_replay_guard(ax, section: dict) -> None:
    metrics = {"sessions_per_s": "sessions/s", "p50_ms": "p50 latency", "p99_ms": "p99 latency"}
    _bars(ax, list(metrics.values()), [section["guard_vs_leastconn"][k] for k in metrics], "C1")
    ax.axhline(1, color="grey", lw=0.8)
    spreads = ", ".join(
        f"{'guard' if 'guard' in name else name} {v['max_deviation_pct'].get('max', 0):.0f} %"
        for name, v in section["variants"].items()
    )
    ax.set_title("7. Replay guard ÷ leastconn")
    ax.set_xlabel(f"{section['replicas']} replicas, most off an even share: {spreads}", fontsize=8)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = results["sections"]
    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
    (a, b, c), (d, e, f), (g, h, i) = axes
    panels = {
        "datapath": lambda s: _plot_datapath(a, s),
        "concurrency": lambda s: _plot_concurrency(b, s),
        "failover": lambda s: _plot_failover(c, d, s),
        "operations": lambda s: _plot_operations(e, s),
        "salt": lambda s: _plot_salt(f, s),
        "realpath": lambda s: _plot_realpath(g, h, s),
        "replay_guard": lambda s: _plot_replay_guard(i, s),
    }
    for name, draw in panels.items():
        if name in sections:
            draw(sections[name])
    later = sorted({r["date"] for r in results.get("section_runs", {}).values()} - {results["date"]})
    dates = results["date"] + "".join(f" (some sections: {d})" for d in later)
    fig.suptitle(f"mtproxy-formula benchmarks, {dates}: medians, whiskers min-max")
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
