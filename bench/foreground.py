#!/usr/bin/env python3
"""Foreground latency while a job runs (issue 15: "a scan-rate limit keeps foreground p99
within 25 % of its idle value").

One node holds N keys of JSON (`u:{i}`, 2 shards of keyspace `mr`). For each setting
(`--job-nice`, `--job-throttle`, `--job-slots`; one fresh node each) redis-benchmark drives GET
and SET (8 clients, keys of the `default` keyspace) idle, then while jobs over every key (sum by
one of 100 groups, J1 of bench/mapreduce.py) run back to back with no scan-rate limit of their
own. Printed per setting: p50 and p99 of each command idle and under jobs, the ratio of the
p99s, throughput, and how many keys per second the jobs read meanwhile.

    python3 bench/foreground.py                      # 2 M keys, 4 settings (~10 min)
    python3 bench/foreground.py --keys 500000 --settings 10:true:1

Needs redis-cli and redis-benchmark (Debian: redis-tools). Not in CI.
"""

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_vs_etcd import Fatal, Procs, fmt_table, free_ports, http_get, log  # noqa: E402

KEYSPACE = "mr"
SHARDS = 2
CLIENTS = 8


def start_node(procs, binary, work, nice, throttle, slots):
    resp, http, peer = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPDB_")}
    name = f"capdb-{nice}-{throttle}-{slots}"
    data = os.path.join(work, name)
    shutil.rmtree(data, ignore_errors=True)
    procs.start(name, [
        binary, "server", "--node-id", "1", "--data-dir", data,
        "--resp-addr", f"127.0.0.1:{resp}", "--http-addr", f"127.0.0.1:{http}",
        "--peer-addr", f"127.0.0.1:{peer}", "--initial-cluster", f"1=127.0.0.1:{peer}",
        "--job-slots", str(slots), "--job-nice", str(nice), "--job-throttle", throttle,
    ], os.path.join(work, f"{name}.log"), env=env)
    deadline = time.time() + 60
    while http_get(f"http://127.0.0.1:{http}/readyz")[0] != 200:
        procs.check_alive()
        if time.time() > deadline:
            raise Fatal("capdb not ready after 60 s")
        time.sleep(0.1)
    import urllib.request
    body = json.dumps({"name": KEYSPACE, "mode": "cp", "shards": SHARDS}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/keyspaces", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        if r.status // 100 != 2:
            raise Fatal(f"keyspace create: HTTP {r.status}")
    return resp


def load(port, keys, work):
    path = os.path.join(work, "load.resp")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(f"*2\r\n$6\r\nSELECT\r\n${len(KEYSPACE)}\r\n{KEYSPACE}\r\n".encode())
            for i in range(keys):
                k = f"u:{i}"
                v = json.dumps({"c": f"c{i % 100}", "a": i % 1000, "g": i})
                f.write(f"*3\r\n$3\r\nSET\r\n${len(k)}\r\n{k}\r\n${len(v)}\r\n{v}\r\n".encode())
    for attempt in range(4):
        with open(path, "rb") as f:
            p = subprocess.run(["redis-cli", "-p", str(port), "--pipe"], stdin=f,
                               capture_output=True, text=True)
        if p.returncode == 0 and "errors: 0" in p.stdout:
            return
        log(f"  load answered errors ({p.stdout.strip()[-200:]}); sending it again (SET is idempotent)")
    raise Fatal("the load failed 4 times")


def benchmark(port, seconds, rates=None):
    """{command: (p50 ms, p99 ms, requests/s)} of GET and SET, each about `seconds` long at
    `rates` ({command: requests/s}; a guess when absent)."""
    out = {}
    for cmd in ("get", "set"):
        # -r spreads keys over 1 M.
        rate = (rates or {}).get(cmd.upper(), (0, 0, 8_000))[2]
        p = subprocess.run(["redis-benchmark", "-p", str(port), "-t", cmd, "-c", str(CLIENTS),
                            "-n", str(int(seconds * rate)), "-r", "1000000", "-d", "64", "--csv"],
                           capture_output=True, text=True, timeout=600)
        rows = list(csv.DictReader(io.StringIO(p.stdout)))
        if not rows:
            raise Fatal(f"redis-benchmark printed nothing: {p.stderr[-500:]}")
        row = rows[0]
        out[cmd.upper()] = (float(row["p50_latency_ms"]), float(row["p99_latency_ms"]),
                            float(row["rps"]))
    return out


class Jobs(threading.Thread):
    """Runs J1 over every key back to back until stopped; counts the keys its jobs read."""

    def __init__(self, port):
        super().__init__(daemon=True)
        import redis
        self.r = redis.Redis(port=port, decode_responses=True, socket_timeout=600)
        self.r.execute_command("SELECT", KEYSPACE)
        self.stop = threading.Event()
        self.keys = 0
        self.seconds = 0.0
        self.runs = 0

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            run_id = f"fg-{n}-{int(time.time() * 1000)}"
            spec = {"id": run_id, "input": {"keyspace": KEYSPACE, "prefix": "u:"},
                    "map": {"group": {"json": "$.c"}, "values": {"a": {"json": "$.a"}}},
                    "reduce": {"s": {"sum": "a"}}}
            t0 = time.perf_counter()
            self.r.execute_command("JOB", "SUBMIT", json.dumps(spec))
            while True:
                st = self.r.execute_command("JOB", "STATUS", run_id)
                if isinstance(st, list):
                    st = dict(zip(st[::2], st[1::2]))
                if st.get("state") in ("done", "failed", "cancelled"):
                    break
                if self.stop.is_set():
                    self.r.execute_command("JOB", "CANCEL", run_id)
                    return
                time.sleep(0.05)
            if st.get("state") != "done":
                raise Fatal(f"job {run_id} ended {st}")
            self.seconds += time.perf_counter() - t0
            self.keys += int(st.get("keys_scanned", 0))
            self.runs += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=2_000_000)
    ap.add_argument("--seconds", type=float, default=20, help="per command and phase (idle)")
    ap.add_argument("--warmup", type=float, default=5, help="seconds of jobs before measuring")
    cores = os.cpu_count() or 1
    ap.add_argument("--settings", default=f"0:false:{cores},10:false:{cores},10:true:{cores},10:true:1",
                    help="nice:throttle:slots, comma-separated (one fresh node each)")
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "capdb"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    for tool in ("redis-cli", "redis-benchmark"):
        if not shutil.which(tool):
            raise Fatal(f"{tool} is needed (Debian: redis-tools)")
    binary = os.path.abspath(args.binary)
    work = tempfile.mkdtemp(prefix="capdb-fg-")
    rows = []
    try:
        for setting in args.settings.split(","):
            nice, throttle, slots = setting.split(":")
            procs = Procs()
            try:
                port = start_node(procs, binary, work, int(nice), throttle, int(slots))
                log(f"job_nice {nice}, job_throttle {throttle}, job_slots {slots}: loading {args.keys:,} keys ...")
                load(port, args.keys, work)
                # Keys for GET to find (SET over the benchmark's key range), and the rates that
                # size the runs (the same number of requests idle and under jobs).
                rates = benchmark(port, 2)
                log("  idle ...")
                idle = benchmark(port, args.seconds, rates)
                jobs = Jobs(port)
                jobs.start()
                # Jobs running, and the node's limit past its first windows.
                time.sleep(args.warmup)
                log("  under jobs ...")
                busy = benchmark(port, args.seconds, idle)
                jobs.stop.set()
                jobs.join(timeout=600)
                procs.check_alive()
                rate = jobs.keys / jobs.seconds if jobs.seconds else 0
                for cmd in ("GET", "SET"):
                    (p50i, p99i, rpsi), (p50b, p99b, rpsb) = idle[cmd], busy[cmd]
                    rows.append([nice, throttle, slots, cmd, f"{p50i:.3f}", f"{p99i:.3f}", f"{p50b:.3f}",
                                 f"{p99b:.3f}", f"{p99b / p99i:.2f}", f"{rpsi:,.0f}", f"{rpsb:,.0f}",
                                 f"{rate:,.0f} ({jobs.runs} jobs)"])
            finally:
                procs.stop_all()
        print(f"\n{args.keys:,} keys, 1 node, {os.cpu_count()} cores; "
              f"redis-benchmark {CLIENTS} clients, 64 B values")
        print(fmt_table(["job_nice", "job_throttle", "job_slots", "cmd", "idle p50 ms", "idle p99 ms", "jobs p50 ms",
                         "jobs p99 ms", "p99 ratio", "idle req/s", "jobs req/s",
                         "job keys/s"], rows, args.markdown))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except Fatal as e:
        print(f"foreground: {e}", file=sys.stderr)
        sys.exit(1)
