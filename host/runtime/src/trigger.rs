//! The one shape of an event source.
//!
//! Every trigger (HTTP, MQTT, timer, the durable queue) is built by the
//! composition root from the manifest and the loaded components, then run
//! until its shutdown token is cancelled. It reaches guests only through
//! [`crate::invoke::Invocable::invoke`], so limits, outcomes, logging and
//! publishing behave the same whatever caused an invocation.

use std::future::Future;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// An event source bound to components.
pub trait Trigger: Send + 'static {
    /// The trigger's kind, as `[[trigger.KIND]]` names it in the manifest.
    const TYPE: &'static str;

    /// Runs until `shutdown` is cancelled: stops taking events then, and
    /// returns once the invocations it started have finished. Long-lived
    /// work it spawns goes on `tasks`, so the caller can wait for it.
    fn run(
        self,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send;
}

/// The switch that pauses one trigger: while paused it takes no new events
/// (what that means per kind is the trigger's: an HTTP rule answers 503,
/// a timer skips its ticks, an MQTT trigger leaves its messages
/// unacknowledged until it resumes). Clones share the switch.
#[derive(Clone, Debug)]
pub struct Pause(std::sync::Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Pause {
    fn default() -> Self {
        Self(std::sync::Arc::new(tokio::sync::watch::Sender::new(false)))
    }
}

impl Pause {
    /// Pauses (`true`) or resumes (`false`); returns whether that changed
    /// anything.
    pub fn set(&self, paused: bool) -> bool {
        self.0
            .send_if_modified(|p| std::mem::replace(p, paused) != paused)
    }

    /// Whether the trigger is paused now.
    pub fn is_paused(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once the trigger is not paused.
    pub async fn resumed(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|paused| !*paused).await;
    }
}

/// The pause switch of every trigger of a manifest, by its label
/// (`http[0]`, `mqtt[1]`, `timer[2]`: kind and index in the manifest).
#[derive(Clone, Debug, Default)]
pub struct Pauses(std::collections::BTreeMap<String, Pause>);

impl Pauses {
    /// One switch per trigger of `m`, all running.
    pub fn of(m: &wasmgate_manifest::Manifest) -> Self {
        let t = &m.triggers;
        let labels = (0..t.http.len())
            .map(|i| format!("http[{i}]"))
            .chain((0..t.mqtt.len()).map(|i| format!("mqtt[{i}]")))
            .chain((0..t.timer.len()).map(|i| format!("timer[{i}]")))
            .chain((0..t.keyvalue.len()).map(|i| format!("keyvalue[{i}]")));
        Self(labels.map(|l| (l, Pause::default())).collect())
    }

    /// One switch per trigger of `m`; a trigger `previous` has too (the
    /// same kind and index) keeps its switch, paused or not (a reload).
    pub fn carried(m: &wasmgate_manifest::Manifest, previous: &Pauses) -> Self {
        let mut next = Self::of(m);
        for (label, pause) in &mut next.0 {
            if let Some(p) = previous.0.get(label) {
                *pause = p.clone();
            }
        }
        next
    }

    /// Resumes every switch of these that `next` does not have (the
    /// triggers a reload removed).
    pub fn resume_all_but(&self, next: &Pauses) {
        for (label, pause) in &self.0 {
            if !next.0.contains_key(label) {
                pause.set(false);
            }
        }
    }

    /// The switch of trigger `label`.
    pub fn get(&self, label: &str) -> Option<&Pause> {
        self.0.get(label)
    }

    /// The switch of trigger `label`; a trigger the manifest does not have
    /// gets one of its own that is never paused.
    pub fn of_trigger(&self, label: &str) -> Pause {
        self.0.get(label).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resumed_returns_once_the_switch_is_off() {
        let p = Pause::default();
        assert!(!p.is_paused());
        p.resumed().await;
        assert!(p.set(true));
        assert!(!p.set(true), "no change");
        let waiting = tokio::spawn({
            let p = p.clone();
            async move { p.resumed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(p.set(false));
        waiting.await.unwrap();
    }
}
