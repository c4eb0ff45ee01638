//! Running a script of [`RedisStore`](super::RedisStore): `EVALSHA`, or `EVAL` with its
//! source on a server that has not seen it; `WAIT` for replicas in the same pipeline; and the
//! release of a lease that a `begin` without an answer may have taken.

use futures_util::FutureExt;
use redis::{ErrorKind, RedisResult, ServerErrorKind, Value};

use super::{
    RedisStore,
    durability::NotAcknowledged,
    scripts::{LuaScript, RELEASE},
};
use crate::store::{LeaseToken, StoreError, StoreErrorKind, StoreKey};

impl RedisStore {
    /// Runs `script` on `key`; with `acknowledged` and [`wait_replicas`](Self::wait_replicas)
    /// set, followed by `WAIT` in the same pipeline (so on the same connection, right after the
    /// write), returning how many replicas acknowledged. A server that does not know the
    /// script (`NOSCRIPT`) gets it once more with its source.
    pub(super) async fn run(
        &self,
        script: &LuaScript,
        key: &str,
        args: &[&[u8]],
        acknowledged: bool,
    ) -> RedisResult<(Value, Option<i64>)> {
        let mut conn = self.conn.clone();
        let mut by_source = false;
        loop {
            let mut cmd = if by_source {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(&script.source);
                cmd
            } else {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(&script.hash);
                cmd
            };
            cmd.arg(1).arg(key);
            for arg in args {
                cmd.arg(*arg);
            }
            let result = match self.wait.filter(|_| acknowledged) {
                None => cmd
                    .query_async::<Value>(&mut conn)
                    .await
                    .map(|reply| (reply, None)),
                Some(wait) => {
                    let mut pipe = redis::pipe();
                    pipe.add_command(cmd)
                        .cmd("WAIT")
                        .arg(wait.replicas)
                        .arg(wait.timeout_ms);
                    pipe.query_async::<(Value, i64)>(&mut conn)
                        .await
                        .map(|(reply, acked)| (reply, Some(acked)))
                }
            };
            match result {
                Err(error)
                    if !by_source
                        && error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                {
                    by_source = true;
                }
                result => return result,
            }
        }
    }

    /// The error for a write that fewer replicas than asked for acknowledged, if so.
    pub(super) fn unacknowledged(&self, acked: Option<i64>) -> Option<StoreError> {
        let (wait, acked) = (self.wait?, acked?);
        (acked < i64::from(wait.replicas)).then(|| {
            StoreError::new(
                StoreErrorKind::Unavailable,
                "Redis replicas did not acknowledge the write in time",
            )
            .with_source(NotAcknowledged {
                wanted: wait.replicas,
                acknowledged: acked,
                timeout_ms: wait.timeout_ms,
            })
        })
    }

    /// A `begin` that failed without an answer (the connection broke, say) may still have
    /// run, and taken a lease under `token` that nobody will complete or release: the key
    /// would answer 409 until the lease ran out. So release it, best effort and without
    /// waiting: the release is queued at once on the same connection, behind the `begin`, and
    /// drops the lease only if `token` holds it. It is sent with its source (`EVAL`), since its
    /// answer, `NOSCRIPT` included, may come too late as well.
    pub(super) fn undo_begin(&self, key: &StoreKey, token: LeaseToken) {
        let mut release = redis::cmd("EVAL");
        release
            .arg(RELEASE)
            .arg(1)
            .arg(self.redis_key(key))
            .arg(&token.to_bytes()[..])
            .arg(self.publish.arg());
        let mut conn = self.conn.clone();
        let mut undo = Box::pin(async move {
            let _: redis::RedisResult<Value> = release.query_async(&mut conn).await;
        });
        if (&mut undo).now_or_never().is_none() {
            tokio::spawn(undo);
        }
    }
}
