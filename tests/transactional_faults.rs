//! A store outage longer than the lease, on the reference API with `--store postgres`, whose
//! creates commit their rows and their idempotency record in one transaction. Durable
//! completion cannot cover an outage past the lease (the lease runs out and a duplicate takes
//! the key over); the fencing token in the handler's transaction does: a handler that lost its
//! lease cannot commit, so every create leaves exactly one resource however often it ran.
//!
//! Three instances reach PostgreSQL through one TCP fault proxy, lease 2 s; 60 creates, each
//! sent by two clients that give up after 1 s and retry on the next instance until they get a
//! 2xx; a 5 s partition of the database starts while the creates run.
//!
//! Needs `DATABASE_URL`; skipped without it, except under `CI=true`.
#![cfg(feature = "postgres")]

mod common;
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/seed_api/main.rs"]
mod seed_api;
mod support;

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::proxy::{FaultProxy, NetFault};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};

const CREATES: usize = 60;
const CLIENTS_PER_CREATE: usize = 2;
const OUTAGE: Duration = Duration::from_secs(5);
const GIVE_UP: Duration = Duration::from_secs(45);

/// `url` with its host and port replaced by `proxy`, and the host and port it named.
fn through(url: &str, proxy: SocketAddr) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (format!("{userinfo}@"), host_port),
        None => (String::new(), authority),
    };
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    (format!("{scheme}://{userinfo}{proxy}{tail}"), host_port)
}

async fn start(database_url: &str) -> SocketAddr {
    let config = seed_api::Config::parse_from([
        "seed_api",
        "--store",
        "postgres",
        "--database-url",
        database_url,
        "--lease-secs",
        "2",
        "--handler-delay-ms",
        "300",
    ]);
    let (store, resources) = seed_api::build(&config).await.expect("store");
    let (app, _drain) = seed_api::app_with(&config, store, resources);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Retries create `n` until a 2xx; the id it got.
async fn client(
    http: reqwest::Client,
    instances: Vec<SocketAddr>,
    org: String,
    n: usize,
    first: usize,
) -> Result<String, String> {
    let started = Instant::now();
    let body = json!({ "name": format!("create-{n}") });
    let mut attempt = first;
    loop {
        if started.elapsed() > GIVE_UP {
            return Err(format!("create-{n}: no 2xx after {GIVE_UP:?}"));
        }
        let instance = instances[attempt % instances.len()];
        attempt += 1;
        let sent = http
            .post(format!("http://{instance}/agents"))
            .bearer_auth(&org)
            .header("x-idempotency-key", format!("create-{n}"))
            .json(&body)
            .send()
            .await;
        if let Ok(response) = sent
            && response.status() == StatusCode::CREATED
            && let Ok(created) = response.json::<Value>().await
        {
            return Ok(created["data"]["id"].as_str().unwrap().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_lease_leaves_one_resource_per_create() {
    let Some(url) = common::service_url("DATABASE_URL", "this PostgreSQL test") else {
        return;
    };
    let direct = PgPool::connect(&url).await.expect("PostgreSQL answers");
    let probe = through(&url, "127.0.0.1:1".parse().unwrap());
    let upstream = support::proxy::resolve(&probe.1).await;
    let proxy = std::sync::Arc::new(FaultProxy::start(upstream).await);
    let (proxied, _) = through(&url, proxy.addr());

    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(start(&proxied).await);
    }
    let org = format!("org_{}", uuid::Uuid::new_v4().simple());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();

    let mut clients = JoinSet::new();
    for n in 0..CREATES {
        for c in 0..CLIENTS_PER_CREATE {
            let (http, instances, org) = (http.clone(), instances.clone(), org.clone());
            clients.spawn(async move { (n, client(http, instances, org, n, n + c).await) });
        }
        if n == CREATES / 3 {
            proxy.set(NetFault::Blackhole);
            let heal = proxy.clone();
            tokio::spawn(async move {
                tokio::time::sleep(OUTAGE).await;
                heal.set(NetFault::Pass);
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); CREATES];
    while let Some(joined) = clients.join_next().await {
        let (n, id) = joined.unwrap();
        ids[n].push(id.unwrap_or_else(|error| panic!("{error}")));
    }

    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT data->>'name', id FROM seed_api_resources WHERE org = $1 ORDER BY seq",
    )
    .bind(&org)
    .fetch_all(&direct)
    .await
    .unwrap();
    let mut duplicates = 0;
    for (n, seen) in ids.iter().enumerate() {
        let name = format!("create-{n}");
        let made: Vec<&String> = rows
            .iter()
            .filter(|(row, _)| *row == name)
            .map(|(_, id)| id)
            .collect();
        duplicates += made.len().saturating_sub(1);
        assert_eq!(made.len(), 1, "{name}: resources {made:?}");
        for id in seen {
            assert_eq!(id, made[0], "{name}: a client got another id");
        }
    }
    println!(
        "{CREATES} creates x {CLIENTS_PER_CREATE} clients, lease 2 s, outage {OUTAGE:?}: {} \
         resources, {duplicates} duplicates",
        rows.len()
    );
    assert_eq!(rows.len(), CREATES);
}
