//! A server that asks for the client address with `toa-client` (`toa_client::client_addr`), the crate applications link, for
//! the cases `getpeername()` cannot carry (NAT64: an IPv6 client on an IPv4 socket). For each
//! line it answers `client=ADDR peer=ADDR` (client `none` when there is none); with `--vtoa`
//! also `vpc=ID vip=ADDR` from `toa_client::virtual_server` (`vs=none` when there is none).
//!
//! Usage: client_addr LISTEN_ADDR [--vtoa]   (prints "listening on ADDR" once bound)

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
};

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "0.0.0.0:8080".to_owned());
    let listener = TcpListener::bind(&addr)?;
    println!("listening on {}", listener.local_addr()?);
    let vtoa = std::env::args().any(|a| a == "--vtoa");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || answer(stream, vtoa));
    }
    Ok(())
}

fn answer(stream: TcpStream, vtoa: bool) {
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        let client = match toa_client::client_addr(&stream) {
            Ok(Some(a)) => a.to_string(),
            Ok(None) => "none".to_owned(),
            Err(e) => format!("error:{e}"),
        };
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let vs = match (vtoa, toa_client::virtual_server(&stream)) {
            (false, _) => String::new(),
            (true, Ok(Some(vs))) => {
                format!(" vpc={} vip={}", vs.vpc_id, vs.vip.map_or("none".into(), |v| v.to_string()))
            }
            (true, Ok(None)) => " vs=none".to_owned(),
            (true, Err(e)) => format!(" vs=error:{e}"),
        };
        if writeln!(&stream, "client={client}{vs} peer={peer}").is_err() {
            break;
        }
        line.clear();
    }
}
