//! Table names of the SQL stores: plain identifiers, so that they can be written into SQL.

use std::fmt;

/// The longest table name accepted, so that the derived index name fits the 63-byte identifier
/// limit of PostgreSQL (MySQL's is 64).
pub(crate) const MAX_TABLE_NAME: usize = 48;

/// A table name that `PostgresStore::with_table_name` or `MySqlStore::with_table_name` refused.
///
/// A table name must be a plain lowercase identifier: 1 to 48 characters from `a`-`z`, `0`-`9`
/// and `_`, not starting with a digit.
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "mysql"))))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableNameError {
    name: String,
}

impl fmt::Display for TableNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid table name {:?}: expected 1 to {MAX_TABLE_NAME} characters of a-z, 0-9 and _, \
             not starting with a digit",
            self.name
        )
    }
}

impl std::error::Error for TableNameError {}

pub(crate) fn validate_table_name(name: &str) -> Result<(), TableNameError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_TABLE_NAME
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(TableNameError {
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in [
            "idempotency_records",
            "a",
            "_x1",
            &"a".repeat(MAX_TABLE_NAME),
        ] {
            assert!(validate_table_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "1abc",
            "Upper",
            "a-b",
            "a.b",
            "a b",
            "x\"; DROP TABLE y; --",
            "é",
            &"a".repeat(MAX_TABLE_NAME + 1),
        ] {
            assert!(validate_table_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            validate_table_name("a-b").unwrap_err().to_string(),
            "invalid table name \"a-b\": expected 1 to 48 characters of a-z, 0-9 and _, not \
             starting with a digit"
        );
    }
}
