//! The SQL of [`PostgresStore`](super::PostgresStore), built once per table name.

use std::sync::Arc;

/// The SQL of every statement, built once for the table name.
pub(super) struct Statements {
    pub(super) table: String,
    pub(super) create_table: Arc<str>,
    pub(super) create_index: Arc<str>,
    /// Adds the `waited` column to a table made before it existed.
    pub(super) add_waited: Arc<str>,
    pub(super) begin: Arc<str>,
    pub(super) renew: Arc<str>,
    pub(super) complete: Arc<str>,
    pub(super) release: Arc<str>,
    /// `complete`, then `pg_notify($5, '')` if it stored the response.
    pub(super) complete_notify: Arc<str>,
    /// `release`, then `pg_notify($3, '')` if it dropped the lease.
    pub(super) release_notify: Arc<str>,
    pub(super) delete_expired: Arc<str>,
    /// $1 key: marks a live lease as waited for; one row if there is one.
    pub(super) mark_waited: Arc<str>,
}

impl Statements {
    /// `table` must have passed [`validate_table_name`]: it is written into the SQL quoted,
    /// and contains only `[a-z0-9_]`.
    pub(super) fn new(table: &str) -> Self {
        let t = format!("\"{table}\"");
        let index = format!("\"{table}_expires_at_idx\"");
        let sql = |s: String| Arc::<str>::from(s);
        // $1 key, $2 token, $3 encoded response, $4 ttl in microseconds.
        let complete = format!(
            "UPDATE {t} SET state = 'completed', token = NULL, response = $3,
                 expires_at = now() + $4::int8 * interval '1 microsecond',
                 completed_at = now()
             WHERE key = $1 AND token = $2 AND state = 'in_flight'"
        );
        // $1 key, $2 token.
        let release =
            format!("DELETE FROM {t} WHERE key = $1 AND token = $2 AND state = 'in_flight'");
        Self {
            // Only when a request waits for the record (`waited`, set by `mark_waited`), and
            // only if the row changed; sent when the transaction commits.
            complete_notify: sql(format!(
                "{complete} RETURNING CASE WHEN waited THEN pg_notify($5::text, '') END"
            )),
            release_notify: sql(format!(
                "{release} RETURNING CASE WHEN waited THEN pg_notify($3::text, '') END"
            )),
            complete: sql(complete),
            release: sql(release),
            table: table.to_owned(),
            create_table: sql(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    key          bytea       PRIMARY KEY,
                    fingerprint  bytea       NOT NULL,
                    state        text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
                    token        bytea,
                    expires_at   timestamptz NOT NULL,
                    response     bytea,
                    created_at   timestamptz NOT NULL,
                    completed_at timestamptz,
                    waited       boolean     NOT NULL DEFAULT false,
                    CHECK ((state = 'in_flight') = (token IS NOT NULL AND response IS NULL))
                )"
            )),
            add_waited: sql(format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS waited boolean NOT NULL DEFAULT false"
            )),
            create_index: sql(format!(
                "CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at)"
            )),
            // $1 key, $2 fingerprint, $3 new token, $4 lease in microseconds.
            //
            // `live` reads the row if its deadline has not passed. Only when there is none
            // does `claimed` insert a fresh lease, or take over a row whose deadline has passed
            // (ON CONFLICT locks the conflicting row, waiting for a concurrent writer, and
            // evaluates the WHERE on its latest committed version, so exactly one of many
            // concurrent statements wins). A replay or an in-flight answer is thus a plain
            // read: no row lock, no write, no commit to flush.
            //
            // No row at all means the conflicting row was committed (or taken over) after this
            // statement's snapshot: run it again.
            begin: sql(format!(
                "WITH live AS (
                    SELECT fingerprint, state, expires_at, response
                    FROM {t}
                    WHERE key = $1::bytea AND expires_at > now()
                ), claimed AS (
                    INSERT INTO {t} AS r
                        (key, fingerprint, state, token, expires_at, response, created_at, completed_at)
                    SELECT $1::bytea, $2::bytea, 'in_flight', $3::bytea,
                           now() + $4::int8 * interval '1 microsecond', NULL, now(), NULL
                    WHERE NOT EXISTS (SELECT FROM live)
                    ON CONFLICT (key) DO UPDATE SET
                        fingerprint  = excluded.fingerprint,
                        state        = 'in_flight',
                        token        = excluded.token,
                        expires_at   = excluded.expires_at,
                        response     = NULL,
                        created_at   = excluded.created_at,
                        completed_at = NULL,
                        waited       = false
                    WHERE r.expires_at <= now()
                    RETURNING 1
                )
                SELECT true AS acquired, NULL::bytea AS fingerprint, NULL::text AS state,
                       NULL::int8 AS remaining_us, NULL::bytea AS response
                FROM claimed
                UNION ALL
                SELECT false, fingerprint, state,
                       (extract(epoch FROM expires_at - now()) * 1000000)::int8,
                       response
                FROM live"
            )),
            // $1 key, $2 token, $3 lease in microseconds.
            renew: sql(format!(
                "UPDATE {t} SET expires_at = now() + $3::int8 * interval '1 microsecond'
                 WHERE key = $1 AND token = $2 AND state = 'in_flight'"
            )),
            // $1 batch size. FOR UPDATE re-checks the deadline on the latest version of a row a
            // concurrent `begin` just took over; SKIP LOCKED passes over rows in use.
            mark_waited: sql(format!(
                "UPDATE {t} SET waited = true
                 WHERE key = $1 AND state = 'in_flight' AND expires_at > now()"
            )),
            delete_expired: sql(format!(
                "DELETE FROM {t} WHERE key IN (
                     SELECT key FROM {t} WHERE expires_at <= now()
                     LIMIT $1 FOR UPDATE SKIP LOCKED
                 ) AND expires_at <= now()"
            )),
        }
    }
}
