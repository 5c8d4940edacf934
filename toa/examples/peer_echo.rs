//! A server that knows nothing of TOA: for each connection it reads one line and answers with
//! the address `accept()` returned and the one `getpeername()` returns after that read.
//! Used by the end-to-end tests; also handy to check a backend by hand with `toa probe`.
//!
//! Usage: peer_echo LISTEN_ADDR   (prints "listening on ADDR" once bound)

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
};

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "[::]:8080".to_owned());
    let listener = TcpListener::bind(&addr)?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let Ok((stream, accepted)) = listener.accept() else { continue };
        let accepted = Ok(accepted);
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let peer = stream.peer_addr();
        let show = |a: std::io::Result<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|e| e.to_string());
        let _ = writeln!(&stream, "accept={} peer={}", show(accepted), show(peer));
    }
}
