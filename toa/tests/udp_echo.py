#!/usr/bin/env python3
"""A UDP server that knows nothing of UOA: it answers each datagram, to the address recvfrom()
gave, with "from=ADDR:PORT data=PAYLOAD". Usage: udp_echo.py HOST PORT
"""
import socket
import sys


def show(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        # Dual-stack when bound to [::].
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    print("listening on", show(sock.getsockname()), flush=True)
    while True:
        data, addr = sock.recvfrom(65535)
        sock.sendto(f"from={show(addr)} data={data.decode(errors='replace')}".encode(), addr)


if __name__ == "__main__":
    main()
