//! Assertion ids, shard hashing and time.
//!
//! An id is 128 bits: `asserted_at` in microseconds (64), shard (16), Raft log index (36) and the
//! item's position in its log entry (12), written as 26 Crockford base-32 characters. Ids are
//! therefore unique in the cluster (a shard's log index is), URL-safe, sortable by time, and
//! carry their shard so any node can route a request about an assertion without a lookup.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
pub const ID_LEN: usize = 26;
pub const MAX_LOG_INDEX: u64 = (1 << 36) - 1;
pub const MAX_ITEMS_PER_ENTRY: usize = 1 << 12;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AssertionId(u128);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid assertion id {0:?}: expected 26 Crockford base-32 characters")]
pub struct InvalidId(pub String);

impl AssertionId {
    pub fn new(asserted_at_us: u64, shard: u16, log_index: u64, item: u16) -> AssertionId {
        debug_assert!(log_index <= MAX_LOG_INDEX, "log index beyond the id's 36 bits");
        debug_assert!((item as usize) < MAX_ITEMS_PER_ENTRY);
        AssertionId(
            (asserted_at_us as u128) << 64
                | (shard as u128) << 48
                | ((log_index & MAX_LOG_INDEX) as u128) << 12
                | (item as u128 & 0xFFF),
        )
    }

    pub fn asserted_at_us(self) -> u64 {
        (self.0 >> 64) as u64
    }

    pub fn shard(self) -> u16 {
        (self.0 >> 48) as u16
    }

    pub fn log_index(self) -> u64 {
        ((self.0 >> 12) as u64) & MAX_LOG_INDEX
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<AssertionId> {
        let array: [u8; 16] = bytes.try_into().ok()?;
        Some(AssertionId(u128::from_be_bytes(array)))
    }

    pub fn parse(text: &str) -> Result<AssertionId, InvalidId> {
        if text.len() != ID_LEN {
            return Err(InvalidId(text.to_string()));
        }
        let mut value: u128 = 0;
        for (position, byte) in text.bytes().enumerate() {
            let digit = decode_digit(byte).ok_or_else(|| InvalidId(text.to_string()))?;
            // 26 digits carry 130 bits; the first may only use its low 3 bits.
            if position == 0 && digit > 0b111 {
                return Err(InvalidId(text.to_string()));
            }
            value = (value << 5) | digit as u128;
        }
        Ok(AssertionId(value))
    }
}

fn decode_digit(byte: u8) -> Option<u8> {
    let upper = byte.to_ascii_uppercase();
    let normalized = match upper {
        b'O' => b'0',
        b'I' | b'L' => b'1',
        other => other,
    };
    CROCKFORD.iter().position(|&c| c == normalized).map(|p| p as u8)
}

impl fmt::Display for AssertionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; ID_LEN];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (ID_LEN - 1 - i);
            *slot = CROCKFORD[((self.0 >> shift) & 0x1F) as usize];
        }
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for AssertionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AssertionId({self})")
    }
}

impl Serialize for AssertionId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// [`AssertionId::parse`]'s input as a JSON Schema pattern: 26 Crockford base-32 characters in
/// either case, `O`, `I` and `L` read as `0`, `1` and `1`, the first at most 7 (26 digits carry
/// 130 bits).
pub const ID_PATTERN: &str = r"^[0-7OoIiLl][0-9A-TV-Za-tv-z]{25}$";

/// In an API document: 26 Crockford base-32 characters (lowercase, `O`, `I` and `L` are read
/// as `0`, `1` and `1` on input).
impl utoipa::PartialSchema for AssertionId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(ID_LEN))
            .max_length(Some(ID_LEN))
            .pattern(Some(ID_PATTERN))
            .description(Some("an assertion id: 26 Crockford base-32 characters"))
            .into()
    }
}

impl utoipa::ToSchema for AssertionId {}

impl<'de> Deserialize<'de> for AssertionId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        AssertionId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Stable 64-bit FNV-1a; unlike `DefaultHasher` it never changes between Rust releases, so a
/// concept_path maps to the same shard on every node and every version.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = Fnv1a64::new();
    hash.feed(bytes);
    hash.finish()
}

/// [`fnv1a64`] fed in pieces (snapshot files checksum everything they write).
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a64(u64);

impl Fnv1a64 {
    pub fn new() -> Fnv1a64 {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64::new()
    }
}

/// Jump consistent hash (Lamping and Veach): a key moves only when it must as buckets grow.
pub fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}

/// The shard that owns a concept_path.
pub fn shard_for_path(concept_path: &str, shards: u16) -> u16 {
    jump_consistent_hash(fnv1a64(concept_path.as_bytes()), shards.max(1) as u32) as u16
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// RFC 3339 with milliseconds, UTC.
pub fn format_time_us(us: u64) -> String {
    let secs = (us / 1_000_000) as i64;
    let nanos = ((us % 1_000_000) * 1000) as u32;
    match chrono::DateTime::from_timestamp(secs, nanos) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => us.to_string(),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid time {0:?}: expected RFC 3339 (2026-11-22T10:00:00Z) or unix milliseconds")]
pub struct InvalidTime(pub String);

/// Parses an `as_of` bound (RFC 3339 or unix milliseconds) into an inclusive microsecond bound.
pub fn parse_as_of(value: &serde_json::Value) -> Result<u64, InvalidTime> {
    match value {
        serde_json::Value::Number(n) => {
            let ms = n.as_u64().ok_or_else(|| InvalidTime(n.to_string()))?;
            ms.checked_mul(1000).and_then(|us| us.checked_add(999)).ok_or_else(|| InvalidTime(n.to_string()))
        }
        serde_json::Value::String(s) => {
            if let Ok(ms) = s.parse::<u64>() {
                return parse_as_of(&serde_json::Value::from(ms));
            }
            let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|_| InvalidTime(s.clone()))?;
            // Times are shown with millisecond precision, so an as_of covers its whole millisecond:
            // passing back an assertion's own asserted_at includes that assertion.
            let ms = t.timestamp_millis();
            if ms < 0 {
                return Err(InvalidTime(s.clone()));
            }
            Ok(ms as u64 * 1000 + 999)
        }
        other => Err(InvalidTime(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn id_round_trips_and_sorts_by_time(ts in 0u64..u64::MAX, shard: u16, index in 0u64..MAX_LOG_INDEX, item in 0u16..4096, ts2 in 0u64..u64::MAX) {
            let id = AssertionId::new(ts, shard, index, item);
            let text = id.to_string();
            prop_assert_eq!(text.len(), ID_LEN);
            prop_assert_eq!(AssertionId::parse(&text), Ok(id));
            prop_assert_eq!(AssertionId::parse(&text.to_lowercase()), Ok(id));
            prop_assert_eq!(id.shard(), shard);
            prop_assert_eq!(id.log_index(), index);
            prop_assert_eq!(id.asserted_at_us(), ts);
            let other = AssertionId::new(ts2, shard, index, item);
            prop_assert_eq!(ts.cmp(&ts2), text.cmp(&other.to_string()));
        }

        #[test]
        fn shard_is_in_range(path in "[a-z/]{1,40}", shards in 1u16..512) {
            prop_assert!(shard_for_path(&path, shards) < shards);
        }
    }

    #[test]
    fn rejects_bad_ids() {
        assert!(AssertionId::parse("").is_err());
        assert!(AssertionId::parse("not-an-id").is_err());
        assert!(AssertionId::parse("ZZZZZZZZZZZZZZZZZZZZZZZZZZ").is_err(), "overflows 128 bits");
        assert!(AssertionId::parse("0000000000000000000000000U").is_err());
    }

    #[test]
    fn shard_hash_is_stable() {
        // Fixed values: a change here would move every concept to another shard on upgrade.
        assert_eq!(fnv1a64(b"test/disk"), 0x9fc2_37bc_3d24_bc0b);
        assert_eq!(shard_for_path("test/disk", 16), jump_consistent_hash(0x9fc2_37bc_3d24_bc0b, 16) as u16);
    }

    #[test]
    fn as_of_forms() {
        assert_eq!(parse_as_of(&serde_json::json!(1000)), Ok(1_000_999));
        assert_eq!(parse_as_of(&serde_json::json!("1000")), Ok(1_000_999));
        assert_eq!(parse_as_of(&serde_json::json!("1970-01-01T00:00:01Z")), Ok(1_000_999));
        assert_eq!(parse_as_of(&serde_json::json!("1970-01-01T00:00:01.002700+00:00")), Ok(1_002_999));
        assert!(parse_as_of(&serde_json::json!("yesterday")).is_err());
        assert!(parse_as_of(&serde_json::json!(-5)).is_err());
        assert!(parse_as_of(&serde_json::json!(true)).is_err());
    }
}
