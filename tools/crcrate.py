#!/usr/bin/env python3
"""ISA-L's CRC32C rate on this machine: one thread from memory and from cache, and 2, 4 and 8
threads over one buffer. Tessera's client checksums snapshots with it as they land, so this is the
rate a snapshot can be sealed at per checksum thread. Needs no build: it loads libisal directly.

    tools/crcrate.py [PATH_TO_LIBISAL]   (default: libisal.so.2 through the system loader)
"""

import ctypes
import os
import sys
import threading
import time

GIB = 1 << 30
CHUNK = 1 << 28  # crc32_iscsi takes an int length


def main() -> int:
    lib = ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else "libisal.so.2")
    crc = lib.crc32_iscsi
    crc.restype = ctypes.c_uint32
    crc.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    buf = ctypes.create_string_buffer(os.urandom(1 << 20) * (GIB >> 20))  # random, not zeros
    base = ctypes.addressof(buf)

    start = time.perf_counter()
    for offset in range(0, GIB, CHUNK):
        crc(base + offset, CHUNK, 0)
    print(f"crc32_iscsi, 1 thread, 1 GiB from memory: {GIB / (time.perf_counter() - start) / 1e9:.1f} GB/s")

    small = 256 << 10
    start = time.perf_counter()
    for _ in range(4096):
        crc(base, small, 0)
    print(f"crc32_iscsi, 1 thread, 256 KiB from cache: "
          f"{small * 4096 / (time.perf_counter() - start) / 1e9:.1f} GB/s")

    for threads in (2, 4, 8):
        share = GIB // threads

        def work(k: int) -> None:
            for offset in range(k * share, (k + 1) * share, CHUNK):
                crc(base + offset, min(CHUNK, (k + 1) * share - offset), 0)

        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        print(f"crc32_iscsi, {threads} threads over 1 GiB: "
              f"{GIB / (time.perf_counter() - start) / 1e9:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
