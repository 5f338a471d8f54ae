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
