"""Load benchmark of `poetgen serve` (issue 19), loopback only, a fixed number of requests.

1. 64 clients at once, each asking one 五绝 (seeds 0..63), against the same 64 requests one at a time, in the same
   run and against the same server (3 alternating rounds, each mode's median round): poems per second of each,
   p50 / p99 latency, failures (must be 0), and how many poems written beside others equal the poem written alone
   (see poetgen.serving.batcher for what holds).
   Passes when the concurrent throughput is at least 5x the sequential one.
2. 1,000 malformed or oversized requests mixed with good ones from 16 threads: every bad one must be answered 4xx,
   every good one 200; the server's resident memory is read before, during and after (it must stay flat).

    python benchmarks/bench_serve.py -c runs/poems        # any checkpoint; default: the shipped tang, else newest run

Prints a table and exits 1 when a limit is missed; with --json the table goes to stderr and one JSON object with
the figures to stdout (benchmarks/run.py's `serve` group reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: bytes | None = None, method: str = "GET") -> tuple[int, bytes, float]:
    """-> (status, body, seconds); a refused or broken connection is status 0."""
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.perf_counter() - t0
    except OSError:
        return 0, b"", time.perf_counter() - t0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def poem(base: str, seed: int) -> tuple[int, str, float]:
    status, body, seconds = call(base + "/v1/poems", json.dumps({"form": "五绝", "seed": seed}).encode(), "POST")
    text = json.loads(body)["poems"][0]["text"] if status == 200 else ""
    return status, text, seconds


def concurrently(base: str, seeds: list[int]) -> tuple[list[tuple[int, str, float]], float]:
    out: list = [None] * len(seeds)
    barrier = threading.Barrier(len(seeds) + 1)

    def client(i: int) -> None:
        barrier.wait()
        out[i] = poem(base, seeds[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def bad_requests(rng: random.Random, base: str, n: int) -> list[tuple[str, str, bytes | None]]:
    """(method, url, body) of requests every one of which must be refused with a 4xx."""
    kinds = [
        lambda: ("POST", "/v1/poems", b"{not json"),
        lambda: ("POST", "/v1/poems", b"[1, 2, 3]"),
        lambda: ("POST", "/v1/poems", json.dumps({"temperature": -rng.random()}).encode()),
        lambda: ("POST", "/v1/poems", json.dumps({"form": "九绝"}, ensure_ascii=False).encode()),
        lambda: ("POST", "/v1/poems", json.dumps({"top_p": 2}).encode()),
        lambda: ("POST", "/v1/poems", json.dumps({"n": 10_000}).encode()),
        lambda: ("POST", "/v1/poems", json.dumps({"length": 10**9}).encode()),
        lambda: ("POST", "/v1/poems", json.dumps({"bogus": 1}).encode()),
        lambda: ("POST", "/v1/poems", json.dumps({"seed": "x" * 50}).encode()),
        lambda: ("POST", "/v1/poems", json.dumps({"model": "no-such-model"}).encode()),
        lambda: ("POST", "/v1/poems", b"{\"prime\": \"" + "月".encode() * rng.randint(6000, 400_000) + b"\"}"),
        lambda: ("POST", "/v1/poems", os.urandom(rng.randint(1, 4000))),
        lambda: ("GET", "/v1/poems/stream?n=3", None),
        lambda: ("GET", "/v1/poems/stream?temperature=nan", None),
        lambda: ("GET", "/no/such/page", None),
        lambda: ("DELETE", "/v1/poems", None),
    ]
    return [rng.choice(kinds)() for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--checkpoint", default=None, help="model to serve (default: as `poetgen serve`)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own, 1; 0 tunes)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both modes (median counts)")
    ap.add_argument("--bad", type=int, default=1000)
    ap.add_argument("--log", default=os.devnull, help="where the server's log goes (default: nowhere)")
    ap.add_argument("--good-every", type=int, default=5, help="one good request per this many bad ones")
    ap.add_argument("--json", action="store_true", help="the figures as one JSON object on stdout (table: stderr)")
    args = ap.parse_args()
    out = sys.stderr if args.json else sys.stdout

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "poetgen", "serve", "--port", str(port), "--max-batch", str(args.clients),
           "--queue", str(2 * args.clients)] + (["-c", args.checkpoint] if args.checkpoint else []) + (
        ["--threads", str(args.threads)] if args.threads is not None else [])
    log = open(args.log, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while call(base + "/healthz")[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                print("the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        model = json.loads(call(base + "/v1/models")[1])["models"][0]
        print(f"model: {model['name']} ({model['cell']} {model['layers']}x{model['hidden']}, vocabulary "
              f"{model['vocab_size']}), {args.clients} clients, 五绝", file=out)
        for s in range(4):  # warm up: first rhyme-book and numpy paths
            poem(base, 10_000 + s)

        # Rounds alternate one-by-one and concurrent, and each mode's median round counts: the machine's other
        # load drifts, and both modes must see the same.
        seeds = list(range(args.clients))
        seq_times, conc_times, alone, together = [], [], [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            alone_round = [poem(base, s) for s in seeds]
            seq_times.append(time.perf_counter() - t0)
            together_round, t_conc = concurrently(base, seeds)
            conc_times.append(t_conc)
            alone += alone_round
            together += together_round
        t_seq, t_conc = statistics.median(seq_times), statistics.median(conc_times)
        stats = json.loads(call(base + "/v1/stats")[1])["models"][model["name"]]

        fails = sum(s != 200 for s, _, _ in alone + together)
        same = sum(a[1] == b[1] for a, b in zip(alone, together))
        lat_seq = [x for _, _, x in alone]
        lat_conc = [x for _, _, x in together]
        speedup = t_seq / t_conc
        print(f"{'':12} {'poems/s':>9} {'p50 ms':>8} {'p99 ms':>8}", file=out)
        print(f"{'one by one':12} {len(seeds) / t_seq:9.1f} {1000 * statistics.median(lat_seq):8.1f} "
              f"{1000 * percentile(lat_seq, 99):8.1f}", file=out)
        print(f"{'concurrent':12} {len(seeds) / t_conc:9.1f} {1000 * statistics.median(lat_conc):8.1f} "
              f"{1000 * percentile(lat_conc, 99):8.1f}", file=out)
        print(f"rounds: one by one {' '.join(f'{t:.2f}' for t in seq_times)} s, concurrent "
              f"{' '.join(f'{t:.2f}' for t in conc_times)} s", file=out)
        print(f"throughput {speedup:.1f}x (limit 5x); failed requests: {fails}; poems equal to the one written "
              f"alone: {same}/{len(alone)}; batches: {stats['steps']} steps, mean {stats['mean_batch']:.1f} rows, "
              f"largest {stats['max_batch']} rows / {stats['max_requests']} requests", file=out)

        # 2. malformed and oversized requests among good ones
        rng = random.Random(0)
        bad = bad_requests(rng, base, args.bad)
        work = [("bad", *b) for b in bad]
        for i in range(0, len(bad), args.good_every):
            work.insert(i + i // args.good_every, ("good", "POST", "/v1/poems",
                                                   json.dumps({"form": "五绝", "seed": i}).encode()))
        rss = [rss_mb(proc.pid)]
        results: list = []
        wrong: list[str] = []
        lock = threading.Lock()
        queue = list(enumerate(work))

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    i, (kind, method, path, body) = queue.pop()
                status, _, _ = call(base + path, body, method)
                with lock:
                    results.append((kind, status))
                    if (kind == "bad" and not 400 <= status < 500) or (kind == "good" and status != 200):
                        wrong.append(f"{kind} {method} {path} ({len(body or b'')} bytes) -> {status or 'no answer'}")
                    if len(results) % 200 == 0:
                        rss.append(rss_mb(proc.pid))

        threads = [threading.Thread(target=worker) for _ in range(16)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_abuse = time.perf_counter() - t0
        rss.append(rss_mb(proc.pid))
        bad_ok = sum(1 for k, s in results if k == "bad" and 400 <= s < 500)
        good_ok = sum(1 for k, s in results if k == "good" and s == 200)
        n_bad, n_good = sum(k == "bad" for k, _ in results), sum(k == "good" for k, _ in results)
        growth = rss[-1] - rss[0]
        print(f"abuse: {n_bad} bad requests, {bad_ok} answered 4xx; {n_good} good, {good_ok} answered 200; "
              f"{t_abuse:.1f} s; server RSS {' -> '.join(f'{r:.0f}' for r in rss)} MB (growth {growth:+.1f} MB)",
              file=out)
        for line in wrong[:10]:
            print("  wrong:", line, file=out)
        ok = speedup >= 5 and fails == 0 and bad_ok == n_bad and good_ok == n_good and growth < 50
        print("PASS" if ok else "FAIL", file=out)
        if args.json:
            print(json.dumps({
                "model": model, "clients": args.clients, "rounds": args.rounds, "form": "五绝",
                "sequential_seconds": seq_times, "concurrent_seconds": conc_times,
                "sequential_poems_per_sec": len(seeds) / t_seq, "concurrent_poems_per_sec": len(seeds) / t_conc,
                "speedup": speedup, "limit": 5.0,
                "p50_ms": {"sequential": 1000 * statistics.median(lat_seq),
                           "concurrent": 1000 * statistics.median(lat_conc)},
                "p99_ms": {"sequential": 1000 * percentile(lat_seq, 99),
                           "concurrent": 1000 * percentile(lat_conc, 99)},
                "failed": fails, "equal_to_alone": same, "requests": len(alone), "batches": stats,
                "bad": n_bad, "bad_answered_4xx": bad_ok, "good": n_good, "good_answered_200": good_ok,
                "rss_mb": rss, "rss_growth_mb": growth, "wrong": wrong[:10], "ok": ok,
            }, ensure_ascii=False))
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
