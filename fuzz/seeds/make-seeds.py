#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets that need no VM (the state
and working-set seeds are real files from a restore: see README.md)."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def seed(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


def outcome(status, body, log, exit_code=0):
    head = struct.pack("<IiIIQQQ", status, exit_code, len(body), len(log), 0, 1500, 0)
    return head + body + log


ok = outcome(0, b"0 3 13\n", b"")
trap = outcome(2, b"wasm trap: integer divide by zero", b"stderr tail\n")
seed("outcome", "ok", ok)
seed("outcome", "trap", trap)
seed("outcome", "timeout", outcome(3, b"time limit of 1000 ms reached", b"", 0))


def header(seq, kind, length):
    h = bytearray(96)
    struct.pack_into("<III", h, 0, 0x424D4245, 1, 4096)
    struct.pack_into("<QII", h, 32, seq, kind, length)
    return bytes(h)


seed("guest_message", "outcome", header(7, 9, len(ok)) + ok)
seed("guest_message", "outcome-preparing", header(8, 10, len(trap)) + trap)
seed("guest_message", "echo", header(2, 3, 5) + b"hello")
seed("guest_message", "error", header(3, 5, 9) + b"bad thing")
seed("guest_message", "idle", header(0, 11, 0))
seed("guest_message", "touched", header(4, 13, 24) + struct.pack("<QQQ", 10, 2, 900))
seed("guest_message", "too-long", header(5, 9, 0xFFFFFFFF) + ok)

# Touch lists: count, then (first page u64, pages u32, flags u32).
touch = struct.pack("<I", 2) + struct.pack("<QII", 0x100, 4, 1) + struct.pack("<QII", 0x2000, 1, 0)
seed("wire", "touch-list", touch)
seed("wire", "touch-list-bad-flags", struct.pack("<I", 1) + struct.pack("<QII", 1, 1, 6))
seed("wire", "reader-ops", bytes([0, 1, 2, 3, 4, 5, 2, 0]) + struct.pack("<IQI", 7, 9, 3) + b"abc")

for name, text in {
    "get-root": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "put-boot-source": b"PUT /boot-source HTTP/1.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 44\r\n\r\n{\"kernel_image_path\": \"/images/ember-guest\"}",
    "invoke-expect-continue": b"POST /ember/invoke HTTP/1.1\r\nExpect: 100-continue\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    "snapshot-load": b"PUT /snapshot/load HTTP/1.1\r\nContent-Length: 97\r\n\r\n"
    b"{\"snapshot_path\": \"s.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"s.mem\"}}",
    "pipelined": b"GET / HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 20\r\n\r\n"
    b"{\"state\": \"Paused\"}\nGET /ember/status HTTP/1.1\r\nConnection: close\r\n\r\n",
    "chunked": b"PUT /machine-config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
}.items():
    # First byte: how the stream is cut into pieces.
    seed("api_request", name, bytes([len(name) * 7 % 256]) + text)

b = b"XyZ123"
multipart = (
    b"--XyZ123\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n"
    b"{\"timeout_ms\": 1000, \"memory_mib\": 64}\r\n"
    b"--XyZ123\r\nContent-Disposition: form-data; name=\"module\"; filename=\"m.wasm\"\r\n"
    b"Content-Type: application/wasm\r\n\r\n\x00asm\x01\x00\x00\x00\r\n"
    b"--XyZ123\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data/words.txt\"\r\n\r\n"
    b"one two\r\n--XyZ123--\r\n"
)
seed("deploy_multipart", "deploy", bytes([len(b)]) + b + multipart)
seed(
    "deploy_multipart",
    "unknown-part",
    bytes([len(b)]) + b + b"--XyZ123\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--XyZ123--\r\n",
)
