//! The key-value buckets guests open with `wasi:keyvalue`, in
//! `state_dir/keyvalue.sqlite`.
//!
//! **Durable when the call returns.** One writer thread owns the database
//! connection. It takes every operation waiting in its queue (up to
//! [`MAX_GROUP`]), runs them in one transaction — each in a savepoint of its
//! own, so a refused operation undoes only itself — commits (WAL,
//! `synchronous = FULL`: the commit is on disk), and only then answers each.
//! Many invocations writing at once share one fsync (group commit); one
//! alone pays one per write. Reads go through the same queue, so a client
//! always reads its own writes.
//!
//! **Bounded.** Key length and value size (`[keyvalue]`), keys and bytes
//! per bucket (`[keyvalue.bucket.NAME]`; bytes count keys and values), the
//! size of one answer (a `list-keys` page, a `get-many`): each breach is a
//! sentence for the guest, and a write that does not grow a bucket is never
//! refused (so a bucket over a lowered bound can still shrink). The usage of
//! each bucket is kept in the same transactions as its data, so it is exact
//! across restarts and across processes (`wasmgate kv` opens the same file
//! while the gateway runs; SQLite's locks order the two writers).
//!
//! **Counters** (`increment`) are ASCII decimal (`"42"`), as wasmtime's own
//! implementation keeps them: readable with `get`, settable with `set`. A
//! value that is not one is an error, as is an overflow.
//!
//! **Cursors** of `list-keys` are row ids: keys come in insertion order, a
//! key set again keeps its place, and a page never repeats or skips a key
//! that stayed in the bucket while it was listed.

pub mod stream;

use rusqlite::{Connection, OptionalExtension, params};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use stream::{StreamBatch, StreamRead, StreamUsage};
use tokio::sync::{mpsc, oneshot, watch};
use wasmgate_manifest::keyvalue::KeyValueBounds;
use wasmgate_runtime::invoke::KvOperation;
use wasmgate_runtime::keyvalue::{Delta, KeyValue, Op, Origin, Pairs, Reply, Token};

/// Most operations committed together.
pub const MAX_GROUP: usize = 256;
/// Most operations waiting for the writer; past it a call is refused as
/// busy (the writer is stalled: a lock held elsewhere, a slow disk).
pub const MAX_WAITING: usize = 4096;
/// Most keys of one `list-keys` page.
pub const PAGE_KEYS: usize = 1000;
/// Most key bytes of one `list-keys` page (a page ends at the first key
/// that reaches it).
pub const PAGE_BYTES: usize = 256 * 1024;
/// Most value bytes one `get-many` answers with.
pub const GET_MANY_BYTES: u64 = 16 * 1024 * 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    -- Sets of the key since its row was created (compare-and-swap).
    version INTEGER NOT NULL DEFAULT 0,
    UNIQUE (bucket, key)
);
CREATE INDEX IF NOT EXISTS kv_by_bucket ON kv (bucket, id);
CREATE TABLE IF NOT EXISTS kv_buckets (
    name TEXT PRIMARY KEY,
    keys INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Opens the file, creating the schema, and adds the `version` column to a
/// store made before it existed.
fn open_db(path: &Path) -> Result<Connection, String> {
    let schema = format!("{SCHEMA}{}", stream::SCHEMA);
    let conn = crate::sqlite::open(path, "the key-value store", &schema)?;
    let has_version = conn
        .prepare("SELECT 1 FROM pragma_table_info('kv') WHERE name = 'version'")
        .and_then(|mut s| s.exists([]))
        .map_err(|e| format!("the key-value store {}: {e}", path.display()))?;
    if !has_version {
        // Another process may add it at the same moment: its error then
        // says the column exists, which is what was wanted.
        if let Err(e) =
            conn.execute_batch("ALTER TABLE kv ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
            && !e.to_string().contains("duplicate column")
        {
            return Err(format!("the key-value store {}: {e}", path.display()));
        }
    }
    Ok(conn)
}

/// What one bucket holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BucketUsage {
    /// Its name.
    pub name: String,
    /// Keys in it.
    pub keys: u64,
    /// Bytes of its keys and values.
    pub bytes: u64,
}

enum Job {
    Op {
        bucket: String,
        op: Op,
        origin: Option<Arc<Origin>>,
        reply: oneshot::Sender<Result<Reply, String>>,
    },
    Usage(oneshot::Sender<Result<Vec<BucketUsage>, String>>),
    Stream(stream::Job),
}

/// The key-value store: a handle to its writer thread. Cloned handles share
/// it; the thread ends when the last handle is dropped, after answering
/// every queued operation.
#[derive(Clone)]
pub struct KeyValueStore {
    jobs: mpsc::Sender<Job>,
    path: Arc<PathBuf>,
    sizes: (usize, usize),
    /// Counts the commits that recorded a change in a stream.
    changed: watch::Receiver<u64>,
}

impl std::fmt::Debug for KeyValueStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyValueStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KeyValueStore {
    /// The file in `state_dir`.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("keyvalue.sqlite")
    }

    /// Opens (creating) the store at `path` and starts its writer thread.
    ///
    /// At most [`MAX_WAITING`] operations wait for it; an operation whose
    /// caller has gone (an invocation past its timeout) is skipped.
    pub fn open(path: &Path, bounds: KeyValueBounds) -> Result<Self, String> {
        let conn = open_db(path)?;
        let (jobs, rx) = mpsc::channel(MAX_WAITING);
        let sizes = (
            usize::try_from(bounds.max_key_bytes).unwrap_or(usize::MAX),
            usize::try_from(bounds.max_value_bytes).unwrap_or(usize::MAX),
        );
        let (notify, changed) = watch::channel(0);
        std::thread::Builder::new()
            .name("keyvalue-writer".into())
            .spawn(move || {
                Writer {
                    conn,
                    bounds,
                    notify,
                    captured: Cell::new(false),
                }
                .run(rx);
                tracing::debug!("key-value writer stopped");
            })
            .map_err(|e| format!("starting the key-value writer: {e}"))?;
        Ok(Self {
            jobs,
            path: Arc::new(path.to_path_buf()),
            sizes,
            changed,
        })
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs one operation (an operator's: no invocation) and waits for its
    /// answer.
    pub async fn run(&self, bucket: &str, op: Op) -> Result<Reply, String> {
        self.submit(bucket, op, None)
            .await
            .unwrap_or_else(|_| Err("the key-value store is closed".into()))
    }

    /// Every bucket that holds something, by name.
    pub async fn usage(&self) -> Result<Vec<BucketUsage>, String> {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Usage(tx)).await.is_err() {
            return Err("the key-value store is closed".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the key-value store is closed".into()))
    }
}

/// The change streams.
impl KeyValueStore {
    /// Changes when a commit of this process recorded a change in a stream
    /// (other processes' are not seen: poll too).
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    async fn stream_job<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, String>>) -> stream::Job,
    ) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Stream(job(tx))).await.is_err() {
            return Err("the key-value store is closed".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the key-value store is closed".into()))
    }

    /// Records the changes of exactly `buckets` from now on (those a
    /// trigger listens to); a bucket no longer listened to loses its
    /// stream.
    pub async fn set_streams(&self, buckets: Vec<String>) -> Result<(), String> {
        self.stream_job(|tx| stream::Job::SetActive(buckets, tx))
            .await
    }

    /// The checkpoint of `consumer` (a trigger), created at the oldest
    /// change kept of `bucket`.
    pub async fn stream_position(&self, consumer: &str, bucket: &str) -> Result<u64, String> {
        let (consumer, bucket) = (consumer.to_string(), bucket.to_string());
        self.stream_job(|reply| stream::Job::Position {
            consumer,
            bucket,
            reply,
        })
        .await
    }

    /// Reads changes after a checkpoint.
    pub async fn read_stream(&self, read: StreamRead) -> Result<StreamBatch, String> {
        self.stream_job(|tx| stream::Job::Read(read, tx)).await
    }

    /// Saves `consumer`'s checkpoint; on disk when this returns.
    pub async fn checkpoint(&self, consumer: &str, bucket: &str, seq: u64) -> Result<(), String> {
        let (consumer, bucket) = (consumer.to_string(), bucket.to_string());
        self.stream_job(|reply| stream::Job::Checkpoint {
            consumer,
            bucket,
            seq,
            reply,
        })
        .await
    }

    /// Queues `consumer`'s checkpoint behind everything queued before it
    /// (it commits with the writer's next group) and returns without
    /// waiting for the commit; the receiver gets its result.
    pub async fn queue_checkpoint(
        &self,
        consumer: &str,
        bucket: &str,
        seq: u64,
    ) -> Result<oneshot::Receiver<Result<(), String>>, String> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Stream(stream::Job::Checkpoint {
            consumer: consumer.to_string(),
            bucket: bucket.to_string(),
            seq,
            reply,
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| "the key-value store is closed".to_string())?;
        Ok(rx)
    }

    /// Every stream.
    pub async fn stream_usage(&self) -> Result<Vec<StreamUsage>, String> {
        self.stream_job(stream::Job::Usage).await
    }
}

impl KeyValue for KeyValueStore {
    fn sizes(&self) -> (usize, usize) {
        self.sizes
    }

    fn submit(
        &self,
        bucket: &str,
        op: Op,
        origin: Option<Arc<Origin>>,
    ) -> oneshot::Receiver<Result<Reply, String>> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Op {
            bucket: bucket.to_string(),
            op,
            origin,
            reply,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Job::Op { reply, .. })) => {
                let _ = reply.send(Err(format!(
                    "the key-value store is busy ({MAX_WAITING} operations are waiting); try again later"
                )));
            }
            // A closed writer drops `reply`, which the caller reads as closed.
            Err(_) => {}
        }
        rx
    }
}

struct Writer {
    conn: Connection,
    bounds: KeyValueBounds,
    notify: watch::Sender<u64>,
    /// Set when the running group recorded a change in a stream.
    captured: Cell<bool>,
}

/// Answers waiting for the commit of their group.
type Pending<T> = Vec<(oneshot::Sender<Result<T, String>>, Result<T, String>)>;

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
    }

    /// Runs a group in one transaction and answers after its commit. An
    /// operation whose caller has gone is skipped. If SQLite fails in a way
    /// that ends the transaction, or the commit fails, every operation of
    /// the group is answered with the failure and none is kept.
    fn commit_group(&mut self, group: Vec<Job>) {
        let mut ops: Pending<Reply> = Vec::new();
        let mut answers: Vec<stream::Answer> = Vec::new();
        self.captured.set(false);
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let mut broken = self
            .conn
            .execute_batch("BEGIN IMMEDIATE")
            .err()
            .map(|e| e.to_string());
        for job in group {
            match job {
                Job::Op { reply, .. } if reply.is_closed() => {}
                Job::Op {
                    bucket,
                    op,
                    origin,
                    reply,
                } => {
                    let result = match &broken {
                        Some(_) => Err(String::new()),
                        None => match self.savepoint(&bucket, op, origin.as_deref()) {
                            Ok(r) => r,
                            Err(e) => {
                                broken = Some(e);
                                Err(String::new())
                            }
                        },
                    };
                    ops.push((reply, result));
                }
                Job::Usage(reply) => answers.push(
                    stream::answer(
                        reply,
                        match &broken {
                            Some(_) => Ok(Vec::new()),
                            None => usage(&self.conn),
                        },
                    )
                    .0,
                ),
                Job::Stream(job) => answers.push(match &broken {
                    Some(_) => Box::new(move |_| job.refuse("the key-value store failed")),
                    None => match self.stream_savepoint(job) {
                        Ok(answer) => answer,
                        Err((answer, e)) => {
                            broken = Some(e);
                            answer
                        }
                    },
                }),
            }
        }
        if broken.is_none()
            && let Err(e) = self.conn.execute_batch("COMMIT")
        {
            broken = Some(format!("commit: {e}"));
        }
        let failed = broken.map(|e| {
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            tracing::error!(error = %e, "key-value store: a transaction failed; none of its group's writes were kept");
            format!("the key-value store failed ({e}); nothing was written")
        });
        if failed.is_none() && self.captured.get() {
            self.notify.send_modify(|n| *n += 1);
        }
        for (tx, r) in ops {
            let _ = tx.send(match &failed {
                Some(why) => Err(why.clone()),
                None => r,
            });
        }
        for a in answers {
            a(failed.as_deref());
        }
    }

    /// A stream job in a savepoint, like an operation: a failed one undoes
    /// only itself. `Err`: the transaction itself failed.
    fn stream_savepoint(
        &mut self,
        job: stream::Job,
    ) -> Result<stream::Answer, (stream::Answer, String)> {
        let sql = |e: rusqlite::Error| e.to_string();
        if let Err(e) = self.conn.execute_batch("SAVEPOINT job") {
            return Err((
                Box::new(move |_| job.refuse("the key-value store failed")),
                sql(e),
            ));
        }
        let (answer, ok) = job.run(&self.conn);
        if self.conn.is_autocommit() {
            return Err((answer, "SQLite ended the transaction".into()));
        }
        let undo = if ok {
            Ok(())
        } else {
            self.conn.execute_batch("ROLLBACK TO job")
        };
        match undo.and_then(|()| self.conn.execute_batch("RELEASE job")) {
            Ok(()) => Ok(answer),
            Err(e) => Err((answer, sql(e))),
        }
    }

    /// One operation in a savepoint: a refused one undoes only itself. The
    /// outer `Err`: the transaction itself failed (SQLite ended it, or
    /// could not roll back to the savepoint).
    fn savepoint(
        &mut self,
        bucket: &str,
        op: Op,
        origin: Option<&Origin>,
    ) -> Result<Result<Reply, String>, String> {
        let sql = |e: rusqlite::Error| e.to_string();
        self.conn.execute_batch("SAVEPOINT op").map_err(sql)?;
        let b = Bucket {
            conn: &self.conn,
            bounds: &self.bounds,
            name: bucket,
            origin,
            captured: &self.captured,
        };
        let result = apply(&b, op);
        if self.conn.is_autocommit() {
            return Err(format!(
                "SQLite ended the transaction: {}",
                result.err().unwrap_or_default()
            ));
        }
        if result.is_err() {
            self.conn.execute_batch("ROLLBACK TO op").map_err(sql)?;
        }
        self.conn.execute_batch("RELEASE op").map_err(sql)?;
        Ok(result)
    }
}

/// A refusal for the guest, or a failure of SQLite (also for the guest: the
/// host goes on).
#[derive(Debug)]
enum Refused {
    Bound(String),
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for Refused {
    fn from(e: rusqlite::Error) -> Self {
        Refused::Sql(e)
    }
}

fn apply(b: &Bucket<'_>, op: Op) -> Result<Reply, String> {
    let result = match op {
        Op::Get(key) => b.get(&key).map(Reply::Value),
        Op::Set(key, value) => b.set(&key, &value).map(|()| Reply::Done),
        Op::Delete(key) => b.delete(&key).map(|()| Reply::Done),
        Op::Exists(key) => b.size_of(&key).map(|s| Reply::Exists(s.is_some())),
        Op::ListKeys(after) => b.list(after),
        Op::Increment(key, delta) => b.increment(&key, delta).map(Reply::Counter),
        Op::Snapshot(key) => b.snapshot(&key).map(Reply::Snapshot),
        Op::Swap(key, expected, value) => b.swap(&key, expected, &value),
        Op::GetMany(keys) => b.get_many(keys).map(Reply::Pairs),
        Op::SetMany(pairs) => pairs
            .iter()
            .try_for_each(|(k, v)| b.set(k, v))
            .map(|()| Reply::Done),
        Op::DeleteMany(keys) => keys
            .iter()
            .try_for_each(|k| b.delete(k))
            .map(|()| Reply::Done),
    };
    result.map_err(|e| match e {
        Refused::Bound(why) => why,
        Refused::Sql(e) => format!("the key-value store failed: {e}"),
    })
}

/// One bucket inside the writer's transaction.
struct Bucket<'a> {
    conn: &'a Connection,
    bounds: &'a KeyValueBounds,
    name: &'a str,
    /// Who writes (for the change stream).
    origin: Option<&'a Origin>,
    /// Set when a change is recorded in a stream.
    captured: &'a Cell<bool>,
}

impl Bucket<'_> {
    /// Checks the key of a write that would create it against
    /// `max_key_bytes`. (Reads, deletes and overwrites of a key that exists
    /// are not refused: a lowered bound leaves old keys usable.)
    fn check_new_key(&self, key: &str) -> Result<(), Refused> {
        let max = self.bounds.max_key_bytes;
        if key.len() as u64 > max {
            return Err(Refused::Bound(format!(
                "the key is {} bytes; keys are at most {max} bytes ([keyvalue] max_key_bytes)",
                key.len()
            )));
        }
        Ok(())
    }

    /// The byte length of `key`'s value, if it exists.
    fn size_of(&self, key: &str) -> Result<Option<u64>, Refused> {
        Ok(self
            .conn
            .prepare_cached("SELECT length(value) FROM kv WHERE bucket = ?1 AND key = ?2")?
            .query_row(params![self.name, key], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|n| n as u64))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Refused> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM kv WHERE bucket = ?1 AND key = ?2")?
            .query_row(params![self.name, key], |r| r.get(0))
            .optional()?)
    }

    fn usage(&self) -> Result<(u64, u64), Refused> {
        Ok(self
            .conn
            .prepare_cached("SELECT keys, bytes FROM kv_buckets WHERE name = ?1")?
            .query_row(params![self.name], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .optional()?
            .unwrap_or((0, 0)))
    }

    fn set_usage(&self, keys: u64, bytes: u64) -> Result<(), Refused> {
        if keys == 0 {
            self.conn
                .prepare_cached("DELETE FROM kv_buckets WHERE name = ?1")?
                .execute(params![self.name])?;
        } else {
            self.conn
                .prepare_cached(
                    "INSERT INTO kv_buckets (name, keys, bytes) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO UPDATE SET keys = excluded.keys, bytes = excluded.bytes",
                )?
                .execute(params![self.name, keys as i64, bytes as i64])?;
        }
        Ok(())
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), Refused> {
        let max = self.bounds.max_value_bytes;
        if value.len() as u64 > max {
            return Err(Refused::Bound(format!(
                "the value is {} bytes; values are at most {max} bytes ([keyvalue] max_value_bytes)",
                value.len()
            )));
        }
        let streamed = stream::is_active(self.conn, self.name)?;
        let old_value = if streamed { self.get(key)? } else { None };
        let old = if streamed {
            old_value.as_ref().map(|v| v.len() as u64)
        } else {
            self.size_of(key)?
        };
        if old.is_none() {
            self.check_new_key(key)?;
        }
        let (keys, bytes) = self.usage()?;
        let k = key.len() as u64;
        let new_keys = keys + u64::from(old.is_none());
        let new_bytes = bytes
            .saturating_sub(old.map_or(0, |v| k + v))
            .saturating_add(k + value.len() as u64);
        let limit = self.bounds.bucket(self.name);
        if new_keys > limit.max_keys && new_keys > keys {
            return Err(Refused::Bound(format!(
                "bucket {:?} is full: it holds {keys} keys, its max_keys of {} ([keyvalue.bucket.{}])",
                self.name, limit.max_keys, self.name
            )));
        }
        if new_bytes > limit.max_bytes && new_bytes > bytes {
            return Err(Refused::Bound(format!(
                "bucket {:?} is full: it holds {bytes} bytes; this write would make it {new_bytes}, past its max_bytes of {} ([keyvalue.bucket.{}])",
                self.name, limit.max_bytes, self.name
            )));
        }
        self.conn
            .prepare_cached(
                "INSERT INTO kv (bucket, key, value) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (bucket, key) DO UPDATE SET value = excluded.value, version = version + 1",
            )?
            .execute(params![self.name, key, value])?;
        self.set_usage(new_keys, new_bytes)?;
        if streamed {
            self.capture(key, KvOperation::Set, Some(value), old_value.as_deref())?;
        }
        Ok(())
    }

    /// Records a change in the bucket's stream.
    fn capture(
        &self,
        key: &str,
        operation: KvOperation,
        new_value: Option<&[u8]>,
        old_value: Option<&[u8]>,
    ) -> Result<(), Refused> {
        stream::record(
            self.conn,
            &stream::Capture {
                bucket: self.name,
                key,
                operation,
                new_value,
                old_value,
                origin: self.origin,
            },
            &self.bounds.bucket(self.name).stream,
        )?;
        self.captured.set(true);
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<(), Refused> {
        let streamed = stream::is_active(self.conn, self.name)?;
        let old_value = if streamed { self.get(key)? } else { None };
        let old = match &old_value {
            Some(v) => Some(v.len() as u64),
            None if streamed => None,
            None => self.size_of(key)?,
        };
        let Some(old) = old else {
            return Ok(());
        };
        self.conn
            .prepare_cached("DELETE FROM kv WHERE bucket = ?1 AND key = ?2")?
            .execute(params![self.name, key])?;
        let (keys, bytes) = self.usage()?;
        self.set_usage(
            keys.saturating_sub(1),
            bytes.saturating_sub(key.len() as u64 + old),
        )?;
        if streamed {
            self.capture(key, KvOperation::Delete, None, old_value.as_deref())?;
        }
        Ok(())
    }

    /// Adds to a counter kept as ASCII decimal: within `u64` for
    /// `0.2.0-draft`'s `u64` step, within `s64` for `0.2.0-draft2`'s.
    fn increment(&self, key: &str, delta: Delta) -> Result<i128, Refused> {
        let (delta, min, max, kind) = match delta {
            Delta::Unsigned(d) => (i128::from(d), 0, i128::from(u64::MAX), "u64"),
            Delta::Signed(d) => (
                i128::from(d),
                i128::from(i64::MIN),
                i128::from(i64::MAX),
                "s64",
            ),
        };
        let current = match self.get(key)? {
            None => 0,
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|t| t.parse::<i128>().ok())
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    Refused::Bound(format!(
                        "the value of {key:?} is not a {kind} counter: increment keeps counters as ASCII decimal numbers from {min} to {max} (e.g. \"42\")"
                    ))
                })?,
        };
        let next = current + delta;
        if !(min..=max).contains(&next) {
            return Err(Refused::Bound(format!(
                "incrementing {key:?} ({current}) by {delta} would leave the {kind} range {min}..={max}"
            )));
        }
        self.set(key, next.to_string().as_bytes())?;
        Ok(next)
    }

    /// The token of `key`'s value now.
    fn snapshot(&self, key: &str) -> Result<Option<Token>, Refused> {
        Ok(self
            .conn
            .prepare_cached("SELECT id, version FROM kv WHERE bucket = ?1 AND key = ?2")?
            .query_row(params![self.name, key], |r| {
                Ok(Token {
                    row: r.get(0)?,
                    version: r.get(1)?,
                })
            })
            .optional()?)
    }

    /// Sets `key` if its token is still `expected`; else answers the
    /// token it has now.
    fn swap(&self, key: &str, expected: Option<Token>, value: &[u8]) -> Result<Reply, Refused> {
        let now = self.snapshot(key)?;
        if now != expected {
            return Ok(Reply::SwapFailed(now));
        }
        self.set(key, value)?;
        Ok(Reply::Swapped)
    }

    fn list(&self, after: u64) -> Result<Reply, Refused> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, key FROM kv WHERE bucket = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let mut rows = stmt.query(params![self.name, after, PAGE_KEYS as i64 + 1])?;
        let mut keys = Vec::new();
        let mut bytes = 0;
        let mut last = after;
        while let Some(row) = rows.next()? {
            if keys.len() == PAGE_KEYS || bytes >= PAGE_BYTES {
                return Ok(Reply::Keys(keys, Some(last as u64)));
            }
            let key: String = row.get(1)?;
            last = row.get(0)?;
            bytes += key.len();
            keys.push(key);
        }
        Ok(Reply::Keys(keys, None))
    }

    fn get_many(&self, keys: Vec<String>) -> Result<Pairs, Refused> {
        let mut total = 0;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let value = self.get(&key)?;
            total += value.as_ref().map_or(0, |v| v.len() as u64);
            if total > GET_MANY_BYTES {
                return Err(Refused::Bound(format!(
                    "get-many would answer with more than {GET_MANY_BYTES} bytes of values; ask for fewer keys at a time"
                )));
            }
            out.push((key, value));
        }
        Ok(out)
    }
}

/// What each bucket of the store at `path` holds, read without starting a
/// writer (none if the file does not exist yet).
pub fn read_usage(path: &Path) -> Result<Vec<BucketUsage>, String> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = open_db(path)?;
    usage(&conn).map_err(|e| format!("the key-value store {}: {e}", path.display()))
}

fn usage(conn: &Connection) -> rusqlite::Result<Vec<BucketUsage>> {
    let mut stmt = conn.prepare_cached("SELECT name, keys, bytes FROM kv_buckets ORDER BY name")?;
    stmt.query_map([], |r| {
        Ok(BucketUsage {
            name: r.get(0)?,
            keys: r.get::<_, i64>(1)? as u64,
            bytes: r.get::<_, i64>(2)? as u64,
        })
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_manifest::keyvalue::BucketBounds;

    fn store(dir: &Path, bounds: KeyValueBounds) -> KeyValueStore {
        KeyValueStore::open(&KeyValueStore::path_in(dir), bounds).unwrap()
    }

    fn small() -> KeyValueBounds {
        let mut b = KeyValueBounds {
            max_key_bytes: 8,
            max_value_bytes: 16,
            ..KeyValueBounds::default()
        };
        b.buckets.insert(
            "small".into(),
            BucketBounds {
                max_keys: 2,
                max_bytes: 30,
                ..BucketBounds::default()
            },
        );
        b
    }

    fn set(k: &str, v: &str) -> Op {
        Op::Set(k.into(), v.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn reads_its_writes_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), KeyValueBounds::default());
        assert_eq!(s.run("b", set("k", "v1")).await, Ok(Reply::Done));
        assert_eq!(
            s.run("b", Op::Get("k".into())).await,
            Ok(Reply::Value(Some(b"v1".to_vec())))
        );
        assert_eq!(
            s.run("other", Op::Get("k".into())).await,
            Ok(Reply::Value(None))
        );
        assert_eq!(
            s.run("b", Op::Increment("n".into(), Delta::Unsigned(5)))
                .await,
            Ok(Reply::Counter(5))
        );
        assert_eq!(
            s.run("b", Op::Increment("n".into(), Delta::Unsigned(2)))
                .await,
            Ok(Reply::Counter(7))
        );
        assert_eq!(
            s.run("c", Op::Increment("max".into(), Delta::Unsigned(u64::MAX)))
                .await,
            Ok(Reply::Counter(u64::MAX.into()))
        );
        let overflow = s
            .run("c", Op::Increment("max".into(), Delta::Unsigned(1)))
            .await
            .unwrap_err();
        assert!(overflow.contains("would leave the u64 range"), "{overflow}");
        s.run("c", Op::Delete("max".into())).await.unwrap();
        assert_eq!(s.run("b", Op::Delete("k".into())).await, Ok(Reply::Done));
        assert_eq!(s.run("b", Op::Delete("k".into())).await, Ok(Reply::Done));
        assert_eq!(
            s.run("b", Op::Exists("k".into())).await,
            Ok(Reply::Exists(false))
        );
        drop(s);
        let s = store(dir.path(), KeyValueBounds::default());
        assert_eq!(
            s.run("b", Op::Get("n".into())).await,
            Ok(Reply::Value(Some(b"7".to_vec())))
        );
        assert_eq!(
            s.usage().await.unwrap(),
            vec![BucketUsage {
                name: "b".into(),
                keys: 1,
                bytes: 2
            }]
        );
    }

    #[tokio::test]
    async fn counters_of_both_versions_and_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), KeyValueBounds::default());
        // Signed counters share the encoding; a negative one is not a u64.
        assert_eq!(
            s.run("c", Op::Increment("s".into(), Delta::Signed(-3)))
                .await,
            Ok(Reply::Counter(-3))
        );
        let e = s
            .run("c", Op::Increment("s".into(), Delta::Unsigned(1)))
            .await
            .unwrap_err();
        assert!(e.contains("not a u64 counter"), "{e}");
        // Compare-and-swap: a token matches until the key is set again, or
        // deleted and set again (a new row).
        let token = |r: Result<Reply, String>| match r {
            Ok(Reply::Snapshot(t)) => t,
            other => panic!("{other:?}"),
        };
        let t0 = token(s.run("c", Op::Snapshot("cas".into())).await);
        assert_eq!(t0, None);
        let swap = |t, v: &str| Op::Swap("cas".into(), t, v.as_bytes().to_vec());
        assert_eq!(s.run("c", swap(t0, "a")).await, Ok(Reply::Swapped));
        let t1 = token(s.run("c", Op::Snapshot("cas".into())).await);
        // A failed swap answers the token now, with which the next try works.
        assert_eq!(s.run("c", swap(t0, "b")).await, Ok(Reply::SwapFailed(t1)));
        s.run("c", Op::Delete("cas".into())).await.unwrap();
        s.run("c", set("cas", "a")).await.unwrap();
        let t2 = token(s.run("c", Op::Snapshot("cas".into())).await);
        assert_ne!(t1, t2, "a key deleted and set again has a new token");
        assert_eq!(s.run("c", swap(t1, "c")).await, Ok(Reply::SwapFailed(t2)));
        assert_eq!(s.run("c", swap(t2, "c")).await, Ok(Reply::Swapped));
        s.run("c", Op::DeleteMany(vec!["cas".into(), "s".into()]))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn every_bound_is_a_sentence_and_undoes_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), small());
        let err = |r: Result<Reply, String>| r.unwrap_err();
        assert!(err(s.run("b", set("123456789", "v")).await).contains("max_key_bytes"));
        assert!(err(s.run("b", set("k", &"x".repeat(17))).await).contains("max_value_bytes"));
        s.run("small", set("a", "1")).await.unwrap();
        s.run("small", set("b", "2")).await.unwrap();
        assert!(err(s.run("small", set("c", "3")).await).contains("max_keys"));
        // Overwriting does not grow the key count; growing bytes past 30 fails.
        s.run("small", set("a", "0123456789abcdef")).await.unwrap();
        let e = err(s.run("small", set("b", "0123456789abcdef")).await);
        assert!(e.contains("max_bytes"), "{e}");
        // A batch is all or none.
        let e = err(s
            .run(
                "small",
                Op::SetMany(vec![
                    ("a".into(), b"1".to_vec()),
                    ("z".into(), b"2".to_vec()),
                ]),
            )
            .await);
        assert!(e.contains("max_keys"), "{e}");
        assert_eq!(
            s.run("small", Op::Get("a".into())).await,
            Ok(Reply::Value(Some(b"0123456789abcdef".to_vec())))
        );
        // Counters: text, and a counter that would not fit its value bound.
        s.run("b", set("t", "text")).await.unwrap();
        assert!(
            err(s
                .run("b", Op::Increment("t".into(), Delta::Unsigned(1)))
                .await)
            .contains("not a u64 counter")
        );
        let e = err(s
            .run("b", Op::Increment("n".into(), Delta::Unsigned(u64::MAX)))
            .await);
        assert!(e.contains("max_value_bytes"), "{e}");
        let usage = s.usage().await.unwrap();
        let used = usage.iter().find(|u| u.name == "small").unwrap();
        assert_eq!((used.keys, used.bytes), (2, 1 + 16 + 1 + 1));
        // Lowered bounds: what exists stays readable, writable and deletable.
        s.run("b", set("12345678", "v")).await.unwrap();
        drop(s);
        let mut lower = small();
        lower.max_key_bytes = 4;
        lower.buckets.get_mut("small").unwrap().max_keys = 1;
        let s = store(dir.path(), lower);
        assert_eq!(
            s.run("b", Op::Get("12345678".into())).await,
            Ok(Reply::Value(Some(b"v".to_vec())))
        );
        s.run("b", set("12345678", "w")).await.unwrap();
        s.run("small", set("a", "1")).await.unwrap();
        assert!(err(s.run("small", set("q", "1")).await).contains("max_keys of 1"));
        s.run("b", Op::Delete("12345678".into())).await.unwrap();
        s.run("small", Op::Delete("a".into())).await.unwrap();
    }

    #[tokio::test]
    async fn list_keys_pages_through_a_bucket_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), KeyValueBounds::default());
        let pairs: Vec<_> = (0..2500).map(|i| (format!("k{i:05}"), vec![1])).collect();
        for chunk in pairs.chunks(1000) {
            s.run("b", Op::SetMany(chunk.to_vec())).await.unwrap();
        }
        s.run("b", set("k00000", "again")).await.unwrap();
        let mut seen = Vec::new();
        let mut cursor = 0;
        let mut pages = 0;
        loop {
            let Ok(Reply::Keys(keys, next)) = s.run("b", Op::ListKeys(cursor)).await else {
                panic!("not a page");
            };
            assert!(keys.len() <= PAGE_KEYS);
            pages += 1;
            seen.extend(keys);
            match next {
                Some(c) => cursor = c,
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let want: Vec<_> = pairs.into_iter().map(|(k, _)| k).collect();
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn concurrent_increments_are_all_counted() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), KeyValueBounds::default());
        let tasks: Vec<_> = (0..500)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.run("b", Op::Increment("n".into(), Delta::Unsigned(1)))
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            s.run("b", Op::Get("n".into())).await,
            Ok(Reply::Value(Some(b"500".to_vec())))
        );
    }

    #[tokio::test]
    #[expect(
        clippy::too_many_lines,
        reason = "one stream's story: capture, reads, retention, checkpoints, removal"
    )]
    async fn a_streamed_bucket_records_its_committed_changes_within_retention() {
        use stream::StreamRead;
        use wasmgate_manifest::keyvalue::{StreamBounds, View};
        let dir = tempfile::tempdir().unwrap();
        let mut bounds = small();
        bounds.buckets.insert(
            "s".into(),
            BucketBounds {
                stream: StreamBounds {
                    max_changes: 4,
                    ..StreamBounds::default()
                },
                ..BucketBounds::default()
            },
        );
        let kv = store(dir.path(), bounds);
        kv.run("s", set("before", "x")).await.unwrap();
        kv.set_streams(vec!["s".into()]).await.unwrap();
        assert_eq!(kv.stream_position("t", "s").await.unwrap(), 0);
        let origin = Arc::new(Origin {
            invocation: "inv-1".into(),
            component: "c".into(),
            trigger: "http".into(),
        });
        let changed = kv.changed();
        kv.submit("s", set("a/1", "one"), Some(origin))
            .await
            .unwrap()
            .unwrap();
        assert!(changed.has_changed().unwrap());
        kv.run("s", set("a/1", "two")).await.unwrap();
        kv.run("s", set("b/1", "three")).await.unwrap();
        // A refused write records nothing; a delete of a missing key neither.
        assert!(kv.run("s", set("a/2", &"x".repeat(17))).await.is_err());
        kv.run("s", Op::Delete("none".into())).await.unwrap();
        kv.run("s", Op::Delete("a/1".into())).await.unwrap();
        // Another bucket is not streamed.
        kv.run("other", set("k", "v")).await.unwrap();
        let read = |after, prefix: Option<&str>, view, max_changes| StreamRead {
            bucket: "s".into(),
            after,
            prefix: prefix.map(String::from),
            view,
            max_changes,
            max_bytes: stream::BATCH_BYTES,
            at_least_one: true,
        };
        let all = kv
            .read_stream(read(0, None, View::NewAndOld, 10))
            .await
            .unwrap();
        assert_eq!(all.gap, None);
        assert_eq!(all.through, 4);
        let seqs: Vec<(u64, &str)> = all
            .changes
            .iter()
            .map(|c| (c.sequence, c.key.as_str()))
            .collect();
        assert_eq!(seqs, [(1, "a/1"), (2, "a/1"), (3, "b/1"), (4, "a/1")]);
        assert_eq!(all.changes[0].writer.as_ref().unwrap().invocation, "inv-1");
        assert_eq!(all.changes[1].writer, None);
        assert_eq!(all.changes[1].old_value.as_deref(), Some(b"one".as_slice()));
        assert_eq!(all.changes[1].new_value.as_deref(), Some(b"two".as_slice()));
        assert_eq!(all.changes[3].operation, KvOperation::Delete);
        assert_eq!(all.changes[3].old_value.as_deref(), Some(b"two".as_slice()));
        // The prefix and the view; `through` passes changes of other keys.
        let b = kv
            .read_stream(read(0, Some("b/"), View::KeysOnly, 10))
            .await
            .unwrap();
        assert_eq!((b.changes.len(), b.through), (1, 4));
        assert_eq!(
            (
                b.changes[0].new_value.clone(),
                b.changes[0].old_value.clone()
            ),
            (None, None)
        );
        let one = kv.read_stream(read(1, None, View::New, 1)).await.unwrap();
        assert_eq!((one.changes[0].sequence, one.through), (2, 2));
        assert_eq!(one.changes[0].old_value, None);
        // The byte bound: one change past it only when it is the first.
        let first = kv
            .read_stream(StreamRead {
                max_bytes: 1,
                ..read(0, None, View::New, 10)
            })
            .await
            .unwrap();
        assert_eq!(
            (first.changes.len(), first.through, first.full),
            (1, 1, true)
        );
        let none = kv
            .read_stream(StreamRead {
                max_bytes: 1,
                at_least_one: false,
                ..read(0, None, View::New, 10)
            })
            .await
            .unwrap();
        assert_eq!((none.changes.len(), none.through, none.full), (0, 0, true));
        // Retention: 4 changes kept; a consumer behind is told the gap.
        kv.run("s", set("c", "1")).await.unwrap();
        kv.run("s", set("c", "2")).await.unwrap();
        let behind = kv.read_stream(read(1, None, View::New, 10)).await.unwrap();
        assert_eq!(
            behind.gap,
            Some(wasmgate_runtime::invoke::KvGap {
                first_sequence: 2,
                last_sequence: 2,
                lost: 1
            })
        );
        assert_eq!(behind.changes.first().map(|c| c.sequence), Some(3));
        // Checkpoints persist; a new consumer starts at the oldest kept.
        kv.checkpoint("t", "s", 5).await.unwrap();
        assert_eq!(kv.stream_position("t", "s").await.unwrap(), 5);
        assert_eq!(kv.stream_position("new", "s").await.unwrap(), 2);
        // No trigger listens any more: the stream goes, and a gap is told.
        kv.set_streams(Vec::new()).await.unwrap();
        kv.run("s", set("d", "1")).await.unwrap();
        let gone = kv.read_stream(read(5, None, View::New, 10)).await.unwrap();
        assert_eq!(gone.changes, []);
        assert_eq!(gone.gap.map(|g| g.lost), Some(1));
    }
}
