//! The change streams of buckets that a `[[trigger.keyvalue]]` listens to.
//!
//! **Written with the change.** `Bucket::set` and `Bucket::delete` (the only
//! write paths) append a row to `kv_changes` in the same savepoint as the
//! change itself, so a change is in the stream exactly when it is committed,
//! whichever process made it (the gateway, `wasmgate kv`, a replay). Each
//! bucket numbers its changes 1, 2, 3, … in commit order (`kv_streams`
//! keeps the last number), so a key's changes are in order.
//!
//! **Bounded.** After each append the oldest changes past the bucket's
//! `stream_max_changes`, `stream_max_bytes` or `stream_max_age` are dropped
//! (never the newest one), and the bucket remembers the last number dropped:
//! a trigger whose checkpoint is behind it is told what it lost (a gap).
//! Age is enforced when the bucket is next written.
//!
//! **Checkpoints** (`kv_checkpoints`) are written through the same writer,
//! in queue order: behind the writes of the handler that settled the batch.

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use wasmgate_manifest::keyvalue::{StreamBounds, View};
use wasmgate_runtime::invoke::{KvChange, KvGap, KvOperation, KvWriter};
use wasmgate_runtime::keyvalue::Origin;

/// Most changes one read looks at (those outside the trigger's
/// `key_prefix` included): one read costs the writer a bounded time.
pub const SCAN_CHANGES: usize = 10_000;
/// Most bytes of keys and values one batch carries (at least one change
/// always goes): 6 MiB, as a Lambda function's stream batch.
pub const BATCH_BYTES: u64 = 6 * 1024 * 1024;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv_streams (
    bucket TEXT PRIMARY KEY,
    -- 1 while a trigger listens: changes are recorded.
    active INTEGER NOT NULL,
    -- The last sequence number given and the last one dropped.
    last_seq INTEGER NOT NULL,
    pruned_seq INTEGER NOT NULL,
    changes INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_changes (
    bucket TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT NOT NULL,
    -- 1 set, 2 delete.
    op INTEGER NOT NULL,
    new_value BLOB,
    old_value BLOB,
    -- Microseconds since the Unix epoch.
    committed_us INTEGER NOT NULL,
    size INTEGER NOT NULL,
    writer_invocation TEXT,
    writer_component TEXT,
    writer_trigger TEXT,
    PRIMARY KEY (bucket, seq)
);
CREATE TABLE IF NOT EXISTS kv_checkpoints (
    consumer TEXT PRIMARY KEY,
    bucket TEXT NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
";

/// What a trigger reads.
#[derive(Debug, Clone)]
pub struct StreamRead {
    /// The bucket.
    pub bucket: String,
    /// Changes after this sequence number (the trigger's checkpoint).
    pub after: u64,
    /// Only keys that start with this.
    pub prefix: Option<String>,
    /// Which values the changes carry.
    pub view: View,
    /// Most changes.
    pub max_changes: usize,
    /// Most bytes of keys and values.
    pub max_bytes: u64,
    /// Past `max_bytes` with one change rather than none (a change larger
    /// than a batch still goes, alone).
    pub at_least_one: bool,
}

/// What a read found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamBatch {
    /// Changes dropped before the trigger read them.
    pub gap: Option<KvGap>,
    /// Matching changes, in order.
    pub changes: Vec<KvChange>,
    /// Every change up to this number was looked at (the checkpoint once
    /// the batch is handled; past changes outside the prefix too).
    pub through: u64,
    /// When the first change was committed, µs since the Unix epoch (for
    /// the lag).
    pub first_committed_us: Option<u64>,
    /// The bucket's last sequence number when it was read.
    pub last: u64,
    /// The read stopped at `max_bytes` or at [`SCAN_CHANGES`]: waiting
    /// will not make the batch larger.
    pub full: bool,
}

/// A bucket's stream, for status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamUsage {
    /// The bucket.
    pub bucket: String,
    /// Whether changes are recorded (a trigger listens).
    pub active: bool,
    /// The last sequence number.
    pub last_sequence: u64,
    /// Changes kept.
    pub changes: u64,
    /// Bytes kept.
    pub bytes: u64,
}

/// A stream job for the writer thread.
pub(super) enum Job {
    /// Records changes of exactly these buckets from now on.
    SetActive(Vec<String>, oneshot::Sender<Result<(), String>>),
    /// A consumer's checkpoint, created at the oldest kept change.
    Position {
        consumer: String,
        bucket: String,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    Read(StreamRead, oneshot::Sender<Result<StreamBatch, String>>),
    Checkpoint {
        consumer: String,
        bucket: String,
        seq: u64,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Usage(oneshot::Sender<Result<Vec<StreamUsage>, String>>),
}

/// An answer to send once the group's transaction has ended: `Some(why)`
/// when it failed.
pub(super) type Answer = Box<dyn FnOnce(Option<&str>) + Send>;

/// The answer of a job whose result is `result`, sent after the commit,
/// and whether the job succeeded.
pub(super) fn answer<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, String>>,
    result: rusqlite::Result<T>,
) -> (Answer, bool) {
    let ok = result.is_ok();
    let answer: Answer = Box::new(move |failed: Option<&str>| {
        let r = match failed {
            Some(why) => Err(why.to_string()),
            None => result.map_err(|e| format!("the key-value store failed: {e}")),
        };
        let _ = reply.send(r);
    });
    (answer, ok)
}

impl Job {
    /// Runs the job in the writer's transaction; returns its answer and
    /// whether it succeeded (a failed one is rolled back to its savepoint).
    pub(super) fn run(self, conn: &Connection) -> (Answer, bool) {
        match self {
            Job::SetActive(buckets, reply) => answer(reply, set_active(conn, &buckets)),
            Job::Position {
                consumer,
                bucket,
                reply,
            } => answer(reply, position(conn, &consumer, &bucket)),
            Job::Read(req, reply) => answer(reply, read(conn, &req)),
            Job::Checkpoint {
                consumer,
                bucket,
                seq,
                reply,
            } => answer(
                reply,
                conn.prepare_cached(
                    "INSERT INTO kv_checkpoints (consumer, bucket, seq) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq",
                )
                .and_then(|mut s| s.execute(params![consumer, bucket, seq as i64]))
                .map(|_| ()),
            ),
            Job::Usage(reply) => answer(reply, usage(conn)),
        }
    }

    /// Answers at once with `why` (the queue is full or closed).
    pub(super) fn refuse(self, why: &str) {
        let why = why.to_string();
        match self {
            Job::SetActive(_, reply) | Job::Checkpoint { reply, .. } => {
                let _ = reply.send(Err(why));
            }
            Job::Position { reply, .. } => {
                let _ = reply.send(Err(why));
            }
            Job::Read(_, reply) => {
                let _ = reply.send(Err(why));
            }
            Job::Usage(reply) => {
                let _ = reply.send(Err(why));
            }
        }
    }
}

fn set_active(conn: &Connection, buckets: &[String]) -> rusqlite::Result<()> {
    let mut was: Vec<String> = conn
        .prepare("SELECT bucket FROM kv_streams WHERE active = 1")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    was.retain(|b| !buckets.contains(b));
    for bucket in was {
        // No trigger listens any more: its changes go, and a trigger that
        // comes back finds them in a gap.
        conn.execute("DELETE FROM kv_changes WHERE bucket = ?1", params![bucket])?;
        conn.execute(
            "UPDATE kv_streams SET active = 0, pruned_seq = last_seq, changes = 0, bytes = 0 \
             WHERE bucket = ?1",
            params![bucket],
        )?;
    }
    for bucket in buckets {
        conn.execute(
            "INSERT INTO kv_streams (bucket, active, last_seq, pruned_seq, changes, bytes) \
             VALUES (?1, 1, 0, 0, 0, 0) ON CONFLICT (bucket) DO UPDATE SET active = 1",
            params![bucket],
        )?;
    }
    Ok(())
}

/// `(last_seq, pruned_seq)` of a bucket's stream.
fn ends(conn: &Connection, bucket: &str) -> rusqlite::Result<(u64, u64)> {
    Ok(conn
        .prepare_cached("SELECT last_seq, pruned_seq FROM kv_streams WHERE bucket = ?1")?
        .query_row(params![bucket], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .optional()?
        .unwrap_or((0, 0)))
}

fn position(conn: &Connection, consumer: &str, bucket: &str) -> rusqlite::Result<u64> {
    let (last, pruned) = ends(conn, bucket)?;
    let saved: Option<i64> = conn
        .prepare_cached("SELECT seq FROM kv_checkpoints WHERE consumer = ?1")?
        .query_row(params![consumer], |r| r.get(0))
        .optional()?;
    match saved {
        // Past the stream's end only if the store was replaced: start
        // again at its end rather than wait for numbers to catch up.
        Some(seq) => Ok((seq as u64).min(last)),
        None => {
            // A new trigger starts at the oldest change kept.
            conn.prepare_cached(
                "INSERT INTO kv_checkpoints (consumer, bucket, seq) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![consumer, bucket, pruned as i64])?;
            Ok(pruned)
        }
    }
}

fn read(conn: &Connection, req: &StreamRead) -> rusqlite::Result<StreamBatch> {
    let (last, pruned) = ends(conn, &req.bucket)?;
    let mut after = req.after;
    let mut batch = StreamBatch {
        last,
        ..StreamBatch::default()
    };
    if pruned > after {
        batch.gap = Some(KvGap {
            first_sequence: after + 1,
            last_sequence: pruned,
            lost: pruned - after,
        });
        after = pruned;
    }
    batch.through = after;
    let (new, old) = match req.view {
        View::KeysOnly => (false, false),
        View::New => (true, false),
        View::Old => (false, true),
        View::NewAndOld => (true, true),
    };
    let prefix = req.prefix.as_deref().unwrap_or("");
    let mut stmt = conn.prepare_cached(
        "SELECT seq, key, op, committed_us, writer_invocation, writer_component, writer_trigger, \
         CASE WHEN ?3 AND substr(key, 1, length(?4)) = ?4 THEN new_value END, \
         CASE WHEN ?5 AND substr(key, 1, length(?4)) = ?4 THEN old_value END \
         FROM kv_changes WHERE bucket = ?1 AND seq > ?2 ORDER BY seq LIMIT ?6",
    )?;
    let mut rows = stmt.query(params![
        req.bucket,
        after as i64,
        new,
        prefix,
        old,
        SCAN_CHANGES as i64
    ])?;
    let mut bytes = 0;
    let mut scanned = 0;
    while let Some(row) = rows.next()? {
        if batch.changes.len() >= req.max_changes {
            break;
        }
        scanned += 1;
        let seq = row.get::<_, i64>(0)? as u64;
        let key: String = row.get(1)?;
        if !key.starts_with(prefix) {
            batch.through = seq;
            continue;
        }
        let change = change_of(row, seq, key)?;
        let forced = req.at_least_one && batch.changes.is_empty();
        if !forced && bytes + change.size() > req.max_bytes {
            batch.full = true;
            break;
        }
        batch
            .first_committed_us
            .get_or_insert(row.get::<_, i64>(3)? as u64);
        batch.through = seq;
        bytes += change.size();
        batch.changes.push(change);
        if bytes >= req.max_bytes {
            batch.full = true;
            break;
        }
    }
    if scanned == SCAN_CHANGES {
        batch.full = true;
    }
    Ok(batch)
}

/// A row of `read`'s query as a change.
fn change_of(row: &rusqlite::Row<'_>, seq: u64, key: String) -> rusqlite::Result<KvChange> {
    let writer = match row.get::<_, Option<String>>(4)? {
        Some(invocation) => Some(KvWriter {
            invocation,
            component: row.get::<_, Option<String>>(5)?.unwrap_or_default(),
            trigger: row.get::<_, Option<String>>(6)?.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(KvChange {
        key,
        operation: if row.get::<_, i64>(2)? == 2 {
            KvOperation::Delete
        } else {
            KvOperation::Set
        },
        sequence: seq,
        committed_at_ms: row.get::<_, i64>(3)? as u64 / 1000,
        new_value: row.get(7)?,
        old_value: row.get(8)?,
        writer,
    })
}

fn usage(conn: &Connection) -> rusqlite::Result<Vec<StreamUsage>> {
    conn.prepare("SELECT bucket, active, last_seq, changes, bytes FROM kv_streams ORDER BY bucket")?
        .query_map([], |r| {
            Ok(StreamUsage {
                bucket: r.get(0)?,
                active: r.get::<_, i64>(1)? == 1,
                last_sequence: r.get::<_, i64>(2)? as u64,
                changes: r.get::<_, i64>(3)? as u64,
                bytes: r.get::<_, i64>(4)? as u64,
            })
        })?
        .collect()
}

/// Microseconds since the Unix epoch, now.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Whether changes of `bucket` are recorded.
pub(super) fn is_active(conn: &Connection, bucket: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT active FROM kv_streams WHERE bucket = ?1")?
        .query_row(params![bucket], |r| r.get::<_, i64>(0))
        .optional()?
        == Some(1))
}

/// One change to record, in the transaction that makes it.
pub(super) struct Capture<'a> {
    pub(super) bucket: &'a str,
    pub(super) key: &'a str,
    pub(super) operation: KvOperation,
    pub(super) new_value: Option<&'a [u8]>,
    pub(super) old_value: Option<&'a [u8]>,
    pub(super) origin: Option<&'a Origin>,
}

/// Appends `c` to its bucket's stream, then drops what is past `bounds`.
pub(super) fn record(
    conn: &Connection,
    c: &Capture<'_>,
    bounds: &StreamBounds,
) -> rusqlite::Result<()> {
    let (last, _) = ends(conn, c.bucket)?;
    let seq = last + 1;
    let now = now_us();
    let size = (c.key.len()
        + c.new_value.map_or(0, <[u8]>::len)
        + c.old_value.map_or(0, <[u8]>::len)) as i64;
    conn.prepare_cached(
        "INSERT INTO kv_changes (bucket, seq, key, op, new_value, old_value, committed_us, size, \
         writer_invocation, writer_component, writer_trigger) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        c.bucket,
        seq as i64,
        c.key,
        if c.operation == KvOperation::Delete {
            2
        } else {
            1
        },
        c.new_value,
        c.old_value,
        now as i64,
        size,
        c.origin.map(|o| o.invocation.as_str()),
        c.origin.map(|o| o.component.as_str()),
        c.origin.map(|o| o.trigger.as_str()),
    ])?;
    conn.prepare_cached(
        "UPDATE kv_streams SET last_seq = ?2, changes = changes + 1, bytes = bytes + ?3 \
         WHERE bucket = ?1",
    )?
    .execute(params![c.bucket, seq as i64, size])?;
    prune(conn, c.bucket, seq, bounds, now)
}

/// Drops the oldest changes of `bucket` past `bounds`, never `newest`.
fn prune(
    conn: &Connection,
    bucket: &str,
    newest: u64,
    bounds: &StreamBounds,
    now: u64,
) -> rusqlite::Result<()> {
    let oldest_kept = now.saturating_sub(bounds.max_age.as_micros() as u64);
    loop {
        let (changes, bytes): (i64, i64) = conn
            .prepare_cached("SELECT changes, bytes FROM kv_streams WHERE bucket = ?1")?
            .query_row(params![bucket], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let Some((seq, size, at)) = conn
            .prepare_cached(
                "SELECT seq, size, committed_us FROM kv_changes WHERE bucket = ?1 ORDER BY seq LIMIT 1",
            )?
            .query_row(params![bucket], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
            .optional()?
        else {
            return Ok(());
        };
        let over = changes as u64 > bounds.max_changes
            || bytes as u64 > bounds.max_bytes
            || (at as u64) < oldest_kept;
        if !over || seq as u64 >= newest {
            return Ok(());
        }
        conn.prepare_cached("DELETE FROM kv_changes WHERE bucket = ?1 AND seq = ?2")?
            .execute(params![bucket, seq])?;
        conn.prepare_cached(
            "UPDATE kv_streams SET changes = changes - 1, bytes = bytes - ?2, pruned_seq = ?3 \
             WHERE bucket = ?1",
        )?
        .execute(params![bucket, size, seq])?;
    }
}
