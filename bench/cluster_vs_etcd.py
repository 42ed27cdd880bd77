#!/usr/bin/env python3
"""A 3-node capdb cluster vs a 3-node etcd cluster on loopback, measured in one run.

Starts both clusters side by side (data dirs in one temp dir under /tmp, so on the same disk),
fills the 100k-key key space of both, then drives both with the same closed-loop load generator
(bench/loadgen: one connection per client, clients round-robin over the three nodes) and prints
throughput, p50 and p99 latency and capdb/etcd ratios for puts and linearizable gets at 1, 16 and
64 concurrent clients.

It also measures the physical floor (bench/floor.py) in the data dirs' temp dir right before the
measurements and right after them: fdatasync of a 4 KiB overwrite and append on that disk (and
which of its two modes, fast or slow, the disk was in) and the loopback RTT; and it reports the
single-client put p50 of both systems as a multiple of RTT p50 + fdatasync overwrite p50 (mean of
the two floor measurements).

  capdb  `default` keyspace (mode cp, Raft over 3 voters, fsync per commit group),
         RESP `SET k v` / `GET k` (GET is linearizable: ReadIndex on the shard leader)
  etcd   3 members, default durability (fsync per commit), gRPC Put / linearizable Range

Values are 256 bytes, keys are 8 bytes (k0000000..k0099999) picked uniformly at random. Every
point is measured --reps times in rep-major order (all points once, then again; the order of
the two systems alternates between reps) and the tables show the median of the reps, because
this machine is shared and noisy. Usage:

  python3 bench/cluster_vs_etcd.py [--duration 8] [--reps 3] [--clients 1,16,64] [--markdown]
                                   [--capdb-binary PATH] [--skip-build] [--json-out FILE]

Needs etcd 3.4 (Debian: etcd-server), protoc to build the load generator (Debian:
protobuf-compiler) and a Rust toolchain. Everything it starts is stopped on exit, also on Ctrl-C.
"""

import argparse
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
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import floor  # noqa: E402  (bench/floor.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN_MANIFEST = os.path.join(ROOT, "bench", "loadgen", "Cargo.toml")
LOADGEN_BIN = os.path.join(ROOT, "bench", "loadgen", "target", "release", "loadgen")
SYSTEMS = ("capdb", "etcd")
OPS = ("put", "get")


class Fatal(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_ports(n):
    """n distinct free loopback ports (sockets held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(url, timeout=2.0):
    """(status, body) or (None, error text)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError) as e:
        return None, str(e).encode()


def tail(path, n=20):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return "(no log)"


class Procs:
    """Every process this script starts; stop_all() ends them (TERM, then KILL)."""

    def __init__(self):
        self.procs = []  # (name, Popen, log path)

    def start(self, name, args, log_path, env=None):
        f = open(log_path, "ab")
        try:
            p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
        finally:
            f.close()
        self.procs.append((name, p, log_path))
        return p

    def check_alive(self):
        for name, p, log_path in self.procs:
            if p.poll() is not None:
                raise Fatal(f"{name} exited (code {p.returncode}); last log lines:\n{tail(log_path)}")

    def stop_all(self):
        for _, p, _ in self.procs:
            if p.poll() is None:
                try:
                    p.terminate()
                except OSError:
                    pass
        deadline = time.time() + 15
        for _, p, _ in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def start_etcd(procs, etcd_bin, work):
    cports, pports = free_ports(3), free_ports(3)
    names = [f"m{i}" for i in (1, 2, 3)]
    initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, pports))
    token = f"bench-{os.getpid()}-{int(time.time())}"
    for n, c, p in zip(names, cports, pports):
        d = os.path.join(work, f"etcd-{n}")
        procs.start(f"etcd {n}", [
            etcd_bin, "--name", n, "--data-dir", d,
            "--listen-client-urls", f"http://127.0.0.1:{c}",
            "--advertise-client-urls", f"http://127.0.0.1:{c}",
            "--listen-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-cluster", initial, "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
            "--quota-backend-bytes", "8589934592",
        ], os.path.join(work, f"etcd-{n}.log"))
    deadline = time.time() + 60
    while True:
        procs.check_alive()
        ok = 0
        for c in cports:
            code, body = http_get(f"http://127.0.0.1:{c}/health")
            if code == 200 and b'"true"' in body:
                ok += 1
        if ok == 3:
            break
        if time.time() > deadline:
            raise Fatal("etcd cluster not healthy after 60 s")
        time.sleep(0.2)
    return [f"127.0.0.1:{c}" for c in cports]


def start_capdb(procs, binary, work):
    resp, http, peer = free_ports(3), free_ports(3), free_ports(3)
    initial = ",".join(f"{i}=127.0.0.1:{p}" for i, p in zip((1, 2, 3), peer))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPDB_")}
    for i in (1, 2, 3):
        d = os.path.join(work, f"capdb-{i}")
        procs.start(f"capdb node {i}", [
            binary, "server", "--node-id", str(i), "--data-dir", d,
            "--resp-addr", f"127.0.0.1:{resp[i - 1]}", "--http-addr", f"127.0.0.1:{http[i - 1]}",
            "--peer-addr", f"127.0.0.1:{peer[i - 1]}", "--initial-cluster", initial,
            "--shutdown-grace-ms", "2000",
        ], os.path.join(work, f"capdb-{i}.log"), env=env)
    deadline = time.time() + 90
    last = ""
    while True:
        procs.check_alive()
        ready = all(http_get(f"http://127.0.0.1:{h}/readyz")[0] == 200 for h in http)
        if ready:
            code, body = http_get(f"http://127.0.0.1:{http[0]}/v1/cluster")
            if code == 200:
                st = json.loads(body)
                last = body.decode(errors="replace")
                ks = [k for k in st.get("keyspaces", []) if k.get("name") == "default"]
                shards = ks[0].get("shards", []) if ks else []
                if shards and all(isinstance(s.get("leader"), int) and len(s.get("voters") or []) == 3
                                  for s in shards):
                    leaders = sorted({s["leader"] for s in shards})
                    return [f"127.0.0.1:{r}" for r in resp], leaders
        if time.time() > deadline:
            raise Fatal(f"capdb cluster not ready (default shard with leader and 3 voters) after "
                        f"90 s; last /v1/cluster: {last[:2000]}")
        time.sleep(0.2)


def etcd_leader(endpoints):
    for i, ep in enumerate(endpoints):
        try:
            out = subprocess.run(["etcdctl", "--endpoints", ep, "endpoint", "status", "-w", "json"],
                                 capture_output=True, text=True, timeout=5,
                                 env={**os.environ, "ETCDCTL_API": "3"})
            st = json.loads(out.stdout)[0]["Status"]
            if st["leader"] == st["header"]["member_id"]:
                return f"m{i + 1}"
        except (OSError, ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
            return "?"
    return "?"


def run_loadgen(procs, args, system, endpoints, op, clients):
    cmd = [LOADGEN_BIN, "--target", system, "--endpoints", ",".join(endpoints), "--op", op,
           "--clients", str(clients), "--duration", str(args.duration), "--warmup", str(args.warmup),
           "--key-space", str(args.key_space), "--value-size", str(args.value_size), "--json"]
    timeout = args.duration + args.warmup + 120 if op != "fill" else 1800
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        p.kill()
        p.wait()
        raise
    if p.returncode != 0:
        raise Fatal(f"loadgen {system} {op} c={clients} failed ({p.returncode}): {err.strip()}")
    procs.check_alive()
    return json.loads(out.strip().splitlines()[-1])


def version_of(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def fmt_table(headers, rows, markdown):
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if i >= 2 else "---" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per point (default 8)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per point, median reported (default 3)")
    ap.add_argument("--clients", default="1,16,64", help="comma-separated client counts")
    ap.add_argument("--key-space", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=256)
    ap.add_argument("--capdb-binary", help="use this capdb binary instead of building target/release/capdb")
    ap.add_argument("--etcd-binary", default="etcd")
    ap.add_argument("--skip-build", action="store_true", help="do not run cargo (binaries must exist)")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    ap.add_argument("--json-out", help="write every measurement and the medians to this file")
    ap.add_argument("--keep-data", action="store_true", help="keep the temp data dir")
    args = ap.parse_args()
    client_counts = [int(c) for c in args.clients.split(",") if c.strip()]

    if not shutil.which(args.etcd_binary):
        sys.exit(f"{args.etcd_binary} not found (Debian: apt-get install etcd-server etcd-client)")

    started = time.time()
    if not args.skip_build:
        log("building loadgen (release) ...")
        subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path", LOADGEN_MANIFEST],
                       check=True)
        if not args.capdb_binary:
            log("building capdb (release) ...")
            subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "capdb-cli"], cwd=ROOT,
                           check=True)
    capdb_bin = args.capdb_binary or os.path.join(ROOT, "target", "release", "capdb")
    for b in (capdb_bin, LOADGEN_BIN):
        if not os.path.exists(b):
            sys.exit(f"{b} missing (run without --skip-build)")
    capdb_bin = os.path.abspath(capdb_bin)
    debug_build = f"{os.sep}debug{os.sep}" in capdb_bin

    work = tempfile.mkdtemp(prefix="capdb-vs-etcd-", dir="/tmp")
    procs = Procs()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    results = []  # every single measurement
    floors = []  # floor.measure() right before and right after the measurements
    try:
        log(f"data under {work}")
        log("starting etcd (3 members) ...")
        etcd_eps = start_etcd(procs, args.etcd_binary, work)
        log("starting capdb (3 nodes) ...")
        capdb_eps, capdb_leaders = start_capdb(procs, capdb_bin, work)
        eps = {"capdb": capdb_eps, "etcd": etcd_eps}
        for system in SYSTEMS:
            log(f"filling {system}: {args.key_space} keys of {args.value_size} B ...")
            r = run_loadgen(procs, args, system, eps[system], "fill", 16)
            log(f"  {r['seconds']:.1f} s ({r['keys_per_sec']:.0f} keys/s)")
        etcd_lead = etcd_leader(etcd_eps)

        log("measuring the physical floor (fdatasync in the data dirs' temp dir, loopback RTT) ...")
        floors.append(floor.measure(work, "before"))
        log(f"  {floors[-1]['line']}")

        total = args.reps * len(OPS) * len(client_counts) * len(SYSTEMS)
        n = 0
        for rep in range(args.reps):
            order = SYSTEMS if rep % 2 == 0 else tuple(reversed(SYSTEMS))
            for op in OPS:
                for c in client_counts:
                    for system in order:
                        n += 1
                        r = run_loadgen(procs, args, system, eps[system], op, c)
                        r["rep"] = rep
                        results.append(r)
                        log(f"[{n}/{total}] rep {rep + 1} {system:5} {op} c={c:<3} "
                            f"{r['ops_per_sec']:9.0f} ops/s  p50 {r['p50_us'] / 1000:7.2f} ms  "
                            f"p99 {r['p99_us'] / 1000:7.2f} ms  errors {r['errors']}"
                            + (f"  misses {r['misses']}" if r.get("misses") else "")
                            + (f"  ({r['first_error']})" if r.get("first_error") else ""))
        log("measuring the physical floor again ...")
        floors.append(floor.measure(work, "after"))
        log(f"  {floors[-1]['line']}")
    except KeyboardInterrupt:
        log("interrupted; stopping servers")
        procs.stop_all()
        sys.exit(130)
    except (Fatal, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        procs.stop_all()
        sys.exit(1)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)

    # Medians over reps, per (system, op, clients).
    med = {}
    for system in SYSTEMS:
        for op in OPS:
            for c in client_counts:
                rs = [r for r in results if r["target"] == system and r["op"] == op and r["clients"] == c]
                med[(system, op, c)] = {
                    "ops_per_sec": statistics.median(r["ops_per_sec"] for r in rs),
                    "ops_min": min(r["ops_per_sec"] for r in rs),
                    "ops_max": max(r["ops_per_sec"] for r in rs),
                    "p50_us": statistics.median(r["p50_us"] for r in rs),
                    "p99_us": statistics.median(r["p99_us"] for r in rs),
                    "errors": sum(r["errors"] for r in rs),
                }

    runtime = time.time() - started
    cpus = os.cpu_count()
    print()
    print(f"capdb 3-node cluster vs etcd 3-node cluster, loopback, {args.reps} rep(s) x "
          f"{args.duration:g} s per point (+{args.warmup:g} s warm-up), median of reps, "
          f"total runtime {runtime / 60:.1f} min")
    print(f"NOTE: both clusters (6 server processes) and the load generator share ONE {cpus}-core "
          f"machine and ONE disk ({work} for all data dirs); absolute numbers are low and "
          f"noisy, the ratios are the point.")
    print(f"capdb: {capdb_bin} ({version_of([capdb_bin, 'version'])}), `default` keyspace (cp, "
          f"3 voters, leader node {','.join(map(str, capdb_leaders))}), RESP SET / GET (linearizable)")
    if debug_build:
        print("WARNING: capdb is a DEBUG build: its numbers are not representative; "
              "rerun with a release build.")
    print(f"etcd:  {version_of([args.etcd_binary, '--version'])}, default fsync, leader {etcd_lead}, "
          f"gRPC Put / linearizable Range")
    print(f"load:  closed loop, one connection per client, clients round-robin over the 3 nodes, "
          f"{args.value_size} B values, 8 B keys uniform over {args.key_space} keys (pre-filled)")
    floor_lines = [m["line"] for m in floors]
    if floor.modes_note(floors):
        floor_lines.append(floor.modes_note(floors))
    for line in floor_lines:
        print(line)
    print()

    # Single-client put p50 as a multiple of the physical floor (RTT + fsync, mean of before/after).
    floor_mean = floor.mean_floor_us(floors)
    vs_floor = {}
    if 1 in client_counts:
        vs_floor = {s: {"p50_us": med[(s, "put", 1)]["p50_us"],
                        "multiple": med[(s, "put", 1)]["p50_us"] / floor_mean} for s in SYSTEMS}
        floor_line = (f"single-client put p50 vs the physical floor (RTT p50 + fdatasync overwrite "
                      f"p50, mean of before/after = {floor_mean:,.0f} µs): "
                      + ", ".join(f"{s} {v['p50_us'] / 1000:.2f} ms = {v['multiple']:.1f}x"
                                  for s, v in vs_floor.items()))
    else:
        floor_line = (f"single-client put vs the physical floor ({floor_mean:,.0f} µs): not measured "
                      f"(--clients has no 1)")

    rows = []
    for op in OPS:
        for c in client_counts:
            for system in SYSTEMS:
                m = med[(system, op, c)]
                rows.append([system, op, str(c), f"{m['ops_per_sec']:.0f}",
                             f"{m['ops_min']:.0f}-{m['ops_max']:.0f}",
                             f"{m['p50_us'] / 1000:.2f}", f"{m['p99_us'] / 1000:.2f}", str(m["errors"])])
    headers = ["system", "op", "clients", "ops/s", "ops/s range", "p50 ms", "p99 ms", "errors"]
    ratio_headers = ["op", "clients", "throughput capdb/etcd", "p50 capdb/etcd", "p99 capdb/etcd"]
    ratio_rows = []
    for op in OPS:
        for c in client_counts:
            a, b = med[("capdb", op, c)], med[("etcd", op, c)]
            def ratio(x, y):
                return f"{x / y:.2f}x" if y else "n/a"
            ratio_rows.append([op, str(c), ratio(a["ops_per_sec"], b["ops_per_sec"]),
                               ratio(a["p50_us"], b["p50_us"]), ratio(a["p99_us"], b["p99_us"])])
    print(fmt_table(headers, rows, False))
    print()
    print("capdb/etcd ratios (throughput > 1: capdb faster; latency < 1: capdb faster)")
    print(fmt_table(ratio_headers, ratio_rows, False))
    print()
    print(floor_line)
    if args.markdown:
        print()
        for line in floor_lines:
            print(f"- {line}")
        print()
        print(fmt_table(headers, rows, True))
        print()
        print(fmt_table(ratio_headers, ratio_rows, True))
        print()
        print(floor_line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"runs": results,
                       "medians": [{"system": s, "op": o, "clients": c, **v}
                                   for (s, o, c), v in med.items()],
                       "floor": {"before": floors[0], "after": floors[1],
                                 "mean_rtt_plus_fsync_us": floor_mean,
                                 "single_client_put_vs_floor": vs_floor}}, f, indent=1)


if __name__ == "__main__":
    main()
