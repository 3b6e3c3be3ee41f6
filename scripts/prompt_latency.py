#!/usr/bin/env python3
"""Card scanned -> prompt latency through the real release binary, end to end.

Starts `storelink demo` (its simulated registers and phones keep running as background load),
opens a lane display's SSE stream, then N times: POST `customer_identified` to
/pos/v1/events and time (a) the HTTP response carrying the effects and (b) the `prompt` event
on the stream; then `transaction_ended` clears the lane. Client-side times, so they include
Python's own HTTP handling (tens of microseconds).

    cargo build --release && python3 scripts/prompt_latency.py [N]
"""
import http.client
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    http_port, mqtt_port = free_port(), free_port()
    demo = subprocess.Popen(
        ["target/release/storelink", "demo", "--http-port", str(http_port), "--mqtt-port", str(mqtt_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # The demo prints the lane display URLs once the agent is up.
    deadline = time.time() + 60
    while time.time() < deadline:
        if "/lanes/" in demo.stdout.readline():
            break
    threading.Thread(target=lambda: [None for _ in demo.stdout], daemon=True).start()
    api = http.client.HTTPConnection("127.0.0.1", http_port)
    api.request("GET", "/api/v1/lanes")
    lanes = json.loads(api.getresponse().read())["lanes"]
    lane = lanes[0]["lane"]
    path = lanes[0]["display"]
    token = path.split("token=")[1]

    arrivals = []
    arrived = threading.Condition()

    def follow():
        sse = http.client.HTTPConnection("127.0.0.1", http_port)
        sse.request("GET", f"/lanes/{lane}/events?token={token}")
        r = sse.getresponse()
        event = None
        while True:
            line = r.fp.readline().decode()
            if not line:
                return
            line = line.rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "prompt":
                data = json.loads(line[6:])
                if data is not None:
                    with arrived:
                        arrivals.append((time.perf_counter(), data["id"]))
                        arrived.notify_all()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(1.0)

    response_ms, stream_ms = [], []
    for i in range(n):
        customer = f"demo-{(i % 40) + 1:03d}"
        body = json.dumps({"type": "customer_identified", "lane": lane, "loyalty_id": customer})
        with arrived:
            seen = len(arrivals)
        t0 = time.perf_counter()
        api.request("POST", "/pos/v1/events", body, {"content-type": "application/json"})
        effects = json.loads(api.getresponse().read())
        t1 = time.perf_counter()
        response_ms.append((t1 - t0) * 1000)
        prompt = effects.get("prompt")
        if prompt:
            with arrived:
                while not any(pid == prompt["id"] for _, pid in arrivals[seen:]):
                    if not arrived.wait(timeout=5):
                        raise SystemExit(f"prompt {prompt['id']} never reached the stream")
                t2 = next(t for t, pid in arrivals[seen:] if pid == prompt["id"])
            stream_ms.append((t2 - t0) * 1000)
        api.request("POST", "/pos/v1/events", json.dumps({"type": "transaction_ended", "lane": lane}),
                    {"content-type": "application/json"})
        api.getresponse().read()
        time.sleep(0.01)
    demo.terminate()
    demo.wait(timeout=10)
    for name, values in (("effects in the HTTP response", response_ms), ("prompt on the SSE stream", stream_ms)):
        print(f"{name}: n={len(values)} p50={statistics.median(values):.2f} ms "
              f"p90={pct(values, 90):.2f} ms p99={pct(values, 99):.2f} ms max={max(values):.2f} ms")


if __name__ == "__main__":
    main()
