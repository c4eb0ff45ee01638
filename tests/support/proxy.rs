//! [`FaultProxy`]: a TCP proxy on loopback whose [`NetFault`] can be changed while it runs,
//! to put a store (Redis, PostgreSQL) behind a slow, partitioned or crashed network.
//!
//! Bytes are never dropped, duplicated or reordered inside a connection: a partition stops
//! them and lets them flow again later, as TCP does; only [`NetFault::Reset`] ends connections,
//! as a crashed server does. Each direction of a connection buffers at most
//! [`BUFFERED_CHUNKS`] chunks of at most [`CHUNK`] bytes; past that it stops reading, and TCP's
//! own flow control holds the sender back.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, watch},
    time::Instant,
};

/// The largest chunk read at once, in bytes.
pub const CHUNK: usize = 16 * 1024;
/// Chunks buffered per direction of a connection at most (with [`NetFault::Latency`] or a
/// partition).
pub const BUFFERED_CHUNKS: usize = 16;

/// What the network between the clients and the upstream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFault {
    /// Bytes flow as they come.
    Pass,
    /// Every chunk is delivered this long after it was read, in both directions.
    Latency(Duration),
    /// A partition: nothing flows either way, on existing and new connections, and nothing is
    /// lost; once the fault changes, what was sent flows on, in order.
    Blackhole,
    /// A crashed server: every open connection is closed, and new ones are closed as soon as
    /// they are accepted.
    Reset,
}

#[derive(Debug, Clone, Copy)]
struct State {
    fault: NetFault,
    /// How many times [`NetFault::Reset`] was set: a connection opened before a reset ends.
    resets: u64,
}

/// A TCP proxy on `127.0.0.1` to one upstream address, with a fault that can be changed at any
/// time. Dropping it ends the proxy and every connection through it.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<watch::Sender<State>>,
    accepted: Arc<AtomicUsize>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free loopback port, with [`NetFault::Pass`].
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(watch::Sender::new(State {
            fault: NetFault::Pass,
            resets: 0,
        }));
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio::spawn(accept(
            listener,
            upstream,
            state.subscribe(),
            accepted.clone(),
        ));
        Self {
            addr,
            state,
            accepted,
            acceptor,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the fault, for open and new connections alike.
    pub fn set(&self, fault: NetFault) {
        self.state.send_modify(|state| {
            if fault == NetFault::Reset {
                state.resets += 1;
            }
            state.fault = fault;
        });
    }

    /// The fault in effect.
    pub fn fault(&self) -> NetFault {
        self.state.borrow().fault
    }

    /// Connections accepted so far (closed ones and refused ones included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        // Every connection task watches the state: closing it ends them all.
        self.state.send_modify(|state| state.resets += 1);
    }
}

/// Resolves `host:port` (as in a store URL) to its first address.
pub async fn resolve(host_port: &str) -> SocketAddr {
    tokio::net::lookup_host(host_port)
        .await
        .unwrap_or_else(|e| panic!("resolve {host_port}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("{host_port} has no address"))
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    state: watch::Receiver<State>,
    accepted: Arc<AtomicUsize>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let born = *state.borrow();
        if born.fault == NetFault::Reset {
            drop(client);
            continue;
        }
        let _ = client.set_nodelay(true);
        tokio::spawn(connection(client, upstream, state.clone(), born.resets));
    }
}

/// Proxies one connection until either side closes it, or a reset (or the proxy's end) after
/// `born` ends it.
async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut state: watch::Receiver<State>,
    born: u64,
) {
    let reset = {
        let mut state = state.clone();
        async move {
            let _ = state.wait_for(|s| s.resets != born).await;
        }
    };
    let work = async {
        // The upstream connection is made only once bytes may flow: a partition holds the
        // handshake back too.
        if !flowing(&mut state, born).await {
            return;
        }
        let Ok(server) = TcpStream::connect(upstream).await else {
            return;
        };
        let _ = server.set_nodelay(true);
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        // The end of one direction is passed on (a shutdown), and the peer then closes the
        // other: stop only once both are done, so that what a peer sent last is delivered.
        tokio::join!(
            pipe(client_read, server_write, state.clone(), born),
            pipe(server_read, client_write, state.clone(), born),
        );
    };
    tokio::select! {
        () = reset => {}
        () = work => {}
    }
}

/// Waits until bytes may flow; `false` once the connection must end.
async fn flowing(state: &mut watch::Receiver<State>, born: u64) -> bool {
    match state
        .wait_for(|s| s.resets != born || s.fault != NetFault::Blackhole)
        .await
    {
        Ok(s) => s.resets == born,
        Err(_) => false,
    }
}

/// One direction: a reader that stamps each chunk as it reads it, and a writer that delivers it
/// once the latency in effect has passed since, and only while no partition holds it.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    state: watch::Receiver<State>,
    born: u64,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(BUFFERED_CHUNKS);
    let reader = {
        let mut state = state.clone();
        async move {
            loop {
                if !flowing(&mut state, born).await {
                    return;
                }
                let mut buf = vec![0; CHUNK];
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send((Instant::now(), buf)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let writer = {
        let mut state = state.clone();
        async move {
            while let Some((read_at, chunk)) = rx.recv().await {
                loop {
                    if !flowing(&mut state, born).await {
                        return;
                    }
                    let latency = match state.borrow().fault {
                        NetFault::Latency(latency) => latency,
                        _ => Duration::ZERO,
                    };
                    let due = read_at + latency;
                    if Instant::now() >= due {
                        break;
                    }
                    // Look again when due, or sooner if the fault changes.
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        _ = state.changed() => {}
                    }
                }
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            // The reader saw the end of the stream: pass it on.
            let _ = to.shutdown().await;
        }
    };
    // A reader that saw the end of the stream lets the writer deliver what is left; a writer
    // that failed ends the reader. Dropping this future (a reset) ends both at once.
    let (reader, writer) = (std::pin::pin!(reader), std::pin::pin!(writer));
    match futures_util::future::select(reader, writer).await {
        futures_util::future::Either::Left(((), writer)) => writer.await,
        futures_util::future::Either::Right(((), _reader)) => {}
    }
}
