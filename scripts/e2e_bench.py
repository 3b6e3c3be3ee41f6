#!/usr/bin/env python3
"""End-to-end load benchmark: the release binary, a real mosquitto, and `storelink sim`.

Starts mosquitto (QoS 1, on a free 127.0.0.1 port) and the agent with three jsonl registers
over TCP and presence from ESPresense room scanners on the same broker; then, for each rate,
runs `storelink sim` with 300 phones (profiles sent down, a report per phone per second) and a
card scan every half second, while sampling the agent's RSS and CPU from /proc. The simulator
checks central's feed: delivered, lost (must be 0), duplicates, and latency percentiles
(written -> agent's ok -> central, card scanned -> prompt).

    cargo build --release
    python3 scripts/e2e_bench.py                       # 10, 100, 1000 tx/s, 60 s each
    python3 scripts/e2e_bench.py --rates 4000 --seconds 60      # sustained throughput
    python3 scripts/e2e_bench.py --rates 100 --seconds 1800     # the 30-minute soak
    python3 scripts/e2e_bench.py --rates "" --idle-s 20         # idle footprint only

Prints one JSON line per run and a Markdown table row; exits 1 if anything was lost.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BIN = os.environ.get("STORELINK_BIN", "target/release/storelink")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, patience=15):
    deadline = time.time() + patience
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """RSS every `every` seconds while a run lasts."""

    def __init__(self, pid, every, data):
        super().__init__(daemon=True)
        self.pid, self.every, self.data = pid, every, data
        self.samples, self.stop = [], threading.Event()

    def run(self):
        while not self.stop.wait(self.every):
            self.samples.append((time.time(), rss_mib(self.pid), du_mib(self.data)))


def du_mib(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total / 1048576


def agent_config(work, mqtt, api, registers, cache_bytes=None, max_seen_ids=None):
    cache = f"cache_bytes = {cache_bytes}" if cache_bytes else ""
    if max_seen_ids:
        cache += f"\nmax_seen_ids = {max_seen_ids}"
    lines = f"""
[store]
id = "s042"
tenant = "acme"
timezone = "Europe/Berlin"
currency = "EUR"

[storage]
path = "{work}/data"
{cache}

[central.mqtt]
url = "mqtt://127.0.0.1:{mqtt}"

[cashier]
bind = "127.0.0.1:{api}"

[presence]
source = "mqtt-scanners"
service_uuid = "6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11"

[presence.scanners]
url = "mqtt://127.0.0.1:{mqtt}"
"""
    for room in ["entrance", "aisle"]:
        lines += f'\n[[presence.zones]]\nname = "{room}"\nscanners = ["{room}"]\nenter_m = 3.5\nexit_m = 5.0\n'
    for i, port in enumerate(registers, start=1):
        lines += f'\n[[presence.zones]]\nname = "lane-{i}"\nlane = "{i}"\nscanners = ["lane-{i}"]\nenter_m = 3.5\nexit_m = 5.0\n'
        lines += f'\n[[registers]]\nname = "lane-{i}"\nlane = "{i}"\nformat = "jsonl"\ntransport = {{ kind = "tcp-listen", bind = "127.0.0.1:{port}" }}\n'
    path = os.path.join(work, "storelink.toml")
    with open(path, "w") as f:
        f.write(lines)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="10,100,1000")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--phones", type=int, default=300)
    ap.add_argument("--card-scans", type=float, default=2.0)
    ap.add_argument("--cache-bytes", type=int, help="storage.cache_bytes for the agent")
    ap.add_argument("--max-seen-ids", type=int,
                    help="storage.max_seen_ids: caps the store's growth, to tell growth in time from growth with size")
    ap.add_argument("--series", help="append rate, second, RSS MiB, store MiB per sample to this file")
    ap.add_argument("--idle-s", type=int, default=2,
                    help="seconds after the agent is ready before the idle footprint is read, and "
                         "then the seconds of idle CPU measured")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="storelink-e2e-")
    mqtt, api = free_port(), free_port()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    conf = os.path.join(work, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {mqtt} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n"
                "max_queued_messages 0\npersistence false\n")
    broker = subprocess.Popen([mosquitto, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(mqtt)
    config = agent_config(work, mqtt, api, [free_port() for _ in range(3)], args.cache_bytes,
                          args.max_seen_ids)
    log = open(os.path.join(work, "agent.log"), "w")
    agent = subprocess.Popen([BIN, "run", "--config", config], stdout=subprocess.DEVNULL, stderr=log,
                             env={**os.environ, "RUST_LOG": "warn"})
    failed = False
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{api}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(args.idle_s)
        idle_rss = rss_mib(agent.pid)
        print(f"agent pid {agent.pid}, idle RSS {idle_rss:.1f} MiB, work dir {work}", file=sys.stderr)
        if args.idle_s > 2:
            status = dict(l.split(":", 1) for l in open(f"/proc/{agent.pid}/status") if ":" in l)
            kib = lambda k: int(status[k].split()[0]) / 1024
            t0, c0 = time.time(), cpu_ticks(agent.pid)
            time.sleep(args.idle_s)
            cpu = (cpu_ticks(agent.pid) - c0) / TICKS
            print(json.dumps({
                "idle_after_s": args.idle_s, "rss_mib": round(kib("VmRSS"), 1),
                "rss_anon_mib": round(kib("RssAnon"), 1), "rss_file_mib": round(kib("RssFile"), 1),
                "threads": int(status["Threads"]),
                "idle_cpu_pct": round(100 * cpu / (time.time() - t0), 2),
            }), flush=True)
        for rate in [float(r) for r in args.rates.split(",") if r]:
            sampler = Sampler(agent.pid, 1.0 if args.seconds <= 300 else 10.0, os.path.join(work, "data"))
            t0, c0 = time.time(), cpu_ticks(agent.pid)
            sampler.start()
            sim = subprocess.run(
                [BIN, "sim", "--agent", f"http://127.0.0.1:{api}", "--rate", str(rate),
                 "--duration-s", str(args.seconds), "--phones", str(args.phones),
                 "--scanners", "entrance,aisle,lane-1,lane-2,lane-3",
                 "--card-scans", str(args.card_scans), "--json"],
                capture_output=True, text=True)
            sampler.stop.set()
            elapsed, cpu = time.time() - t0, (cpu_ticks(agent.pid) - c0) / TICKS
            if sim.returncode != 0:
                failed = True
                print(sim.stderr, file=sys.stderr)
            report = json.loads(sim.stdout)
            rss = [r for _, r, _ in sampler.samples] or [rss_mib(agent.pid)]
            if args.series:
                with open(args.series, "a") as f:
                    for t, r, d in sampler.samples:
                        f.write(f"{rate:g}\t{t - t0:.0f}\t{r:.1f}\t{d:.1f}\n")
            n = len(rss)
            first, last = rss[: max(1, n // 6)], rss[-max(1, n // 6):]
            row = {
                "rate": rate, "seconds": args.seconds, "phones": args.phones,
                "sent": report["sent"], "delivered": report["delivered"], "lost": report["lost"],
                "duplicates": report["duplicates"],
                "achieved_tx_s": round(report["delivered"] / report["duration_s"], 1),
                "ingest_ms": report["ingest_ms"], "end_to_end_ms": report["end_to_end_ms"],
                "prompt_ms": report["prompt_ms"], "scanner_reports": report["scanner_reports"],
                "agent_cpu_pct": round(100 * cpu / elapsed, 1),
                "rss_mib_median": round(statistics.median(rss), 1), "rss_mib_max": round(max(rss), 1),
                "rss_first_sixth_max": round(max(first), 1), "rss_last_sixth_max": round(max(last), 1),
                "rss_growth_pct": round(100 * (max(last) - max(first)) / max(first), 1),
            }
            print(json.dumps(row))
            e, p = row["end_to_end_ms"], row["prompt_ms"]
            print(f"| {rate:g} | {row['achieved_tx_s']} | {row['delivered']}/{row['sent']} | {row['lost']} | "
                  f"{e['p50']} / {e['p99']} | {p['p50']} / {p['p99']} | {row['agent_cpu_pct']} % | "
                  f"{row['rss_mib_median']} ({row['rss_mib_max']}) | {row['rss_growth_pct']} % |", flush=True)
            failed |= row["lost"] > 0
    finally:
        agent.terminate()
        agent.wait(timeout=15)
        broker.terminate()
        broker.wait()
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
