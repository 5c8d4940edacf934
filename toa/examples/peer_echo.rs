//! A server that knows nothing of TOA: for each line a client sends it answers with the address
//! `accept()` returned for that connection and the one `getpeername()` returns now; it closes
//! when the client does. Used by the end-to-end tests; also handy to check a backend by hand
//! with `toa probe`.
//!
//! Usage: peer_echo LISTEN_ADDR   (prints "listening on ADDR" once bound)

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
};

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "[::]:8080".to_owned());
    let listener = TcpListener::bind(&addr)?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let Ok((stream, accepted)) = listener.accept() else { continue };
        // A thread per connection: a client may keep its connection open.
        std::thread::spawn(move || answer(stream, accepted));
    }
}

fn answer(stream: TcpStream, accepted: SocketAddr) {
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|e| e.to_string());
        if writeln!(&stream, "accept={accepted} peer={peer}").is_err() {
            break;
        }
        line.clear();
    }
}
