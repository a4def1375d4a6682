#!/usr/bin/env python3
"""Table for scripts/splice-threshold.sh: proxy CPU per round trip and per GB, by message
size and relay mode (medians over rounds), and the size from which splice is cheaper.

Usage: threshold_report.py RESULTS_DIR
"""

import json
import os
import statistics
import sys

MODES = ["copy", "splice", "auto"]  # and "sockmap" when the run had --with-sockmap


def size_label(c):
    if c == "bulk":
        return "bulk (1 stream)"
    n = int(c)
    return "%d KiB" % (n // 1024) if n >= 1024 else "%d B" % n


def main():
    d = sys.argv[1]
    params = {}
    with open(os.path.join(d, "params.txt")) as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                params[k] = v
    with open(os.path.join(d, "machine.txt")) as f:
        machine = f.read().splitlines()
    modes = params.get("modes", " ".join(MODES)).split()

    per_rt, per_gb, p99, gbit = {}, {}, {}, {}
    m_rt, m_gb = {}, {}  # whole-machine CPU (/proc/stat), when recorded
    by_round = {}  # (case, mode) -> {round: CPU s/GB}
    failures = []
    rdir = os.path.join(d, "runs")
    for name in sorted(os.listdir(rdir)):
        if not name.endswith(".meta.json"):
            continue
        with open(os.path.join(rdir, name)) as f:
            m = json.load(f)
        key = (m["case"], m["mode"])
        if m.get("error"):
            failures.append("round %s, %s, %s: %s" % (m["round"], m["case"], m["mode"], m["error"]))
            continue
        try:
            with open(os.path.join(rdir, name[: -len(".meta.json")] + ".client.json")) as f:
                c = json.load(f)
        except (OSError, ValueError):
            failures.append("round %s, %s, %s: no client JSON" % (m["round"], m["case"], m["mode"]))
            continue
        cpu = m["cpu_after_s"] - m["cpu_before_s"]
        mcpu = None
        if m.get("machine_busy_after_s") is not None and m.get("machine_busy_before_s") is not None:
            mcpu = m["machine_busy_after_s"] - m["machine_busy_before_s"]
        if m["case"] == "bulk":
            if c.get("verified") is not True or not c.get("tx_bytes"):
                failures.append("round %s, bulk, %s: echo not verified" % (m["round"], m["mode"]))
                continue
            per_gb.setdefault(key, []).append(cpu / (2 * c["tx_bytes"] / 1e9))
            by_round.setdefault(key, {})[m["round"]] = per_gb[key][-1]
            gbit.setdefault(key, []).append(c["tx_gbit_per_s"])
            if mcpu is not None:
                m_gb.setdefault(key, []).append(mcpu / (2 * c["tx_bytes"] / 1e9))
        else:
            if not c.get("completed"):
                failures.append("round %s, %s, %s: nothing completed" % (m["round"], m["case"], m["mode"]))
                continue
            # CPU covers the warm-up too, which ran at the same fixed rate.
            rts = c["completed"] * (c["duration_s"] + c.get("warmup_s", 0)) / c["duration_s"]
            per_rt.setdefault(key, []).append(cpu / rts * 1e6)
            per_gb.setdefault(key, []).append(cpu / (2 * int(m["case"]) * rts / 1e9))
            by_round.setdefault(key, {})[m["round"]] = per_gb[key][-1]
            p99.setdefault(key, []).append(c["latency_us"]["p99"])
            if mcpu is not None:
                m_rt.setdefault(key, []).append(mcpu / rts * 1e6)
                m_gb.setdefault(key, []).append(mcpu / (2 * int(m["case"]) * rts / 1e9))

    cases = sorted({k[0] for k in per_gb} | {k[0] for k in per_rt}, key=lambda c: (c == "bulk", int(c) if c != "bulk" else 0))
    med = lambda dct, k: statistics.median(dct[k]) if k in dct else None
    f = lambda v, p: ("%." + str(p) + "f") % v if v is not None else "ERR"

    out = []
    w = out.append
    w("## holdfast relay cost by message size: copy vs splice\n")
    w("```")
    out.extend(machine)
    w("load average at start: %s" % params.get("loadavg_start", "?"))
    w("load average at end:   %s" % params.get("loadavg_end", "?"))
    w("rounds: %s%s; medians" % (params.get("rounds", "?"), " (--quick)" if params.get("quick") == "1" else ""))
    w(params.get("command_proxy", ""))
    w(params.get("command_size", ""))
    w(params.get("command_bulk", ""))
    if params.get("command_sockmap"):
        w(params["command_sockmap"])
    w("```\n")
    rest = " | ".join(modes[1:])
    w("| message | proxy CPU µs / round trip: %s | %s | proxy CPU s / GB: %s | %s | splice / copy | rounds where splice < copy | p99 µs: %s | %s |" % (modes[0], rest, modes[0], rest, modes[0], rest))
    w("|---|" + "---|" * (3 * len(modes) + 2))
    ratios = []
    for c in cases:
        gb = {m: med(per_gb, (c, m)) for m in modes}
        rt = {m: med(per_rt, (c, m)) for m in modes}
        ratio = gb["splice"] / gb["copy"] if gb["splice"] and gb["copy"] else None
        cp, sp = by_round.get((c, "copy"), {}), by_round.get((c, "splice"), {})
        paired = [r for r in cp if r in sp]
        wins = sum(1 for r in paired if sp[r] < cp[r])
        ratios.append((c, ratio, wins, len(paired)))
        if c == "bulk":
            rt_cells = ["– (%s Gbit/s)" % f(med(gbit, (c, m)), 2) for m in modes]
            p_cells = ["–"] * len(modes)
        else:
            rt_cells = [f(rt[m], 1) for m in modes]
            p_cells = [f(med(p99, (c, m)), 0) for m in modes]
        w("| %s | %s | %s | %s | %d/%d | %s |" % (
            size_label(c),
            " | ".join(rt_cells),
            " | ".join(f(gb[m], 3) for m in modes),
            f(ratio, 2) if ratio else "ERR",
            wins,
            len(paired),
            " | ".join(p_cells),
        ))
    # The threshold: the smallest size from which splice stays cheaper for every larger size,
    # by the median, and (stricter, since one round can be disturbed) in every round.
    sized = [x for x in ratios if x[0] != "bulk" and x[1] is not None]

    def first(ok):
        for i, x in enumerate(sized):
            if all(ok(y) for y in sized[i:]):
                return x[0]
        return None

    by_median = first(lambda y: y[1] < 1.0)
    every_round = first(lambda y: y[3] > 0 and y[2] == y[3])
    w("")
    for label, c in (("by the median", by_median), ("in every round", every_round)):
        if c is None:
            w("- %s: splice is not cheaper than copying at any measured message size" % label)
        else:
            w("- %s: **splice is cheaper than copying from %s messages up** (at that size and every larger one)" % (label, size_label(c)))
    if m_rt or m_gb:
        w("")
        w("Whole-machine CPU (/proc/stat, every process and the kernel's threads, and anything else the")
        w("machine ran). For `sockmap` these are the columns to read: its own process does next to")
        w("nothing, the kernel relays. Without `--no-spin` in the command above, the latency generator's")
        w("spinning between sends (about one core, in every mode alike) is in them too.")
        w("")
        w("| message | machine CPU µs / round trip: %s | %s | machine CPU s / GB: %s | %s |" % (modes[0], rest, modes[0], rest))
        w("|---|" + "---|" * (2 * len(modes)))
        for c in cases:
            rt_cells = ["–" if c == "bulk" else f(med(m_rt, (c, m)), 1) for m in modes]
            w("| %s | %s | %s |" % (size_label(c), " | ".join(rt_cells), " | ".join(f(med(m_gb, (c, m)), 3) for m in modes)))
    w("\nFor reference, holdfast's `auto` switches a direction to splice after a read of >= 16 KiB (AUTO_SPLICE_THRESHOLD) and back after 4 splices in a row of < 4 KiB (AUTO_SMALL_SPLICES).")
    if failures:
        w("\n**Failed runs** (excluded):\n")
        for x in failures:
            w("- " + x)

    detail = ["## Per-round values (CPU s / GB)\n", "| message | mode | rounds |", "|---|---|---|"]
    for c in cases:
        for m in modes:
            if (c, m) in per_gb:
                detail.append("| %s | %s | %s |" % (size_label(c), m, ", ".join("%.3f" % v for v in per_gb[(c, m)])))
    text = "\n".join(out) + "\n"
    with open(os.path.join(d, "results.md"), "w") as fh:
        fh.write(text + "\n" + "\n".join(detail) + "\n")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
