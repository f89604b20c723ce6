#!/usr/bin/env python3
"""Turns bench.sh's raw results into the table of BENCHMARKS.md and checks the plugin's goals.

Usage: report.py RESULTS.tsv [PLUGIN.tsv]
RESULTS.tsv lines: rep, row, metric, value (tab separated). PLUGIN.tsv lines: metric, value.
Prints markdown. Exit status 1 when a correctness check fails (the app did not see the expected
client address, a connection bypassed the proxy, held connections failed, the plugin leaked);
missed performance goals are reported, not failed (timings are not tests).
"""
import os
import statistics
import sys
from collections import defaultdict

ROWS = ["direct", "sidecar-tproxy", "sidecar-old", "sidecar-redirect", "sidecar-w2", "sidecar-1cpu",
        "sidecar-fastpath", "haproxy", "haproxy-istio", "nginx"]
PEERS = ["haproxy", "haproxy-istio", "nginx"]


def load(path):
    data = defaultdict(lambda: defaultdict(list))
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            _, row, metric, value = parts
            data[row][metric].append(value)
    return data


def num(values):
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            pass
    return out


def med(data, row, metric):
    v = num(data.get(row, {}).get(metric, []))
    return statistics.median(v) if v else None


def total(data, row, metric):
    v = num(data.get(row, {}).get(metric, []))
    return sum(v) if v else None


def fmt(v, digits=1):
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def ratio(v, base):
    if v is None or not base:
        return ""
    return f" ({v / base:.2f}×)"


def hold_key(n, kind):
    """bench.sh's metric for N held connections: the 1,000 row keeps its historical names."""
    sfx = "1k" if n == 1000 else str(n)
    return {"rss": f"rss_{sfx}_kib", "fds": f"fds_{sfx}",
            "failed": "hold_failed" if n == 1000 else f"hold_{sfx}_failed"}[kind]


def hold_sizes(data, rows):
    sizes = set()
    for r in rows:
        for m in data[r]:
            if m == "rss_1k_kib":
                sizes.add(1000)
            elif m.startswith("rss_") and m.endswith("_kib") and m[4:-4].isdigit():
                sizes.add(int(m[4:-4]))
    return sorted(sizes)


def per_connection(data, row, sizes):
    """KiB per idle connection between the smallest and the largest N every repetition held."""
    held = [n for n in sizes if med(data, row, hold_key(n, "rss")) is not None
            and not total(data, row, hold_key(n, "failed"))]
    if len(held) < 2:
        return None, held
    a, b = held[0], held[-1]
    return (med(data, row, hold_key(b, "rss")) - med(data, row, hold_key(a, "rss"))) / (b - a), held


def idle_section(data, rows):
    """RSS and descriptors with N idle connections, per row; the cost of one idle connection."""
    sizes = hold_sizes(data, rows)
    if not sizes:
        return
    print("\n### Idle connections (each after one request), medians\n")
    print("| row | RSS at start / idle MiB | " + " | ".join(f"RSS {n:,} MiB" for n in sizes)
          + " | KiB per idle connection | descriptors idle / " + " / ".join(f"{n:,}" for n in sizes)
          + " | not held (of " + " / ".join(f"{n:,}" for n in sizes) + ") |")
    print("|---" * (4 + len(sizes)) + "|---|")
    for r in rows:
        if r == "direct" or med(data, r, "rss_idle_kib") is None:
            continue
        kib, held = per_connection(data, r, sizes)
        rss = [med(data, r, hold_key(n, "rss")) for n in sizes]
        start = med(data, r, "rss_start_kib")
        cells = [r, ("-" if start is None else f"{start / 1024:.1f}")
                 + f" / {med(data, r, 'rss_idle_kib') / 1024:.1f}"]
        cells += ["-" if v is None else f"{v / 1024:.1f}" for v in rss]
        cells.append("-" if kib is None else f"{kib:.2f} ({held[0]:,} → {held[-1]:,})")
        cells.append(" / ".join(fmt(med(data, r, m), 0) for m in
                                ["fds_idle"] + [hold_key(n, "fds") for n in sizes]))
        cells.append(" / ".join(fmt(total(data, r, hold_key(n, "failed")) or 0, 0) for n in sizes))
        print("| " + " | ".join(cells) + " |")
    if "sidecar-old" in data and "sidecar-tproxy" in data:
        parts = []
        for m, name in (("ka_rps", "keep-alive"), ("close_rps", "new connections"),
                        ("bulk_mib_s", "bulk")):
            new, old = num(data["sidecar-tproxy"][m]), num(data["sidecar-old"][m])
            rs = [a / b for a, b in zip(new, old) if b]
            if rs:
                parts.append(f"{name} " + ", ".join(f"{x:.2f}" for x in rs)
                             + f" (median {statistics.median(rs):.2f})")
        print("\nsidecar-tproxy / sidecar-old in the same repetition: " + "; ".join(parts))


def main():
    data = load(sys.argv[1])
    plugin = {}
    if len(sys.argv) > 2 and os.path.exists(sys.argv[2]):
        with open(sys.argv[2]) as f:
            for line in f:
                k, _, v = line.strip().partition("\t")
                if k:
                    plugin[k] = v
    rows = [r for r in ROWS if r in data]
    reps = max((len(data[r]["ka_rps"]) for r in rows), default=0)
    failures = []

    print(f"Medians over {reps} interleaved repetitions; (×) = ratio to `direct` in the same run.\n")
    print("| row | keep-alive req/s | p50 / p99 ms (c=50) | 1 conn p50 / p99 ms "
          "| new conn/s | p99 / max ms (new conn) | bulk MiB/s | CPU s/GiB "
          "| RSS idle / 1k conns MiB | bypassed | app saw | clash probes failed "
          "| CPU µs/req keep-alive / new conn (proxy + app) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {m: med(data, "direct", m) for m in ("ka_rps", "close_rps", "bulk_mib_s")}
    for r in rows:
        ka, cl, bulk = med(data, r, "ka_rps"), med(data, r, "close_rps"), med(data, r, "bulk_mib_s")
        rss0, rss1 = med(data, r, "rss_idle_kib"), med(data, r, "rss_1k_kib")
        seen = sorted(set(data[r]["ip_seen"]))
        expected = data[r]["ip_expected"][0] if data[r]["ip_expected"] else "?"
        bypass = total(data, r, "bypassed")
        cells = [
            r,
            fmt(ka, 0) + ratio(ka, base["ka_rps"]),
            f"{fmt(med(data, r, 'ka_p50_ms'), 2)} / {fmt(med(data, r, 'ka_p99_ms'), 2)}",
            f"{fmt(med(data, r, 'single_p50_ms'), 3)} / {fmt(med(data, r, 'single_p99_ms'), 3)}",
            fmt(cl, 0) + ratio(cl, base["close_rps"]),
            f"{fmt(med(data, r, 'close_p99_ms'), 2)} / {fmt(med(data, r, 'close_max_ms'), 0)}",
            fmt(bulk, 0) + ratio(bulk, base["bulk_mib_s"]),
            fmt(med(data, r, "cpu_s_per_gib"), 2),
            "-" if rss0 is None else f"{rss0 / 1024:.1f} / {rss1 / 1024:.1f}",
            "-" if r == "direct" else fmt(bypass, 0),
            ", ".join(seen),
            "-" if r == "direct" else f"{fmt(med(data, r, 'probe_pod_failed'), 0)}, "
            f"{fmt(med(data, r, 'probe_low_failed'), 0)} of {fmt(med(data, r, 'probe_n'), 0)}",
            f"{fmt(med(data, r, 'ka_cpu_us'), 1)} / {fmt(med(data, r, 'close_cpu_us'), 1)}",
        ]
        print("| " + " | ".join(cells) + " |")
        if seen != [expected]:
            failures.append(f"{r}: the app saw {seen}, expected {expected}")
        if r != "direct" and (bypass is None or bypass > 0):
            failures.append(f"{r}: {fmt(bypass, 0)} connections bypassed the proxy")
        held = total(data, r, "hold_failed")
        if held:
            failures.append(f"{r}: {held:.0f} of the held connections failed")
    errors = {r: total(data, r, "ka_errors") or 0 for r in rows}
    errors_close = {r: total(data, r, "close_errors") or 0 for r in rows}
    print("\nwrk socket errors + non-2xx, summed over repetitions (keep-alive / new conn): "
          + ", ".join(f"{r} {errors[r]:.0f} / {errors_close[r]:.0f}" for r in rows))
    syn = {r: total(data, r, "client_syn") for r in rows}
    leg = {r: total(data, r, "app_leg_syn") for r in rows}
    clash = {r: total(data, r, "clash_syn") for r in rows}
    print("client SYNs / proxy->app SYNs over lo / client SYNs that hit a tuple held by the "
          "proxy's upstream leg: "
          + ", ".join(f"{r} {fmt(syn[r], 0)} / {fmt(leg[r], 0)} / {fmt(clash[r], 0)}" for r in rows))

    idle_section(data, rows)

    churn = sorted({r for r in data if r.startswith("churn|")},
                   key=lambda c: (c.split("|")[2] != "ts1", c.split("|")[3], c.split("|")[1]))
    if churn:
        print("\n### Churn: one client IP -> one app port, one request per connection\n")
        print("| row | TCP timestamps (pod) | closes first | asked /s | done /s | failed "
              "| seconds with failures | slowest connect ms | connects > 100 ms "
              "| bypassed / clashes | TIME_WAIT max (pod) | conntrack max (pod) "
              "| accept queue max | listen drops |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in churn:
            _, r, ts, close = c.split("|")
            d = data[c]
            g = lambda m: (d.get(m) or ["-"])[0]
            print(f"| {r} | {'on' if ts == 'ts1' else 'off'} | {close} | {g('rate_asked')} "
                  f"| {g('rate')} | {g('failed')} | {g('fail_seconds')} | {g('max_connect_ms')} "
                  f"| {g('over_100ms')} | {'-' if r == 'direct' else g('bypassed')} / "
                  f"{g('clash_syn')} | {g('tw_max')} | {g('conntrack_max')} "
                  f"| {g('acceptq_max') if r != 'direct' else '-'} | {g('nstat_TcpExtListenDrops')} |")
            if r != "direct" and g("bypassed") not in ("0", "-"):
                failures.append(f"churn {r} {ts} {close}: {g('bypassed')} connections bypassed the proxy")

    if plugin:
        print("\n### Plugin (tproxy-cni alone, env + stdin, fresh netns per pod)\n")
        print("| path | p50 ms | p99 ms |")
        print("|---|---|---|")
        for key, name in (("add", "tproxy-cni ADD (tproxy mode)"),
                          ("del", "tproxy-cni DEL"),
                          ("nft", "`nft -f` of the same table (render)"),
                          ("nft_full", "`nft -f` + `ip rule` + `ip route` (whole plan)"),
                          ("nft_del", "`nft delete table` (same table)"),
                          ("spawn", "spawn `/bin/true` (the process floor under all)")):
            if f"{key}_p50_ms" in plugin:
                print(f"| {name} | {float(plugin[key + '_p50_ms']):.2f} "
                      f"| {float(plugin[key + '_p99_ms']):.2f} |")
        print(f"\npods: {plugin.get('pods', '?')}; parallel cycles: {plugin.get('cycles', '?')} "
              f"ADD/DEL with {plugin.get('parallel', '?')} in parallel; "
              f"leaked objects: {plugin.get('leaks', '?')}")
        if plugin.get("leaks") != "0":
            failures.append(f"plugin: {plugin.get('leaks')} leaked objects ({plugin.get('leak_detail', '')})")

    print("\n### Goals (issues 5, 12 and 23)\n")
    goals = []

    def goal(text, ok, measured):
        mark = "n/a" if ok is None else ("met" if ok else "MISSED")
        goals.append(f"- {mark}: {text}: {measured}")

    def best_peer(metric, better=max):
        vals = [(med(data, p, metric), p) for p in PEERS if med(data, p, metric) is not None]
        return better(vals) if vals else (None, None)

    s = "sidecar-tproxy"
    if s in data:
        ka, d = med(data, s, "ka_rps"), base["ka_rps"]
        pv, pn = best_peer("ka_rps")
        goal("keep-alive req/s ≥ 1.3× the better peer", None if not pv else ka / pv >= 1.3,
             f"{ka / pv:.2f}× {pn}" if pv else "no peer")
        goal("keep-alive req/s ≥ 0.45× direct", None if not d else ka / d >= 0.45,
             f"{ka / d:.2f}×" if d else "no direct")
        cl = med(data, s, "close_rps")
        pv, pn = best_peer("close_rps")
        goal("new connections/s ≥ 1.2× the better peer", None if not pv else cl / pv >= 1.2,
             f"{cl / pv:.2f}× {pn}" if pv else "no peer")
        p99 = med(data, s, "ka_p99_ms")
        pv, pn = best_peer("ka_p99_ms", min)
        goal("p99 (c=50) no worse than the better peer", None if not pv else p99 <= pv,
             f"{p99:.2f} ms vs {pv:.2f} ms {pn}" if pv else "no peer")
        bulk, db = med(data, s, "bulk_mib_s"), base["bulk_mib_s"]
        goal("bulk ≥ 0.6× direct", None if not db else bulk / db >= 0.6,
             f"{bulk / db:.2f}×" if db else "no direct")
        cpu = med(data, s, "cpu_s_per_gib")
        pv, pn = best_peer("cpu_s_per_gib", min)
        goal("less CPU per GiB than either peer", None if pv is None else cpu < pv,
             f"{cpu:.2f} s/GiB vs {pv:.2f} {pn}" if pv is not None else "no peer")
        for other, what in (("sidecar-w2", "with --workers auto (2 here)"),
                            ("sidecar-1cpu", "confined to 1 CPU (taskset)")):
            if other in data:
                for m, name in (("ka_rps", "keep-alive"), ("close_rps", "new connections/s")):
                    v = med(data, other, m)
                    pv, pn = best_peer(m)
                    goal(f"{name} {what} vs the better peer", None,
                         f"{v / pv:.2f}× {pn}, {v / med(data, s, m):.2f}× one worker"
                         if pv and v else "-")
        if "haproxy" in data and "haproxy-istio" in data:
            for m, name in (("ka_rps", "keep-alive"), ("close_rps", "new connections/s")):
                a, b = med(data, "haproxy", m), med(data, "haproxy-istio", m)
                goal(f"HAProxy {name} on our rules vs on Istio's recipe", None,
                     f"{a / b:.2f}×" if a and b else "-")
        r0, r1 = med(data, s, "rss_idle_kib"), med(data, s, "rss_1k_kib")
        goal("RSS ≤ 8 MiB idle", r0 / 1024 <= 8, f"{r0 / 1024:.1f} MiB")
        # As started, no connection yet; `auto` workers reported beside it.
        rs = med(data, s, "rss_start_kib")
        if rs is not None:
            w2 = med(data, "sidecar-w2", "rss_start_kib") if "sidecar-w2" in data else None
            goal("RSS ≤ 3 MiB at start, one worker", rs <= 3 * 1024,
                 f"{rs / 1024:.2f} MiB" + (f" ({w2 / 1024:.2f} MiB with --workers auto)" if w2 else ""))
        goal("RSS ≤ 32 MiB with 1,000 connections", r1 / 1024 <= 32, f"{r1 / 1024:.1f} MiB")
        goal("RSS ≤ 3 MiB idle, after one request", r0 / 1024 <= 3, f"{r0 / 1024:.2f} MiB")
        sizes = hold_sizes(data, rows)
        kib, held = per_connection(data, s, sizes)
        goal("≤ 2 KiB per idle connection", None if kib is None else kib <= 2,
             "-" if kib is None else f"{kib:.2f} KiB ({held[0]:,} → {held[-1]:,})")
        if held and held[-1] >= 10000:
            top = med(data, s, hold_key(held[-1], "rss")) / 1024
            goal("RSS ≤ 24 MiB with 10,000 idle connections", top <= 24,
                 f"{top:.1f} MiB at {held[-1]:,}")
        elif held and kib is not None:
            top = med(data, s, hold_key(held[-1], "rss"))
            goal("RSS ≤ 24 MiB with 10,000 idle connections", None,
                 f"{top / 1024:.1f} MiB at {held[-1]:,}, the most held here; "
                 f"{(top + (10000 - held[-1]) * kib) / 1024:.1f} MiB projected at 10,000")
    for c in churn:
        _, r, ts, close = c.split("|")
        if r != "sidecar-tproxy":
            continue
        d = data[c]
        failed, slow = num(d.get("failed", [])), num(d.get("max_connect_ms", []))
        rate = num(d.get("rate_asked", []))
        if not failed or not slow:
            continue
        goal(f"churn ({'timestamps ' + ('on' if ts == 'ts1' else 'off')}, {close} closes first) "
             "≥ 2,000/s, 0 failures, no connect over 100 ms",
             # Below 2,000/s only where the client itself cannot go faster: not judged.
             (failed[0] == 0 and slow[0] <= 100) if rate[0] >= 2000 else None,
             f"{rate[0]:.0f}/s asked, {failed[0]:.0f} failed, slowest connect {slow[0]:.1f} ms"
             + ("" if rate[0] >= 2000 else " (the client's own cap without timestamps)"))
    if plugin:
        add, dl = float(plugin["add_p50_ms"]), float(plugin["del_p50_ms"])
        nft = float(plugin.get("nft_p50_ms", "nan"))
        goal("plugin ADD p50 ≤ 3 ms", add <= 3, f"{add:.2f} ms")
        goal("plugin ADD ≥ 5× faster than `nft -f`", nft / add >= 5, f"{nft / add:.1f}×")
        goal("plugin DEL p50 ≤ 15 ms", dl <= 15, f"{dl:.2f} ms")
        goal("0 leaked objects", plugin.get("leaks") == "0", plugin.get("leaks", "?"))
    print("\n".join(goals))

    print("\n### Correctness checks\n")
    if failures:
        for f in failures:
            print(f"- FAILED: {f}")
        return 1
    print("- passed: every proxy row showed the app the expected client address "
          "(redirect: 127.0.0.6), 0 connections bypassed the proxy, held connections all worked"
          + (", the plugin leaked nothing" if plugin else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
