//! The SQL of [`MySqlStore`](super::MySqlStore), built once per table name.

use std::sync::Arc;

/// The SQL of every statement, built once for the table name.
pub(super) struct Statements {
    pub(super) table: String,
    pub(super) create_table: Arc<str>,
    pub(super) read: Arc<str>,
    pub(super) insert: Arc<str>,
    pub(super) take_over: Arc<str>,
    pub(super) renew: Arc<str>,
    pub(super) complete: Arc<str>,
    pub(super) release: Arc<str>,
    pub(super) select_expired: Arc<str>,
}

impl Statements {
    /// `table` must have passed [`validate_table_name`]: it is written into the SQL quoted,
    /// and contains only `[a-z0-9_]`.
    pub(super) fn new(table: &str) -> Self {
        let t = format!("`{table}`");
        let index = format!("`{table}_expires_at_idx`");
        let sql = |s: String| Arc::<str>::from(s);
        Self {
            table: table.to_owned(),
            create_table: sql(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    `key`        BINARY(32)  NOT NULL,
                    fingerprint  BINARY(32)  NOT NULL,
                    state        ENUM('in_flight', 'completed') NOT NULL,
                    token        BINARY(16)  NULL,
                    expires_at   DATETIME(6) NOT NULL,
                    response     LONGBLOB    NULL,
                    created_at   DATETIME(6) NOT NULL,
                    completed_at DATETIME(6) NULL,
                    PRIMARY KEY (`key`),
                    KEY {index} (expires_at),
                    CHECK ((state = 'in_flight') = (token IS NOT NULL AND response IS NULL))
                ) ENGINE = InnoDB"
            )),
            // ? key. A plain (consistent, non-locking) read; the response only of a live
            // completed record. UTC_TIMESTAMP(6) is one value for the whole statement.
            read: sql(format!(
                "SELECT fingerprint, state,
                        TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) AS remaining_us,
                        IF(state = 'completed' AND expires_at > UTC_TIMESTAMP(6), response, NULL)
                            AS response
                 FROM {t} WHERE `key` = ?"
            )),
            // ? key, ? fingerprint, ? token, ? lease in microseconds.
            insert: sql(format!(
                "INSERT INTO {t}
                     (`key`, fingerprint, state, token, expires_at, response, created_at,
                      completed_at)
                 VALUES (?, ?, 'in_flight', ?, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, NULL,
                         UTC_TIMESTAMP(6), NULL)"
            )),
            // ? fingerprint, ? token, ? lease in microseconds, ? key. The WHERE is evaluated on
            // the latest committed version of the row, under its exclusive lock.
            take_over: sql(format!(
                "UPDATE {t} SET fingerprint = ?, state = 'in_flight', token = ?,
                     expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, response = NULL,
                     created_at = UTC_TIMESTAMP(6), completed_at = NULL
                 WHERE `key` = ? AND expires_at <= UTC_TIMESTAMP(6)"
            )),
            // ? lease in microseconds, ? key, ? token.
            renew: sql(format!(
                "UPDATE {t} SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND
                 WHERE `key` = ? AND token = ? AND state = 'in_flight'"
            )),
            // ? encoded response, ? ttl in microseconds, ? key, ? token.
            complete: sql(format!(
                "UPDATE {t} SET state = 'completed', token = NULL, response = ?,
                     expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND,
                     completed_at = UTC_TIMESTAMP(6)
                 WHERE `key` = ? AND token = ? AND state = 'in_flight'"
            )),
            // ? a fresh token nobody holds, ? key, ? token. The lease ends now: its deadline
            // one microsecond in the past, so the next `begin` takes the row over.
            release: sql(format!(
                "UPDATE {t} SET token = ?,
                     expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 MICROSECOND
                 WHERE `key` = ? AND token = ? AND state = 'in_flight'"
            )),
            // ? batch size. Locks the expired rows it returns; skips rows in use.
            select_expired: sql(format!(
                "SELECT `key` FROM {t} WHERE expires_at <= UTC_TIMESTAMP(6)
                 ORDER BY expires_at LIMIT ? FOR UPDATE SKIP LOCKED"
            )),
        }
    }

    /// `DELETE` of `rows` keys (locked by `select_expired` in the same transaction).
    pub(super) fn delete_keys(&self, rows: usize) -> String {
        let mut placeholders = "?,".repeat(rows);
        placeholders.pop();
        format!(
            "DELETE FROM `{}` WHERE `key` IN ({placeholders}) AND expires_at <= UTC_TIMESTAMP(6)",
            self.table
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_lists_one_placeholder_per_key() {
        let sql = Statements::new("t").delete_keys(3);
        assert!(sql.contains("IN (?,?,?)"), "{sql}");
    }
}
