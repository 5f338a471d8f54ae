//! Prometheus metrics of invocations, recorded on the one invocation path
//! ([`crate::invoke::Invocable::invoke`]) once a
//! [`crate::invoke::Invocable::set_metrics`] has given it somewhere to record.
//!
//! Labels are bounded by the manifest: `component` is a component's name,
//! `trigger` the trigger's kind and index (`http[0]`, `mqtt[2]`,
//! `timer[1]`) or, for invocations no trigger of the manifest made, the
//! kind alone (`invoke`, `queue`); `outcome` is one of
//! [`crate::invoke::Status::name`]. Never a topic, a path or an id.

use crate::invoke::{Outcome, Status};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;

/// Labels of `wasmgate_invocations_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvocationLabels {
    /// The component's name.
    pub component: String,
    /// The trigger's kind and index.
    pub trigger: String,
    /// How it ended ([`Status::name`]).
    pub outcome: &'static str,
}

/// A component's name as the one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabel {
    /// The component's name.
    pub component: String,
}

type HistogramFamily = Family<ComponentLabel, Histogram, fn() -> Histogram>;

/// Upper bounds of the duration buckets: 50 µs to about 10 s, doubling.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 19)
}

fn duration_histogram() -> Histogram {
    Histogram::new(duration_buckets())
}

/// Upper bounds of the memory buckets: 64 KiB to 4 GiB, by fours.
fn memory_histogram() -> Histogram {
    Histogram::new(exponential_buckets(65_536.0, 4.0, 9))
}

/// The invocation metrics of one gateway.
#[derive(Debug)]
pub struct InvocationMetrics {
    invocations: Family<InvocationLabels, Counter>,
    duration: HistogramFamily,
    fuel: Family<ComponentLabel, Counter>,
    memory_peak: HistogramFamily,
    throttled: Family<ComponentLabel, Counter>,
    /// (component, the invocation context's trigger) → the trigger label.
    triggers: std::sync::RwLock<HashMap<(String, String), String>>,
}

impl InvocationMetrics {
    /// Metrics whose `trigger` label is looked up in `triggers`, keyed by
    /// the component and the trigger text its invocations carry
    /// ([`crate::invoke::InvocationContext::trigger`]).
    pub fn new(triggers: HashMap<(String, String), String>) -> Self {
        Self {
            invocations: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            fuel: Family::default(),
            memory_peak: Family::new_with_constructor(memory_histogram),
            throttled: Family::default(),
            triggers: std::sync::RwLock::new(triggers),
        }
    }

    /// Adds the metrics to `registry` (whose prefix names them).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "invocations",
            "Invocations by component, trigger and outcome",
            self.invocations.clone(),
        );
        registry.register_with_unit(
            "invocation_duration",
            "Time from the concurrency slot to the outcome, per component",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register(
            "fuel_consumed",
            "Fuel the component's invocations consumed",
            self.fuel.clone(),
        );
        registry.register_with_unit(
            "memory_peak",
            "Largest linear memory of each invocation, per component",
            Unit::Bytes,
            self.memory_peak.clone(),
        );
        registry.register(
            "throttled",
            "Invocations turned away because the component's concurrency was used up",
            self.throttled.clone(),
        );
    }

    /// Makes a component's series exist (at zero) before its first
    /// invocation, so a rate over them is defined from the start.
    pub fn declare(&self, component: &str) {
        let c = ComponentLabel {
            component: component.to_string(),
        };
        drop(self.duration.get_or_create(&c));
        drop(self.fuel.get_or_create(&c));
        drop(self.memory_peak.get_or_create(&c));
        drop(self.throttled.get_or_create(&c));
    }

    /// Looks the `trigger` label up in `triggers` from now on (a reload).
    pub fn set_triggers(&self, triggers: HashMap<(String, String), String>) {
        *self
            .triggers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = triggers;
    }

    /// The `trigger` label of an invocation of `component` by `trigger`.
    pub fn trigger_label(&self, component: &str, trigger: &str) -> String {
        if let Some(label) = self
            .triggers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(component.to_string(), trigger.to_string()))
        {
            return label.clone();
        }
        // Not a trigger of the manifest: its kind only, which is bounded.
        let kind: String = trigger
            .chars()
            .take_while(char::is_ascii_lowercase)
            .take(16)
            .collect();
        if kind.is_empty() {
            "other".into()
        } else {
            kind
        }
    }

    /// Records one finished invocation.
    pub fn record(&self, outcome: &Outcome) {
        let component = ComponentLabel {
            component: outcome.component.clone(),
        };
        self.invocations
            .get_or_create(&InvocationLabels {
                component: outcome.component.clone(),
                trigger: self.trigger_label(&outcome.component, &outcome.trigger),
                outcome: outcome.status.name(),
            })
            .inc();
        if matches!(outcome.status, Status::Throttled { .. }) {
            // It never ran: no duration, fuel or memory.
            self.throttled.get_or_create(&component).inc();
            return;
        }
        self.duration
            .get_or_create(&component)
            .observe(outcome.duration_us as f64 / 1e6);
        self.fuel
            .get_or_create(&component)
            .inc_by(outcome.fuel_consumed);
        self.memory_peak
            .get_or_create(&component)
            .observe(outcome.memory_peak_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_span_50us_to_10s() {
        let b: Vec<f64> = duration_buckets().collect();
        assert!((b[0] - 50e-6).abs() < 1e-12);
        assert!(b[b.len() - 1] >= 10.0 && b[b.len() - 2] < 10.0, "{b:?}");
    }

    #[test]
    fn trigger_labels_are_bounded() {
        let mut table = HashMap::new();
        table.insert(
            ("c".to_string(), "mqtt:devices/+/t".to_string()),
            "mqtt[0]".to_string(),
        );
        let m = InvocationMetrics::new(table);
        assert_eq!(m.trigger_label("c", "mqtt:devices/+/t"), "mqtt[0]");
        assert_eq!(m.trigger_label("d", "mqtt:devices/+/t"), "mqtt");
        assert_eq!(m.trigger_label("c", "invoke"), "invoke");
        assert_eq!(m.trigger_label("c", "timer:*/5 * * * * *"), "timer");
        assert_eq!(m.trigger_label("c", "Ünïcode"), "other");
        assert_eq!(m.trigger_label("c", &"a".repeat(1000)).len(), 16);
    }
}
