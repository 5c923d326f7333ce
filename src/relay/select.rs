//! Which outboxes the relay reads: those whose sale is live or that still hold entries
//! ([`worth_reading`]), in groups one read may cover ([`slot_groups`]).

use std::collections::BTreeMap;

use super::WINDOW_MARGIN;

/// A sale window in ms since the epoch (`starts_ms`, `ends_ms` of the state hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub starts_ms: i64,
    pub ends_ms: i64,
}

impl Window {
    /// Whether the sale may take winners at `now_ms`, give or take [`WINDOW_MARGIN`].
    pub fn live(&self, now_ms: i64) -> bool {
        let margin = i64::try_from(WINDOW_MARGIN.as_millis()).unwrap_or(i64::MAX);
        self.starts_ms.saturating_sub(margin) <= now_ms
            && now_ms < self.ends_ms.saturating_add(margin)
    }
}

/// Whether the relay reads a tracked product's outbox: its sale is live or entries wait in it
/// (an unknown window — the state hash is gone — counts only its entries).
pub fn worth_reading(window: Option<Window>, backlog: i64, now_ms: i64) -> bool {
    backlog > 0 || window.is_some_and(|w| w.live(now_ms))
}

/// Splits streams into the groups one multi-key command may cover: all of them on a single
/// Redis, one group per hash slot on a cluster (each product has a slot of its own).
pub fn slot_groups<T: Clone>(streams: &[(T, String)], cluster: bool) -> Vec<Vec<(T, String)>> {
    if !cluster {
        return if streams.is_empty() {
            Vec::new()
        } else {
            vec![streams.to_vec()]
        };
    }
    let mut by_slot: BTreeMap<u16, Vec<(T, String)>> = BTreeMap::new();
    for (id, stream) in streams {
        by_slot
            .entry(fred::util::redis_keyslot(stream.as_bytes()))
            .or_default()
            .push((id.clone(), stream.clone()));
    }
    by_slot.into_values().collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::{domain::ProductId, keys::Keys};

    #[test]
    fn only_live_or_draining_outboxes_are_read() {
        let w = Window {
            starts_ms: 100_000,
            ends_ms: 200_000,
        };
        let margin = WINDOW_MARGIN.as_millis() as i64;
        // Live, with the margin either side for clock skew.
        assert!(worth_reading(Some(w), 0, 150_000));
        assert!(worth_reading(Some(w), 0, 100_000 - margin));
        assert!(worth_reading(Some(w), 0, 200_000 + margin - 1));
        // Upcoming, or ended and drained: not read.
        assert!(!worth_reading(Some(w), 0, 100_000 - margin - 1));
        assert!(!worth_reading(Some(w), 0, 200_000 + margin));
        // Ended with winners not yet relayed: read until they are.
        assert!(worth_reading(Some(w), 3, 900_000));
        // No window known (not in Redis): only waiting entries count.
        assert!(!worth_reading(None, 0, 150_000));
        assert!(worth_reading(None, 1, 150_000));
    }

    #[test]
    fn one_read_covers_a_single_redis_and_one_hash_slot_on_a_cluster() {
        let keys = Keys::new("shop");
        let streams: Vec<(i64, String)> = (1..=5)
            .map(|i| (i, keys.product(ProductId::try_from(i).unwrap()).outbox))
            .collect();
        assert!(slot_groups::<i64>(&[], false).is_empty());
        let single = slot_groups(&streams, false);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].len(), 5);
        let cluster = slot_groups(&streams, true);
        assert_eq!(cluster.len(), 5, "each product has a hash slot of its own");
        for group in &cluster {
            let slots: HashSet<u16> = group
                .iter()
                .map(|(_, s)| fred::util::redis_keyslot(s.as_bytes()))
                .collect();
            assert_eq!(slots.len(), 1);
        }
    }
}
