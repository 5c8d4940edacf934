#!/usr/bin/env python3
"""A server that asks for the client the way the NAT64 patches of nginx/OpenResty do:
getsockopt(IPPROTO_IP, TOA_SO_GET_LOOKUP = 4096) into struct toa_nat64_peer
{ struct in6_addr saddr; uint16_t port; } (20 bytes). For each line it answers
"lookup=[ADDR]:PORT peer=ADDR" (lookup=none when the kernel answers with an error).

With --vtoa it asks instead what the applications of Alibaba's VTOA module ask (OceanBase,
obproxy): getsockopt(IPPROTO_IP, VTOA_SO_GET_VS = 1345) into struct vtoa_get_vs { u32 vid;
__be32 vaddr; __be16 vport; } (12 bytes; vid read as a native number, as they do), and answers
"vid=N vip=ADDR:PORT peer=ADDR" ("vs=none" on an error).

With --vs4rds it asks as OceanBase's servers do: VTOA_SO_GET_VS4RDS = 1346 into struct
vtoa_get_vs4rds { u16 protocol; __be32 caddr; __be16 cport; __be32 daddr; __be16 dport;
struct vtoa_vs entrytable; } (exactly 32 bytes; the caller's own fields are what it got from
getpeername and getsockname), and answers "proto=N caddr=ADDR:PORT daddr=ADDR:PORT vid=N
vip=ADDR:PORT badlen=none|answered peer=ADDR" (badlen: the same call with 36 bytes, which the
module refuses).

With --vni it asks ByteDance's TOA_SO_GET_VNI = 2064 (a native unsigned int) and answers
"vni=N peer=ADDR" ("vni=none" on an error).
Usage: nat64_echo.py HOST PORT [--vtoa | --vs4rds | --vni]
"""
import ipaddress
import socket
import struct
import sys
import threading

TOA_SO_GET_LOOKUP = 4096
VTOA_SO_GET_VS = 1345
VTOA_SO_GET_VS4RDS = 1346
TOA_SO_GET_VNI = 2064


def show(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def get(conn, option, length):
    """The bytes getsockopt(IPPROTO_IP, option) gives in a buffer of length, None on an error."""
    try:
        return conn.getsockopt(socket.IPPROTO_IP, option, length)
    except OSError:
        return None


def ipv4(raw, port):
    return f"{socket.inet_ntoa(raw)}:{socket.ntohs(port)}"


def lookup(conn):
    raw = get(conn, TOA_SO_GET_LOOKUP, 20)
    if raw is None:
        return "lookup=none"
    saddr, port = struct.unpack("!16sH", raw[:18])
    addr = ipaddress.IPv6Address(saddr)
    # Written ::ffff:a.b.c.d whatever Python's version prints.
    text = f"::ffff:{addr.ipv4_mapped}" if addr.ipv4_mapped else str(addr)
    return f"lookup=[{text}]:{port}"


def vtoa(conn):
    raw = get(conn, VTOA_SO_GET_VS, 12)
    if raw is None:
        return "vs=none"
    vid, vaddr, vport = struct.unpack("=I4sH2x", raw[:12])
    return f"vid={vid} vip={ipv4(vaddr, vport)}"


def vs4rds(conn):
    raw = get(conn, VTOA_SO_GET_VS4RDS, 32)
    if raw is None:
        return "rds=none"
    proto, caddr, cport, daddr, dport, vid, vaddr, vport = struct.unpack("=H2x4sH2x4sH2xI4sH2x", raw)
    badlen = "none" if get(conn, VTOA_SO_GET_VS4RDS, 36) is None else "answered"
    return (
        f"proto={proto} caddr={ipv4(caddr, cport)} daddr={ipv4(daddr, dport)} "
        f"vid={vid} vip={ipv4(vaddr, vport)} badlen={badlen}"
    )


def vni(conn):
    raw = get(conn, TOA_SO_GET_VNI, 4)
    return "vni=none" if raw is None else f"vni={struct.unpack('=I', raw)[0]}"


def answer(conn, ask):
    with conn:
        try:
            for _ in conn.makefile("rb"):
                conn.sendall(f"{ask(conn)} peer={show(conn.getpeername())}\n".encode())
        except OSError:
            pass


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    asks = {"--vtoa": vtoa, "--vs4rds": vs4rds, "--vni": vni}
    ask = next((asks[a] for a in sys.argv[3:] if a in asks), lookup)
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    print("listening on", show(srv.getsockname()), flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=answer, args=(conn, ask), daemon=True).start()


if __name__ == "__main__":
    main()
