//! Regression tests of the WebSocket and token findings of issue 8: a Ping
//! flood that grew memory (1), issuer and audience of external tokens (5),
//! `exp` near `u64::MAX` (7), a refresh that changed the role (8) and `nbf` (11).
//!
//! The flood test runs the real binary (as `logs` does) and watches its VmRSS,
//! so it sees the memory an operator would see.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::helpers::{DataDir, WAIT};
use crate::logs::Binary;

/// A client Ping frame with the largest payload a control frame may carry
/// (125 bytes), masked with a zero key (legal, and the payload stays readable).
fn masked_ping() -> Vec<u8> {
    let mut frame = vec![0x89, 0x80 | 125, 0, 0, 0, 0];
    frame.extend(std::iter::repeat_n(b'p', 125));
    frame
}

/// Opens a WebSocket by hand and reads exactly the 101 response, nothing more.
fn raw_websocket(addr: SocketAddr, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect to the binary");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let request = format!(
        "GET /api/v1/ws/connect?token={token} HTTP/1.1\r\nHost: {addr}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).expect("read the 101"), 1, "EOF in the handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
    stream
}

/// Resident memory of process `pid` in KiB (Linux `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// Finding 1: five sockets of one user send Pings as fast as they can and never
/// read. Every client frame costs a frame-rate token, and the bytes held per
/// socket are bounded, so the server closes them (4429, or the TCP connection
/// ends) and its memory stays put. Before the fix the sockets stayed open and
/// the process grew by hundreds of MiB within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_that_never_reads_is_closed_and_memory_stays_bounded() {
    const SOCKETS: usize = 5;
    // How long a socket may keep flooding before the test calls it "not closed".
    const FLOOD_LIMIT: Duration = Duration::from_secs(20);
    const GROWTH_LIMIT_KIB: u64 = 64 * 1024;

    let dir = DataDir::new();
    let secret = "JwtSecretValue0123456789abcdefXYZ";
    let server = Binary::start(&dir.0, &[("JWT_SECRET", secret), ("RUST_LOG", "info")]);
    let pid = server.child.id();
    let claims = crate::helpers::claims("flooder", agentcast::auth::Role::User, "default", 3600);
    let token = crate::helpers::sign(jsonwebtoken::Algorithm::HS256, secret, &claims);
    let sockets: Vec<TcpStream> = (0..SOCKETS)
        .map(|_| raw_websocket(server.addr, &token))
        .collect();
    let baseline = rss_kib(pid);

    let burst: Vec<u8> = masked_ping().repeat(512);
    let flooders: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            let burst = burst.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                while started.elapsed() < FLOOD_LIMIT {
                    if socket.write_all(&burst).is_err() {
                        return true;
                    }
                }
                false
            })
        })
        .collect();
    let mut peak = baseline;
    while !flooders.iter().all(|f| f.is_finished()) {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    peak = peak.max(rss_kib(pid));
    let closed = flooders
        .into_iter()
        .map(|f| f.join().unwrap())
        .filter(|&closed| closed)
        .count();
    eprintln!(
        "ping flood: RSS baseline {baseline} KiB, peak {peak} KiB, growth {} KiB; {closed}/{SOCKETS} sockets closed",
        peak - baseline
    );
    assert_eq!(closed, SOCKETS, "every flooding socket is closed by the server");
    assert!(
        peak - baseline < GROWTH_LIMIT_KIB,
        "RSS grew by {} KiB (baseline {baseline} KiB, peak {peak} KiB)",
        peak - baseline
    );
    // The server is still fine.
    let health = server.http.get(format!("http://{}/health", server.addr)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    server.stop();
}
