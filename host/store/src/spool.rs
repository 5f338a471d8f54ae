//! The publish spool: QoS 1/2 messages the host publishes while the broker
//! is unreachable wait here, on disk in `state_dir`, and are sent in order
//! once the connection is back (see the MQTT trigger's publisher).
//!
//! An SQLite table in WAL mode with `synchronous = FULL`: a message is on
//! disk when [`Spool::append`] returns, so it survives a crash or a restart
//! of the host. The spool is bounded by a number of messages and a number of
//! bytes; when a message does not fit, [`OnFull`] decides, explicitly, which
//! message is lost — the oldest waiting one or the new one — and each loss
//! is counted by the caller from the returned [`Stored`].

use rusqlite::{Connection, params};
use std::path::Path;
use wasmgate_runtime::invoke::MqttMessage;

/// The spool's file in `state_dir`.
pub const FILE_NAME: &str = "mqtt-spool.sqlite";
/// Default bound on waiting messages.
pub const DEFAULT_MAX_MESSAGES: u64 = 100_000;
/// Default bound on the bytes of waiting messages (topics, payloads and
/// properties): 64 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

pub use wasmgate_manifest::OnFull;

/// The spool's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolBounds {
    /// Most messages waiting.
    pub max_messages: u64,
    /// Most bytes waiting (see [`size`]).
    pub max_bytes: u64,
    /// What a full spool does.
    pub on_full: OnFull,
}

impl From<&wasmgate_manifest::SpoolConfig> for SpoolBounds {
    /// The manifest's `[mqtt] spool = {...}`, defaults filled in.
    fn from(c: &wasmgate_manifest::SpoolConfig) -> Self {
        let d = SpoolBounds::default();
        Self {
            max_messages: c
                .max_messages
                .as_ref()
                .map_or(d.max_messages, |m| *m.get_ref()),
            max_bytes: c.max_bytes.as_ref().map_or(d.max_bytes, |b| b.get_ref().0),
            on_full: c.on_full,
        }
    }
}

impl Default for SpoolBounds {
    fn default() -> Self {
        Self {
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
            on_full: OnFull::default(),
        }
    }
}

/// What one [`Spool::append`] or [`Spool::prepend`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// Messages written.
    pub stored: u64,
    /// Older messages dropped to make room (`drop_oldest`), including ones
    /// written earlier in the same call.
    pub dropped_oldest: u64,
    /// Messages refused (`refuse_new`, or larger than `max_bytes` alone).
    pub refused: u64,
    /// Which messages of the call were refused (their indices).
    pub refused_at: Vec<usize>,
}

/// The bytes a message counts against `max_bytes` ([`MqttMessage::size`]).
pub fn size(m: &MqttMessage) -> u64 {
    m.size()
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS spool (
             seq INTEGER PRIMARY KEY,
             topic TEXT NOT NULL,
             payload BLOB NOT NULL,
             qos INTEGER NOT NULL,
             retain INTEGER NOT NULL,
             content_type TEXT,
             response_topic TEXT,
             correlation_data BLOB,
             user_properties TEXT NOT NULL,
             size INTEGER NOT NULL,
             spooled_at_ms INTEGER NOT NULL
         );";

/// The on-disk spool. One owner (the publisher's thread) uses it.
#[derive(Debug)]
pub struct Spool {
    conn: Connection,
    bounds: SpoolBounds,
    len: u64,
    bytes: u64,
    /// The next sequence number at the back, and the lowest one used at the
    /// front: sequence numbers are never reused while the spool is open (a
    /// drain's cursor and the rows in flight refer to them).
    next_seq: i64,
    low_seq: i64,
}

impl Spool {
    /// Opens (creating it if needed) the spool at `path`; what an earlier run
    /// left there waits to be sent first.
    pub fn open(path: &Path, bounds: SpoolBounds) -> Result<Self, String> {
        let conn = crate::sqlite::open(path, "MQTT publish spool", SCHEMA)?;
        let (len, bytes, low, high): (i64, i64, i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MIN(seq), 1), COALESCE(MAX(seq), 0) FROM spool",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(|e| format!("MQTT publish spool {}: {e}", path.display()))?;
        Ok(Self {
            conn,
            bounds,
            len: len as u64,
            bytes: bytes as u64,
            next_seq: high + 1,
            low_seq: low,
        })
    }

    /// A spool in memory (lost with the process), for embedding and tests.
    pub fn open_in_memory(bounds: SpoolBounds) -> Result<Self, String> {
        let conn = Connection::open_in_memory().map_err(|e| e.to_string())?;
        conn.execute_batch(SCHEMA).map_err(|e| e.to_string())?;
        Ok(Self {
            conn,
            bounds,
            len: 0,
            bytes: 0,
            next_seq: 1,
            low_seq: 1,
        })
    }

    /// Messages waiting.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes waiting (see [`size`]).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes `messages` after everything waiting, in one transaction (on
    /// disk when this returns).
    pub fn append(&mut self, messages: &[MqttMessage]) -> rusqlite::Result<Stored> {
        let first = self.next_seq;
        let out = self.write(messages, first)?;
        self.next_seq = first + messages.len() as i64;
        Ok(out)
    }

    /// Writes `messages` before everything waiting (they are older: publishes
    /// the broker had not acknowledged when the connection dropped), in one
    /// transaction.
    pub fn prepend(&mut self, messages: &[MqttMessage]) -> rusqlite::Result<Stored> {
        let first = self.low_seq - messages.len() as i64;
        let out = self.write(messages, first)?;
        self.low_seq = first;
        Ok(out)
    }

    fn write(&mut self, messages: &[MqttMessage], first_seq: i64) -> rusqlite::Result<Stored> {
        let mut out = Stored::default();
        let (mut len, mut bytes) = (self.len, self.bytes);
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO spool (seq, topic, payload, qos, retain, content_type, \
                 response_topic, correlation_data, user_properties, size, spooled_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            let mut oldest = tx.prepare_cached(
                "SELECT seq, size FROM spool WHERE seq != ?1 ORDER BY seq LIMIT 1",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM spool WHERE seq = ?1")?;
            let now = crate::sqlite::now_ms() as i64;
            for (i, m) in messages.iter().enumerate() {
                let n = size(m);
                let fits = |len: u64, bytes: u64| {
                    len < self.bounds.max_messages && bytes + n <= self.bounds.max_bytes
                };
                if n > self.bounds.max_bytes
                    || (self.bounds.on_full == OnFull::RefuseNew && !fits(len, bytes))
                {
                    out.refused += 1;
                    out.refused_at.push(i);
                    continue;
                }
                let seq = first_seq + i as i64;
                // drop_oldest: make room, never dropping the new message.
                while !fits(len, bytes) {
                    let (old, old_size): (i64, i64) =
                        oldest.query_row(params![seq], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    delete.execute(params![old])?;
                    len -= 1;
                    bytes -= old_size as u64;
                    out.dropped_oldest += 1;
                }
                let user_properties =
                    serde_json::to_string(&m.user_properties).expect("strings serialize");
                insert.execute(params![
                    seq,
                    m.topic,
                    m.payload,
                    m.qos,
                    m.retain,
                    m.content_type,
                    m.response_topic,
                    m.correlation_data,
                    user_properties,
                    n as i64,
                    now
                ])?;
                len += 1;
                bytes += n;
                out.stored += 1;
            }
        }
        tx.commit()?;
        self.len = len;
        self.bytes = bytes;
        Ok(out)
    }

    /// Up to `n` of the oldest waiting messages, oldest first, with their
    /// sequence numbers (for [`Spool::remove`]).
    pub fn peek(&self, n: usize) -> rusqlite::Result<Vec<(i64, MqttMessage)>> {
        self.peek_after(i64::MIN, n)
    }

    /// Up to `n` of the oldest waiting messages with a sequence number
    /// after `seq`, oldest first.
    pub fn peek_after(&self, seq: i64, n: usize) -> rusqlite::Result<Vec<(i64, MqttMessage)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, topic, payload, qos, retain, content_type, response_topic, \
             correlation_data, user_properties FROM spool WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![seq, n as i64], |r| {
            let props: String = r.get(8)?;
            Ok((
                r.get::<_, i64>(0)?,
                MqttMessage {
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                    qos: r.get(3)?,
                    retain: r.get(4)?,
                    content_type: r.get(5)?,
                    response_topic: r.get(6)?,
                    correlation_data: r.get(7)?,
                    user_properties: serde_json::from_str(&props).unwrap_or_default(),
                },
            ))
        })?;
        rows.collect()
    }

    /// Removes the messages with sequence numbers `seqs` (the broker
    /// acknowledged them), in one transaction; returns how many were still
    /// there (a full spool may have dropped some meanwhile).
    pub fn remove(&mut self, seqs: &[i64]) -> rusqlite::Result<u64> {
        let tx = self.conn.transaction()?;
        let (mut n, mut b) = (0u64, 0u64);
        {
            let mut delete =
                tx.prepare_cached("DELETE FROM spool WHERE seq = ?1 RETURNING size")?;
            for seq in seqs {
                let mut rows = delete.query(params![seq])?;
                if let Some(r) = rows.next()? {
                    n += 1;
                    b += r.get::<_, i64>(0)? as u64;
                }
            }
        }
        tx.commit()?;
        self.len -= n;
        self.bytes -= b;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &[u8]) -> MqttMessage {
        MqttMessage {
            topic: topic.into(),
            payload: payload.to_vec(),
            qos: 1,
            ..MqttMessage::default()
        }
    }

    fn topics(s: &Spool) -> Vec<String> {
        s.peek(1000)
            .unwrap()
            .into_iter()
            .map(|(_, m)| m.topic)
            .collect()
    }

    fn bounds(max_messages: u64, max_bytes: u64, on_full: OnFull) -> SpoolBounds {
        SpoolBounds {
            max_messages,
            max_bytes,
            on_full,
        }
    }

    /// A drain's cursor and the rows in flight refer to sequence numbers:
    /// an emptied spool must not hand out the same ones again.
    #[test]
    fn sequence_numbers_are_never_reused_while_open() {
        let mut s = Spool::open_in_memory(SpoolBounds::default()).unwrap();
        s.append(&[msg("a", b""), msg("b", b"")]).unwrap();
        let first: Vec<i64> = s.peek(10).unwrap().iter().map(|(q, _)| *q).collect();
        assert_eq!(s.remove(&first).unwrap(), 2);
        assert!(s.is_empty());
        s.append(&[msg("c", b"")]).unwrap();
        let (c, _) = s.peek(1).unwrap()[0].clone();
        assert!(c > first[1], "{c} after {first:?}");
        assert_eq!(s.remove(&[c]).unwrap(), 1);
        s.prepend(&[msg("d", b"")]).unwrap();
        let (d, _) = s.peek(1).unwrap()[0].clone();
        assert!(d < first[0], "{d} before {first:?}");
    }

    #[test]
    fn messages_keep_their_order_fields_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let full = MqttMessage {
            topic: "t/full".into(),
            payload: vec![0, 255, 1],
            qos: 2,
            retain: true,
            content_type: Some("application/octet-stream".into()),
            response_topic: Some("replies/1".into()),
            correlation_data: Some(vec![9, 9]),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        };
        {
            let mut s = Spool::open(&path, SpoolBounds::default()).unwrap();
            s.append(&[msg("a", b"1"), full.clone()]).unwrap();
            s.append(&[msg("b", b"")]).unwrap();
            // Older: unacknowledged when the connection dropped.
            s.prepend(&[msg("p1", b""), msg("p2", b"")]).unwrap();
        }
        let mut s = Spool::open(&path, SpoolBounds::default()).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(topics(&s), ["p1", "p2", "a", "t/full", "b"]);
        let rows = s.peek(5).unwrap();
        assert_eq!(rows[3].1, full);
        assert_eq!(
            s.remove(&[rows[0].0, rows[1].0, rows[2].0, rows[2].0])
                .unwrap(),
            3
        );
        assert_eq!(topics(&s), ["t/full", "b"]);
        assert_eq!(s.len(), 2);
        assert_eq!(s.bytes(), size(&full) + 1);
        s.append(&[msg("c", b"")]).unwrap();
        assert_eq!(topics(&s), ["t/full", "b", "c"]);
    }

    #[test]
    fn drop_oldest_makes_room_by_count_and_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(
            &dir.path().join(FILE_NAME),
            bounds(3, 995, OnFull::DropOldest),
        )
        .unwrap();
        let r = s
            .append(&[msg("1", b""), msg("2", b""), msg("3", b"")])
            .unwrap();
        assert_eq!(r.stored, 3);
        let r = s.append(&[msg("4", b""), msg("5", b"")]).unwrap();
        assert_eq!((r.stored, r.dropped_oldest, r.refused), (2, 2, 0));
        assert_eq!(topics(&s), ["3", "4", "5"]);
        // 995 bytes need the whole spool: all three older ones (1 byte each)
        // go.
        let r = s.append(&[msg("6", &[0; 994])]).unwrap();
        assert_eq!((r.stored, r.dropped_oldest), (1, 3));
        assert_eq!(topics(&s), ["6"]);
        assert_eq!(s.bytes(), 995);
        // Larger than the whole spool: refused whatever the policy.
        let r = s.append(&[msg("7", &[0; 995])]).unwrap();
        assert_eq!((r.stored, r.refused), (0, 1));
        assert_eq!(topics(&s), ["6"]);
    }

    #[test]
    fn refuse_new_keeps_what_waits() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(
            &dir.path().join(FILE_NAME),
            bounds(2, 1000, OnFull::RefuseNew),
        )
        .unwrap();
        let r = s
            .append(&[msg("1", b""), msg("2", b""), msg("3", b"")])
            .unwrap();
        assert_eq!((r.stored, r.dropped_oldest, r.refused), (2, 0, 1));
        let r = s.prepend(&[msg("0", b"")]).unwrap();
        assert_eq!(r.refused, 1);
        assert_eq!(topics(&s), ["1", "2"]);
        let (seq, _) = s.peek(1).unwrap()[0].clone();
        assert_eq!(s.remove(&[seq]).unwrap(), 1);
        let r = s.append(&[msg("4", b"")]).unwrap();
        assert_eq!(r.stored, 1);
        assert_eq!(topics(&s), ["2", "4"]);
    }
}
