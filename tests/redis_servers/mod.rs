//! Private Redis servers and clusters for tests that restart, pause or kill them, so that the
//! shared Redis at `REDIS_URL` (and the cluster at `REDIS_CLUSTER_URL`) stay healthy for the
//! other tests. Each server is a `redis-server` child process on a free loopback port, with a
//! directory of its own; it is killed when dropped.
//!
//! Tests using them need `redis-server` (and `redis-cli` for clusters) on the `PATH`; they
//! run when `REDIS_URL` is set, as that says a Redis installation is at hand.
#![allow(dead_code, unreachable_pub)]

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A port on loopback that is free now, and whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 20_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// `redis-cli -p port args...`, its standard output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One `redis-server` child process.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Whether the tests on private servers run: where a Redis installation is at hand, as a set
/// `REDIS_URL` says (skipped otherwise, and a failure under `CI=true`).
pub fn private_servers(test: &str) -> bool {
    crate::common::service_url("REDIS_URL", test).is_some()
}

impl RedisServer {
    /// A server that keeps nothing on disk and takes `DEBUG` commands (`DEBUG SLEEP` pauses it).
    pub fn start_debuggable() -> Self {
        Self::start(&[
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
        ])
    }

    /// Starts `redis-server` on a free port with `args` (its own `--port`, `--dir` and
    /// `--bind` come first), and waits until it answers `PING`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_on(free_port(), args)
    }

    /// As [`start`](Self::start), on `port`.
    pub fn start_on(port: u16, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-redis-{port}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (is it installed?)");
        let server = Self {
            port,
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while cli(port, &["PING"]).trim() != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `check` holds, polling every 50 ms; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a replica of `master`, and waits until its link to the master is up.
pub fn replica_of(master: &RedisServer) -> RedisServer {
    let replica = RedisServer::start(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--replicaof",
        "127.0.0.1",
        &master.port.to_string(),
    ]);
    wait_until("the replica's link", Duration::from_secs(10), || {
        replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
    });
    // WAIT counts only replicas the master sees online (past the initial sync), so wait for
    // the master's side too: otherwise a loaded machine fails WAIT right after the link is up.
    let port = format!("port={},state=online", replica.port);
    wait_until(
        "the master's replica online",
        Duration::from_secs(10),
        || master.cli(&["INFO", "replication"]).contains(&port),
    );
    replica
}

/// A private Redis Cluster: three masters, each with its replicas, no persistence.
pub struct RedisCluster {
    /// Masters first, then replicas, as `redis-cli --cluster create` was given them.
    pub nodes: Vec<RedisServer>,
    replicas: usize,
}

impl RedisCluster {
    /// Starts `3 * (1 + replicas)` cluster-enabled servers with `cluster-node-timeout`
    /// `node_timeout_ms`, joins them with `redis-cli --cluster create --cluster-replicas
    /// <replicas>`, and waits until every node says `cluster_state:ok` and every master has
    /// its replicas online.
    pub fn start(node_timeout_ms: u64, replicas: usize) -> Self {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
            .map(|_| {
                RedisServer::start(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &timeout,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes, replicas };
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    /// Waits until every live node says `cluster_state:ok`, every master has its replicas
    /// online, and every replica its link to the master up.
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_until("cluster_state:ok", timeout, || {
            self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let replication = n.cli(&["INFO", "replication"]);
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && if replication.contains("role:master") {
                        replication.contains(&format!("connected_slaves:{}", self.replicas))
                            && replication.matches("state=online").count() == self.replicas
                    } else {
                        replication.contains("master_link_status:up")
                    }
            })
        });
    }

    /// The seed URL list: every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node serving `slot` as master now.
    pub fn master_of_slot(&self, slot: u16) -> usize {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.child.is_none() || !node.cli(&["ROLE"]).starts_with("master") {
                continue;
            }
            let myself = node.cli(&["CLUSTER", "MYID"]);
            let nodes = node.cli(&["CLUSTER", "NODES"]);
            for line in nodes.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 9 || fields[0] != myself.trim() {
                    continue;
                }
                for range in &fields[8..] {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>())
                        && (lo..=hi).contains(&slot)
                    {
                        return i;
                    }
                }
            }
        }
        panic!("no master serves slot {slot}");
    }
}

/// A TCP proxy on a free loopback port to `upstream`, whose replies (upstream to client) stop
/// while it is held: what passes through stays unread in the upstream's socket.
pub struct HoldingProxy {
    pub port: u16,
    hold: tokio::sync::watch::Sender<bool>,
}

impl HoldingProxy {
    /// Starts forwarding to `127.0.0.1:upstream`, not held.
    pub async fn start(upstream: u16) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (hold, held) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut held = held.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    loop {
                        if held.wait_for(|held| !held).await.is_err() {
                            return;
                        }
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        // Read before the hold began: held back as well.
                        if held.wait_for(|held| !held).await.is_err() {
                            return;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, hold }
    }

    /// Holds (`true`) or releases (`false`) the replies.
    pub fn hold(&self, held: bool) {
        self.hold.send_replace(held);
    }
}
