//! Per-invocation limits: what each one bounds, its default, and its range.
//!
//! Every invocation of a component runs under all four. A breach ends that
//! invocation only (its outcome says which limit), never the host.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// Bounds on one invocation of a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU budget in wasmtime fuel units (roughly one per wasm instruction;
    /// ~1e10 per second of tight-loop CPU on a 2-core edge box). Counting
    /// instructions, not time, makes the budget independent of machine load:
    /// the same input burns the same fuel. Exhausted → outcome `fuel_exhausted`.
    pub fuel: u64,
    /// Cap on the bytes of all linear memories of the instance together.
    /// A `memory.grow` past it traps → outcome `memory_limit`.
    pub memory: u64,
    /// Wall-clock deadline, counted from the start of instantiation. It bounds
    /// both guest code (epoch interruption) and time blocked in host calls
    /// (sleeps, I/O). Passed → outcome `timeout`.
    pub timeout: Duration,
    /// How many invocations of this component may run at once. Past it an
    /// event is refused (`throttled`, HTTP 503) or waits, depending on the trigger.
    pub concurrency: u32,
    /// Most MQTT messages one invocation may publish. Past it `publish`
    /// returns `unavailable`; the invocation goes on.
    pub publishes: u32,
    /// Most bytes (topic, payload and properties) one invocation may
    /// publish. The host holds them until the invocation ends, so they also
    /// count against `memory`: buffered publishes plus linear memory stay
    /// under the memory cap. Past either, `publish` returns `unavailable`.
    pub publish_bytes: u64,
    /// Most key-value operations (`wasi:keyvalue`: each get, set, delete,
    /// exists, list-keys page, increment, and each key of a batch) one
    /// invocation may make. Past it every call returns an error; the
    /// invocation goes on.
    pub keyvalue_ops: u32,
}

impl Limits {
    /// Default fuel: about one second of busy CPU on the reference machine.
    pub const DEFAULT_FUEL: u64 = 10_000_000_000;
    /// Default memory cap: 64 MiB, enough for a Rust guest with std and a
    /// few MiB of data, small enough that a gateway can run dozens at once.
    pub const DEFAULT_MEMORY: u64 = 64 * 1024 * 1024;
    /// Default timeout: 5 s, like a short Lambda handler.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default concurrency per component.
    pub const DEFAULT_CONCURRENCY: u32 = 16;
    /// Default publishes per invocation: room for a fan-out to many devices.
    pub const DEFAULT_PUBLISHES: u32 = 1000;
    /// Default publish bytes per invocation: four of the largest messages.
    pub const DEFAULT_PUBLISH_BYTES: u64 = 4 * 1024 * 1024;
    /// Default key-value operations per invocation.
    pub const DEFAULT_KEYVALUE_OPS: u32 = 10_000;
    /// Most key-value operations per invocation that can be configured.
    pub const MAX_KEYVALUE_OPS: u32 = 1_000_000;

    /// Largest fuel budget accepted: about 15 minutes of busy CPU.
    pub const MAX_FUEL: u64 = 10_000_000_000_000;
    /// Smallest memory cap: one 64 KiB wasm page.
    pub const MIN_MEMORY: u64 = 64 * 1024;
    /// Largest memory cap: the 4 GiB a 32-bit linear memory can address.
    pub const MAX_MEMORY: u64 = 4 * 1024 * 1024 * 1024;
    /// Smallest timeout.
    pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);
    /// Largest timeout: 15 minutes, Lambda's ceiling.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
    /// Largest concurrency per component.
    pub const MAX_CONCURRENCY: u32 = 10_000;
    /// Largest publish count per invocation.
    pub const MAX_PUBLISHES: u32 = 100_000;
    /// Largest publish byte budget per invocation.
    pub const MAX_PUBLISH_BYTES: u64 = 256 * 1024 * 1024;

    /// Checks every limit against its range; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=Self::MAX_FUEL).contains(&self.fuel) {
            return Err(format!(
                "fuel = {} is out of range: it must be between 1 and {}",
                self.fuel,
                Self::MAX_FUEL
            ));
        }
        if !(Self::MIN_MEMORY..=Self::MAX_MEMORY).contains(&self.memory) {
            return Err(format!(
                "memory = {} is out of range: it must be between 64KiB and 4GiB",
                Size(self.memory)
            ));
        }
        if !(Self::MIN_TIMEOUT..=Self::MAX_TIMEOUT).contains(&self.timeout) {
            return Err(format!(
                "timeout = {} is out of range: it must be between 1ms and 15m",
                humantime::format_duration(self.timeout)
            ));
        }
        if !(1..=Self::MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(format!(
                "concurrency = {} is out of range: it must be between 1 and {}",
                self.concurrency,
                Self::MAX_CONCURRENCY
            ));
        }
        if self.publishes > Self::MAX_PUBLISHES {
            return Err(format!(
                "publishes = {} is out of range: it must be between 0 and {}",
                self.publishes,
                Self::MAX_PUBLISHES
            ));
        }
        if self.publish_bytes > Self::MAX_PUBLISH_BYTES {
            return Err(format!(
                "publish_bytes = {} is out of range: it must be at most 256MiB",
                Size(self.publish_bytes)
            ));
        }
        if self.keyvalue_ops > Self::MAX_KEYVALUE_OPS {
            return Err(format!(
                "keyvalue_ops = {} is out of range: it must be between 0 and {}",
                self.keyvalue_ops,
                Self::MAX_KEYVALUE_OPS
            ));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: Self::DEFAULT_FUEL,
            memory: Self::DEFAULT_MEMORY,
            timeout: Self::DEFAULT_TIMEOUT,
            concurrency: Self::DEFAULT_CONCURRENCY,
            publishes: Self::DEFAULT_PUBLISHES,
            publish_bytes: Self::DEFAULT_PUBLISH_BYTES,
            keyvalue_ops: Self::DEFAULT_KEYVALUE_OPS,
        }
    }
}

/// A size in bytes, written as `"16MiB"`, `"512KiB"`, `"1GB"` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    /// Parses `"16MiB"`, `"16 MiB"`, `"1GB"`, `"65536"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            return Err(format!("{text:?} is not a size: sizes cannot be negative"));
        }
        trimmed
            .parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|_| {
                format!(
                    "{text:?} is not a size (write e.g. \"16MiB\", \"512KiB\" or a number of bytes)"
                )
            })
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 0 => Ok(Size(n as u64)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!(
                "{n} is not a size: sizes cannot be negative"
            ))),
            Raw::Text(t) => Size::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written as `"2s"`, `"150ms"`, `"1m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses `"2s"`, `"150ms"`, `"1m 30s"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| {
                format!("{text:?} is not a duration ({e}); write e.g. \"2s\", \"150ms\" or \"1m\"")
            })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Other(toml::Value),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => HumanDuration::parse(&t).map_err(serde::de::Error::custom),
            Raw::Other(v) => Err(serde::de::Error::custom(format!(
                "{v} is not a duration: write it as a string with a unit, e.g. \"2s\" or \"150ms\""
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, want) in [
            ("16MiB", Some(16 << 20)),
            ("16 MiB", Some(16 << 20)),
            ("512KiB", Some(512 << 10)),
            ("1GB", Some(1_000_000_000)),
            ("65536", Some(65536)),
            ("16XB", None),
            ("-1MiB", None),
            ("", None),
        ] {
            assert_eq!(Size::parse(text).ok().map(|s| s.0), want, "{text:?}");
        }
    }

    #[test]
    fn durations() {
        for (text, want) in [
            ("2s", Some(Duration::from_secs(2))),
            ("150ms", Some(Duration::from_millis(150))),
            ("1m 30s", Some(Duration::from_secs(90))),
            ("2", None),
            ("soon", None),
        ] {
            assert_eq!(
                HumanDuration::parse(text).ok().map(|d| d.0),
                want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn ranges() {
        assert!(Limits::default().validate().is_ok());
        let bad = [
            Limits {
                fuel: 0,
                ..Limits::default()
            },
            Limits {
                memory: 1024,
                ..Limits::default()
            },
            Limits {
                memory: Limits::MAX_MEMORY + 1,
                ..Limits::default()
            },
            Limits {
                timeout: Duration::ZERO,
                ..Limits::default()
            },
            Limits {
                timeout: Duration::from_secs(3600),
                ..Limits::default()
            },
            Limits {
                concurrency: 0,
                ..Limits::default()
            },
            Limits {
                publishes: Limits::MAX_PUBLISHES + 1,
                ..Limits::default()
            },
            Limits {
                publish_bytes: Limits::MAX_PUBLISH_BYTES + 1,
                ..Limits::default()
            },
            Limits {
                keyvalue_ops: Limits::MAX_KEYVALUE_OPS + 1,
                ..Limits::default()
            },
        ];
        for limits in bad {
            assert!(limits.validate().is_err(), "{limits:?}");
        }
    }
}
