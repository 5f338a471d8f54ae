//! The durable queue of asynchronous invocations (`wasmgate invoke --async`).
//!
//! `state_dir/queue.sqlite` (SQLite, WAL, `synchronous = FULL`): an event is on
//! disk when `enqueue` returns, so an accepted event is never lost. A running
//! `wasmgate up` takes events in order, delivers each with the default retry
//! policy (dead-lettering those that fail for good), and removes an event only
//! after its delivery ended — a crash in between delivers it again, with the
//! same invocation id, so a guest can deduplicate.

use crate::deadletter::StoredEvent;
use rusqlite::{Connection, params};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File name of the queue inside `state_dir`.
pub const FILE_NAME: &str = "queue.sqlite";

/// One queued event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its invocation id.
    pub id: String,
    /// The component to invoke.
    pub component: String,
    /// The event.
    pub event: StoredEvent,
    /// When it was accepted, ms since the Unix epoch.
    pub enqueued_ms: u64,
}

/// The queue.
pub struct EventQueue {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Ids of rows that cannot be parsed: reported once, then skipped.
    unreadable: Mutex<Vec<String>>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EventQueue {
    /// Opens (or creates) the queue; the error names the file.
    pub fn open(path: &Path) -> Result<Self, String> {
        let conn = crate::sqlite::open(
            path,
            "event queue",
            "CREATE TABLE IF NOT EXISTS queue (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 id TEXT NOT NULL UNIQUE,
                 component TEXT NOT NULL,
                 event TEXT NOT NULL,
                 enqueued_ms INTEGER NOT NULL
             );",
        )?;
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            unreadable: Mutex::default(),
        })
    }

    /// Adds an event durably and returns its invocation id.
    pub fn enqueue(&self, component: &str, event: &StoredEvent) -> Result<String, String> {
        let id = uuid::Uuid::now_v7().to_string();
        self.enqueue_as(&id, component, event)?;
        Ok(id)
    }

    /// Adds an event durably under an existing invocation id (a replayed
    /// dead letter keeps its id).
    pub fn enqueue_as(&self, id: &str, component: &str, event: &StoredEvent) -> Result<(), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        self.conn
            .lock()
            .expect("queue lock")
            .execute(
                "INSERT INTO queue (id, component, event, enqueued_ms) VALUES (?1, ?2, ?3, ?4)",
                params![
                    id,
                    component,
                    serde_json::to_string(event).expect("event serializes"),
                    now
                ],
            )
            .map_err(|e| format!("cannot enqueue into {}: {e}", self.path.display()))?;
        Ok(())
    }

    /// The oldest `limit` events, skipping `exclude` (those in flight).
    pub fn peek(&self, limit: usize, exclude: &[String]) -> Result<Vec<Queued>, String> {
        let conn = self.conn.lock().expect("queue lock");
        let mut stmt = conn
            .prepare("SELECT id, component, event, enqueued_ms FROM queue ORDER BY seq LIMIT ?1")
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map(
                params![
                    (limit + exclude.len() + self.unreadable.lock().expect("queue lock").len())
                        as i64
                ],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                },
            )
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for row in rows {
            let (id, component, event, enqueued_ms) = row.map_err(|e| e.to_string())?;
            if exclude.contains(&id) || self.unreadable.lock().expect("queue lock").contains(&id) {
                continue;
            }
            let event = match serde_json::from_str(&event) {
                Ok(event) => event,
                Err(e) => {
                    // One bad row must not stop the queue: report it once, skip it.
                    tracing::error!(%id, error = %e, file = %self.path.display(), "queued event is unreadable; skipped (left in the queue file)");
                    self.unreadable.lock().expect("queue lock").push(id);
                    continue;
                }
            };
            out.push(Queued {
                id,
                component,
                event,
                enqueued_ms: enqueued_ms as u64,
            });
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Removes a delivered (or dead-lettered) event.
    pub fn remove(&self, id: &str) -> Result<(), String> {
        self.conn
            .lock()
            .expect("queue lock")
            .execute("DELETE FROM queue WHERE id = ?1", params![id])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Events waiting.
    pub fn len(&self) -> Result<u64, String> {
        self.conn
            .lock()
            .expect("queue lock")
            .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| e.to_string())
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> Result<bool, String> {
        self.len().map(|n| n == 0)
    }
}

/// How often a running host looks for newly queued events.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Most queued events delivered at once.
pub const MAX_IN_FLIGHT: usize = 16;

/// Delivers queued events until `shutdown`, then waits for those in flight.
pub async fn consume(
    queue: std::sync::Arc<EventQueue>,
    deployment: std::sync::Arc<wasmgate_runtime::deployment::Deployment>,
    dead_letters: std::sync::Arc<crate::deadletter::DeadLetterStore>,
    policy: crate::delivery::RetryPolicy,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut running = tokio::task::JoinSet::new();
    // Ids being delivered, and ids whose component is gone (reported once).
    let busy = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        while running.try_join_next().is_some() {}
        let room = MAX_IN_FLIGHT.saturating_sub(running.len());
        let exclude = busy.lock().expect("busy lock").clone();
        let batch = if room == 0 {
            Vec::new()
        } else {
            // SQLite may wait for a lock held by `wasmgate invoke --async`:
            // keep that off the async workers.
            let q = queue.clone();
            match tokio::task::spawn_blocking(move || q.peek(room, &exclude)).await {
                Ok(Ok(batch)) => batch,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the event queue");
                    Vec::new()
                }
                Err(e) => {
                    tracing::error!(error = %e, "the event-queue reader failed");
                    Vec::new()
                }
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            continue;
        }
        for item in batch {
            busy.lock().expect("busy lock").push(item.id.clone());
            let Some(invocable) = deployment.component(&item.component) else {
                tracing::error!(
                    id = %item.id,
                    component = %item.component,
                    "queued event for a component the manifest does not define; left in the queue"
                );
                continue;
            };
            let event = match item.event.to_event() {
                Ok(event) => event,
                Err(e) => {
                    tracing::error!(id = %item.id, error = %e, "queued event is unreadable; left in the queue");
                    continue;
                }
            };
            let (queue, dead_letters, busy) = (queue.clone(), dead_letters.clone(), busy.clone());
            running.spawn(async move {
                let ctx = wasmgate_runtime::invoke::InvocationContext {
                    id: item.id.clone(),
                    trigger: "invoke:async".into(),
                    attempt: 1,
                };
                let delivery =
                    crate::delivery::deliver(&invocable, event, ctx, &policy, Some(&dead_letters)).await;
                if !delivery.settled {
                    // The dead letter was not written: the queue holds the only
                    // copy, so the event stays and is delivered again later.
                    tracing::error!(id = %item.id, "event kept in the queue: its dead letter could not be written");
                    tokio::time::sleep(POLL_INTERVAL * 5).await;
                    busy.lock().expect("busy lock").retain(|id| id != &item.id);
                    return;
                }
                let (q, id) = (queue.clone(), item.id.clone());
                let removed = tokio::task::spawn_blocking(move || q.remove(&id))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                if let Err(e) = removed {
                    tracing::error!(id = %item.id, error = %e, "delivered, but cannot remove it from the queue: it will be delivered again");
                }
                busy.lock().expect("busy lock").retain(|id| id != &item.id);
            });
        }
    }
    while running.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let q = EventQueue::open(&path).unwrap();
        let tick = |n: u64| StoredEvent::Timer {
            schedule: "invoke".into(),
            scheduled_at_ms: n,
            fired_at_ms: n,
            missed: 0,
        };
        let a = q.enqueue("c", &tick(1)).unwrap();
        let b = q.enqueue("c", &tick(2)).unwrap();
        drop(q);
        let q = EventQueue::open(&path).unwrap();
        let got: Vec<String> = q.peek(10, &[]).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(got, [a.clone(), b.clone()]);
        assert_eq!(q.peek(10, std::slice::from_ref(&a)).unwrap()[0].id, b);
        q.remove(&a).unwrap();
        assert_eq!(q.len().unwrap(), 1);
        assert_eq!(q.peek(1, &[]).unwrap()[0].event, tick(2));
    }
}
