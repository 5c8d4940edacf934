#!/usr/bin/env python3
"""A UDP server that knows nothing of UOA: it answers each datagram, to the address recvfrom()
gave, with "from=ADDR:PORT data=PAYLOAD".

With --connect it serves each new peer from a socket of its own, bound to the same port
(SO_REUSEPORT) and connected to the peer, as some QUIC and game servers do: the answer goes out
with send() and says "from=ADDR:PORT peer=GETPEERNAME data=PAYLOAD"; later datagrams of that
peer arrive on its socket. Usage: udp_echo.py HOST PORT [--connect]
"""
import select
import socket
import sys


def show(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bound(family, host, port, reuse):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        # Dual-stack when bound to [::].
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    return sock


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    connect = "--connect" in sys.argv
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = bound(family, host, port, connect)
    print("listening on", show(listener.getsockname()), flush=True)
    connected = {}
    while True:
        ready, _, _ = select.select([listener, *connected.values()], [], [])
        for sock in ready:
            data, addr = sock.recvfrom(65535)
            text = data.decode(errors="replace")
            if not connect:
                sock.sendto(f"from={show(addr)} data={text}".encode(), addr)
                continue
            if sock is listener:
                own = bound(family, host, port, True)
                own.connect(addr)
                connected[addr] = own
                sock = own
            sock.send(f"from={show(addr)} peer={show(sock.getpeername())} data={text}".encode())


if __name__ == "__main__":
    main()
