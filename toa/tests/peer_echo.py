#!/usr/bin/env python3
"""A server that knows nothing of TOA (the Python twin of examples/peer_echo.rs).

For each line a client sends: answer with the address accept() returned for the connection
and the one getpeername() returns now (and with --sockname, what getsockname() returns); close
when the client does. Usage: peer_echo.py HOST PORT [--sockname]
"""
import socket
import sys
import threading


def show(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # Dual-stack when listening on [::], as Go and Java do by default.
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((host, port))
    srv.listen(128)
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


if __name__ == "__main__":
    main()
