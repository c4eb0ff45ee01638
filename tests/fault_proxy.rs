//! The TCP fault proxy (`support::proxy::FaultProxy`) that the store fault runs put between the
//! instances and their store, against an echo server: it forwards both ways; a blackhole holds
//! every byte, on open and new connections, and delivers them in order when it ends; latency
//! delays each direction; a reset closes open connections and refuses new ones until it ends.
//!
//! Built with a store feature (`redis`, `postgres` or `mysql`), as the fault runs are.
#![cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]

mod support;

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::{Instant, timeout},
};

use support::proxy::{FaultProxy, NetFault};

/// An echo server on a free loopback port.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = conn.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

async fn read_exactly(conn: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(Duration::from_secs(10), conn.read_exact(&mut buf))
        .await
        .expect("bytes within 10 s")
        .expect("read");
    buf
}

/// Whether nothing arrives on `conn` within `wait`.
async fn silent(conn: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0; 1];
    timeout(wait, conn.read(&mut byte)).await.is_err()
}

#[tokio::test]
async fn pass_forwards_both_ways() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    conn.write_all(b"hello").await.unwrap();
    assert_eq!(read_exactly(&mut conn, 5).await, b"hello");
}

#[tokio::test]
async fn blackhole_holds_every_byte_on_old_and_new_connections_then_delivers_them_in_order() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
    old.write_all(b"before ").await.unwrap();
    assert_eq!(read_exactly(&mut old, 7).await, b"before ");

    proxy.set(NetFault::Blackhole);
    // More than one chunk, written in many pieces, from an open and a new connection.
    let payload: Vec<u8> = (0..100_000u32).map(|n| (n % 251) as u8).collect();
    for piece in payload.chunks(1000) {
        old.write_all(piece).await.unwrap();
    }
    let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
    new.write_all(b"new").await.unwrap();
    assert!(silent(&mut old, Duration::from_millis(300)).await);
    assert!(silent(&mut new, Duration::from_millis(50)).await);

    proxy.set(NetFault::Pass);
    assert_eq!(read_exactly(&mut old, payload.len()).await, payload);
    assert_eq!(read_exactly(&mut new, 3).await, b"new");
}

#[tokio::test]
async fn latency_delays_each_direction() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.set(NetFault::Latency(Duration::from_millis(200)));
    let sent = Instant::now();
    conn.write_all(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut conn, 4).await, b"ping");
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(400), "round trip {took:?}");

    proxy.set(NetFault::Pass);
    let sent = Instant::now();
    conn.write_all(b"pong").await.unwrap();
    assert_eq!(read_exactly(&mut conn, 4).await, b"pong");
    assert!(sent.elapsed() < Duration::from_millis(200));
}

#[tokio::test]
async fn reset_closes_open_connections_and_refuses_new_ones_until_it_ends() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
    old.write_all(b"up").await.unwrap();
    assert_eq!(read_exactly(&mut old, 2).await, b"up");

    proxy.set(NetFault::Reset);
    let mut buf = [0; 8];
    let read = timeout(Duration::from_secs(10), old.read(&mut buf))
        .await
        .expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
    let _ = refused.write_all(b"anyone?").await;
    let read = timeout(Duration::from_secs(10), refused.read(&mut buf))
        .await
        .expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    proxy.set(NetFault::Pass);
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    again.write_all(b"back").await.unwrap();
    assert_eq!(read_exactly(&mut again, 4).await, b"back");
}
