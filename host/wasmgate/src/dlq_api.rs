//! The dead-letter routes of the admin API (what `wasmgate dlq` does, on a
//! running gateway): list (paged), show, replay, purge.
//!
//! A replay runs the record's event through the running component (its
//! active version, limits and publish sink): a success removes the record,
//! a failure keeps it with one more attempt and the new error. Every store
//! call runs off the async workers; a page holds at most [`MAX_PAGE`]
//! records, a replay request at most [`MAX_REPLAY`].

use crate::admin::{AdminState, error};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;
use wasmgate_runtime::invoke::{Admission, InvocationContext};
use wasmgate_store::deadletter::{AttemptError, DeadLetter, DeadLetterStore, Filter};

/// Most records one list request returns.
pub const MAX_PAGE: usize = 1000;
/// Most records one replay request runs.
pub const MAX_REPLAY: usize = 100;

/// `GET /v1/dead-letters` parameters.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    component: Option<String>,
    trigger: Option<String>,
    /// Records per page (default 100, at most [`MAX_PAGE`]).
    limit: Option<usize>,
    /// The id of the last record of the previous page.
    before: Option<String>,
}

/// `POST /v1/dead-letters/replay` and `/purge` parameters.
#[derive(Debug, Deserialize)]
pub struct BulkQuery {
    component: Option<String>,
    /// Purge: every record.
    #[serde(default)]
    all: bool,
    /// Purge: records dead for longer than this (`"7d"`).
    older_than: Option<String>,
    /// Replay: records to run (default and at most [`MAX_REPLAY`]).
    limit: Option<usize>,
}

/// An error answer: status and message.
struct Failure(u16, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn store(state: &AdminState) -> Result<Arc<DeadLetterStore>, Failure> {
    state
        .dead_letters()
        .ok_or_else(|| Failure(503, "the dead-letter store is not open yet".into()))
}

/// Runs `f` on the store off the async workers.
async fn blocking<T: Send + 'static>(
    state: &AdminState,
    f: impl FnOnce(&DeadLetterStore) -> Result<T, String> + Send + 'static,
) -> Result<T, Failure> {
    let store = store(state)?;
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Failure(500, e.to_string()))?
        .map_err(|e| Failure(500, e))
}

/// `GET /v1/dead-letters`: newest first, payloads included; `next` is the
/// `before` of the next page (null on the last).
pub async fn list(State(state): State<Arc<AdminState>>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let page = blocking(&state, move |s| {
        let cursor = match &q.before {
            Some(id) => Some(
                s.cursor_of(id)?
                    .ok_or_else(|| format!("before: no dead letter with id {id:?}"))?,
            ),
            None => None,
        };
        let filter = Filter {
            component: q.component.as_deref(),
            trigger: q.trigger.as_deref(),
            with_payloads: true,
        };
        s.list_page(&filter, cursor, limit)
    })
    .await;
    match page {
        Ok(page) => {
            let next = page
                .next
                .is_some()
                .then(|| page.records.last().map(|r| r.id.clone()))
                .flatten();
            axum::Json(serde_json::json!({ "records": page.records, "next": next })).into_response()
        }
        Err(r) => r.into_response(),
    }
}

/// `GET /v1/dead-letters/ID`.
pub async fn show(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    let wanted = id.clone();
    match blocking(&state, move |s| s.get(&wanted)).await {
        Ok(Some(r)) => axum::Json(r).into_response(),
        Ok(None) => error(404, format!("no dead letter with id {id:?}")),
        Err(r) => r.into_response(),
    }
}

/// `POST /v1/dead-letters/ID/replay`.
pub async fn replay_one(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    let wanted = id.clone();
    match blocking(&state, move |s| s.get(&wanted)).await {
        Ok(Some(record)) => match replay(&state, record).await {
            Ok(result) => axum::Json(result).into_response(),
            Err(r) => r.into_response(),
        },
        Ok(None) => error(404, format!("no dead letter with id {id:?}")),
        Err(r) => r.into_response(),
    }
}

/// `POST /v1/dead-letters/replay?component=C&limit=N`: up to `limit`
/// records, newest first like the list; `more` says whether some remain.
pub async fn replay_many(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<BulkQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(MAX_REPLAY).clamp(1, MAX_REPLAY);
    let component = q.component.clone();
    let page = blocking(&state, move |s| {
        let filter = Filter {
            component: component.as_deref(),
            trigger: None,
            with_payloads: true,
        };
        s.list_page(&filter, None, limit)
    })
    .await;
    let page = match page {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let mut results = Vec::new();
    for record in page.records {
        match replay(&state, record).await {
            Ok(r) => results.push(r),
            Err(r) => return r.into_response(),
        }
    }
    let ok = results.iter().filter(|r| r["removed"] == true).count();
    axum::Json(serde_json::json!({
        "replayed": results.len(),
        "ok": ok,
        "failed": results.len() - ok,
        "more": page.next.is_some(),
        "results": results,
    }))
    .into_response()
}

/// Replays one record on the running component.
async fn replay(
    state: &Arc<AdminState>,
    mut record: DeadLetter,
) -> Result<serde_json::Value, Failure> {
    let Some(component) = state.component(&record.component) else {
        return Err(Failure(
            409,
            format!(
                "dead letter {} belongs to component {:?}, which the manifest no longer defines; kept",
                record.id, record.component
            ),
        ));
    };
    let event = record
        .event
        .to_event()
        .map_err(|e| Failure(500, format!("dead letter {}: {e}", record.id)))?;
    let ctx = InvocationContext {
        id: record.id.clone(),
        trigger: record.trigger.clone(),
        attempt: record.attempts + 1,
    };
    let outcome = component.invoke(event, ctx, Admission::Wait).await;
    let id = record.id.clone();
    if outcome.is_ok() {
        blocking(state, move |s| s.delete(&id)).await?;
        return Ok(serde_json::json!({ "id": record.id, "outcome": "ok", "removed": true }));
    }
    record.attempts += 1;
    record.last_error = AttemptError::from_outcome(&outcome);
    let kept = record.clone();
    store(state)?.put(kept).await.map_err(|e| Failure(500, e))?;
    Ok(serde_json::json!({
        "id": record.id,
        "outcome": record.last_error.outcome,
        "message": record.last_error.message,
        "removed": false,
    }))
}

/// `POST /v1/dead-letters/purge?all=true | component=C | older_than=7d`.
pub async fn purge(State(state): State<Arc<AdminState>>, Query(q): Query<BulkQuery>) -> Response {
    if !q.all && q.component.is_none() && q.older_than.is_none() {
        return error(
            400,
            "say what to purge: all=true, component=C and/or older_than=DURATION",
        );
    }
    let older_than = match q.older_than.as_deref().map(humantime::parse_duration) {
        None => None,
        Some(Ok(d)) => Some(d.as_millis() as u64),
        Some(Err(e)) => return error(400, format!("older_than: {e}")),
    };
    let component = q.component.clone();
    match blocking(&state, move |s| s.purge(component.as_deref(), older_than)).await {
        Ok(n) => axum::Json(serde_json::json!({ "purged": n })).into_response(),
        Err(r) => r.into_response(),
    }
}
