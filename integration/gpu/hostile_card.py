#!/usr/bin/env python3
"""A hostile tenant against the card directory, for integration/gpu/hostile_gpu.sh (plain Python, no vgpu code).

  hold CARD_DIR UUID SECONDS   create the card file GPU-<uuid>.card if missing, then hold every free entry of it
                               with an OFD write lock (what a live slice holds), each claiming share 99, force,
                               a 500 ms period and activity refreshed every 5 ms, for SECONDS (or until killed).
                               Prints "held N of 64" once the table is taken.
  cut CARD_DIR SECONDS         for SECONDS: every 150 ms cut every card file in CARD_DIR short (0, 10, 70, 0 bytes
                               in turn), and every 2 ms write 2^64-1 into words 5 to 7 of every entry (the debt,
                               payment and overrun words of the first layout; period and reserved in the second).

The layout is contract/src/card_layout.rs (version 2): a 64-byte header (magic "VGPUCARD", version 2, 64
entries), then 64 entries of 64 bytes: key, share | policy << 32, last active (CLOCK_MONOTONIC ns), launches,
throttled ns, period ns, 2 reserved words.
"""
import fcntl
import os
import struct
import sys
import time

ENTRIES = 64
HEADER = 64
ENTRY = 64
FILE_BYTES = HEADER + ENTRIES * ENTRY
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)


def entry_at(i):
    return HEADER + ENTRY * i


def header():
    return b"VGPUCARD" + struct.pack("<QQ", 2, ENTRIES) + bytes(HEADER - 24)


def flock(kind, start, length):
    # struct flock on Linux x86_64/aarch64: short type, short whence, off_t start, off_t len, pid_t pid (+ pad).
    return struct.pack("@hhqqi4x", kind, os.SEEK_SET, start, length, 0)


def lock_entry(fd, i):
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, flock(fcntl.F_WRLCK, entry_at(i), ENTRY))
        return True
    except OSError:
        return False


def create_card(path):
    """The card as a slice creates it: complete, mode 0666, never over an existing file."""
    tmp = f"{path}.tenant.{os.getpid()}"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    os.write(fd, header() + bytes(FILE_BYTES - HEADER))
    os.fchmod(fd, 0o666)
    os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    os.unlink(tmp)


def hold(card_dir, uuid, seconds):
    os.makedirs(card_dir, exist_ok=True)
    path = os.path.join(card_dir, f"{uuid}.card")
    if not os.path.exists(path):
        create_card(path)
    fd = os.open(path, os.O_RDWR)
    mine = []
    for i in range(ENTRIES):
        key = struct.unpack("<Q", os.pread(fd, 8, entry_at(i)))[0]
        if lock_entry(fd, i):
            mine.append(i)
        elif key == 0:
            print(f"entry {i}: held by someone else", flush=True)
    period_ns = 500_000_000
    for i in mine:
        e = struct.pack("<QQQQQQQQ", 0xBAD0 + i, 99 | (1 << 32), time.monotonic_ns(), 0, 0, period_ns, 0, 0)
        os.pwrite(fd, e, entry_at(i))
    print(f"held {len(mine)} of {ENTRIES} in {path}", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = struct.pack("<Q", time.monotonic_ns())
        for i in mine:
            os.pwrite(fd, now, entry_at(i) + 16)
        time.sleep(0.005)


def cut(card_dir, seconds):
    end = time.monotonic() + seconds
    lens = [0, 10, 70, 0]
    n = 0
    next_cut = time.monotonic()
    maxw = struct.pack("<Q", 2**64 - 1)
    while time.monotonic() < end:
        for name in os.listdir(card_dir):
            if not name.endswith(".card"):
                continue
            p = os.path.join(card_dir, name)
            try:
                fd = os.open(p, os.O_RDWR | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                if time.monotonic() >= next_cut:
                    os.ftruncate(fd, lens[n % len(lens)])
                    n += 1
                    next_cut = time.monotonic() + 0.15
                for i in range(ENTRIES):
                    for w in (5, 6, 7):
                        os.pwrite(fd, maxw, entry_at(i) + 8 * w)
            finally:
                os.close(fd)
        time.sleep(0.002)
    print(f"cut the card {n} times", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "hold":
        hold(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    elif len(sys.argv) == 4 and sys.argv[1] == "cut":
        cut(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit(__doc__)
