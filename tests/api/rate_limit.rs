//! Property test: reserve.lua's user window and product gate against a small reference model,
//! driven by a controlled clock (edges included: attempts exactly at window/interval bounds).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use proptest::prelude::*;
use seckill::{
    keys::Keys,
    reservations::{Clock, Outcome, Reservations},
};

use crate::{
    helpers::RedisScope,
    reservations::{live_plan, now_ms, product, rate, user},
};

const USER_LIMIT: i64 = 2;
const WINDOW_MS: i64 = 100;
const GATE_COUNT: i64 = 5;
const GATE_PERIOD_US: i64 = 50_000;

#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Won,
    Already,
    Limited { retry_ms: i64 },
}

/// The reference: a fixed window per user, then a GCRA bucket per product, then dedup.
#[derive(Default)]
struct Model {
    windows: HashMap<i64, (i64, i64)>, // user -> (start ms, count)
    tat: i64,
    winners: std::collections::HashSet<i64>,
}

impl Model {
    fn attempt(&mut self, u: i64, now_us: i64) -> (Expect, i64) {
        let now_ms = now_us.div_euclid(1_000);
        let (fresh, used, reset) = match self.windows.get(&u) {
            Some(&(start, count)) if now_ms >= start && now_ms < start + WINDOW_MS => {
                (false, count, start + WINDOW_MS - now_ms)
            }
            _ => (true, 0, WINDOW_MS),
        };
        if used >= USER_LIMIT {
            return (Expect::Limited { retry_ms: reset }, 0);
        }
        let interval = (GATE_PERIOD_US / GATE_COUNT).max(1);
        let tat = self.tat.max(now_us);
        let tolerance = GATE_PERIOD_US - interval;
        if tat - now_us > tolerance {
            let wait = tat - now_us - tolerance;
            return (
                Expect::Limited {
                    retry_ms: (wait + 999) / 1_000,
                },
                USER_LIMIT - used,
            );
        }
        self.tat = tat + interval;
        if fresh {
            self.windows.insert(u, (now_ms, 1));
        } else if let Some(w) = self.windows.get_mut(&u) {
            w.1 += 1;
        }
        let left = USER_LIMIT - used - 1;
        if self.winners.insert(u) {
            (Expect::Won, left)
        } else {
            (Expect::Already, left)
        }
    }
}

fn steps() -> impl Strategy<Value = Vec<(i64, i64)>> {
    // (advance in µs, user): advances hit 0, exact interval multiples and window edges often.
    let advance = prop_oneof![
        Just(0_i64),
        Just(10_000_i64),
        Just(100_000_i64),
        Just(1_000_i64),
        0_i64..40_000,
    ];
    prop::collection::vec((advance, 1_i64..=3), 1..40)
}

#[test]
fn reserve_lua_matches_the_reference_model_of_window_and_gate() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let scope = rt.block_on(RedisScope::new());
    let clock = Arc::new(AtomicI64::new(0));
    let r = Reservations::new(
        scope.pool.clone(),
        Keys::new(scope.prefix.clone()),
        rate(&format!("{USER_LIMIT}/{WINDOW_MS}ms")),
        rate(&format!("{GATE_COUNT}/{}ms", GATE_PERIOD_US / 1_000)),
    )
    .with_clock(Clock::Manual(clock.clone()));
    let next_product = AtomicI64::new(1);

    let config = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(steps in steps())| {
        let p = product(next_product.fetch_add(1, Ordering::SeqCst));
        rt.block_on(r.preheat(&live_plan(p, 1_000))).unwrap();
        let mut model = Model::default();
        let mut now_us = now_ms() * 1_000;
        for (advance, u) in steps {
            now_us += advance;
            clock.store(now_us, Ordering::SeqCst);
            let d = rt.block_on(r.reserve(user(u), p)).unwrap();
            let (expect, left) = model.attempt(u, now_us);
            let got = match d.outcome {
                Outcome::Won { .. } => Expect::Won,
                Outcome::AlreadyReserved { .. } => Expect::Already,
                Outcome::RateLimited { retry_after } => Expect::Limited {
                    retry_ms: i64::try_from(retry_after.as_millis()).unwrap(),
                },
                other => panic!("{other:?}"),
            };
            prop_assert_eq!(&got, &expect, "user {} at +{}µs", u, advance);
            if !matches!(expect, Expect::Limited { .. }) || left == 0 {
                prop_assert_eq!(i64::from(d.window.remaining), left);
            }
            prop_assert!(d.window.reset <= Duration::from_millis(WINDOW_MS as u64));
        }
    });
}
