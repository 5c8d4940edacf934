#!/usr/bin/env python3
"""A server that knows nothing of TOA (the Python twin of examples/peer_echo.rs).

For each line a client sends: answer with the address accept() returned for the connection
and the one getpeername() returns now (and with --sockname, what getsockname() returns); close
when the client does. With --libtoa-counters FILE, after each connection it rewrites FILE
with "connections=N" and the counters of the libtoa.so preloaded into this process, so that
tests count what its lookups did. Usage: peer_echo.py HOST PORT [--sockname]
[--libtoa-counters FILE]
"""
import socket
import sys
import threading


def show(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


LIBTOA_COUNTERS = ["lookups", "no_table", "found", "waits", "waits_caught_up", "waits_timed_out"]
closed = 0
closed_lock = threading.Lock()


def write_libtoa_counters(path):
    """Writes this process's libtoa counters to `path` (atomically: a new file renamed)."""
    import ctypes
    import os

    counter = ctypes.CDLL(None).toa_libtoa_counter
    counter.restype = ctypes.c_uint64
    counter.argtypes = [ctypes.c_uint32]
    text = f"connections={closed}\n" + "".join(f"{n}={counter(i)}\n" for i, n in enumerate(LIBTOA_COUNTERS))
    with open(path + ".new", "w") as f:
        f.write(text)
    os.rename(path + ".new", path)


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # Dual-stack when listening on [::], as Go and Java do by default.
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((host, port))
    srv.listen(4096)
    print("listening on", show(srv.getsockname()), flush=True)
    while True:
        conn, accepted = srv.accept()
        threading.Thread(target=answer, args=(conn, accepted), daemon=True).start()


def answer(conn, accepted):
    with conn:
        try:
            for _ in conn.makefile("rb"):
                reply = f"accept={show(accepted)} peer={show(conn.getpeername())}"
                if "--sockname" in sys.argv:
                    reply += f" sock={show(conn.getsockname())}"
                conn.sendall((reply + "\n").encode())
        except OSError:
            pass
    if "--libtoa-counters" in sys.argv:
        global closed
        with closed_lock:
            closed += 1
            write_libtoa_counters(sys.argv[sys.argv.index("--libtoa-counters") + 1])


if __name__ == "__main__":
    main()
