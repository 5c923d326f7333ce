//! Handling what Postgres refuses for good: [`classify`] tells a refusal from a transient
//! failure, and [`bisect`] splits a refused batch until the messages refused on their own are
//! found.

use sea_orm::{DbErr, RuntimeErr, sqlx};

/// How a failed step is handled.
#[derive(Debug)]
pub enum Failure {
    /// The data itself is refused: retrying cannot help. Why, in plain words.
    Permanent(String),
    /// Anything else (a lost connection, Redis down, a deadlock…): hold and retry.
    Transient(anyhow::Error),
}

/// Whether a SQLSTATE means the data is refused for good: class 22 (data exception: a bad
/// value) or 23 (integrity constraint violation: a check, a foreign key, a unique key).
pub fn is_permanent_sqlstate(code: &str) -> bool {
    code.starts_with("22") || code.starts_with("23")
}

/// Classifies an error of [`process_batch`](super::process_batch) by the SQLSTATE Postgres answered, if any.
pub fn classify(e: anyhow::Error) -> Failure {
    let refused = e.chain().find_map(|cause| {
        let (DbErr::Exec(RuntimeErr::SqlxError(sqlx_err))
        | DbErr::Query(RuntimeErr::SqlxError(sqlx_err))
        | DbErr::Conn(RuntimeErr::SqlxError(sqlx_err))) = cause.downcast_ref::<DbErr>()?
        else {
            return None;
        };
        let sqlx::Error::Database(db_err) = sqlx_err.as_ref() else {
            return None;
        };
        let code = db_err.code()?;
        is_permanent_sqlstate(&code)
            .then(|| format!("permanent database error {code}: {}", db_err.message()))
    });
    match refused {
        Some(reason) => Failure::Permanent(reason),
        None => Failure::Transient(e),
    }
}

/// A message that is refused for good on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// Its position in the items given to [`bisect`].
    pub index: usize,
    pub reason: String,
}

/// Runs `attempt` on all of `items`; when that is refused for good, on each half (left first),
/// and so on, until every item was either part of an attempt that succeeded or refused on its
/// own: those are returned, in order. One attempt when nothing is wrong, about 2·k·log2(n) with
/// k bad items of n. A transient failure stops the search: the caller retries later (attempts
/// must be idempotent, as [`process_batch`](super::process_batch) is).
pub async fn bisect<'a, T, F, Fut>(items: &'a [T], mut attempt: F) -> anyhow::Result<Vec<Poison>>
where
    F: FnMut(&'a [T]) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let mut poison = Vec::new();
    // A stack of index ranges still to attempt (the top is the leftmost).
    let mut todo: Vec<std::ops::Range<usize>> = Vec::new();
    todo.push(0..items.len());
    while let Some(range) = todo.pop() {
        if range.is_empty() {
            continue;
        }
        match attempt(&items[range.clone()]).await {
            Ok(()) => {}
            Err(Failure::Transient(e)) => return Err(e),
            Err(Failure::Permanent(reason)) if range.len() == 1 => poison.push(Poison {
                index: range.start,
                reason,
            }),
            Err(Failure::Permanent(_)) => {
                let mid = range.start + range.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
        }
    }
    Ok(poison)
}

#[cfg(test)]
mod tests {
    use std::{borrow::Cow, sync::Arc};

    use anyhow::Context;

    use super::*;

    /// A database error as Postgres would answer it, with a SQLSTATE.
    #[derive(Debug)]
    struct PgError(&'static str);

    impl std::fmt::Display for PgError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl std::error::Error for PgError {}

    impl sqlx::error::DatabaseError for PgError {
        fn message(&self) -> &str {
            "insert or update on table \"orders\" violates foreign key constraint \"orders_product_fkey\""
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn failed(err: sqlx::Error, wrap: fn(RuntimeErr) -> DbErr) -> anyhow::Error {
        let e: Result<(), DbErr> = Err(wrap(RuntimeErr::SqlxError(Arc::new(err))));
        e.context("inserting orders").unwrap_err()
    }

    fn pg(code: &'static str) -> anyhow::Error {
        failed(sqlx::Error::Database(Box::new(PgError(code))), DbErr::Query)
    }

    #[test]
    fn sqlstate_classes_22_and_23_are_permanent_the_rest_transient() {
        for code in [
            "22001", "22003", "22008", "22P02", "23502", "23503", "23505", "23514",
        ] {
            assert!(is_permanent_sqlstate(code), "{code}");
        }
        for code in [
            "08006", "40001", "40P01", "53300", "57P01", "42P01", "XX000", "",
        ] {
            assert!(!is_permanent_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn a_refused_batch_is_permanent_with_a_reason_and_anything_else_is_transient() {
        match classify(pg("23503")) {
            Failure::Permanent(reason) => {
                assert!(
                    reason.starts_with("permanent database error 23503: "),
                    "{reason}"
                );
                assert!(reason.contains("orders_product_fkey"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let exec = failed(
            sqlx::Error::Database(Box::new(PgError("22008"))),
            DbErr::Exec,
        );
        assert!(matches!(classify(exec), Failure::Permanent(_)));
        for transient in [
            pg("40P01"),
            pg("57P01"),
            failed(sqlx::Error::PoolTimedOut, DbErr::Conn),
            failed(sqlx::Error::WorkerCrashed, DbErr::Exec),
            anyhow::anyhow!("Redis did not answer").context("recording statuses in Redis"),
        ] {
            let text = format!("{transient:#}");
            match classify(transient) {
                Failure::Transient(e) => assert_eq!(format!("{e:#}"), text),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    /// Attempts of `bisect` over numbers: `bad` ones are refused for good, and any other
    /// attempt containing `flaky` fails transiently.
    async fn run(
        items: &[u32],
        bad: &[u32],
        flaky: Option<u32>,
    ) -> (anyhow::Result<Vec<Poison>>, Vec<Vec<u32>>) {
        let attempts = std::sync::Mutex::new(Vec::new());
        let result = bisect(items, |part| {
            attempts.lock().unwrap().push(part.to_vec());
            let outcome = if let Some(b) = part.iter().find(|i| bad.contains(i)) {
                Err(Failure::Permanent(format!("{b} is bad")))
            } else if flaky.is_some_and(|f| part.contains(&f)) {
                Err(Failure::Transient(anyhow::anyhow!("connection lost")))
            } else {
                Ok(())
            };
            async move { outcome }
        })
        .await;
        (result, attempts.into_inner().unwrap())
    }

    #[tokio::test]
    async fn bisecting_finds_each_bad_item_alone_and_attempts_everything_else() {
        let items: Vec<u32> = (0..200).collect();
        let (found, attempts) = run(&items, &[], None).await;
        assert_eq!(found.unwrap(), vec![]);
        assert_eq!(
            attempts,
            vec![items.clone()],
            "one attempt when nothing is wrong"
        );

        let (found, attempts) = run(&items, &[7, 150], None).await;
        let found = found.unwrap();
        assert_eq!(
            found,
            vec![
                Poison {
                    index: 7,
                    reason: "7 is bad".into()
                },
                Poison {
                    index: 150,
                    reason: "150 is bad".into()
                },
            ]
        );
        // Every good item was in exactly one successful attempt.
        let mut persisted: Vec<u32> = attempts
            .iter()
            .filter(|a| !a.iter().any(|i| [7, 150].contains(i)))
            .flatten()
            .copied()
            .collect();
        persisted.sort_unstable();
        let good: Vec<u32> = items
            .iter()
            .copied()
            .filter(|i| ![7, 150].contains(i))
            .collect();
        assert_eq!(persisted, good);
        assert!(
            attempts.len() <= 2 * 2 * 8 + 1,
            "{} attempts",
            attempts.len()
        );
        // Left halves first: the earlier items are attempted first.
        assert_eq!(attempts[1], items[..100].to_vec());

        let (found, _) = run(&[1, 2, 3], &[1, 2, 3], None).await;
        assert_eq!(found.unwrap().len(), 3);
        let (found, _) = run(&[], &[], None).await;
        assert_eq!(found.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn a_transient_failure_stops_the_search() {
        let items: Vec<u32> = (0..10).collect();
        // 2 is found on the left; the right half then loses the connection.
        let (found, attempts) = run(&items, &[2], Some(8)).await;
        assert_eq!(found.unwrap_err().to_string(), "connection lost");
        assert!(attempts.contains(&vec![2]), "{attempts:?}");
        assert_eq!(attempts.last().unwrap(), &(5..10).collect::<Vec<u32>>());
    }
}
