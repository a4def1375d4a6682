#!/usr/bin/env python3
"""Turns the run records of scripts/bench-vs-haproxy.sh into the published markdown table.

Usage: report.py RESULTS_DIR

RESULTS_DIR holds params.txt (key=value), machine.txt, commands.txt, haproxy-default.cfg
and runs/, one
`<round>.<scenario>.<variant>.meta.json` per client run plus the client's own JSON output
(`.client.json`) and stderr (`.err`). Every number in the table is the median over the rounds
that succeeded; a cell with no successful round reads ERR, and the failures are listed under
the table. The per-round values are written to RESULTS_DIR/rounds.md.

The report leads with a verdict per row: holdfast with its default settings (`auto`) against
the HAProxy variant with the best median on that row, compared round by round (both ran in the
same round, minutes apart at most): "ahead" when holdfast was better in every round, "behind"
when it was worse in every round, "level" when the rounds disagree (the difference is within
the run-to-run noise). The ratio is the median of the per-round ratios, with their range.
"""

import json
import math
import os
import statistics
import sys

VARIANTS = [
    ("direct", "direct"),
    ("hf-auto", "holdfast auto"),
    ("hf-splice", "holdfast splice"),
    ("hf-copy", "holdfast copy"),
    ("hf-auto-64k", "holdfast auto, --pipe-memory 0"),
    ("ha-default", "haproxy default"),
    ("ha-splice", "haproxy splice"),
    ("ha-splice-auto", "haproxy splice-auto"),
    ("ha-splice-256k", "haproxy splice, pipesize 256k"),
]
# The shipped relay modes; hf-auto-64k (bulk rows only) is the relay before #15's grown pipes,
# shown for the before/after and not counted as "best holdfast".
HOLDFAST = ["hf-auto", "hf-splice", "hf-copy"]
HAPROXY = ["ha-default", "ha-splice", "ha-splice-auto", "ha-splice-256k"]
PROXIES = HOLDFAST + HAPROXY


def cpu(m):
    return m["cpu_after_s"] - m["cpu_before_s"]


def lat_pct(key):
    def f(m, c):
        if not c.get("completed"):
            raise ValueError("no request completed")
        return c["latency_us"][key]

    return f


def lat_round_trips(c):
    # CPU is sampled around the whole client run, warm-up included, while `completed` counts
    # only the measured window; at a fixed rate the warm-up did the same work per second.
    d = c["duration_s"]
    return c["completed"] * (d + c.get("warmup_s", 0.0)) / d


def cpu_per_100k_rt(m, c):
    if not c.get("completed"):
        raise ValueError("no request completed")
    return cpu(m) / lat_round_trips(c) * 1e5


def bulk_gbit(m, c):
    if c.get("verified") is not True:
        raise ValueError("echo byte counts not verified")
    return c["tx_gbit_per_s"]


def cpu_per_gb(m, c):
    if c.get("verified") is not True:
        raise ValueError("echo byte counts not verified")
    # Every byte the client wrote crossed the proxy twice: out, and back as the echo
    # (verified: the client got back exactly what it sent).
    return cpu(m) / (2 * c["tx_bytes"] / 1e9)


def conns_per_s(m, c):
    if not c.get("completed"):
        raise ValueError("no connection completed")
    return c["conns_per_sec"]


def cpu_ms_per_1k_conns(m, c):
    if not c.get("completed"):
        raise ValueError("no connection completed")
    return cpu(m) / c["completed"] * 1e6


def req_rate(m, c):
    if not c.get("completed"):
        raise ValueError("no request completed")
    return c["achieved_rate"]


def cpu_per_100k_closed(m, c):
    if not c.get("completed"):
        raise ValueError("no request completed")
    return cpu(m) / c["completed"] * 1e5


def machine(m):
    if m.get("machine_busy_after_s") is None or m.get("machine_busy_before_s") is None:
        raise ValueError("no whole-machine CPU recorded")
    return m["machine_busy_after_s"] - m["machine_busy_before_s"]


def machine_us_per_rt(m, c):
    if not c.get("completed"):
        raise ValueError("no request completed")
    return machine(m) / lat_round_trips(c) * 1e6


def machine_us_per_closed_rt(m, c):
    if not c.get("completed"):
        raise ValueError("no request completed")
    return machine(m) / c["completed"] * 1e6


def machine_per_gb(m, c):
    if c.get("verified") is not True:
        raise ValueError("echo byte counts not verified")
    return machine(m) / (2 * c["tx_bytes"] / 1e9)


def machine_ms_per_1k_conns(m, c):
    if not c.get("completed"):
        raise ValueError("no connection completed")
    return machine(m) / c["completed"] * 1e6


def kernel_per_conn(key):
    def f(m, c):
        est = c.get("established", 0)
        if est <= 0:
            raise ValueError("no connection established")
        if m.get(key + "_after") is None or m.get(key + "_before") is None:
            raise ValueError("no kernel memory recorded (--with-sockmap, as root)")
        return (m[key + "_after"] - m[key + "_before"]) / est

    return f


def rss_per_conn(m, c):
    est = c.get("established", 0)
    if est <= 0:
        raise ValueError("no connection established")
    return (m["rss_after_kib"] - m["rss_before_kib"]) * 1024 / est


def client_problems(scenario, c):
    """Errors the client reported although it produced a result."""
    if scenario.startswith("lat") or scenario in ("reqrate", "cpu64"):
        n = c.get("errors", 0) + c.get("conn_errors", 0)
        if scenario != "reqrate":  # closed loop: the unsent queue is "timed out" by design
            n += c.get("timed_out", 0)
        return n
    if scenario.startswith("bulk"):
        return c.get("errors", 0)
    if scenario == "connrate":
        return c.get("failures", 0)
    if scenario == "hold":
        return c.get("failed", 0) + c.get("dropped", 0)
    return 0


# (label, scenario, extractor, higher is better, proxies only, target ratio or None, fmt)
# Targets are issue #15's (holdfast default settings / best HAProxy variant).
ROWS = [
    ("64 B p50 latency (µs)", "lat64", lat_pct("p50"), False, False, None, "{:.0f}"),
    ("64 B p99 latency (µs)", "lat64", lat_pct("p99"), False, False, None, "{:.0f}"),
    ("64 B p99.9 latency (µs)", "lat64", lat_pct("p99_9"), False, False, None, "{:.0f}"),
    ("1 KiB p50 latency (µs)", "lat1k", lat_pct("p50"), False, False, None, "{:.0f}"),
    ("1 KiB p99 latency (µs)", "lat1k", lat_pct("p99"), False, False, None, "{:.0f}"),
    ("1 KiB p99.9 latency (µs)", "lat1k", lat_pct("p99_9"), False, False, None, "{:.0f}"),
    ("16 KiB p50 latency (µs)", "lat16k", lat_pct("p50"), False, False, None, "{:.0f}"),
    ("16 KiB p99 latency (µs)", "lat16k", lat_pct("p99"), False, False, None, "{:.0f}"),
    ("16 KiB p99.9 latency (µs)", "lat16k", lat_pct("p99_9"), False, False, None, "{:.0f}"),
    ("64 B p50 latency (µs), generator not spinning", "cpu64", lat_pct("p50"), False, False, None, "{:.0f}"),
    ("proxy CPU s / 100k round trips, 64 B @ fixed rate", "lat64", cpu_per_100k_rt, False, True, ("<=", 0.8), "{:.2f}"),
    ("proxy CPU s / 100k round trips, 1 KiB @ fixed rate", "lat1k", cpu_per_100k_rt, False, True, None, "{:.2f}"),
    ("proxy CPU s / 100k round trips, 16 KiB @ fixed rate", "lat16k", cpu_per_100k_rt, False, True, None, "{:.2f}"),
    ("bulk, 1 stream (Gbit/s each way)", "bulk1", bulk_gbit, True, False, (">=", 1.15), "{:.2f}"),
    ("bulk, 4 streams (Gbit/s each way)", "bulk4", bulk_gbit, True, False, None, "{:.2f}"),
    ("proxy CPU s / GB relayed, 1 stream", "bulk1", cpu_per_gb, False, True, ("<=", 0.8), "{:.3f}"),
    ("proxy CPU s / GB relayed, 4 streams", "bulk4", cpu_per_gb, False, True, None, "{:.3f}"),
    ("connection rate (conn/s)", "connrate", conns_per_s, True, False, (">=", 1.1), "{:.0f}"),
    ("proxy CPU ms / 1k connections", "connrate", cpu_ms_per_1k_conns, False, True, ("<=", 0.8), "{:.0f}"),
    ("request rate over kept connections (req/s, 64 B, closed loop)", "reqrate", req_rate, True, False, (">=", 1.1), "{:.0f}"),
    ("proxy CPU s / 100k round trips, closed loop", "reqrate", cpu_per_100k_closed, False, True, None, "{:.2f}"),
    ("RSS per idle proxied connection (bytes, 8000 held)", "hold", rss_per_conn, False, True, ("<=", 0.15), "{:.0f}"),
    # Whole-machine CPU (/proc/stat) around each client run: client, echo server, proxy,
    # softirq and kernel threads, and whatever else the machine did. The latency generator
    # spins between sends, so the lat rows carry a constant floor: compare with `direct`.
    ("machine CPU µs / round trip, 64 B @ fixed rate", "lat64", machine_us_per_rt, False, False, None, "{:.1f}"),
    ("machine CPU µs / round trip, 1 KiB @ fixed rate", "lat1k", machine_us_per_rt, False, False, None, "{:.1f}"),
    ("machine CPU µs / round trip, 16 KiB @ fixed rate", "lat16k", machine_us_per_rt, False, False, None, "{:.1f}"),
    ("machine CPU µs / round trip, 64 B @ fixed rate, generator not spinning", "cpu64", machine_us_per_rt, False, False, None, "{:.1f}"),
    ("machine CPU µs / round trip, closed loop", "reqrate", machine_us_per_closed_rt, False, False, None, "{:.1f}"),
    ("machine CPU s / GB relayed, 1 stream", "bulk1", machine_per_gb, False, False, None, "{:.3f}"),
    ("machine CPU s / GB relayed, 4 streams", "bulk4", machine_per_gb, False, False, None, "{:.3f}"),
    ("machine CPU ms / 1k connections", "connrate", machine_ms_per_1k_conns, False, False, None, "{:.0f}"),
]
# Rows of the kernel's memory per held connection: recorded with --with-sockmap only.
KERNEL_ROWS = [
    ("kernel socket slabs per held connection (bytes)", "hold", kernel_per_conn("sock_slab"), False, False, None, "{:.0f}"),
    ("kernel TCP buffer memory per held connection (bytes)", "hold", kernel_per_conn("tcp_mem"), False, False, None, "{:.0f}"),
]


# Variants that run in the bulk scenarios only.
BULK_ONLY = {"hf-auto-64k", "ha-splice-256k"}


def verdict(i, label, higher, target, f, values):
    """One verdict row: hf-auto against the HAProxy variant with the best median, round by round."""
    hf = dict(values.get((i, "hf-auto"), []))
    meds = {v: statistics.median([x for _, x in values[(i, v)]]) for v in HAPROXY if values.get((i, v))}
    if not hf or not meds:
        return [label, fmt(statistics.median(hf.values()) if hf else None, f), "ERR", "", "no data", ""]
    best_ha = (max if higher else min)(meds, key=meds.get)
    ha = dict(values[(i, best_ha)])
    ratios = [hf[r] / ha[r] for r in sorted(hf) if r in ha and ha[r]]
    if not ratios:
        return [label, fmt(statistics.median(hf.values()), f), best_ha, "", "no paired round", ""]
    good = [x if higher else 1 / x for x in ratios if x]
    if all(g > 1 for g in good):
        v = "**ahead**"
    elif all(g < 1 for g in good):
        v = "**behind**"
    else:
        v = "level (within the noise)"
    if len(ratios) == 1:
        v += ", 1 round"
    med = statistics.median(ratios)
    spread = "%.2f (%.2f–%.2f)" % (med, min(ratios), max(ratios)) if len(ratios) > 1 else "%.2f" % med
    if target:
        op, t = target
        met = med >= t if op == ">=" else med <= t
        tgt = "%s %.2f: %s" % (op.replace("<=", "≤").replace(">=", "≥"), t, "met" if met else "missed")
    else:
        tgt = ""
    name = dict(VARIANTS)[best_ha].replace("haproxy ", "")
    return [
        label,
        fmt(statistics.median(hf.values()), f),
        "%s (%s)" % (fmt(meds[best_ha], f), name),
        spread,
        v,
        tgt,
    ]


def row_index(label):
    for i, r in enumerate(ROWS):
        if r[0] == label:
            return i
    raise KeyError(label)


# The sockmap section: (metric label, row label, reference variant, how, target, higher is
# better). how: "added" compares what each adds over `direct` in the same round; "ratio"
# compares the values themselves. Targets are issue #16's.
SOCKMAP_CHECKS = [
    ("64 B p50 latency added over direct", "64 B p50 latency (µs)", "hf-copy", "added", ("<=", 0.4), False),
    ("64 B p99 latency added over direct", "64 B p99 latency (µs)", "hf-copy", "added", None, False),
    ("1 KiB p50 latency added over direct", "1 KiB p50 latency (µs)", "hf-copy", "added", ("<=", 0.4), False),
    ("1 KiB p99 latency added over direct", "1 KiB p99 latency (µs)", "hf-copy", "added", None, False),
    ("16 KiB p50 latency added over direct", "16 KiB p50 latency (µs)", "hf-copy", "added", ("<=", 0.4), False),
    ("16 KiB p99 latency added over direct", "16 KiB p99 latency (µs)", "hf-copy", "added", None, False),
    ("machine CPU per 64 B round trip (whole), generator not spinning", "machine CPU µs / round trip, 64 B @ fixed rate, generator not spinning", "hf-copy", "ratio", ("<=", 0.9), False),
    ("machine CPU per 64 B round trip, added over direct, generator not spinning", "machine CPU µs / round trip, 64 B @ fixed rate, generator not spinning", "hf-copy", "added", None, False),
    ("64 B p50 latency added over direct, generator not spinning", "64 B p50 latency (µs), generator not spinning", "hf-copy", "added", None, False),
    ("machine CPU per 64 B round trip, added over direct (spinning generator)", "machine CPU µs / round trip, 64 B @ fixed rate", "hf-copy", "added", None, False),
    ("machine CPU per 1 KiB round trip, added over direct (spinning generator)", "machine CPU µs / round trip, 1 KiB @ fixed rate", "hf-copy", "added", None, False),
    ("machine CPU per 16 KiB round trip, added over direct (spinning generator)", "machine CPU µs / round trip, 16 KiB @ fixed rate", "hf-copy", "added", None, False),
    ("machine CPU per round trip, closed loop (whole)", "machine CPU µs / round trip, closed loop", "hf-copy", "ratio", ("<=", 0.9), False),
    ("request rate, closed loop", "request rate over kept connections (req/s, 64 B, closed loop)", "hf-copy", "ratio", None, True),
    ("bulk, 1 stream", "bulk, 1 stream (Gbit/s each way)", "hf-splice", "ratio", (">=", 1.0), True),
    ("bulk, 4 streams", "bulk, 4 streams (Gbit/s each way)", "hf-splice", "ratio", (">=", 1.0), True),
    ("machine CPU per GB, 1 stream", "machine CPU s / GB relayed, 1 stream", "hf-splice", "ratio", None, False),
    ("machine CPU per GB, 4 streams", "machine CPU s / GB relayed, 4 streams", "hf-splice", "ratio", None, False),
    ("connection rate (insert + remove per connection)", "connection rate (conn/s)", "hf-copy", "ratio", None, True),
    ("machine CPU per connection", "machine CPU ms / 1k connections", "hf-copy", "ratio", None, False),
    ("proxy RSS per idle connection", "RSS per idle proxied connection (bytes, 8000 held)", "hf-copy", "ratio", None, False),
    ("kernel socket slabs per idle connection, added over direct", "kernel socket slabs per held connection (bytes)", "hf-copy", "added", None, False),
    ("kernel TCP buffer memory per idle connection, added over direct", "kernel TCP buffer memory per held connection (bytes)", "hf-copy", "added", None, False),
]


def sockmap_section(w, values, ran, d):
    """sockmap against holdfast copy / splice on issue #16's targets, round by round."""
    w("")
    w("### sockmap (the in-kernel relay, examples/sockmap_proxy.rs) against holdfast copy / splice\n")
    w("Not a holdfast feature: a benchmark instrument (issue #16). Its own CPU is near zero by")
    w("construction (the kernel relays in softirq and kworker context), so its CPU rows are the")
    w("whole machine's (/proc/stat). \"added\": each variant's value minus `direct`'s in the same")
    w("round, then sockmap's over the reference's; \"ratio\": sockmap's value over the reference's.\n")
    w("| metric | sockmap | holdfast copy | holdfast splice | direct | compared with | sockmap / reference: median of rounds (range) | issue #16 target | verdict |")
    w("|---|---|---|---|---|---|---|---|---|")
    for label, row, ref, how, target, higher in SOCKMAP_CHECKS:
        try:
            i = row_index(row)
        except KeyError:
            continue
        sc = ROWS[i][1]
        if ran and sc not in ran:
            continue
        f = ROWS[i][6]
        per = {v: dict(values.get((i, v), [])) for v in ("sockmap", "hf-copy", "hf-splice", "direct")}
        med = lambda v: fmt(statistics.median(per[v].values()), f) if per[v] else "–"
        ratios = []
        for r in sorted(per["sockmap"]):
            if r not in per[ref]:
                continue
            a, b = per["sockmap"][r], per[ref][r]
            if how == "added":
                if r not in per["direct"]:
                    continue
                a, b = a - per["direct"][r], b - per["direct"][r]
            if b > 0:
                ratios.append(a / b)
        if not ratios:
            why = "n/a: %s adds nothing over direct here" % ref[3:] if how == "added" and per["sockmap"] else "no paired round"
            cells = [label, med("sockmap"), med("hf-copy"), med("hf-splice"), med("direct"), "%s (%s)" % (ref[3:], how), why, "", ""]
            w("| " + " | ".join(cells) + " |")
            continue
        m = statistics.median(ratios)
        spread = "%.2f (%.2f–%.2f)" % (m, min(ratios), max(ratios)) if len(ratios) > 1 else "%.2f" % m
        good = [x > 1 if higher else x < 1 for x in ratios]
        if all(good):
            v = "better in every round"
        elif not any(good):
            v = "worse in every round"
        else:
            v = "level (rounds disagree)"
        if len(ratios) == 1:
            v += ", 1 round"
        tgt = ""
        if target:
            op, t = target
            met = m >= t if op == ">=" else m <= t
            tgt = "%s %.2f: **%s**" % (op.replace("<=", "≤").replace(">=", "≥"), t, "met" if met else "missed")
        cells = [label, med("sockmap"), med("hf-copy"), med("hf-splice"), med("direct"),
                 "%s (%s)" % (ref[3:], how), spread, tgt, v]
        w("| " + " | ".join(cells) + " |")
    w("")
    w("The lat rows' machine CPU includes the latency generator's spinning between sends (about")
    w("one core, the same for every variant): the cpu64 rows (the same 64 B load with `--no-spin`)")
    w("are the ones to judge machine CPU by; their latency is up to ~1 ms late by design and is")
    w("shown only for the added-over-direct comparison. The closed-loop row saturates the")
    w("machine, so its CPU per round trip is the inverse of the rate. A round where the reference")
    w("adds nothing over direct (noise) is left out of an \"added\" ratio.")
    # The proxy's own account: sessions it had to relay in user space are not in-kernel.
    work = os.path.join(d, "work")
    lines = []
    if os.path.isdir(work):
        for name in sorted(os.listdir(work)):
            if name.startswith("sockmap") and name.endswith(".log"):
                with open(os.path.join(work, name)) as fh:
                    for line in fh:
                        if "counters" in line:
                            lines.append("%s: %s" % (name[:-4], line.strip().split("counters ", 1)[-1]))
    if lines:
        w("")
        w("sockmap_proxy's counters at exit (`insert_failed`/`ended_in_switch` sessions and `late_bytes` were relayed in user space):")
        w("")
        w("```")
        for x in lines:
            w(x)
        w("```")


def load_runs(d):
    runs = []
    rdir = os.path.join(d, "runs")
    for name in sorted(os.listdir(rdir)):
        if not name.endswith(".meta.json"):
            continue
        base = name[: -len(".meta.json")]
        with open(os.path.join(rdir, name)) as f:
            meta = json.load(f)
        client = None
        cpath = os.path.join(rdir, base + ".client.json")
        if os.path.exists(cpath):
            try:
                with open(cpath) as f:
                    client = json.loads(f.read())
            except ValueError:
                client = None
        meta["_client"] = client
        meta["_base"] = base
        runs.append(meta)
    return runs


def read_meta(d):
    def text(name):
        path = os.path.join(d, name)
        if not os.path.exists(path):
            return ""
        with open(path) as f:
            return f.read()

    meta = {}
    for line in text("params.txt").splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            meta[k] = v
    meta["machine"] = text("machine.txt").splitlines()
    meta["commands"] = text("commands.txt").splitlines()
    meta["haproxy_config"] = text("haproxy-default.cfg")
    meta["quick"] = meta.get("quick") == "1"
    return meta


def fmt(v, f):
    if v is None:
        return "ERR"
    if isinstance(v, float) and math.isnan(v):
        return "ERR"
    if abs(v) >= 100000:
        return "{:,.0f}".format(v)
    return f.format(v)


def main():
    d = sys.argv[1]
    meta = read_meta(d)
    runs = load_runs(d)
    with_sockmap = meta.get("with_sockmap") == "1"
    if with_sockmap:
        VARIANTS.append(("sockmap", "sockmap (in-kernel relay)"))
        ROWS.extend(KERNEL_ROWS)

    failures = []  # (scenario, variant, round, reason)
    values = {}  # (row index, variant) -> [values by round]
    problems = {}  # variant -> client-reported errors summed over runs
    for run in runs:
        sc, var, rnd = run["scenario"], run["variant"], run["round"]
        c = run["_client"]
        if run.get("error"):
            failures.append((sc, var, rnd, run["error"]))
            continue
        if c is None:
            failures.append((sc, var, rnd, "client printed no JSON (exit %s)" % run.get("exit")))
            continue
        problems[var] = problems.get(var, 0) + client_problems(sc, c)
        for i, row in enumerate(ROWS):
            if row[1] != sc or (row[4] and var == "direct"):
                continue
            try:
                v = row[2](run, c)
            except (ValueError, KeyError, ZeroDivisionError, TypeError) as e:
                failures.append((sc, var, rnd, "%s: %s" % (row[0], e)))
                continue
            values.setdefault((i, var), []).append((rnd, v))

    out = []
    w = out.append
    w("## holdfast vs HAProxy, `mode tcp`\n")
    w("```")
    for line in meta["machine"]:
        w(line)
    w("load average at start: %s" % meta["loadavg_start"])
    w("load average at end:   %s" % meta.get("loadavg_end", "?"))
    one_min = [float(r["loadavg"].split()[0]) for r in runs if r.get("loadavg")]
    if one_min:
        w("1-minute load average after each run (the benchmark itself keeps 2-3 processes busy): min %.2f, median %.2f, max %.2f" % (
            min(one_min), statistics.median(one_min), max(one_min)))
    w("latency generator: %s" % meta.get("latency_generator", "?"))
    w("rounds: %s%s; every cell is the median over rounds" % (meta.get("rounds", "?"), " (--quick)" if meta["quick"] else ""))
    w("scenarios: %s" % meta.get("scenarios", "?"))
    if meta.get("pinning"):
        w("pinning: %s" % meta["pinning"])
    w("```\n")

    ran = set(meta.get("scenarios", "").split())
    w("### Verdict: holdfast (default settings) against the best HAProxy variant of each row\n")
    w("| metric | holdfast auto | best HAProxy | holdfast / HAProxy: median of rounds (range) | verdict | #15 target |")
    w("|---|---|---|---|---|---|")
    for i, (label, sc, _, higher, proxies_only, target, f) in enumerate(ROWS):
        if ran and sc not in ran:
            continue
        w("| " + " | ".join(verdict(i, label, higher, target, f, values)) + " |")
    w("")
    w("ahead / behind: holdfast was better / worse in every round, compared with that round's run of")
    w("the HAProxy variant that has the best median; level: the rounds disagree, so the difference")
    w("is within the run-to-run noise. Ratios are holdfast / HAProxy (above 1 is better for rates,")
    w("below 1 for latency, CPU and memory). With one round there is no spread to judge noise by.")
    w("")
    w("### Detail: medians over rounds\n")

    head = ["metric"] + [label for _, label in VARIANTS] + [
        "auto / best HAProxy",
        "best holdfast / best HAProxy",
        "#15 target",
    ]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for i, (label, sc, _, higher, proxies_only, target, f) in enumerate(ROWS):
        if ran and sc not in ran:
            continue
        med = {}
        cells = [label]
        for var, _ in VARIANTS:
            vals = [v for _, v in values.get((i, var), [])]
            if proxies_only and var == "direct":
                cells.append("–")
                continue
            if sc == "hold" and var == "direct" and not vals:
                cells.append("–")
                continue
            if var in BULK_ONLY and not sc.startswith("bulk"):
                cells.append("–")
                continue
            if vals:
                med[var] = statistics.median(vals)
                cells.append(fmt(med[var], f))
            else:
                cells.append("ERR")
        best = max if higher else min
        ha = [med[v] for v in HAPROXY if v in med]
        hf = [(med[v], v) for v in HOLDFAST if v in med]
        ha_best = best(ha) if ha else None

        def ratio(x):
            if x is None or ha_best is None or ha_best == 0:
                return None
            return x / ha_best

        def mark(r):
            if r is None:
                return "ERR"
            s = "%.2f" % r
            if target:
                op, t = target
                ok = r >= t if op == ">=" else r <= t
                s += " ✓" if ok else " ✗"
            return s

        cells.append(mark(ratio(med.get("hf-auto"))))
        if hf:
            bv, bname = (max if higher else min)(hf)
            cells.append("%s (%s)" % (mark(ratio(bv)), bname[3:]))
        else:
            cells.append("ERR")
        cells.append("%s %.2f" % (target[0].replace("<=", "≤").replace(">=", "≥"), target[1]) if target else "")
        w("| " + " | ".join(cells) + " |")
    w("| client-reported errors, all runs | " + " | ".join(str(problems.get(v, 0)) for v, _ in VARIANTS) + " | | | |")
    w("")
    w("Ratios are holdfast / HAProxy; the HAProxy reference is whichever of its variants did best")
    w("on that row. ✓/✗: the median ratio against issue #15's target (higher is better for rates,")
    w("lower is better for latency, CPU and memory); the verdict above says whether the difference")
    w("is larger than the noise. `holdfast auto, --pipe-memory 0` and `haproxy splice, pipesize")
    w("256k` run in the bulk rows only.")
    if with_sockmap:
        sockmap_section(w, values, ran, d)
    # Tail latency is what a shared machine disturbs most: one descheduling of the generator,
    # the echo server or the proxy at the wrong moment moves a p99 by milliseconds. The
    # least-disturbed round (the minimum over rounds, for every variant alike) is shown as a
    # supplement; the medians above remain the published numbers.
    tail_rows = [i for i, r in enumerate(ROWS) if r[1] in ran and ("p99" in r[0])]
    if int(meta.get("rounds", "1") or 1) > 1 and tail_rows:
        w("")
        w("Supplement: tail latency in the least-disturbed round (minimum over rounds, every variant alike):")
        w("")
        shown = [(v, label) for v, label in VARIANTS if v not in BULK_ONLY]
        w("| metric | " + " | ".join(label for _, label in shown) + " | auto / best HAProxy |")
        w("|" + "---|" * (len(shown) + 2))
        for i in tail_rows:
            mins = {v: min(x for _, x in values[(i, v)]) for v, _ in VARIANTS if values.get((i, v))}
            ha = [mins[v] for v in HAPROXY if v in mins]
            r = "%.2f" % (mins["hf-auto"] / min(ha)) if ha and "hf-auto" in mins else "ERR"
            w("| %s | %s | %s |" % (ROWS[i][0], " | ".join(fmt(mins.get(v), ROWS[i][6]) for v, _ in shown), r))
    if failures:
        w("\n**Failed runs** (excluded from the medians):\n")
        for sc, var, rnd, why in failures:
            w("- round %s, %s, %s: %s" % (rnd, sc, var, why))
    table = "\n".join(out) + "\n"

    # Per-round values, to judge the noise behind each median.
    detail = ["## Per-round values\n", "| metric | variant | values by round |", "|---|---|---|"]
    for i, row in enumerate(ROWS):
        for var, vlabel in VARIANTS:
            vals = values.get((i, var))
            if not vals:
                continue
            detail.append(
                "| %s | %s | %s |"
                % (row[0], vlabel, ", ".join("r%s: %s" % (r, fmt(v, row[6])) for r, v in sorted(vals)))
            )
    with open(os.path.join(d, "rounds.md"), "w") as f:
        f.write("\n".join(detail) + "\n")

    # The HAProxy configuration and the commands are part of the published result.
    full = (
        table
        + "\n### HAProxy configuration (variant `default`; the others add the lines shown)\n\n```\n"
        + meta["haproxy_config"]
        + "```\n\n- `splice`: `option splice-request` + `option splice-response` in `defaults`\n"
        + "- `splice-auto`: `option splice-auto` in `defaults`\n"
        + "- `splice-256k`: as `splice`, plus `tune.pipesize 262144` in `global`\n\n"
        + "### Commands\n\n```\n" + "\n".join(meta["commands"]) + "\n```\n"
    )
    with open(os.path.join(d, "results.md"), "w") as f:
        f.write(full)
    sys.stdout.write(full)


if __name__ == "__main__":
    main()
