#!/usr/bin/env python3
"""Independent EID vectors for storelink's rotating presence identifier.

EID = HMAC-SHA256(presence_key, b"storelink-eid-v1" || u32_be(window))[0:8],
window = floor(unix_time / rotation_s)   (docs/eid.md)

Written with Python's standard hmac and hashlib only, so it shares no code with the agent.
Prints the vectors as JSON; tests/fixtures/eid_vectors.json is its output.
"""
import hashlib
import hmac
import json
import struct
from datetime import datetime, timezone

CONTEXT = b"storelink-eid-v1"


def eid(key: bytes, window: int) -> bytes:
    return hmac.new(key, CONTEXT + struct.pack(">I", window), hashlib.sha256).digest()[:8]


def rfc3339(t: int) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


keys = [
    bytes(32),
    bytes(range(32)),
    bytes.fromhex("6f3c1a528d1e4c1b9a7e5b2d0c4e8f11" * 2),
    hashlib.sha256(b"customer 4711000001").digest(),
]
vectors = []
for key in keys:
    for rotation in (900, 60):
        base = 1_795_000_000 - 1_795_000_000 % rotation
        # Window edges: the last second of one window and the first of the next.
        for t in (base - 1, base, base + rotation - 1, base + rotation, 0):
            window = t // rotation
            vectors.append(
                {
                    "key": key.hex(),
                    "at": rfc3339(t),
                    "rotation_s": rotation,
                    "window": window,
                    "eid": eid(key, window).hex(),
                }
            )
print(json.dumps(vectors, indent=1))
