//! The status page at the admin listener's `/`: server-rendered HTML, no
//! script and no external asset, that reloads itself every
//! [`REFRESH_SECONDS`]. It shows what `/metrics` shows (which needs no
//! token either): the gateway, MQTT, queue, spool and dead letters, and per
//! component its version, invocation rate and failures.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::time::{Duration, Instant};

/// The page reloads itself this often.
pub const REFRESH_SECONDS: u32 = 5;

/// How often the counts are sampled for the rates.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples kept: the rates span about a minute.
const SAMPLES: usize = 13;

/// Per component: invocations started and failures, at one time.
pub type Counts = BTreeMap<String, (u64, u64)>;

/// Recent samples of the counts, for rates over the last minute.
#[derive(Debug, Default)]
pub struct Rates {
    samples: std::sync::Mutex<VecDeque<(Instant, Counts)>>,
}

impl Rates {
    /// Adds a sample, dropping the oldest past about a minute.
    pub fn sample(&self, counts: Counts) {
        let mut s = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.len() == SAMPLES {
            s.pop_front();
        }
        s.push_back((Instant::now(), counts));
    }

    /// Per component: invocations and failures per minute from the oldest
    /// sample to `now` (`None` before a first sample 1 s old).
    pub fn per_minute(&self, now: &Counts) -> BTreeMap<String, (f64, f64)> {
        let s = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((at, then)) = s.front() else {
            return BTreeMap::new();
        };
        let secs = at.elapsed().as_secs_f64();
        if secs < 1.0 {
            return BTreeMap::new();
        }
        now.iter()
            .map(|(name, (inv, fail))| {
                let (inv0, fail0) = then.get(name).copied().unwrap_or((0, 0));
                let per = |a: u64, b: u64| a.saturating_sub(b) as f64 * 60.0 / secs;
                (name.clone(), (per(*inv, inv0), per(*fail, fail0)))
            })
            .collect()
    }
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One component's row.
#[derive(Debug)]
pub struct Row {
    /// Its name.
    pub name: String,
    /// `sha256:…` of the running version.
    pub digest: String,
    /// Invocations started.
    pub invocations: u64,
    /// Invocations that did not succeed.
    pub failures: u64,
    /// Running now, and the concurrency limit.
    pub in_flight: (u32, u32),
    /// Dead letters kept.
    pub dead_letters: Option<u64>,
    /// Outcome of its last failure.
    pub last_error: Option<String>,
}

/// What the page shows besides the components.
#[derive(Debug)]
pub struct Summary {
    /// The gateway's name.
    pub gateway: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// `Some(connected)` when the gateway has an MQTT connection.
    pub mqtt_connected: Option<bool>,
    /// Events in the durable queue.
    pub queue_depth: Option<u64>,
    /// Publishes in the spool.
    pub spool_messages: Option<u64>,
    /// The last deploys and rollbacks, by component, newest last.
    pub deploys: Vec<(String, crate::deploy::HistoryEntry)>,
    /// Each trigger: label (`http[0]`), component, source, paused.
    pub triggers: Vec<(String, String, String, bool)>,
}

fn or_dash(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// The page.
pub fn render(summary: &Summary, rows: &[Row], rates: &BTreeMap<String, (f64, f64)>) -> String {
    let mut h = String::new();
    let gateway = escape(&summary.gateway);
    let _ = write!(
        h,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{gateway} · wasmgate</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
code {{ font-size: 12px; }}
.bad {{ color: #b00020; }}
</style></head><body>
<h1>{gateway}</h1>
<p id="gateway">wasmgate {version}, up {uptime} s; reloads every {REFRESH_SECONDS} s</p>
<table id="summary"><tr><th>MQTT</th><th>queue</th><th>spool</th></tr>
<tr><td id="mqtt">{mqtt}</td><td class="n" id="queue">{queue}</td><td class="n" id="spool">{spool}</td></tr></table>
<h2>Components</h2>
<table id="components">
<tr><th>component</th><th>version</th><th>invocations</th><th>per minute</th><th>failures</th><th>failures per minute</th><th>in flight</th><th>dead letters</th><th>last failure</th></tr>
"#,
        version = env!("CARGO_PKG_VERSION"),
        uptime = summary.uptime_s,
        mqtt = match summary.mqtt_connected {
            None => "none",
            Some(true) => "connected",
            Some(false) => r#"<span class="bad">not connected</span>"#,
        },
        queue = or_dash(summary.queue_depth),
        spool = or_dash(summary.spool_messages),
    );
    for r in rows {
        let (rate, fail_rate) = rates.get(&r.name).map_or_else(
            || ("-".into(), "-".into()),
            |(a, b)| (format!("{a:.1}"), format!("{b:.1}")),
        );
        let short: String = r.digest.chars().take(19).collect();
        let _ = writeln!(
            h,
            r#"<tr data-component="{name}"><td>{name}</td><td><code title="{digest}">{short}</code></td><td class="n invocations">{inv}</td><td class="n">{rate}</td><td class="n failures{bad}">{fail}</td><td class="n">{fail_rate}</td><td class="n">{in_flight}/{limit}</td><td class="n">{dead}</td><td>{last}</td></tr>"#,
            name = escape(&r.name),
            digest = escape(&r.digest),
            short = escape(&short),
            inv = r.invocations,
            bad = if r.failures > 0 { " bad" } else { "" },
            fail = r.failures,
            in_flight = r.in_flight.0,
            limit = r.in_flight.1,
            dead = or_dash(r.dead_letters),
            last = escape(r.last_error.as_deref().unwrap_or("-")),
        );
    }
    h.push_str("</table>\n");
    render_triggers(&mut h, &summary.triggers);
    render_deploys(&mut h, &summary.deploys);
    h.push_str("<p><a href=\"/metrics\">/metrics</a></p>\n</body></html>\n");
    h
}

/// The triggers table.
fn render_triggers(h: &mut String, triggers: &[(String, String, String, bool)]) {
    h.push_str("<h2>Triggers</h2>\n<table id=\"triggers\">\n<tr><th>trigger</th><th>component</th><th>source</th><th>state</th></tr>\n");
    for (label, component, source, paused) in triggers {
        let _ = writeln!(
            h,
            r#"<tr data-trigger="{label}"><td>{label}</td><td>{component}</td><td>{source}</td><td class="{state}">{state}</td></tr>"#,
            label = escape(label),
            component = escape(component),
            source = escape(source),
            state = if *paused { "paused" } else { "running" },
        );
    }
    h.push_str("</table>\n");
}

/// The last deploys and rollbacks, if any.
fn render_deploys(h: &mut String, deploys: &[(String, crate::deploy::HistoryEntry)]) {
    if deploys.is_empty() {
        return;
    }
    h.push_str("<h2>Deploys and rollbacks</h2>\n<table id=\"deploys\">\n<tr><th>UTC</th><th>component</th><th>what</th><th>from</th><th>to</th><th>why</th></tr>\n");
    for (component, e) in deploys {
        let when = chrono::DateTime::from_timestamp_millis(e.at_ms as i64)
            .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M:%S").to_string());
        let action = serde_json::to_value(e.action)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let short = |d: &str| escape(&d.chars().take(12).collect::<String>());
        let _ = writeln!(
            h,
            r#"<tr><td>{when}</td><td>{component}</td><td class="{action}">{action}</td><td><code>{from}</code></td><td><code>{to}</code></td><td>{why}</td></tr>"#,
            component = escape(component),
            from = short(&e.from),
            to = short(&e.to),
            why = escape(e.reason.as_deref().unwrap_or("")),
        );
    }
    h.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        let page = render(
            &Summary {
                gateway: "<script>alert(1)</script>".into(),
                uptime_s: 1,
                mqtt_connected: None,
                queue_depth: Some(0),
                spool_messages: None,
                deploys: Vec::new(),
                triggers: vec![("mqtt[0]".into(), "<b>".into(), "a/<script>".into(), true)],
            },
            &[],
            &BTreeMap::new(),
        );
        assert!(
            !page.contains("<script>") && !page.contains("<b>"),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains(r#"<td class="paused">paused</td>"#), "{page}");
    }

    #[test]
    fn rates_are_per_minute_since_the_oldest_sample() {
        let rates = Rates::default();
        let mut c = Counts::new();
        c.insert("a".into(), (10, 1));
        rates.sample(c.clone());
        assert!(rates.per_minute(&c).is_empty());
    }
}
