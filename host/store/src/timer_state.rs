//! The timer trigger's durable state: the last fire time of each timer, kept
//! in `state_dir/timers.json` so that missed ticks can be caught up after a
//! restart.
//!
//! Writes are batched: [`TimerState::flush`] writes at most once per call
//! (the host calls it every second and at shutdown), atomically (temporary
//! file + rename). A crash loses at most the last second of records, which
//! can make a tick run twice after the restart, never be lost.

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Last fire times by timer key.
#[derive(Debug, Default)]
pub struct TimerState {
    path: Option<PathBuf>,
    last: Mutex<BTreeMap<String, i64>>,
    dirty: AtomicBool,
}

impl TimerState {
    /// State kept only in memory (no catch-up across restarts).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Opens the state file; a missing file is an empty state. A file that
    /// cannot be read or parsed is an error that says what to do: the host
    /// never discards it silently.
    pub fn open(path: &Path) -> Result<Self, String> {
        let last = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice::<BTreeMap<String, i64>>(&bytes).map_err(|e| {
                format!(
                    "timer state {} is corrupt ({e}); move it away to start without catch-up state",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read timer state {}: {e}", path.display())),
        };
        Ok(Self {
            path: Some(path.to_path_buf()),
            last: Mutex::new(last),
            dirty: AtomicBool::new(false),
        })
    }

    /// The last recorded fire time of `key`.
    pub fn last(&self, key: &str) -> Option<DateTime<Utc>> {
        let ms = *self.last.lock().expect("timer state lock").get(key)?;
        DateTime::from_timestamp_millis(ms)
    }

    /// Records that the tick of `key` scheduled at `t` was handled. The
    /// recorded time only moves forward.
    pub fn record(&self, key: &str, t: DateTime<Utc>) {
        let mut last = self.last.lock().expect("timer state lock");
        let ms = t.timestamp_millis();
        let entry = last.entry(key.to_string()).or_insert(ms);
        *entry = (*entry).max(ms);
        drop(last);
        self.dirty.store(true, Ordering::Release);
    }

    /// Writes the state if it changed since the last flush.
    pub fn flush(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let json = serde_json::to_vec_pretty(&*self.last.lock().expect("timer state lock"))
            .expect("a map of numbers serializes");
        let result = write_atomically(path, &json);
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".timers-{}.tmp", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_corruption() {
        let dir = std::env::temp_dir().join(format!("wasmgate-state-{}", uuid::Uuid::now_v7()));
        let path = dir.join("timers.json");
        let state = TimerState::open(&path).unwrap();
        assert_eq!(state.last("a"), None);
        let t = DateTime::from_timestamp_millis(1_790_000_000_123).unwrap();
        state.record("a", t);
        state.flush().unwrap();
        assert_eq!(TimerState::open(&path).unwrap().last("a"), Some(t));
        std::fs::write(&path, b"{ not json").unwrap();
        let err = TimerState::open(&path).unwrap_err();
        assert!(
            err.contains("is corrupt") && err.contains("move it away"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
