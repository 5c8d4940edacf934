#!/usr/bin/env python3
"""A server that asks for the VPC id and virtual address the way the applications of Alibaba's
VTOA module do (OceanBase, obproxy): getsockopt(IPPROTO_IP, VTOA_SO_GET_VS = 1345) into
struct vtoa_get_vs { u32 vid; __be32 vaddr; __be16 vport; } (12 bytes; vid read as a native
number, as they do). For each line it answers "vid=N vip=ADDR:PORT peer=ADDR" ("vs=none" when
the kernel answers with an error). Usage: vtoa_echo.py HOST PORT
"""
import socket
import struct
import sys
import threading

VTOA_SO_GET_VS = 1345


def show(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def lookup(conn):
    try:
        raw = conn.getsockopt(socket.IPPROTO_IP, VTOA_SO_GET_VS, 12)
    except OSError:
        return "vs=none"
    vid, vaddr, vport = struct.unpack("=I4sH2x", raw[:12])
    return f"vid={vid} vip={socket.inet_ntoa(vaddr)}:{socket.ntohs(vport)}"


def answer(conn):
    with conn:
        try:
            for _ in conn.makefile("rb"):
                conn.sendall(f"{lookup(conn)} peer={show(conn.getpeername())}\n".encode())
        except OSError:
            pass


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    print("listening on", show(srv.getsockname()), flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
