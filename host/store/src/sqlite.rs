//! The one way the host opens its SQLite files.

use rusqlite::Connection;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Opens (creating it and its directory if needed) an SQLite database for
/// durable state: WAL (cut back to 4 MiB after checkpoints),
/// `synchronous = FULL` (a commit is on disk when it returns), a 5 s busy timeout (other processes, e.g. `wasmgate dlq`, may hold
/// the lock), an integrity check, then `schema`. Errors name `what` and the
/// file, and say what to do: wasmgate never deletes such a file.
pub fn open(path: &Path, what: &str, schema: &str) -> Result<Connection, String> {
    let fail = |e: &dyn std::fmt::Display| {
        format!(
            "{what} {} cannot be used ({e}); if it is corrupt, move it away and restart \
             (wasmgate never deletes it)",
            path.display()
        )
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    }
    let conn = Connection::open(path).map_err(|e| fail(&e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| fail(&e))?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| fail(&e))?;
    if check != "ok" {
        return Err(fail(&format!("integrity check: {check}")));
    }
    // The WAL is checkpointed every 1,000 pages (SQLite's default) and cut
    // back to 4 MiB after that, so it does not keep the size of its largest
    // burst on the state disk.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
         PRAGMA journal_size_limit = 4194304;",
    )
    .map_err(|e| fail(&e))?;
    conn.execute_batch(schema).map_err(|e| fail(&e))?;
    Ok(conn)
}
