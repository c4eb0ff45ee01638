//! The subscriber's bookkeeping, against a real Redis: the last waiter out of a channel has it
//! unsubscribed and forgotten, and a waiter that stays keeps it subscribed. Needs `REDIS_URL`;
//! skipped without it, except under `CI=true`.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::Subscriber;
use crate::store::test_services::{service_url, unique_name};

fn client(test: &str) -> Option<redis::Client> {
    let url = service_url("REDIS_URL", test)?;
    Some(redis::Client::open(url).expect("a valid REDIS_URL"))
}

/// A channel no other test run uses.
fn channel(test: &str) -> String {
    unique_name("idempotency-test", test, ':')
}

/// How many connections the server has subscribed to `channel`.
async fn subscribers(client: &redis::Client, channel: &str) -> i64 {
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    count
}

/// Whether the subscriber still keeps `channel` after up to `within`.
async fn still_kept(subscriber: &Subscriber, channel: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let kept = subscriber.channels.lock().unwrap().contains_key(channel);
        if !kept || Instant::now() >= deadline {
            return kept;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_last_waiter_out_has_the_channel_forgotten_and_unsubscribed() {
    let Some(client) = client("the_last_waiter_out_has_the_channel_forgotten") else {
        return;
    };
    let subscriber = Subscriber::single(&client, Duration::from_millis(500))
        .await
        .unwrap();
    let channel = channel("forgotten");
    subscriber
        .wait(&channel, async { Ok(true) }, Duration::from_millis(300))
        .await;
    assert!(
        !still_kept(&subscriber, &channel, Duration::from_secs(5)).await,
        "a channel nobody waits on any more is forgotten"
    );
    assert_eq!(subscriber.waiters(&channel), 0);
    assert_eq!(subscribers(&client, &channel).await, 0, "and unsubscribed");
}

#[tokio::test]
async fn a_waiter_that_stays_is_still_woken_after_another_leaves() {
    let Some(client) = client("a_waiter_that_stays_is_still_woken") else {
        return;
    };
    let subscriber = Subscriber::single(&client, Duration::from_millis(500))
        .await
        .unwrap();
    let channel = channel("stays");
    let stays = {
        let subscriber = Arc::clone(&subscriber);
        let channel = channel.clone();
        tokio::spawn(async move {
            subscriber
                .wait(&channel, async { Ok(true) }, Duration::from_secs(30))
                .await;
        })
    };
    // The first waiter is subscribed before the second one comes and goes.
    let subscribed = Instant::now() + Duration::from_secs(5);
    while subscribers(&client, &channel).await == 0 {
        assert!(Instant::now() < subscribed, "the staying waiter subscribes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    subscriber
        .wait(&channel, async { Ok(true) }, Duration::from_millis(300))
        .await;
    assert_eq!(subscriber.waiters(&channel), 1);
    // Let what the leaving waiter set off run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(still_kept(&subscriber, &channel, Duration::ZERO).await);
    assert_eq!(subscribers(&client, &channel).await, 1);

    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg("")
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), stays)
        .await
        .expect("the staying waiter is woken by the message, not by its 30 s timeout")
        .unwrap();
}

/// A waiter that comes just as the last one leaves, and subscribes before the leaving one's
/// unsubscribing task runs, keeps its subscription: the task looks at the count again.
#[tokio::test]
async fn a_waiter_that_comes_as_the_last_one_leaves_stays_subscribed() {
    let Some(client) = client("a_waiter_that_comes_as_the_last_one_leaves") else {
        return;
    };
    let subscriber = Subscriber::single(&client, Duration::from_millis(500))
        .await
        .unwrap();
    let channel = channel("comes");
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    subscriber
        .wait(&channel, async { Ok(true) }, Duration::from_millis(200))
        .await;
    // On this one thread, the leaving waiter's task has not run yet: the next waiter counts
    // itself and starts subscribing first.
    let started = Instant::now();
    let ((), ()) = tokio::join!(
        subscriber.wait(&channel, async { Ok(true) }, Duration::from_secs(10)),
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _: i64 = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg("")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "woken by the message, not by its 10 s timeout ({:?})",
        started.elapsed()
    );
}
