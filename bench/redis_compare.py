#!/usr/bin/env python3
"""capdb vs Redis on loopback, measured in one run with redis-benchmark.

Starts a real redis-server and a real capdb (release build) side by side, runs
`redis-benchmark -t set,get -c 50` at pipeline depth 1 and 16 against both, and prints a table
of throughput, p50 latency and capdb/Redis ratios for three pairings:

  cache     capdb `cache` keyspace (in memory)    vs Redis without persistence
  always    capdb `cp` keyspace (fsync per group) vs Redis appendonly + appendfsync always
  everysec  capdb `cp` keyspace (fsync per group) vs Redis appendonly + appendfsync everysec
            (Redis may lose 1 s of acknowledged writes here; capdb never does)

Runs alternate between the two servers and each figure is the median of --reps runs, because
this machine is shared and noisy. Usage:

  python3 bench/redis_compare.py [--reps 3] [--requests 200000] [--markdown]

With --baseline-binary OTHER, a second capdb built from OTHER runs beside the first and is
measured in the same rounds (Redis, capdb, baseline, in turn), so a change is judged against the
build before it on the same noisy machine: the table gains its ops/s and ratio.

It also measures the physical floor (bench/floor.py) in the data dirs' temp dir right before the
measurements and right after them: fdatasync of a 4 KiB overwrite and append on that disk (and
which of its two modes, fast or slow, the disk was in) and the loopback RTT. redis-benchmark runs
50 clients, so there is no single-client case: the script reports the p50 of SET at -P 1 in the
`always` pairing, a per-request latency with 50 requests in flight (it includes waiting for the
group commit and for the other clients), as a multiple of RTT p50 + fdatasync overwrite p50 (mean
of the two floor measurements).

Needs redis-server and redis-benchmark (Debian: redis-server, redis-tools). Everything it starts
is stopped on exit, also on Ctrl-C.
"""

import argparse
import csv
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import floor  # noqa: E402  (bench/floor.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited during start (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port} within {timeout}s")


class Servers:
    def __init__(self, work):
        self.work = work
        self.procs = []

    def start_redis(self, mode):
        port = free_port()
        d = os.path.join(self.work, f"redis-{mode}")
        os.makedirs(d, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                "--save", "", "--daemonize", "no", "--logfile", os.path.join(d, "log")]
        if mode == "none":
            args += ["--appendonly", "no"]
        else:
            args += ["--appendonly", "yes", "--appendfsync", mode]
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        wait_port(port, p, "redis-server")
        return p, port

    def start_capdb(self, binary, name="capdb"):
        resp, http, peer = free_port(), free_port(), free_port()
        d = os.path.join(self.work, name)
        log = open(os.path.join(self.work, f"{name}.log"), "w")
        p = subprocess.Popen([binary, "server", "--data-dir", d, "--resp-addr", f"127.0.0.1:{resp}",
                              "--http-addr", f"127.0.0.1:{http}", "--peer-addr", f"127.0.0.1:{peer}"],
                             stdout=log, stderr=log)
        self.procs.append(p)
        wait_port(resp, p, "capdb")
        body = json.dumps({"name": "1", "mode": "cache", "max_memory_bytes": 2 << 30}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/keyspaces", data=body, method="POST")
        urllib.request.urlopen(req, timeout=10).read()
        return p, resp

    def stop(self, p):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in self.procs:
            self.stop(p)


def bench(port, test, pipeline, requests, dbnum):
    """One redis-benchmark run; returns (rps, p50 ms, p99 ms)."""
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", test, "-c", "50",
         "-n", str(requests), "-P", str(pipeline), "-r", "100000", "--dbnum", str(dbnum), "--csv"],
        capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        sys.exit(f"redis-benchmark failed on port {port}: {out.stderr}")
    rows = list(csv.reader(io.StringIO(out.stdout)))
    header = rows[0]
    col = {name: i for i, name in enumerate(header)}
    # LRANGE tests first fill the list with an LPUSH run, reported as its own row: take the row
    # of the test asked for.
    data = next((r for r in rows[1:] if r[col["test"]].upper().startswith(test.upper())), rows[1])
    return float(data[col["rps"]]), float(data[col["p50_latency_ms"]]), float(data[col["p99_latency_ms"]])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="runs per figure (median reported)")
    ap.add_argument("--requests", type=int, default=200_000, help="requests per run at -P 1 (x4 at -P 16)")
    ap.add_argument("--durable-requests", type=int, default=50_000,
                    help="requests per run against fsync-always configurations at -P 1")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "capdb"))
    ap.add_argument("--baseline-binary", help="a second capdb build measured in the same rounds")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--tests", default="set,get",
                    help="redis-benchmark tests, comma-separated (e.g. lpush,lpop,sadd,hset,zadd,lrange_100)")
    ap.add_argument("--pairings", default="cache,always,everysec", help="which pairings to run")
    ap.add_argument("--pipelines", default="1,16", help="pipeline depths")
    args = ap.parse_args()
    for tool in ("redis-server", "redis-benchmark"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (Debian: apt-get install redis-server redis-tools)")
    if not os.path.exists(args.binary):
        print("building capdb (release)...", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "-p", "capdb-cli"], cwd=ROOT, check=True)

    work = tempfile.mkdtemp(prefix="capdb-bench-")
    servers = Servers(work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rows = []
    floors = []  # floor.measure() right before and right after the measurements
    try:
        capdb, capdb_port = servers.start_capdb(args.binary)
        base_port = servers.start_capdb(args.baseline_binary, "capdb-baseline")[1] if args.baseline_binary else None
        floors.append(floor.measure(work, "before"))
        print(f"  {floors[-1]['line']}", file=sys.stderr)
        pairings = [p for p in (("cache", "none", 1), ("always", "always", 0), ("everysec", "everysec", 0))
                    if p[0] in args.pairings.split(",")]
        for pairing, redis_mode, capdb_db in pairings:
            redis, redis_port = servers.start_redis(redis_mode)
            for pipeline in [int(p) for p in args.pipelines.split(",")]:
                for test in args.tests.split(","):
                    n = args.requests * (4 if pipeline == 16 else 1)
                    writes = test not in ("get", "lrange_100", "lrange_300", "lrange_500", "lrange_600")
                    if pairing != "cache" and pipeline == 1 and writes:
                        n = args.durable_requests
                    r_runs, c_runs, b_runs = [], [], []
                    for _ in range(args.reps):
                        r_runs.append(bench(redis_port, test, pipeline, n, 0))
                        c_runs.append(bench(capdb_port, test, pipeline, n, capdb_db))
                        if base_port:
                            b_runs.append(bench(base_port, test, pipeline, n, capdb_db))
                    med = lambda runs, i: statistics.median(r[i] for r in runs) if runs else None
                    rows.append((pairing, test.upper(), pipeline, med(r_runs, 0), med(c_runs, 0),
                                 med(r_runs, 1), med(c_runs, 1), med(r_runs, 2), med(c_runs, 2),
                                 med(b_runs, 0)))
                    base = f"  baseline {rows[-1][9]:>10,.0f}/s" if base_port else ""
                    print(f"  {pairing:<8} {test.upper():<3} -P {pipeline:<2}  redis {rows[-1][3]:>10,.0f}/s"
                          f"  capdb {rows[-1][4]:>10,.0f}/s{base}", file=sys.stderr)
            servers.stop(redis)
        floors.append(floor.measure(work, "after"))
        print(f"  {floors[-1]['line']}", file=sys.stderr)
    finally:
        servers.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    head = ["pairing", "op", "-P", "Redis ops/s", "capdb ops/s", "capdb/Redis", "Redis p50 ms", "capdb p50 ms",
            "Redis p99 ms", "capdb p99 ms"]
    lines = [[p, op, str(pl), f"{r:,.0f}", f"{c:,.0f}", f"{c / r:.2f}", f"{rp50:.3f}", f"{cp50:.3f}",
              f"{rp99:.3f}", f"{cp99:.3f}"] + ([f"{b:,.0f}", f"{b / r:.2f}"] if b is not None else [])
             for (p, op, pl, r, c, rp50, cp50, rp99, cp99, b) in rows]
    if args.baseline_binary:
        head += ["baseline ops/s", "baseline/Redis"]
    print(f"\ncapdb vs Redis, redis-benchmark -c 50 -r 100000, median of {args.reps} runs, "
          f"{os.cpu_count()} cores shared by client and server")
    floor_lines = [m["line"] for m in floors]
    if floor.modes_note(floors):
        floor_lines.append(floor.modes_note(floors))
    # redis-benchmark always runs 50 clients: no single-client case. The nearest is SET at -P 1 in
    # the fsync-always pairing; its p50 is per request with 50 requests in flight.
    floor_mean = floor.mean_floor_us(floors)
    always_set = next((r for r in rows if r[0] == "always" and r[1] == "SET" and r[2] == 1), None)
    if always_set:
        floor_line = (f"SET -P 1 `always` p50 vs the physical floor (RTT p50 + fdatasync overwrite p50, "
                      f"mean of before/after = {floor_mean:,.0f} µs): Redis {always_set[5]:.3f} ms = "
                      f"{always_set[5] * 1000 / floor_mean:.1f}x, capdb {always_set[6]:.3f} ms = "
                      f"{always_set[6] * 1000 / floor_mean:.1f}x (50 concurrent clients, not 1: this "
                      f"per-request latency includes waiting for the group commit and behind the "
                      f"other clients' requests)")
    else:
        floor_line = (f"SET -P 1 `always` vs the physical floor ({floor_mean:,.0f} µs): not measured "
                      f"(needs the always pairing, pipeline 1 and the set test)")
    if args.markdown:
        print()
        for line in floor_lines:
            print(f"- {line}")
        print()
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for l in lines:
            print("| " + " | ".join(l) + " |")
    else:
        for line in floor_lines:
            print(line)
        widths = [max(len(x) for x in col) for col in zip(head, *lines)]
        for l in [head] + lines:
            print("  ".join(x.rjust(w) for x, w in zip(l, widths)))
    print()
    print(floor_line)


if __name__ == "__main__":
    main()
