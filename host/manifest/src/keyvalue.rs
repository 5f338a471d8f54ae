//! `[keyvalue]`: the bounds of the gateway's key-value buckets
//! (`wasi:keyvalue`, kept in `state_dir/keyvalue.sqlite`).
//!
//! ```toml
//! [keyvalue]
//! max_key_bytes = 1024        # default
//! max_value_bytes = "1MiB"    # default
//!
//! [keyvalue.bucket.readings]
//! max_keys = 100000           # default
//! max_bytes = "64MiB"         # default: keys and values together
//! ```
//!
//! A component opens a bucket only if `allow.keyvalue` names it; a bucket
//! needs no section of its own (it then has the default bounds).
//!
//! A bucket that a `[[trigger.keyvalue]]` listens to keeps a change stream,
//! bounded by `stream_max_changes` (100,000), `stream_max_bytes` (64 MiB of
//! keys and values) and `stream_max_age` (24 h) in its section: the oldest
//! changes past them are dropped, and a trigger that had not read them is
//! told (a gap).
//!
//! ```toml
//! [[trigger.keyvalue]]
//! component = "audit"
//! bucket = "orders"
//! key_prefix = "eu/"          # optional
//! view = "new_and_old"        # keys_only | new | old | new_and_old (default "new")
//! batch_size = 100            # default 1, at most 1000
//! batch_window = "200ms"      # wait this long for a batch to fill (default 0)
//! retry = { attempts = 5 }
//! ```

use crate::RetryConfig;
use crate::limits::{HumanDuration, Size};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use toml::Spanned;

/// `[keyvalue]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyValueConfig {
    /// Longest key, in bytes of UTF-8 (default 1,024; at most 8,192).
    pub max_key_bytes: Option<Spanned<u64>>,
    /// Largest value (default 1 MiB; at most 16 MiB).
    pub max_value_bytes: Option<Spanned<Size>>,
    /// `[keyvalue.bucket.NAME]`, by name.
    #[serde(default)]
    pub bucket: BTreeMap<String, Spanned<BucketConfig>>,
}

/// `[keyvalue.bucket.NAME]`: what one bucket may hold.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Most keys (default 100,000).
    pub max_keys: Option<u64>,
    /// Most bytes of keys and values together (default 64 MiB).
    pub max_bytes: Option<Size>,
    /// Most changes its change stream keeps (default 100,000).
    pub stream_max_changes: Option<u64>,
    /// Most bytes (keys and values) its change stream keeps (default 64 MiB).
    pub stream_max_bytes: Option<Size>,
    /// Oldest change its change stream keeps (default 24 h).
    pub stream_max_age: Option<HumanDuration>,
}

/// The bounds of the whole store, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValueBounds {
    /// Longest key in bytes.
    pub max_key_bytes: u64,
    /// Largest value in bytes.
    pub max_value_bytes: u64,
    /// Each configured bucket's bounds; other buckets have
    /// [`BucketBounds::default`].
    pub buckets: BTreeMap<String, BucketBounds>,
}

/// One bucket's bounds, defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketBounds {
    /// Most keys.
    pub max_keys: u64,
    /// Most bytes of keys and values together.
    pub max_bytes: u64,
    /// Its change stream's retention.
    pub stream: StreamBounds,
}

/// What a bucket's change stream keeps; the oldest changes past any bound
/// are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamBounds {
    /// Most changes.
    pub max_changes: u64,
    /// Most bytes of keys and values.
    pub max_bytes: u64,
    /// Oldest change.
    pub max_age: Duration,
}

impl Default for StreamBounds {
    fn default() -> Self {
        Self {
            max_changes: 100_000,
            max_bytes: 64 * 1024 * 1024,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

impl Default for BucketBounds {
    fn default() -> Self {
        Self {
            max_keys: KeyValueBounds::DEFAULT_MAX_KEYS,
            max_bytes: KeyValueBounds::DEFAULT_MAX_BYTES,
            stream: StreamBounds::default(),
        }
    }
}

impl Default for KeyValueBounds {
    fn default() -> Self {
        Self {
            max_key_bytes: Self::DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: Self::DEFAULT_MAX_VALUE_BYTES,
            buckets: BTreeMap::new(),
        }
    }
}

impl KeyValueBounds {
    /// Default longest key: 1 KiB (a path-like key with room to spare).
    pub const DEFAULT_MAX_KEY_BYTES: u64 = 1024;
    /// Longest key that can be configured: 8 KiB.
    pub const MAX_KEY_BYTES: u64 = 8 * 1024;
    /// Default largest value: 1 MiB (the largest MQTT message the host
    /// takes fits).
    pub const DEFAULT_MAX_VALUE_BYTES: u64 = 1024 * 1024;
    /// Largest value that can be configured: 16 MiB.
    pub const MAX_VALUE_BYTES: u64 = 16 * 1024 * 1024;
    /// Default keys per bucket.
    pub const DEFAULT_MAX_KEYS: u64 = 100_000;
    /// Default bytes (keys and values) per bucket: 64 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

    /// The bounds of bucket `name`.
    pub fn bucket(&self, name: &str) -> BucketBounds {
        self.buckets.get(name).copied().unwrap_or_default()
    }
}

impl KeyValueConfig {
    /// The bounds with defaults filled in (checked by the manifest's
    /// validation).
    pub fn bounds(&self) -> KeyValueBounds {
        let d = BucketBounds::default();
        KeyValueBounds {
            max_key_bytes: self
                .max_key_bytes
                .as_ref()
                .map_or(KeyValueBounds::DEFAULT_MAX_KEY_BYTES, |k| *k.get_ref()),
            max_value_bytes: self
                .max_value_bytes
                .as_ref()
                .map_or(KeyValueBounds::DEFAULT_MAX_VALUE_BYTES, |v| v.get_ref().0),
            buckets: self
                .bucket
                .iter()
                .map(|(name, b)| {
                    let b = b.get_ref();
                    let bounds = BucketBounds {
                        max_keys: b.max_keys.unwrap_or(d.max_keys),
                        max_bytes: b.max_bytes.map_or(d.max_bytes, |s| s.0),
                        stream: StreamBounds {
                            max_changes: b.stream_max_changes.unwrap_or(d.stream.max_changes),
                            max_bytes: b.stream_max_bytes.map_or(d.stream.max_bytes, |s| s.0),
                            max_age: b.stream_max_age.map_or(d.stream.max_age, |a| a.0),
                        },
                    };
                    (name.clone(), bounds)
                })
                .collect(),
        }
    }
}

/// What a change carries of the key's values (DynamoDB's
/// `StreamViewType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Neither value.
    KeysOnly,
    /// The value after the change.
    #[default]
    New,
    /// The value before it.
    Old,
    /// Both.
    NewAndOld,
}

/// `[[trigger.keyvalue]]`: a component handles the changes of a bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyValueTrigger {
    /// The component whose `handle-changes` runs.
    pub component: Spanned<String>,
    /// The bucket whose changes it gets.
    pub bucket: Spanned<String>,
    /// Only the changes of keys that start with this.
    pub key_prefix: Option<Spanned<String>>,
    /// What each change carries of the values.
    #[serde(default)]
    pub view: View,
    /// Most changes per invocation (default 1, at most 1000).
    pub batch_size: Option<Spanned<u32>>,
    /// How long to wait for a batch to fill (default 0: at once).
    pub batch_window: Option<Spanned<HumanDuration>>,
    /// Retry policy for a failed batch.
    pub retry: Option<RetryConfig>,
    /// Lets the component write to the bucket it listens to (each of its
    /// writes is a change it gets again).
    #[serde(default)]
    pub allow_self_trigger: bool,
}

impl KeyValueTrigger {
    /// Most changes per invocation, at most [`Self::MAX_BATCH_SIZE`].
    pub const MAX_BATCH_SIZE: u32 = 1000;
    /// Longest `batch_window`.
    pub const MAX_BATCH_WINDOW: Duration = Duration::from_secs(300);

    /// `batch_size`, default filled in.
    pub fn batch_size(&self) -> u32 {
        self.batch_size.as_ref().map_or(1, |b| *b.get_ref())
    }

    /// `batch_window`, default filled in.
    pub fn batch_window(&self) -> Duration {
        self.batch_window
            .as_ref()
            .map_or(Duration::ZERO, |w| w.get_ref().0)
    }
}

/// Checks a bucket name: 1 to 64 of ASCII letters, digits, `-`, `_`, `.`.
pub fn validate_bucket_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid bucket name: use 1 to 64 ASCII letters, digits, '-', '_' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        for ok in ["readings", "dedup-v2", "a.b_c", "X"] {
            assert!(validate_bucket_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
            assert!(validate_bucket_name(bad).is_err(), "{bad}");
        }
    }
}
