//! Property test: reserve.lua's user window and product gate, one attempt per call, against a
//! small reference model, driven by a controlled clock (edges included: attempts exactly at
//! window/interval bounds).

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

pub const USER_LIMIT: i64 = 2;
pub const WINDOW_MS: i64 = 100;
pub const GATE_COUNT: i64 = 5;
pub const GATE_PERIOD_US: i64 = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Won,
    Already,
    SoldOut,
    Limited { retry_ms: i64 },
}

impl Expect {
    /// What the script decided, in the model's terms.
    pub fn of(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Won { .. } => Expect::Won,
            Outcome::AlreadyReserved { .. } => Expect::Already,
            Outcome::SoldOut => Expect::SoldOut,
            Outcome::RateLimited { retry_after } => Expect::Limited {
                retry_ms: i64::try_from(retry_after.as_millis()).unwrap(),
            },
            other => panic!("not in the model: {other:?}"),
        }
    }
}

/// The reference: a fixed window per user, then a GCRA bucket per product, then dedup, then
/// stock.
pub struct Model {
    windows: HashMap<i64, (i64, i64)>, // user -> (start ms, count)
    tat: i64,
    winners: std::collections::HashSet<i64>,
    remaining: i64,
}

impl Model {
    pub fn new(stock: i64) -> Self {
        Self {
            windows: HashMap::new(),
            tat: 0,
            winners: std::collections::HashSet::new(),
            remaining: stock,
        }
    }

    /// The attempt's outcome and the user's attempts left in the window.
    pub fn attempt(&mut self, u: i64, now_us: i64) -> (Expect, i64) {
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
        if self.winners.contains(&u) {
            (Expect::Already, left)
        } else if self.remaining <= 0 {
            (Expect::SoldOut, left)
        } else {
            self.remaining -= 1;
            self.winners.insert(u);
            (Expect::Won, left)
        }
    }
}

/// Reservations with the model's window and gate, on `clock`.
pub fn modelled(scope: &RedisScope, clock: &Arc<AtomicI64>) -> Reservations {
    Reservations::new(
        scope.pool.clone(),
        Keys::new(scope.prefix.clone()),
        rate(&format!("{USER_LIMIT}/{WINDOW_MS}ms")),
        rate(&format!("{GATE_COUNT}/{}ms", GATE_PERIOD_US / 1_000)),
    )
    .with_clock(Clock::Manual(clock.clone()))
}

/// `cases` random cases, none saved to disk.
pub fn cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Clock advances in µs that hit 0, exact gate intervals and window edges often.
pub fn advances() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0_i64),
        Just(10_000_i64),
        Just(100_000_i64),
        Just(1_000_i64),
        0_i64..40_000,
    ]
}

fn steps() -> impl Strategy<Value = Vec<(i64, i64)>> {
    // (advance in µs, user)
    prop::collection::vec((advances(), 1_i64..=3), 1..40)
}

#[test]
fn reserve_lua_matches_the_reference_model_of_window_and_gate() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let scope = rt.block_on(RedisScope::new());
    let clock = Arc::new(AtomicI64::new(0));
    let r = modelled(&scope, &clock);
    let next_product = AtomicI64::new(1);

    proptest!(cases(64), |(steps in steps())| {
        let p = product(next_product.fetch_add(1, Ordering::SeqCst));
        rt.block_on(r.preheat(&live_plan(p, 1_000))).unwrap();
        let mut model = Model::new(1_000);
        let mut now_us = now_ms() * 1_000;
        for (advance, u) in steps {
            now_us += advance;
            clock.store(now_us, Ordering::SeqCst);
            let d = rt.block_on(r.reserve(user(u), p)).unwrap();
            let (expect, left) = model.attempt(u, now_us);
            let got = Expect::of(&d.outcome);
            prop_assert_eq!(&got, &expect, "user {} at +{}µs", u, advance);
            if !matches!(expect, Expect::Limited { .. }) || left == 0 {
                prop_assert_eq!(i64::from(d.window.remaining), left);
            }
            prop_assert!(d.window.reset <= Duration::from_millis(WINDOW_MS as u64));
        }
    });
}
