//! The load test's bookkeeping, without IO: the open loop's schedule (which send is due when,
//! which ones the in-flight cap turned away) and the tallies of answers (an HdrHistogram of
//! latencies, counts by status and code, the winners).

use std::{collections::HashMap, time::Duration};

use hdrhistogram::Histogram;

/// The slowest latency recorded exactly (µs); slower ones count as this (the client's own
/// timeout is 30 s).
const MAX_LATENCY_US: u64 = 60_000_000;

/// What the open loop does next ([`Schedule::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send request `i` now; it was due `due` after the start (its latency counts from then).
    Send { i: u64, due: Duration },
    /// Request `i` was due, but the in-flight cap was reached: it is not sent, only counted.
    Dropped { i: u64 },
    /// Nothing is due before this offset from the start.
    WaitUntil(Duration),
    /// Every send is scheduled (the duration or the count is reached).
    Done,
}

/// An open loop's schedule: request `i` is due `i / rate` seconds after the start, whatever
/// became of the earlier ones. A send falls due only once; one due while `cap` requests are
/// in flight is dropped and counted, never sent late.
#[derive(Debug, Clone)]
pub struct Schedule {
    rate: f64,
    cap: u64,
    limit: u64,
    horizon: Duration,
    next: u64,
    dropped: u64,
}

impl Schedule {
    /// `rate` sends per second (> 0), at most `cap` in flight, at most `limit` sends, none due
    /// at or after `horizon`.
    pub fn new(rate: f64, cap: usize, limit: u64, horizon: Duration) -> Self {
        Self {
            rate,
            cap: cap as u64,
            limit,
            horizon,
            next: 0,
            dropped: 0,
        }
    }

    /// When request `i` is due, from the start.
    pub fn due(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// The next step, `elapsed` after the start, with `in_flight` requests unanswered.
    pub fn step(&mut self, elapsed: Duration, in_flight: u64) -> Step {
        if self.next >= self.limit {
            return Step::Done;
        }
        let due = self.due(self.next);
        if due >= self.horizon {
            return Step::Done;
        }
        if due > elapsed {
            return Step::WaitUntil(due);
        }
        let i = self.next;
        self.next += 1;
        if in_flight >= self.cap {
            self.dropped += 1;
            Step::Dropped { i }
        } else {
            Step::Send { i, due }
        }
    }

    /// Sends that fell due so far (sent + dropped).
    pub fn scheduled(&self) -> u64 {
        self.next
    }

    /// Sends the in-flight cap turned away (the report counts them as scheduled − sent).
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// User + system CPU time, in clock ticks, of a `/proc/<pid>/stat` line: its fields 14 and 15,
/// counted after the command name (which may hold spaces and parentheses).
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // `fields[0]` is field 3 (the state).
    let tick = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(tick(14)? + tick(15)?)
}

/// The answers one part of the load got.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latencies in µs.
    pub latency: Histogram<u32>,
    /// Answers by `"<status> <code>"` (or `transport error`).
    pub codes: HashMap<String, u64>,
    /// The users whose attempt won (`202`).
    pub winners: Vec<i64>,
}

impl Tally {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            // 3 significant digits from 1 µs to 60 s.
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .map_err(|e| anyhow::anyhow!("latency histogram: {e:?}"))?,
            codes: HashMap::new(),
            winners: Vec::new(),
        })
    }

    /// Records one answer: its latency (from when it was due, or sent), its label and, for a
    /// win, the user who won.
    pub fn record(&mut self, latency: Duration, label: &str, winner: Option<i64>) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(us.clamp(1, MAX_LATENCY_US));
        self.count(label);
        self.winners.extend(winner);
    }

    /// Counts an answer that has no latency (a transport error).
    pub fn count(&mut self, label: &str) {
        *self.codes.entry(label.to_owned()).or_default() += 1;
    }

    /// Adds another tally's answers to this one.
    pub fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.latency
            .add(&other.latency)
            .map_err(|e| anyhow::anyhow!("merging latency histograms: {e:?}"))?;
        for (code, n) in other.codes {
            *self.codes.entry(code).or_default() += n;
        }
        self.winners.extend(other.winners);
        Ok(())
    }

    /// Answers counted (with or without a latency).
    pub fn answers(&self) -> u64 {
        self.codes.values().sum()
    }

    /// The latency at quantile `q` (0–1), in ms.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        if self.latency.is_empty() {
            return 0.0;
        }
        self.latency.value_at_quantile(q) as f64 / 1_000.0
    }

    /// The slowest latency, in ms.
    pub fn max_ms(&self) -> f64 {
        self.latency.max() as f64 / 1_000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn sends_fall_due_at_the_rate_whatever_the_answers_and_the_cap_drops_and_counts() {
        // 1,000/s for 10 ms: sends 0..=9 are due at 0, 1, …, 9 ms; at most 2 in flight.
        let mut s = Schedule::new(1_000.0, 2, u64::MAX, ms(10));
        assert_eq!(s.step(ms(0), 0), Step::Send { i: 0, due: ms(0) });
        assert_eq!(s.step(ms(0), 1), Step::WaitUntil(ms(1)));
        // The loop woke late, at 5.5 ms, with the cap reached: sends 1–5 are due and dropped,
        // not postponed (an open loop never sends late to catch up).
        for i in 1..=5 {
            assert_eq!(s.step(Duration::from_micros(5_500), 2), Step::Dropped { i });
        }
        assert_eq!(
            s.step(Duration::from_micros(5_500), 2),
            Step::WaitUntil(ms(6))
        );
        // Woken at 20 ms with room: 6–9 go out at once, each keeping its own due time, so
        // their latency counts the time they waited for the loop (coordinated omission).
        for i in 6..=9 {
            assert_eq!(s.step(ms(20), 0), Step::Send { i, due: ms(i) });
        }
        assert_eq!(s.step(ms(20), 0), Step::Done, "10 ms is the horizon");
        assert_eq!((s.scheduled(), s.dropped()), (10, 5));
    }

    #[test]
    fn a_count_ends_the_schedule_before_the_horizon() {
        let mut s = Schedule::new(100.0, 8, 3, Duration::from_secs(60));
        let sent: Vec<Step> = (0..4).map(|_| s.step(Duration::from_secs(1), 0)).collect();
        assert_eq!(
            sent,
            [
                Step::Send { i: 0, due: ms(0) },
                Step::Send { i: 1, due: ms(10) },
                Step::Send { i: 2, due: ms(20) },
                Step::Done
            ]
        );
        assert_eq!((s.scheduled(), s.dropped()), (3, 0));
    }

    #[test]
    fn cpu_ticks_are_user_plus_system_whatever_the_command_name() {
        let stat = "4242 (sec kill) (x)) S 1 4242 4242 0 -1 4194560 9 0 0 0 1234 567 0 0 20 0 9 0 100 200 300";
        assert_eq!(cpu_ticks(stat), Some(1_234 + 567));
        assert_eq!(cpu_ticks("4242 (seckill) S 1 2"), None);
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn tallies_merge_counts_winners_and_histograms() {
        let mut a = Tally::new().unwrap();
        for n in 1..=99 {
            a.record(ms(n), "202", Some(i64::try_from(n).unwrap()));
        }
        let mut b = Tally::new().unwrap();
        b.record(ms(1_000), "410 sold_out", None);
        b.count("transport error");
        a.merge(b).unwrap();
        assert_eq!(a.answers(), 101);
        assert_eq!(a.latency.len(), 100, "a transport error has no latency");
        assert_eq!(a.codes["202"], 99);
        assert_eq!(a.winners.len(), 99);
        // 3 significant digits: within 0.1% of the exact value.
        assert!(
            (a.percentile_ms(0.50) - 50.0).abs() <= 0.05,
            "{}",
            a.percentile_ms(0.5)
        );
        assert!((a.percentile_ms(0.99) - 99.0).abs() <= 0.1);
        assert!((a.max_ms() - 1_000.0).abs() <= 1.0);
        // A latency beyond the histogram's range is counted at its top, not lost.
        a.record(Duration::from_secs(3_600), "202", None);
        assert_eq!(a.latency.len(), 101);
        assert_eq!(Tally::new().unwrap().percentile_ms(0.99), 0.0);
    }
}
