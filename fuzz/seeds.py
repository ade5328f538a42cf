#!/usr/bin/env python3
"""Writes the binary seeds of fuzz/corpus: agent replies (protobuf) and
fdmsg streams (the segment format of fuzz_targets/fdmsg_recv.rs). The
text seeds of the other targets are files written by hand."""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(num, value):
    return varint(num << 3) + varint(value)


def field_bytes(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def agent_replies():
    # VersionResponse {protocol, agent_version, kernel_release, ready_ms}
    write("agent_replies", "version", field_varint(1, 1) + field_bytes(2, b"0.1.0")
          + field_bytes(3, b"6.1.94-podvisor") + field_varint(4, 212))
    # ContainerStats, fields 1 to 9
    stats = [268435456, 536870912, 300000000, 1523000, 1200000, 323000, 7, 512, 1]
    write("agent_replies", "stats",
          b"".join(field_varint(i + 1, v) for i, v in enumerate(stats)))
    write("agent_replies", "stats-huge",
          b"".join(field_varint(i + 1, 2**64 - 1) for i in range(9)))
    # WaitProcessResponse {exit_code, signal}: exited 3; killed by SIGKILL;
    # a negative exit code (int32, ten-byte varint)
    write("agent_replies", "wait-exit", field_varint(1, 3))
    write("agent_replies", "wait-signal", field_varint(1, 137) + field_varint(2, 9))
    write("agent_replies", "wait-negative", field_varint(1, 2**64 - 1))
    # ListProcessesResponse {repeated uint32 pids}, packed and not
    packed = b"".join(varint(p) for p in [1, 7, 42, 31337])
    write("agent_replies", "pids-packed", field_bytes(1, packed))
    write("agent_replies", "pids-unpacked", field_varint(1, 1) + field_varint(1, 2))
    # OutputChunk {bytes data}
    write("agent_replies", "output", field_bytes(1, b"hello from the guest\r\n\x1b[0m"))
    write("agent_replies", "empty", b"")


def segment(payload, fds=0, over=False, most=False, repeat=False):
    flags = (fds & 3) | (4 if over else 0) | (16 if most else 0) | (8 if repeat else 0)
    return bytes([flags]) + struct.pack("<H", len(payload)) + payload


def fdmsg():
    take = json.dumps({"op": "take", "nics": 1}).encode() + b"\n"
    attach = json.dumps({"op": "attach", "name": "rootfs"}).encode() + b"\n"
    reply = json.dumps({"error": "", "sandbox_id": "pool-t-1-1",
                        "agent_socket": "/run/podvisor/a.sock", "vmm_pid": 7,
                        "kernel_release": "6.1"}).encode() + b"\n"
    write("fdmsg_recv", "take-with-tap", segment(take, fds=1))
    write("fdmsg_recv", "attach-with-tree", segment(attach, fds=1) + segment(reply))
    # A line split over two sends, its descriptors with the first.
    write("fdmsg_recv", "split-line", segment(take[:5], fds=2) + segment(take[5:]))
    # Two lines in one send, then more descriptors than a message carries.
    write("fdmsg_recv", "two-lines-many-fds", segment(take + attach) + segment(attach, over=True))
    # A line without end, sent 32 times over: past the reader's limit.
    write("fdmsg_recv", "endless-line", segment(b"x" * 4096, repeat=True))
    write("fdmsg_recv", "trailing-partial", segment(reply + b'{"op":"deta'))
    write("fdmsg_recv", "most-fds", segment(take, most=True) + segment(attach, fds=1))


agent_replies()
fdmsg()
