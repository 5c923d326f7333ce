//! Proof of work for joining a waiting room (hashcash-style): the server hands a shopper a
//! signed challenge (`Auth::issue_challenge`: user, product, a random nonce, a difficulty in
//! bits and an expiry), and the shopper must find a `solution` such that
//! `SHA-256(challenge ":" solution)` starts with that many zero bits — about 2^bits hashes for
//! the shopper, one for the server. A challenge is used once (its nonce is remembered in Redis
//! until it expires). The difficulty follows the room's join rate, so a bot farm pays CPU per
//! identity while one phone solves it in about a second.

use sha2::{Digest, Sha256};

use crate::config::PowSettings;

/// Zero bits at the start of `hash`.
pub fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in hash {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// Whether `solution` solves `challenge` at `bits` of difficulty.
pub fn solves(challenge: &str, solution: &str, bits: u32) -> bool {
    let mut h = Sha256::new();
    h.update(challenge.as_bytes());
    h.update(b":");
    h.update(solution.as_bytes());
    leading_zero_bits(&h.finalize()) >= bits
}

/// The difficulty for a room joined at `rate` shoppers a second: the minimum up to the
/// configured rate, then one bit more per doubling of it (each bit doubles the work), capped.
pub fn difficulty(rate: f64, s: &PowSettings) -> u32 {
    let over = rate / f64::from(s.join_rate.max(1));
    let extra = if over > 1.0 {
        over.log2().floor() as u32 + 1
    } else {
        0
    };
    (s.min_bits + extra).min(s.max_bits)
}

/// A solution found by trying 0, 1, 2, … (tests and tools; the storefront page does the same
/// in a Web Worker).
pub fn solve(challenge: &str, bits: u32) -> String {
    (0u64..)
        .map(|n| n.to_string())
        .find(|s| solves(challenge, s, bits))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zero_bits_count_across_bytes() {
        assert_eq!(leading_zero_bits(&[0xff]), 0);
        assert_eq!(leading_zero_bits(&[0x0f]), 4);
        assert_eq!(leading_zero_bits(&[0, 0, 0x40]), 17);
        assert_eq!(leading_zero_bits(&[0, 0]), 16);
    }

    #[test]
    fn a_solution_solves_its_own_challenge_only_at_its_difficulty() {
        let s = solve("challenge-a", 10);
        assert!(solves("challenge-a", &s, 10));
        assert!(solves("any", "thing", 0), "no work at 0 bits");
        assert!(
            !solves("challenge-a", &s, 200),
            "no hash has 200 zero bits in practice"
        );
    }

    #[test]
    fn the_difficulty_follows_the_join_rate_within_its_bounds() {
        let s = PowSettings {
            min_bits: 16,
            max_bits: 22,
            join_rate: 100,
        };
        assert_eq!(difficulty(0.0, &s), 16);
        assert_eq!(difficulty(100.0, &s), 16);
        assert_eq!(difficulty(150.0, &s), 17);
        assert_eq!(difficulty(400.0, &s), 19);
        assert_eq!(difficulty(1e9, &s), 22, "capped");
        let mut last = 0;
        for rate in [0.0, 50.0, 200.0, 800.0, 3_200.0] {
            let d = difficulty(rate, &s);
            assert!(d >= last, "never easier as the rate rises");
            last = d;
        }
    }
}
