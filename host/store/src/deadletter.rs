//! The durable dead-letter store: events whose delivery failed for good.
//!
//! One SQLite database, `state_dir/dead-letters.sqlite`, in WAL mode with
//! `synchronous = FULL`: a record is on disk when [`DeadLetterStore::put`]
//! returns, and the `wasmgate dlq` commands can read and change the store
//! while the host runs (SQLite's file locking; writers wait up to 5 s).
//!
//! Writes go through one writer thread that commits every record waiting at
//! that moment in one transaction (group commit): under a burst of failures
//! the cost of a durable commit is shared by the whole batch.
//!
//! The store is bounded: past `max_records` records or `max_bytes` bytes the
//! oldest records are evicted, and records older than `max_age` are removed;
//! each eviction is logged and counted. Payloads and bodies are stored as
//! blobs, apart from the record's JSON, so listing records never reads them. A store that cannot be opened or fails its integrity check is a
//! start-up error that names the file: wasmgate never deletes it.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use wasmgate_runtime::invoke::{
    Event, HttpRequest, KvBatch, KvChange, KvGap, KvOperation, KvWriter, MqttMessage, Outcome,
    Status, TimerTick,
};

/// File name of the store inside `state_dir`.
pub const FILE_NAME: &str = "dead-letters.sqlite";

/// Why an event was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Every attempt failed.
    RetriesExhausted,
    /// The event grew older than the retry policy's `max_event_age`.
    EventAgeExceeded,
    /// The guest returned `handler-error.reject`.
    Rejected,
}

impl Condition {
    fn as_str(self) -> &'static str {
        match self {
            Condition::RetriesExhausted => "retries_exhausted",
            Condition::EventAgeExceeded => "event_age_exceeded",
            Condition::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "retries_exhausted" => Some(Condition::RetriesExhausted),
            "event_age_exceeded" => Some(Condition::EventAgeExceeded),
            "rejected" => Some(Condition::Rejected),
            _ => None,
        }
    }
}

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// The outcome: `retry`, `reject`, `trap`, `timeout`, ...
    pub outcome: String,
    /// The guest's message or the trap's, if any.
    pub message: String,
    /// When the attempt ended, ms since the Unix epoch.
    pub at_ms: u64,
}

impl AttemptError {
    /// The error an outcome describes.
    pub fn from_outcome(outcome: &Outcome) -> Self {
        let message = match &outcome.status {
            Status::HandlerError { message, .. }
            | Status::Trap { message }
            | Status::ClientClosed { message } => message.clone(),
            Status::FuelExhausted { fuel_limit } => format!("fuel limit {fuel_limit} exhausted"),
            Status::MemoryLimit { memory_limit } => {
                format!("memory limit {memory_limit} bytes exceeded")
            }
            Status::Timeout { timeout_ms } => format!("timed out after {timeout_ms} ms"),
            Status::Throttled { concurrency } => format!("throttled at concurrency {concurrency}"),
            Status::Ok => String::new(),
        };
        Self {
            outcome: outcome.status.name().to_string(),
            message,
            at_ms: crate::sqlite::now_ms(),
        }
    }
}

/// An event as stored: payloads and bodies as hex, so any bytes round-trip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoredEvent {
    /// An MQTT message.
    Mqtt {
        /// Topic.
        topic: String,
        /// Payload, hex.
        payload_hex: String,
        /// QoS.
        qos: u8,
        /// Retain flag.
        retain: bool,
        /// MQTT 5 content type.
        content_type: Option<String>,
        /// MQTT 5 response topic.
        response_topic: Option<String>,
        /// MQTT 5 correlation data, hex.
        correlation_data_hex: Option<String>,
        /// MQTT 5 user properties.
        user_properties: Vec<(String, String)>,
    },
    /// A timer tick.
    Timer {
        /// Schedule text.
        schedule: String,
        /// Due time, ms.
        scheduled_at_ms: u64,
        /// Fire time, ms.
        fired_at_ms: u64,
        /// Missed ticks before it.
        missed: u32,
    },
    /// A batch of key-value changes.
    #[serde(rename = "keyvalue")]
    KeyValue {
        /// The bucket.
        bucket: String,
        /// Changes lost before these: first, last, count.
        gap: Option<(u64, u64, u64)>,
        /// The changes.
        changes: Vec<StoredChange>,
    },
    /// An HTTP request.
    Http {
        /// Method.
        method: String,
        /// Path and query.
        path: String,
        /// Authority.
        authority: String,
        /// Headers.
        headers: Vec<(String, String)>,
        /// Body, hex.
        body_hex: String,
    },
}

/// One key-value change as stored: values as hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChange {
    /// The key.
    pub key: String,
    /// `set` or `delete`.
    pub operation: String,
    /// Its sequence number.
    pub sequence: u64,
    /// Its commit time, ms.
    pub committed_at_ms: u64,
    /// The new value, hex.
    pub new_value_hex: Option<String>,
    /// The old value, hex.
    pub old_value_hex: Option<String>,
    /// The writer: invocation, component, trigger.
    pub writer: Option<(String, String, String)>,
}

impl From<&KvChange> for StoredChange {
    fn from(c: &KvChange) -> Self {
        Self {
            key: c.key.clone(),
            operation: match c.operation {
                KvOperation::Set => "set",
                KvOperation::Delete => "delete",
            }
            .into(),
            sequence: c.sequence,
            committed_at_ms: c.committed_at_ms,
            new_value_hex: c.new_value.as_ref().map(hex::encode),
            old_value_hex: c.old_value.as_ref().map(hex::encode),
            writer: c
                .writer
                .as_ref()
                .map(|w| (w.invocation.clone(), w.component.clone(), w.trigger.clone())),
        }
    }
}

impl StoredChange {
    fn to_change(&self) -> Result<KvChange, String> {
        let unhex = |s: &str| hex::decode(s).map_err(|e| format!("stored bytes are not hex: {e}"));
        Ok(KvChange {
            key: self.key.clone(),
            operation: match self.operation.as_str() {
                "set" => KvOperation::Set,
                "delete" => KvOperation::Delete,
                other => return Err(format!("{other:?} is not a key-value operation")),
            },
            sequence: self.sequence,
            committed_at_ms: self.committed_at_ms,
            new_value: self.new_value_hex.as_deref().map(unhex).transpose()?,
            old_value: self.old_value_hex.as_deref().map(unhex).transpose()?,
            writer: self.writer.as_ref().map(|(i, c, t)| KvWriter {
                invocation: i.clone(),
                component: c.clone(),
                trigger: t.clone(),
            }),
        })
    }

    fn size(&self) -> usize {
        self.key.len()
            + self.new_value_hex.as_ref().map_or(0, |v| v.len() / 2)
            + self.old_value_hex.as_ref().map_or(0, |v| v.len() / 2)
    }
}

impl From<&Event> for StoredEvent {
    fn from(event: &Event) -> Self {
        match event {
            Event::Mqtt(m) => StoredEvent::Mqtt {
                topic: m.topic.clone(),
                payload_hex: hex::encode(&m.payload),
                qos: m.qos,
                retain: m.retain,
                content_type: m.content_type.clone(),
                response_topic: m.response_topic.clone(),
                correlation_data_hex: m.correlation_data.as_ref().map(hex::encode),
                user_properties: m.user_properties.clone(),
            },
            Event::Timer(t) => StoredEvent::Timer {
                schedule: t.schedule.clone(),
                scheduled_at_ms: t.scheduled_at_ms,
                fired_at_ms: t.fired_at_ms,
                missed: t.missed,
            },
            Event::KeyValue(b) => StoredEvent::KeyValue {
                bucket: b.bucket.clone(),
                gap: b.gap.map(|g| (g.first_sequence, g.last_sequence, g.lost)),
                changes: b.changes.iter().map(StoredChange::from).collect(),
            },
            Event::Http(r) => StoredEvent::Http {
                method: r.method.clone(),
                path: r.path.clone(),
                authority: r.authority.clone(),
                headers: r.headers.clone(),
                body_hex: hex::encode(&r.body),
            },
        }
    }
}

impl StoredEvent {
    /// The event to deliver again.
    pub fn to_event(&self) -> Result<Event, String> {
        let unhex = |s: &str| hex::decode(s).map_err(|e| format!("stored bytes are not hex: {e}"));
        Ok(match self {
            StoredEvent::Mqtt {
                topic,
                payload_hex,
                qos,
                retain,
                content_type,
                response_topic,
                correlation_data_hex,
                user_properties,
            } => Event::Mqtt(MqttMessage {
                topic: topic.clone(),
                payload: unhex(payload_hex)?,
                qos: *qos,
                retain: *retain,
                content_type: content_type.clone(),
                response_topic: response_topic.clone(),
                correlation_data: correlation_data_hex.as_deref().map(unhex).transpose()?,
                user_properties: user_properties.clone(),
            }),
            StoredEvent::Timer {
                schedule,
                scheduled_at_ms,
                fired_at_ms,
                missed,
            } => Event::Timer(TimerTick {
                schedule: schedule.clone(),
                scheduled_at_ms: *scheduled_at_ms,
                fired_at_ms: *fired_at_ms,
                missed: *missed,
            }),
            StoredEvent::KeyValue {
                bucket,
                gap,
                changes,
            } => Event::KeyValue(KvBatch {
                bucket: bucket.clone(),
                gap: gap.map(|(first_sequence, last_sequence, lost)| KvGap {
                    first_sequence,
                    last_sequence,
                    lost,
                }),
                changes: changes
                    .iter()
                    .map(StoredChange::to_change)
                    .collect::<Result<_, _>>()?,
            }),
            StoredEvent::Http {
                method,
                path,
                authority,
                headers,
                body_hex,
            } => Event::Http(HttpRequest {
                method: method.clone(),
                path: path.clone(),
                authority: authority.clone(),
                headers: headers.clone(),
                body: unhex(body_hex)?,
            }),
        })
    }
}

/// One dead-lettered event with its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The invocation id (the same for every attempt of the event).
    pub id: String,
    /// The component that failed it.
    pub component: String,
    /// The trigger that delivered it.
    pub trigger: String,
    /// Why it is here.
    pub condition: Condition,
    /// Attempts made (replays included).
    pub attempts: u32,
    /// The original event.
    pub event: StoredEvent,
    /// The first failed attempt.
    pub first_error: AttemptError,
    /// The last failed attempt.
    pub last_error: AttemptError,
    /// When the first attempt started, ms since the Unix epoch.
    pub first_attempt_ms: u64,
    /// When it was dead-lettered, ms since the Unix epoch.
    pub dead_at_ms: u64,
}

/// Which records [`DeadLetterStore::list_page`] returns.
#[derive(Debug, Clone, Copy, Default)]
pub struct Filter<'a> {
    /// Only this component's.
    pub component: Option<&'a str>,
    /// Only this trigger's.
    pub trigger: Option<&'a str>,
    /// Read payloads and bodies too.
    pub with_payloads: bool,
}

/// Where a page of records ended: the next page starts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    dead_at_ms: i64,
    rowid: i64,
}

/// One page of records, newest first.
#[derive(Debug)]
pub struct Page {
    /// The records.
    pub records: Vec<DeadLetter>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// Bounds of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Most records kept; past it the oldest are evicted.
    pub max_records: u64,
    /// Most bytes the records take (payloads, bodies and the rest of each
    /// record); past it the oldest are evicted.
    pub max_bytes: u64,
    /// Records older than this are removed.
    pub max_age: Duration,
}

impl From<&wasmgate_manifest::DeadLettersConfig> for Bounds {
    /// The manifest's `[dead_letters]`, defaults filled in.
    fn from(c: &wasmgate_manifest::DeadLettersConfig) -> Self {
        let d = Bounds::default();
        Self {
            max_records: c
                .max_records
                .as_ref()
                .map_or(d.max_records, |m| *m.get_ref()),
            max_bytes: c.max_bytes.as_ref().map_or(d.max_bytes, |m| m.get_ref().0),
            max_age: c.max_age.as_ref().map_or(d.max_age, |a| a.get_ref().0),
        }
    }
}

/// The dead-letter store's file in `state_dir`.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

impl Default for Bounds {
    /// 100,000 records, 100 MiB, 30 days.
    fn default() -> Self {
        Self {
            max_records: 100_000,
            max_bytes: 100 * 1024 * 1024,
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

type Job = (DeadLetter, oneshot::Sender<Result<(), String>>);

/// The store. Cheap to share behind an `Arc`.
pub struct DeadLetterStore {
    path: PathBuf,
    reader: Mutex<Connection>,
    /// Bounded ([`WRITER_QUEUE`]): a burst of failures waits for the disk.
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    stats: Arc<StoreStats>,
    publish_topic: Option<String>,
}

/// Counters of the store.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Records written.
    pub written: AtomicU64,
    /// Records evicted by the bounds.
    pub evicted: AtomicU64,
    /// Records that could not be written (e.g. disk full): those events are lost.
    pub write_failures: AtomicU64,
    /// Transactions committed by the writer.
    pub commits: AtomicU64,
}

impl std::fmt::Debug for DeadLetterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS dead_letters (
             id TEXT PRIMARY KEY,
             component TEXT NOT NULL,
             trigger TEXT NOT NULL,
             condition TEXT NOT NULL,
             attempts INTEGER NOT NULL,
             event TEXT NOT NULL,
             first_error TEXT NOT NULL,
             last_error TEXT NOT NULL,
             first_attempt_ms INTEGER NOT NULL,
             dead_at_ms INTEGER NOT NULL,
             payload BLOB,
             size INTEGER NOT NULL DEFAULT 0
         );
         CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (dead_at_ms);
         CREATE INDEX IF NOT EXISTS dead_letters_by_component ON dead_letters (component);";

fn open_connection(path: &Path) -> Result<Connection, String> {
    let conn = crate::sqlite::open(path, "dead-letter store", SCHEMA)?;
    migrate(&conn).map_err(|e| {
        format!(
            "dead-letter store {} cannot be upgraded: {e}",
            path.display()
        )
    })?;
    Ok(conn)
}

/// A store written before payloads became blobs: add the columns (its
/// records keep their payloads in the JSON, which still reads) and size
/// them.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_payload: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('dead_letters') WHERE name = 'payload'",
        [],
        |r| r.get(0),
    )?;
    if !has_payload {
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE dead_letters ADD COLUMN payload BLOB;
             ALTER TABLE dead_letters ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
             UPDATE dead_letters SET size = length(event) + length(first_error) + length(last_error);
             COMMIT;",
        )?;
    }
    Ok(())
}

/// The bytes of an event's payload (MQTT) or body (HTTP), and the event
/// with them taken out (to be stored as a blob).
fn split_payload(event: &StoredEvent) -> (StoredEvent, Option<Vec<u8>>) {
    let mut bare = event.clone();
    let hex = match &mut bare {
        StoredEvent::Mqtt { payload_hex, .. } => payload_hex,
        StoredEvent::Http { body_hex, .. } => body_hex,
        StoredEvent::Timer { .. } | StoredEvent::KeyValue { .. } => return (bare, None),
    };
    // Bytes that are not hex (a record built by hand) stay in the JSON as
    // they came: the writer thread must not fail on them.
    match hex::decode(&*hex) {
        Ok(bytes) => {
            hex.clear();
            (bare, Some(bytes))
        }
        Err(_) => (bare, None),
    }
}

/// Puts a stored payload back into its event.
fn join_payload(event: &mut StoredEvent, payload: Vec<u8>) {
    match event {
        StoredEvent::Mqtt { payload_hex, .. } => *payload_hex = hex::encode(payload),
        StoredEvent::Http { body_hex, .. } => *body_hex = hex::encode(payload),
        StoredEvent::Timer { .. } | StoredEvent::KeyValue { .. } => {}
    }
}

/// A row of [`COLUMNS`], followed by the payload column when
/// `with_payload`.
fn row_to_record(
    row: &rusqlite::Row<'_>,
    with_payload: bool,
) -> rusqlite::Result<Result<DeadLetter, String>> {
    let condition: String = row.get(3)?;
    let payload: Option<Vec<u8>> = if with_payload { row.get(10)? } else { None };
    let event: String = row.get(5)?;
    let first: String = row.get(6)?;
    let last: String = row.get(7)?;
    let id: String = row.get(0)?;
    let parsed = (|| -> Result<DeadLetter, String> {
        Ok(DeadLetter {
            id: id.clone(),
            component: row.get(1).map_err(|e| e.to_string())?,
            trigger: row.get(2).map_err(|e| e.to_string())?,
            condition: Condition::parse(&condition)
                .ok_or_else(|| format!("unknown condition {condition:?}"))?,
            attempts: row.get(4).map_err(|e| e.to_string())?,
            event: serde_json::from_str(&event).map_err(|e| e.to_string())?,
            first_error: serde_json::from_str(&first).map_err(|e| e.to_string())?,
            last_error: serde_json::from_str(&last).map_err(|e| e.to_string())?,
            first_attempt_ms: row.get::<_, i64>(8).map_err(|e| e.to_string())? as u64,
            dead_at_ms: row.get::<_, i64>(9).map_err(|e| e.to_string())? as u64,
        })
    })();
    Ok(parsed
        .map(|mut record| {
            if let Some(payload) = payload {
                join_payload(&mut record.event, payload);
            }
            record
        })
        .map_err(|e| format!("record {id} is unreadable: {e}")))
}

const COLUMNS: &str = "id, component, trigger, condition, attempts, event, first_error, last_error, first_attempt_ms, dead_at_ms";

fn write_batch(
    conn: &mut Connection,
    batch: &[DeadLetter],
    bounds: Bounds,
    stats: &StoreStats,
) -> Result<(), String> {
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    {
        let mut insert = tx
            .prepare_cached(&format!(
                "INSERT OR REPLACE INTO dead_letters ({COLUMNS}, payload, size) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ))
            .map_err(|e| e.to_string())?;
        for d in batch {
            let (event, payload) = split_payload(&d.event);
            let event = serde_json::to_string(&event).expect("event serializes");
            let first = serde_json::to_string(&d.first_error).expect("error serializes");
            let last = serde_json::to_string(&d.last_error).expect("error serializes");
            let size = event.len()
                + first.len()
                + last.len()
                + d.id.len()
                + d.component.len()
                + d.trigger.len()
                + payload.as_ref().map_or(0, Vec::len);
            insert
                .execute(params![
                    d.id,
                    d.component,
                    d.trigger,
                    d.condition.as_str(),
                    d.attempts,
                    event,
                    first,
                    last,
                    d.first_attempt_ms as i64,
                    d.dead_at_ms as i64,
                    payload,
                    size as i64,
                ])
                .map_err(|e| e.to_string())?;
        }
    }
    let evicted = evict(&tx, bounds)?;
    tx.commit().map_err(|e| e.to_string())?;
    stats.commits.fetch_add(1, Ordering::Relaxed);
    stats
        .written
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    if evicted > 0 {
        stats.evicted.fetch_add(evicted, Ordering::Relaxed);
        tracing::warn!(
            evicted,
            max_records = bounds.max_records,
            max_bytes = bounds.max_bytes,
            max_age_s = bounds.max_age.as_secs(),
            "dead letters evicted by the store's bounds"
        );
    }
    Ok(())
}

/// Removes what the bounds no longer allow: records past `max_age`, the
/// oldest past `max_records`, the oldest past `max_bytes`. Returns how many.
fn evict(tx: &rusqlite::Transaction<'_>, bounds: Bounds) -> Result<u64, String> {
    let oldest = crate::sqlite::now_ms().saturating_sub(bounds.max_age.as_millis() as u64) as i64;
    let mut evicted = tx
        .execute(
            "DELETE FROM dead_letters WHERE dead_at_ms < ?1",
            params![oldest],
        )
        .map_err(|e| e.to_string())? as u64;
    let count: i64 = tx
        .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    let excess = count - bounds.max_records as i64;
    if excess > 0 {
        evicted += tx
            .execute(
                "DELETE FROM dead_letters WHERE rowid IN \
                 (SELECT rowid FROM dead_letters ORDER BY dead_at_ms ASC, rowid ASC LIMIT ?1)",
                params![excess],
            )
            .map_err(|e| e.to_string())? as u64;
    }
    let bytes: i64 = tx
        .query_row("SELECT COALESCE(SUM(size), 0) FROM dead_letters", [], |r| {
            r.get(0)
        })
        .map_err(|e| e.to_string())?;
    if bytes > bounds.max_bytes as i64 {
        // Keep the newest records that fit in max_bytes together.
        evicted += tx
            .execute(
                "DELETE FROM dead_letters WHERE rowid IN (SELECT rowid FROM \
                 (SELECT rowid, SUM(size) OVER (ORDER BY dead_at_ms DESC, rowid DESC \
                  ROWS UNBOUNDED PRECEDING) AS kept FROM dead_letters) WHERE kept > ?1)",
                params![bounds.max_bytes as i64],
            )
            .map_err(|e| e.to_string())? as u64;
    }
    Ok(evicted)
}

/// Records waiting for the writer; past it `put` waits for room.
const WRITER_QUEUE: usize = 1024;
/// Most records one transaction of the writer takes.
const MAX_BATCH: usize = 1000;
/// Most payload bytes one transaction takes (it passes through the WAL).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

impl DeadLetter {
    /// About the bytes the record's payload or body takes.
    fn approx_size(&self) -> usize {
        match &self.event {
            StoredEvent::Mqtt { payload_hex, .. } => payload_hex.len() / 2,
            StoredEvent::Http { body_hex, .. } => body_hex.len() / 2,
            StoredEvent::Timer { .. } => 0,
            StoredEvent::KeyValue { changes, .. } => changes.iter().map(StoredChange::size).sum(),
        }
    }
}

impl DeadLetterStore {
    /// Also publishes each record, once committed, as JSON (QoS 1) to
    /// `topic` (`[dead_letters] mqtt_topic`), through the components' publish
    /// sink (see [`crate::delivery`]).
    pub fn with_publish_topic(mut self, topic: Option<String>) -> Self {
        self.publish_topic = topic;
        self
    }

    /// Where committed records are published, if anywhere.
    pub fn publish_topic(&self) -> Option<&str> {
        self.publish_topic.as_deref()
    }

    /// Opens (or creates) the store at `path`; fails with a message that names
    /// the file when it cannot be opened or is corrupt.
    pub fn open(path: &Path, bounds: Bounds) -> Result<Self, String> {
        let reader = open_connection(path)?;
        let mut writer_conn = open_connection(path)?;
        let stats = Arc::new(StoreStats::default());
        let (tx, mut rx) = mpsc::channel::<Job>(WRITER_QUEUE);
        let writer_stats = stats.clone();
        std::thread::Builder::new()
            .name("wasmgate-dlq".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut bytes = first.0.approx_size();
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(job) => {
                                bytes += job.0.approx_size();
                                jobs.push(job);
                            }
                            Err(_) => break,
                        }
                    }
                    let records: Vec<DeadLetter> = jobs.iter().map(|(d, _)| d.clone()).collect();
                    // A transient failure (the database locked by a `dlq`
                    // command past the busy timeout) is retried before the
                    // batch is reported as failed.
                    let mut result = write_batch(&mut writer_conn, &records, bounds, &writer_stats);
                    for pause_ms in [100, 500, 2000] {
                        if result.is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(pause_ms));
                        result = write_batch(&mut writer_conn, &records, bounds, &writer_stats);
                    }
                    if result.is_err() {
                        writer_stats
                            .write_failures
                            .fetch_add(records.len() as u64, Ordering::Relaxed);
                    }
                    for (_, ack) in jobs {
                        let _ = ack.send(result.clone());
                    }
                }
            })
            .map_err(|e| format!("cannot start the dead-letter writer: {e}"))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(tx)),
            stats,
            publish_topic: None,
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its counters.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Stores a record durably; returns once it is committed to disk.
    pub async fn put(&self, record: DeadLetter) -> Result<(), String> {
        let (ack, acked) = oneshot::channel();
        let writer = self.writer.lock().expect("writer lock").clone();
        let sent = match writer {
            Some(tx) => tx.send((record, ack)).await.is_ok(),
            None => false,
        };
        if !sent {
            return Err("the dead-letter writer has stopped".into());
        }
        acked
            .await
            .unwrap_or_else(|_| Err("the dead-letter writer has stopped".into()))
    }

    /// Stores a record durably, blocking the calling thread (CLI use).
    pub fn put_blocking(&self, record: DeadLetter) -> Result<(), String> {
        let (ack, acked) = oneshot::channel();
        let writer = self.writer.lock().expect("writer lock").clone();
        match writer {
            Some(tx) => tx
                .blocking_send((record, ack))
                .map_err(|_| "the dead-letter writer has stopped".to_string())?,
            None => return Err("the dead-letter writer has stopped".into()),
        }
        acked
            .blocking_recv()
            .unwrap_or_else(|_| Err("the dead-letter writer has stopped".into()))
    }

    /// Every record, newest first, optionally only those of a component
    /// and/or trigger, payloads included. This holds the whole selection in
    /// memory: commands page with [`Self::list_page`].
    pub fn list(
        &self,
        component: Option<&str>,
        trigger: Option<&str>,
    ) -> Result<Vec<DeadLetter>, String> {
        let filter = Filter {
            component,
            trigger,
            with_payloads: true,
        };
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.list_page(&filter, cursor, 1000)?;
            let Some(last) = page.next else {
                out.extend(page.records);
                return Ok(out);
            };
            cursor = Some(last);
            out.extend(page.records);
        }
    }

    /// Up to `limit` records, newest first, older than `before` (from the
    /// newest when `None`). A page never holds more than `limit` records;
    /// without [`Filter::with_payloads`] their payloads and bodies are not
    /// read (the events carry empty ones).
    pub fn list_page(
        &self,
        filter: &Filter<'_>,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Page, String> {
        let conn = self.reader.lock().expect("reader lock");
        let payload = if filter.with_payloads {
            ", payload"
        } else {
            ""
        };
        let (at, rowid) = before.map_or((i64::MAX, i64::MAX), |c| (c.dead_at_ms, c.rowid));
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS}{payload}, rowid FROM dead_letters \
                 WHERE (?1 IS NULL OR component = ?1) AND (?2 IS NULL OR trigger = ?2) \
                 AND (dead_at_ms < ?3 OR (dead_at_ms = ?3 AND rowid < ?4)) \
                 ORDER BY dead_at_ms DESC, rowid DESC LIMIT ?5"
            ))
            .map_err(|e| e.to_string())?;
        let rowid_column = if filter.with_payloads { 11 } else { 10 };
        let rows = stmt
            .query_map(
                params![
                    filter.component,
                    filter.trigger,
                    at,
                    rowid,
                    limit.saturating_add(1) as i64
                ],
                |row| {
                    Ok((
                        row_to_record(row, filter.with_payloads)?,
                        Cursor {
                            dead_at_ms: row.get(9)?,
                            rowid: row.get(rowid_column)?,
                        },
                    ))
                },
            )
            .map_err(|e| e.to_string())?;
        let mut records = Vec::new();
        let (mut seen, mut last, mut more) = (0, None, false);
        for row in rows {
            let (record, cursor) = row.map_err(|e| e.to_string())?;
            if seen == limit {
                more = true;
                break;
            }
            seen += 1;
            last = Some(cursor);
            // One unreadable record must not hide the others.
            match record {
                Ok(record) => records.push(record),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable dead letter"),
            }
        }
        let next = if more { last } else { None };
        Ok(Page { records, next })
    }

    /// Records kept, per component (from the component index: no record
    /// is read).
    pub fn counts_by_component(&self) -> Result<Vec<(String, u64)>, String> {
        let conn = self.reader.lock().expect("reader lock");
        let mut stmt = conn
            .prepare_cached("SELECT component, COUNT(*) FROM dead_letters GROUP BY component")
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| e.to_string())?;
        rows.map(|r| r.map_err(|e| e.to_string())).collect()
    }

    /// Where the record `id` sits in the newest-first order: a page
    /// `before` it starts with the next older record.
    pub fn cursor_of(&self, id: &str) -> Result<Option<Cursor>, String> {
        let conn = self.reader.lock().expect("reader lock");
        conn.query_row(
            "SELECT dead_at_ms, rowid FROM dead_letters WHERE id = ?1",
            params![id],
            |r| {
                Ok(Cursor {
                    dead_at_ms: r.get(0)?,
                    rowid: r.get(1)?,
                })
            },
        )
        .optional()
        .map_err(|e| e.to_string())
    }

    /// One record.
    pub fn get(&self, id: &str) -> Result<Option<DeadLetter>, String> {
        let conn = self.reader.lock().expect("reader lock");
        let row = conn
            .query_row(
                &format!("SELECT {COLUMNS}, payload FROM dead_letters WHERE id = ?1"),
                params![id],
                |row| row_to_record(row, true),
            )
            .optional()
            .map_err(|e| e.to_string())?;
        row.transpose()
    }

    /// Removes one record; returns whether it existed.
    pub fn delete(&self, id: &str) -> Result<bool, String> {
        let conn = self.reader.lock().expect("reader lock");
        conn.execute("DELETE FROM dead_letters WHERE id = ?1", params![id])
            .map(|n| n > 0)
            .map_err(|e| e.to_string())
    }

    /// Removes the records of a component (all if `None`) that are older than
    /// `older_than_ms` (all if `None`); returns how many.
    pub fn purge(
        &self,
        component: Option<&str>,
        older_than_ms: Option<u64>,
    ) -> Result<u64, String> {
        let conn = self.reader.lock().expect("reader lock");
        let before = older_than_ms.map_or(i64::MAX, |ms| {
            crate::sqlite::now_ms().saturating_sub(ms) as i64
        });
        conn.execute(
            "DELETE FROM dead_letters WHERE (?1 IS NULL OR component = ?1) AND dead_at_ms < ?2",
            params![component, before],
        )
        .map(|n| n as u64)
        .map_err(|e| e.to_string())
    }
}

impl Drop for DeadLetterStore {
    fn drop(&mut self) {
        // Disconnect the writer; it finishes what it has and exits.
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
    }
}

/// Builds a record for `event`.
pub fn record(
    event: &Event,
    outcome: &Outcome,
    condition: Condition,
    first_error: AttemptError,
    first_attempt_ms: u64,
) -> DeadLetter {
    DeadLetter {
        id: outcome.invocation_id.clone(),
        component: outcome.component.clone(),
        trigger: outcome.trigger.clone(),
        condition,
        attempts: outcome.attempt,
        event: StoredEvent::from(event),
        first_error,
        last_error: AttemptError::from_outcome(outcome),
        first_attempt_ms,
        dead_at_ms: crate::sqlite::now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &str, component: &str, dead_at_ms: u64) -> DeadLetter {
        let err = AttemptError {
            outcome: "retry".into(),
            message: "sensor offline".into(),
            at_ms: dead_at_ms,
        };
        DeadLetter {
            id: id.into(),
            component: component.into(),
            trigger: "timer:every 1m".into(),
            condition: Condition::RetriesExhausted,
            attempts: 3,
            event: StoredEvent::from(&Event::Mqtt(MqttMessage {
                topic: "a/b".into(),
                payload: vec![0, 255, 7],
                qos: 1,
                correlation_data: Some(vec![9]),
                user_properties: vec![("k".into(), "v".into())],
                ..MqttMessage::default()
            })),
            first_error: err.clone(),
            last_error: err,
            first_attempt_ms: dead_at_ms - 10,
            dead_at_ms,
        }
    }

    #[test]
    fn records_round_trip_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let bounds = Bounds {
            max_records: 3,
            max_age: Duration::from_secs(3600),
            ..Bounds::default()
        };
        let store = DeadLetterStore::open(&path, bounds).unwrap();
        let now = crate::sqlite::now_ms();
        for i in 0..5 {
            store
                .put_blocking(letter(&format!("id-{i}"), "c", now - 100 + i))
                .unwrap();
        }
        // A record older than max_age is removed at the next write.
        store
            .put_blocking(letter("ancient", "other", now - 7_200_000))
            .unwrap();
        let ids: Vec<String> = store
            .list(None, None)
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids, ["id-4", "id-3", "id-2"]);
        assert_eq!(store.stats().evicted.load(Ordering::Relaxed), 3);

        let got = store.get("id-4").unwrap().unwrap();
        assert_eq!(got, letter("id-4", "c", now - 96));
        let Event::Mqtt(m) = got.event.to_event().unwrap() else {
            panic!()
        };
        assert_eq!(m.payload, [0, 255, 7]);
        assert_eq!(m.correlation_data, Some(vec![9]));

        assert!(store.delete("id-4").unwrap());
        assert!(!store.delete("id-4").unwrap());
        assert_eq!(store.purge(Some("c"), None).unwrap(), 2);
        assert!(store.list(None, None).unwrap().is_empty());
        drop(store);

        // Reopened: still empty, still usable.
        let store = DeadLetterStore::open(&path, bounds).unwrap();
        store.put_blocking(letter("again", "c", now)).unwrap();
        assert_eq!(store.list(Some("c"), None).unwrap().len(), 1);
        assert_eq!(store.list(Some("nope"), None).unwrap().len(), 0);
    }

    fn with_payload(mut d: DeadLetter, bytes: usize) -> DeadLetter {
        if let StoredEvent::Mqtt { payload_hex, .. } = &mut d.event {
            *payload_hex = hex::encode(vec![0xA5u8; bytes]);
        }
        d
    }

    /// A flood of failed 100 KB messages: the store keeps the newest that
    /// fit in max_bytes, and its file stays near that size.
    #[test]
    fn the_store_is_bounded_in_bytes_and_stores_payloads_as_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let bounds = Bounds {
            max_bytes: 1024 * 1024,
            ..Bounds::default()
        };
        let store = DeadLetterStore::open(&path, bounds).unwrap();
        let now = crate::sqlite::now_ms();
        for i in 0..100 {
            store
                .put_blocking(with_payload(
                    letter(&format!("id-{i:03}"), "c", now - 1000 + i),
                    100_000,
                ))
                .unwrap();
        }
        let kept = store.list(None, None).unwrap();
        assert!(
            (8..=10).contains(&kept.len()),
            "{} records kept",
            kept.len()
        );
        assert_eq!(kept[0].id, "id-099", "the newest are kept");
        assert_eq!(
            store.stats().evicted.load(Ordering::Relaxed),
            100 - kept.len() as u64
        );
        let Event::Mqtt(m) = kept[0].event.to_event().unwrap() else {
            panic!()
        };
        assert_eq!(m.payload, vec![0xA5u8; 100_000]);
        // On disk: the bound, plus the WAL (checkpointed every 1,000 pages,
        // cut back to 4 MiB); without the byte bound the flood took 20 MB.
        drop(store);
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            on_disk < 8 * 1024 * 1024,
            "{on_disk} bytes on disk for a 1 MiB bound"
        );
        let conn = Connection::open(&path).unwrap();
        let stored: i64 = conn
            .query_row(
                "SELECT length(payload) FROM dead_letters WHERE id = 'id-099'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 100_000);
    }

    #[test]
    fn pages_list_every_record_once_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetterStore::open(&dir.path().join(FILE_NAME), Bounds::default()).unwrap();
        let now = crate::sqlite::now_ms();
        for i in 0..250u64 {
            // Groups of five share a timestamp: the cursor must tell them apart.
            store
                .put_blocking(with_payload(
                    letter(&format!("id-{i:03}"), "c", now - 1000 + i / 5),
                    10,
                ))
                .unwrap();
        }
        let filter = Filter::default();
        let mut seen = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = store.list_page(&filter, cursor, 100).unwrap();
            assert!(page.records.len() <= 100);
            // Without payloads, none is read.
            assert!(page.records.iter().all(|r| matches!(
                &r.event,
                StoredEvent::Mqtt { payload_hex, .. } if payload_hex.is_empty()
            )));
            seen.extend(page.records.into_iter().map(|r| r.id));
            pages += 1;
            cursor = page.next;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(pages, 3);
        let mut want: Vec<String> = (0..250).map(|i| format!("id-{i:03}")).collect();
        want.reverse();
        assert_eq!(seen, want);
        let from = store.cursor_of("id-100").unwrap();
        let page = store.list_page(&filter, from, 2).unwrap();
        let ids: Vec<&str> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["id-099", "id-098"]);
    }

    /// A store written before payloads were blobs opens, reads and is
    /// bounded like a new one.
    #[test]
    fn a_store_of_the_earlier_schema_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let old = letter("old", "c", crate::sqlite::now_ms() - 5);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE dead_letters (id TEXT PRIMARY KEY, component TEXT NOT NULL, \
                 trigger TEXT NOT NULL, condition TEXT NOT NULL, attempts INTEGER NOT NULL, \
                 event TEXT NOT NULL, first_error TEXT NOT NULL, last_error TEXT NOT NULL, \
                 first_attempt_ms INTEGER NOT NULL, dead_at_ms INTEGER NOT NULL)",
            )
            .unwrap();
            conn.execute(
                &format!("INSERT INTO dead_letters ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    old.id,
                    old.component,
                    old.trigger,
                    old.condition.as_str(),
                    old.attempts,
                    serde_json::to_string(&old.event).unwrap(),
                    serde_json::to_string(&old.first_error).unwrap(),
                    serde_json::to_string(&old.last_error).unwrap(),
                    old.first_attempt_ms as i64,
                    old.dead_at_ms as i64,
                ],
            )
            .unwrap();
        }
        let store = DeadLetterStore::open(&path, Bounds::default()).unwrap();
        assert_eq!(store.get("old").unwrap().unwrap(), old);
        store
            .put_blocking(letter("new", "c", crate::sqlite::now_ms()))
            .unwrap();
        let ids: Vec<String> = store
            .list(None, None)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["new", "old"]);
    }

    #[test]
    fn a_corrupt_store_is_refused_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let err = DeadLetterStore::open(&path, Bounds::default()).unwrap_err();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("move it away"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![0x42u8; 8192],
            "the file is left alone"
        );
    }
}
