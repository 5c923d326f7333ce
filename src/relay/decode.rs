//! Decoding Redis's stream answers (raw values) into outbox entries, and an entry into the
//! queue message.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use fred::{prelude::*, types::streams::XReadValue};

use crate::{
    amqp::OrderMessage,
    domain::{ProductId, UserId},
    reservations::Moment,
};

pub(super) type Entry = XReadValue<String, String, String>;

/// Turns an outbox entry into the queue message.
pub fn message_of(fields: &HashMap<String, String>) -> Option<OrderMessage> {
    let ms: i64 = fields.get("t")?.parse().ok()?;
    Some(OrderMessage {
        v: OrderMessage::VERSION,
        reservation_id: fields.get("r")?.parse().ok()?,
        user_id: UserId::try_from(fields.get("u")?.as_str()).ok()?,
        product_id: ProductId::try_from(fields.get("p")?.as_str()).ok()?,
        reserved_at: DateTime::<Utc>::from_timestamp_millis(ms)?,
    })
}

/// An outbox entry's moment in Redis (`e`, `s`): the epoch and win sequence `reserve.lua` wrote
/// (the zero moment for an entry written before they existed).
pub fn moment_of(fields: &HashMap<String, String>) -> Moment {
    let field = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    Moment::new(field("e"), field("s"))
}

/// Parses `XREADGROUP`'s answer: nil, or `[[stream, [entries]], ...]` (RESP3: a map of
/// stream → entries).
pub(super) fn parse_xread(raw: Value) -> anyhow::Result<Vec<(String, Vec<Entry>)>> {
    let pairs: Vec<(Value, Value)> = match raw {
        Value::Null => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop().unwrap_or(Value::Null);
                    let name = pair.pop().unwrap_or(Value::Null);
                    Ok((name, entries))
                }
                other => anyhow::bail!("unexpected XREADGROUP answer: {other:?}"),
            })
            .collect::<anyhow::Result<_>>()?,
        Value::Map(map) => map
            .inner()
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
        other => anyhow::bail!("unexpected XREADGROUP answer: {other:?}"),
    };
    pairs
        .into_iter()
        .map(|(name, entries)| Ok((name.convert::<String>()?, parse_entries(entries)?)))
        .collect()
}

/// Parses `XAUTOCLAIM`'s answer: `[cursor, [entries], (deleted ids)]`.
pub(super) fn parse_autoclaim(raw: Value) -> anyhow::Result<Vec<Entry>> {
    let Value::Array(mut parts) = raw else {
        anyhow::bail!("XAUTOCLAIM answered a non-array");
    };
    anyhow::ensure!(
        parts.len() >= 2,
        "XAUTOCLAIM answered {} parts",
        parts.len()
    );
    parse_entries(parts.swap_remove(1))
}

/// Parses stream entries `[[id, [field, value, ...]], ...]` (raw values: fred's typed stream
/// helpers fail on some Redis 7 answers).
fn parse_entries(raw: Value) -> anyhow::Result<Vec<Entry>> {
    let entries = match raw {
        Value::Null => return Ok(Vec::new()),
        Value::Array(entries) => entries,
        other => anyhow::bail!("stream entries are not an array: {other:?}"),
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(mut pair) = entry else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        // A deleted entry comes back with a nil field list.
        let fields = pair.pop().unwrap_or(Value::Null);
        let Ok(id) = pair.pop().unwrap_or(Value::Null).convert::<String>() else {
            continue;
        };
        // A field that is not text leaves it out: the entry is then malformed and dropped
        // with a log line, never a read that fails for good.
        let mut map = HashMap::new();
        if let Value::Array(kv) = fields {
            for chunk in kv.chunks(2) {
                if let [k, v] = chunk
                    && let (Ok(k), Ok(v)) =
                        (k.clone().convert::<String>(), v.clone().convert::<String>())
                {
                    map.insert(k, v);
                }
            }
        }
        out.push((id, map));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_entry_becomes_a_message() {
        let fields: HashMap<String, String> = [
            ("r", "0190a000-0000-7000-8000-000000000001"),
            ("u", "7"),
            ("p", "3"),
            ("t", "1763719200000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let m = message_of(&fields).unwrap();
        assert_eq!((m.user_id.get(), m.product_id.get()), (7, 3));
        assert_eq!(m.reserved_at.timestamp_millis(), 1_763_719_200_000);
        let mut broken = fields.clone();
        broken.insert("u".into(), "-1".into());
        assert!(message_of(&broken).is_none());
    }

    fn entry(id: &str, kv: &[&str]) -> Value {
        Value::Array(vec![
            Value::from(id),
            Value::Array(kv.iter().map(|s| Value::from(*s)).collect()),
        ])
    }

    #[test]
    fn stream_answers_decode_to_entries() {
        let entries = Value::Array(vec![
            entry("1-0", &["r", "x", "u", "7"]),
            // A deleted entry comes back with a nil field list.
            Value::Array(vec![Value::from("2-0"), Value::Null]),
        ]);
        let xread = Value::Array(vec![Value::Array(vec![
            Value::from("outbox"),
            entries.clone(),
        ])]);
        let got = parse_xread(xread).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "outbox");
        let got = &got[0].1;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "1-0");
        assert_eq!(got[0].1.get("u").map(String::as_str), Some("7"));
        assert!(got[1].1.is_empty());
        assert!(parse_xread(Value::Null).unwrap().is_empty());
        assert!(parse_xread(Value::from(3)).is_err());

        // One read over several streams names each.
        let two = Value::Array(vec![
            Value::Array(vec![
                Value::from("a"),
                Value::Array(vec![entry("1-0", &["u", "1"])]),
            ]),
            Value::Array(vec![
                Value::from("b"),
                Value::Array(vec![entry("2-0", &["u", "2"])]),
            ]),
        ]);
        let got = parse_xread(two).unwrap();
        let names: Vec<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(got[1].1[0].1.get("u").map(String::as_str), Some("2"));

        let claimed = parse_autoclaim(Value::Array(vec![
            Value::from("0-0"),
            entries,
            Value::Array(vec![]),
        ]))
        .unwrap();
        assert_eq!(claimed.len(), 2);
        assert!(parse_autoclaim(Value::Array(vec![Value::from("0-0")])).is_err());
        assert!(parse_autoclaim(Value::Null).is_err());
    }

    #[test]
    fn a_stream_entry_with_a_field_that_is_not_text_is_kept_as_malformed() {
        let raw = Value::Array(vec![Value::Array(vec![
            Value::from("1-0"),
            Value::Array(vec![
                Value::from("u"),
                Value::Array(vec![Value::from(1), Value::from(2)]),
                Value::from("p"),
                Value::from("3"),
            ]),
        ])]);
        let got = parse_entries(raw).unwrap();
        assert_eq!(got.len(), 1);
        assert!(!got[0].1.contains_key("u"));
        assert!(message_of(&got[0].1).is_none());
    }
}
