//! The MQTT trigger against a real Mosquitto, spawned per test on an
//! ephemeral port with a config the test writes (no discarding of QoS 1
//! messages, TCP_NODELAY, persistence in the test's directory), and real
//! clients (rumqttc).

use crate::util::{KillOnDrop, free_port, invocable, spawn_guarded, wasmgate};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_manifest::Manifest;
use wasmgate_manifest::limits::Limits;
use wasmgate_manifest::topic::TopicFilter;
use wasmgate_runtime::invoke::MqttMessage;
use wasmgate_store::deadletter::{Bounds, DeadLetterStore};
use wasmgate_store::delivery::RetryPolicy;
use wasmgate_store::spool::{OnFull, Spool, SpoolBounds};
use wasmgate_test_artifacts::{ECHO_MQTT, HOSTILE};
use wasmgate_trigger_mqtt::{ClientOptions, MqttSpec, MqttStats, MqttTriggers, client_options};

/// Failure guard for waits; never a claim about speed.
const PATIENCE: Duration = Duration::from_secs(60);

/// A Mosquitto on 127.0.0.1 with a config written by the test.
struct Mosquitto {
    child: Child,
    port: u16,
    conf: PathBuf,
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Mosquitto {
    fn start(dir: &Path) -> Self {
        Self::start_on(dir, free_port())
    }

    /// A broker with `extra` appended to the config (more listeners,
    /// authentication); `port` is its plain listener. `wait` lists ports to
    /// wait for besides it.
    fn start_with(dir: &Path, port: u16, extra: &str, wait: &[u16]) -> Self {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nper_listener_settings false\nlog_dest stderr\nlog_type error\n\
                 set_tcp_nodelay true\nmax_queued_messages 0\nlistener {port} 127.0.0.1\n{extra}"
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mosquitto is installed");
        for p in std::iter::once(&port).chain(wait) {
            wait_for_port(*p);
        }
        Self { child, port, conf }
    }

    fn start_on(dir: &Path, port: u16) -> Self {
        let data = dir.join("mosquitto");
        std::fs::create_dir_all(&data).unwrap();
        let conf = dir.join("mosquitto.conf");
        // No loss by design: no cap on queued QoS 1/2 messages per client,
        // persistence (saved on a clean stop) for the restart tests.
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
                 max_queued_messages 0\nmax_inflight_messages 0\npersistence true\n\
                 persistence_location {}/\nlog_dest stderr\nlog_type error\n",
                data.display()
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mosquitto is installed");
        wait_for_port(port);
        Self { child, port, conf }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops it cleanly (SIGTERM: it saves its persistence file).
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        let dir = self.conf.parent().unwrap().to_path_buf();
        *self = Self::start_on(&dir, self.port);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test client with automatic acks and a persistent session; received
/// publishes come out of the channel.
struct TestClient {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
    stop: CancellationToken,
}

impl TestClient {
    async fn connect(port: u16, id: &str, subscribe: &[(&str, QoS)]) -> Self {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(Some(1024 * 1024));
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        let (client, mut eventloop) = AsyncClient::new(o, 4096);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let subs: Vec<(String, QoS)> = subscribe.iter().map(|(t, q)| (t.to_string(), *q)).collect();
        let sub_client = client.clone();
        tokio::spawn(async move {
            let mut subacks = 0;
            loop {
                let ev = tokio::select! {
                    _ = stopped.cancelled() => break,
                    ev = eventloop.poll() => ev,
                };
                match ev {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        for (t, q) in &subs {
                            sub_client.subscribe(t.clone(), *q).await.unwrap();
                        }
                        if subs.is_empty()
                            && let Some(r) = ready_tx.take()
                        {
                            let _ = r.send(());
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks == subs.len()
                            && let Some(r) = ready_tx.take()
                        {
                            let _ = r.send(());
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(PATIENCE, ready_rx)
            .await
            .expect("test client connects")
            .unwrap();
        Self { client, rx, stop }
    }

    async fn publish(&self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, false, payload.into())
            .await
            .unwrap();
    }

    /// Collects publishes until `done` says so.
    async fn collect(
        &mut self,
        mut done: impl FnMut(&[rumqttc::v5::mqttbytes::v5::Publish]) -> bool,
    ) -> Vec<rumqttc::v5::mqttbytes::v5::Publish> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !done(&got) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(p)) => got.push(p),
                _ => {
                    let mut seen: Vec<u64> = payloads(&got)
                        .iter()
                        .filter_map(|p| p.parse().ok())
                        .collect();
                    seen.sort();
                    let missing: Vec<u64> = (0..seen.last().copied().unwrap_or(0))
                        .filter(|i| seen.binary_search(i).is_err())
                        .collect();
                    panic!(
                        "timed out; received {} messages ({} distinct); missing below the highest: {missing:?}",
                        got.len(),
                        payloads(&got).len()
                    )
                }
            }
        }
        got
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Client options as `wasmgate up` builds them from a manifest's `[mqtt]`.
fn options(url: &str, client_id: &str) -> (ClientOptions, u16) {
    options_with(url, client_id, "")
}

/// [`options`] with more `[mqtt]` settings (`extra`, TOML lines).
fn options_with(url: &str, client_id: &str, extra: &str) -> (ClientOptions, u16) {
    let text = format!(
        "[gateway]\nname = \"{client_id}\"\n[mqtt]\nbroker = \"{url}\"\nkeep_alive = \"5s\"\n{extra}"
    );
    let m = Manifest::parse(Path::new("wasmgate.toml"), text).unwrap();
    client_options(&m).unwrap().unwrap()
}

fn spec(path: &str, publish: &[&str], topic: &str, qos: u8, max_in_flight: u32) -> MqttSpec {
    MqttSpec {
        label: format!("trigger.mqtt {topic}"),
        component: Arc::new(invocable(path, Limits::default(), publish)),
        filter: TopicFilter::parse(topic).unwrap(),
        qos,
        max_in_flight,
        retry: RetryPolicy {
            attempts: 2,
            backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        pause: Default::default(),
    }
}

/// `spec` whose component may reply on response topics matching `filter`.
fn replying(mut spec: MqttSpec, filter: &str) -> MqttSpec {
    let component = Arc::try_unwrap(spec.component).unwrap_or_else(|_| unreachable!());
    spec.component =
        Arc::new(component.with_response_acl(vec![TopicFilter::parse(filter).unwrap()]));
    spec
}

/// A running trigger set; stopped (and drained) by `stop`.
struct Running {
    stats: Arc<MqttStats>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Running {
    async fn start(
        url: &str,
        client_id: &str,
        specs: Vec<MqttSpec>,
        dead_letters: Option<Arc<DeadLetterStore>>,
    ) -> Self {
        Self::start_with(options(url, client_id), specs, dead_letters).await
    }

    /// [`Running::start`] with client options of the test's choosing.
    async fn start_with(
        options: (ClientOptions, u16),
        specs: Vec<MqttSpec>,
        dead_letters: Option<Arc<DeadLetterStore>>,
    ) -> Self {
        let r = Self::spawn(options, specs, dead_letters);
        r.wait_for(|s| s.subscribed.load(Relaxed) >= 1).await;
        r
    }

    /// Starts the triggers without waiting for the connection.
    fn spawn(
        options: (ClientOptions, u16),
        specs: Vec<MqttSpec>,
        dead_letters: Option<Arc<DeadLetterStore>>,
    ) -> Self {
        Self::spawn_built(options, specs, |t| match dead_letters {
            Some(d) => t.with_dead_letters(d),
            None => t,
        })
    }

    /// Starts the triggers, set up further by `build`, without waiting for
    /// the connection.
    fn spawn_built(
        (o, receive_maximum): (ClientOptions, u16),
        specs: Vec<MqttSpec>,
        build: impl FnOnce(MqttTriggers) -> MqttTriggers,
    ) -> Self {
        let t = build(MqttTriggers::new(o, receive_maximum, specs));
        let stats = t.stats();
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        tasks.spawn(t.run(tasks.clone(), shutdown.clone()));
        Self {
            stats,
            tasks,
            shutdown,
        }
    }

    async fn wait_for(&self, mut cond: impl FnMut(&MqttStats) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !cond(&self.stats) {
            assert!(Instant::now() < deadline, "timed out: {:?}", self.stats);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        tokio::time::timeout(PATIENCE, self.tasks.wait())
            .await
            .expect("the trigger drains and stops");
    }
}

use std::sync::atomic::Ordering::Relaxed;

fn payloads(got: &[rumqttc::v5::mqttbytes::v5::Publish]) -> std::collections::BTreeSet<String> {
    got.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_and_wildcards_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    qos_and_wildcards(broker.port, "", "v5").await;
}

/// `[mqtt] version = 3`: the same over MQTT 3.1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_and_wildcards_end_to_end_over_mqtt_3_1_1() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    qos_and_wildcards(broker.port, "version = 3", "v3").await;
}

/// The same on the embedded broker, over MQTT 5 and 3.1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_and_wildcards_end_to_end_on_the_embedded_broker() {
    let broker = wasmgate_trigger_mqtt::broker::EmbeddedBroker::start(
        wasmgate_trigger_mqtt::broker::EmbeddedOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let port = broker.local_addr().port();
    qos_and_wildcards(port, "", "embedded-v5").await;
    qos_and_wildcards(port, "version = 3", "embedded-v3").await;
}

async fn qos_and_wildcards(port: u16, extra: &str, tag: &str) {
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut replies = TestClient::connect(
        port,
        &format!("replies-qos-{tag}"),
        &[("sensors/+/temp/reply", QoS::ExactlyOnce)],
    )
    .await;
    let specs = vec![spec(
        ECHO_MQTT,
        &["sensors/+/temp/reply"],
        "sensors/+/temp",
        2,
        8,
    )];
    let host = Running::start_with(
        options_with(&url, &format!("host-qos-{tag}"), extra),
        specs,
        None,
    )
    .await;
    let publisher = TestClient::connect(port, &format!("pub-qos-{tag}"), &[]).await;
    let n = 20;
    for (q, qos) in [
        (0, QoS::AtMostOnce),
        (1, QoS::AtLeastOnce),
        (2, QoS::ExactlyOnce),
    ] {
        for i in 0..n {
            publisher
                .publish(&format!("sensors/{q}-{i}/temp"), qos, format!("{q}-{i}"))
                .await;
        }
    }
    let got = replies.collect(|g| payloads(g).len() == 3 * n).await;
    for p in &got {
        let text = String::from_utf8_lossy(&p.payload);
        let want = match &text[..1] {
            "0" => QoS::AtMostOnce,
            "1" => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        assert_eq!(p.qos, want, "the reply to {text} keeps its QoS");
        assert_eq!(
            String::from_utf8_lossy(&p.topic),
            format!("sensors/{text}/temp/reply")
        );
    }
    host.wait_for(|s| s.acks_sent.load(Relaxed) == 2 * n as u64)
        .await;
    // A reply is published (inside the invocation) just before its
    // delivery is counted: the last QoS 0 ones may still be counting.
    host.wait_for(|s| s.succeeded.load(Relaxed) >= 3 * n as u64)
        .await;
    assert_eq!(host.stats.succeeded.load(Relaxed), 3 * n as u64);
    assert_eq!(host.stats.published.load(Relaxed), 3 * n as u64);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_through_the_response_topic_with_correlation_data() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut requester = TestClient::connect(
        broker.port,
        "requester",
        &[("replies/me", QoS::AtLeastOnce)],
    )
    .await;
    // No publish grant; `allow.mqtt_response = ["replies/+"]` lets the
    // guest reply. `#` matches the request topic at any depth.
    let specs = vec![replying(
        spec(ECHO_MQTT, &[], "requests/#", 1, 4),
        "replies/+",
    )];
    let host = Running::start(&broker.url(), "host-rr", specs, None).await;
    let props = PublishProperties {
        response_topic: Some("replies/me".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00corr-42\xff")),
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..PublishProperties::default()
    };
    requester
        .client
        .publish_with_properties("requests/a/b/c", QoS::AtLeastOnce, false, "ping", props)
        .await
        .unwrap();
    let got = requester.collect(|g| !g.is_empty()).await;
    let reply = &got[0];
    assert_eq!(&reply.payload[..], b"ping");
    let p = reply.properties.as_ref().expect("MQTT 5 properties");
    assert_eq!(p.correlation_data.as_deref(), Some(&b"\x00corr-42\xff"[..]));
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
    assert_eq!(p.response_topic, None);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_outside_the_acl_is_denied_counted_and_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let store =
        Arc::new(DeadLetterStore::open(&dir.path().join("dl.sqlite"), Bounds::default()).unwrap());
    let specs = vec![spec(ECHO_MQTT, &["allowed/#"], "acl/+", 1, 4)];
    let host = Running::start(&broker.url(), "host-acl", specs, Some(store.clone())).await;
    let publisher = TestClient::connect(broker.port, "pub-acl", &[]).await;
    // echo-mqtt replies on `acl/x/reply`, which `allowed/#` does not grant:
    // the guest sees `denied` and rejects the message.
    publisher.publish("acl/x", QoS::AtLeastOnce, "secret").await;
    host.wait_for(|s| s.acks_sent.load(Relaxed) == 1).await;
    assert_eq!(host.stats.publish_denied.load(Relaxed), 1);
    assert_eq!(host.stats.published.load(Relaxed), 0);
    assert_eq!(host.stats.failed.load(Relaxed), 1);
    let records = store.list(None, None).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].trigger, "mqtt:acl/+");
    assert_eq!(records[0].last_error.outcome, "reject");
    assert!(
        records[0].last_error.message.contains("not allowed"),
        "{:?}",
        records[0].last_error
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_go_out_in_arrival_order_when_handlers_finish_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let specs = vec![spec(HOSTILE, &[], "sleep", 1, 8)];
    let host = Running::start(&broker.url(), "host-order", specs, None).await;
    let publisher = TestClient::connect(broker.port, "pub-order", &[]).await;
    // The first handler sleeps longest, so later ones finish first.
    let sleeps = [600, 5, 5, 5, 300, 5, 5, 5];
    for ms in sleeps {
        publisher
            .publish("sleep", QoS::AtLeastOnce, ms.to_string())
            .await;
    }
    let n = sleeps.len() as u64;
    host.wait_for(|s| s.acks_sent.load(Relaxed) == n).await;
    let order = host.stats.recent_order();
    assert_eq!(order.arrived.len(), sleeps.len());
    assert_ne!(
        order.settled, order.arrived,
        "the handlers finished out of order"
    );
    assert_eq!(order.acked, order.arrived, "acks in arrival order");
    // Nothing was redelivered: every message arrived once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host.stats.received.load(Relaxed), n);
    assert_eq!(host.stats.succeeded.load(Relaxed), n);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_at_start_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let (o, receive_maximum) = options(&url, "host-late");
    let t = MqttTriggers::new(o, receive_maximum, vec![spec(HOSTILE, &[], "ok", 1, 1)]);
    let stats = t.stats();
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    tasks.spawn(t.run(tasks.clone(), shutdown.clone()));
    let deadline = Instant::now() + PATIENCE;
    while stats.connection_errors.load(Relaxed) < 2 {
        assert!(Instant::now() < deadline, "no connection attempts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let broker = Mosquitto::start_on(dir.path(), port);
    let host = Running {
        stats,
        tasks,
        shutdown,
    };
    host.wait_for(|s| s.subscribed.load(Relaxed) == 1).await;
    let publisher = TestClient::connect(broker.port, "pub-late", &[]).await;
    publisher.publish("ok", QoS::AtLeastOnce, "").await;
    host.wait_for(|s| s.succeeded.load(Relaxed) == 1).await;
    host.stop().await;
}

/// Streams `n` messages at `qos` through echo-mqtt and restarts the broker
/// half-way; every message must be handled (its reply collected).
async fn broker_restart_mid_stream(qos: QoS, tag: &str, extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    let mut replies = TestClient::connect(
        broker.port,
        &format!("replies-restart-{tag}"),
        &[("stream/+/reply", qos)],
    )
    .await;
    let specs = vec![spec(ECHO_MQTT, &["stream/+/reply"], "stream/+", 2, 8)];
    let host = Running::start_with(
        options_with(&broker.url(), &format!("host-restart-{tag}"), extra),
        specs,
        None,
    )
    .await;
    let publisher = TestClient::connect(broker.port, &format!("pub-restart-{tag}"), &[]).await;
    let n = 400;
    for i in 0..n / 2 {
        publisher
            .publish(&format!("stream/{i}"), qos, i.to_string())
            .await;
    }
    // Stop the broker while the first half is in flight, then bring it back.
    let first = replies.collect(|g| payloads(g).len() >= 20).await;
    broker.restart();
    for i in n / 2..n {
        publisher
            .publish(&format!("stream/{i}"), qos, i.to_string())
            .await;
    }
    let mut seen = payloads(&first);
    let rest = replies
        .collect(|g| seen.union(&payloads(g)).count() == n)
        .await;
    seen.extend(payloads(&rest));
    let want: std::collections::BTreeSet<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(seen, want, "every {tag} message was handled");
    assert!(
        host.stats.connects.load(Relaxed) >= 2,
        "the host reconnected"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_no_qos1_message() {
    broker_restart_mid_stream(QoS::AtLeastOnce, "qos1", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_no_qos1_message_over_mqtt_3_1_1() {
    broker_restart_mid_stream(QoS::AtLeastOnce, "qos1-v3", "version = 3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_no_qos2_message() {
    broker_restart_mid_stream(QoS::ExactlyOnce, "qos2", "").await;
}

/// A manifest for `wasmgate up`: `hostile` on `retry` (always fails), two
/// attempts, dead letters in the state directory.
fn sigkill_manifest(dir: &Path, url: &str) -> String {
    let path = dir.join("wasmgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"[gateway]
name = "sigkill-host"
state_dir = "{state}"

[mqtt]
broker = "{url}"
keep_alive = "5s"

[component.hostile]
source = "{hostile}"
allow = {{ mqtt_publish = [] }}

[[trigger.mqtt]]
component = "hostile"
topic = "retry"
qos = 1
max_in_flight = 8
retry = {{ attempts = 2, backoff = "40ms" }}
"#,
            state = dir.join("state").display(),
            hostile = HOSTILE,
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn spawn_host(file: &str) -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    spawn_host_with(file, &[], &[])
}

/// `wasmgate up -f FILE ARGS…` with `env`, its stderr lines on a channel.
fn spawn_host_with(
    file: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    let mut host = spawn_guarded(
        wasmgate()
            .args(["up", "-f", file])
            .args(args)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null()),
    );
    let lines = BufReader::new(host.stderr.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (host, rx)
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return,
            Ok(_) => {}
            Err(_) => panic!("the host never logged {needle:?}"),
        }
    }
}

fn dead_lettered(dir: &Path) -> std::collections::BTreeSet<String> {
    let path = dir.join("state/dead-letters.sqlite");
    if !path.exists() {
        return Default::default();
    }
    let store = DeadLetterStore::open(&path, Bounds::default()).unwrap();
    store
        .list(None, None)
        .unwrap()
        .into_iter()
        .map(|d| d.last_error.message)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_host_mid_stream_loses_no_failing_qos1_message() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let file = sigkill_manifest(dir.path(), &broker.url());
    // The first run makes the persistent session and its subscription.
    let (mut host, lines) = spawn_host(&file);
    wait_line(&lines, "MQTT subscribed");
    let publisher = TestClient::connect(broker.port, "pub-sigkill", &[]).await;
    let n = 300;
    for i in 0..n {
        publisher
            .publish("retry", QoS::AtLeastOnce, format!("m{i}"))
            .await;
    }
    let want: std::collections::BTreeSet<String> = (0..n).map(|i| format!("m{i}")).collect();
    // Kill the host at seeded-random points (up to 40 times) and restart
    // it; then let the last one finish. The test waits on progress, not on
    // a count of kills: on a busy machine a restarted host may get little
    // done before the next kill, which is slow, not lossy.
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut kills = 0;
    let mut stored = dead_lettered(dir.path());
    let mut progress_at = Instant::now();
    while !stored.is_superset(&want) {
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        let now = dead_lettered(dir.path());
        if now.len() > stored.len() {
            progress_at = Instant::now();
        }
        stored = now;
        assert!(
            progress_at.elapsed() < Duration::from_secs(90),
            "no progress for 90 s after {kills} SIGKILLs: {} of {n} stored",
            stored.len()
        );
        if kills < 40 && !stored.is_superset(&want) {
            host.kill().unwrap(); // SIGKILL
            host.wait().unwrap();
            kills += 1;
            host = spawn_host(&file).0;
        }
    }
    let stored = dead_lettered(dir.path());
    assert_eq!(stored, want, "every message is in the store, none lost");
    eprintln!("all {n} messages dead-lettered across {kills} SIGKILLs");
    assert!(kills >= 1, "the host was never killed mid-stream");
    // A clean stop (SIGTERM) drains and exits 0.
    let _ = Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    assert_eq!(host.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_is_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut ordered = spec(HOSTILE, &[], "sleep", 1, 1);
    ordered.max_in_flight = 1;
    let host = Running::start(&broker.url(), "host-expiry", vec![ordered], None).await;
    let publisher = TestClient::connect(broker.port, "pub-expiry", &[]).await;
    publisher.publish("sleep", QoS::AtLeastOnce, "2500").await;
    // Expires 1 s after it is sent, while it waits behind the sleeper.
    let props = PublishProperties {
        message_expiry_interval: Some(1),
        ..PublishProperties::default()
    };
    publisher
        .client
        .publish_with_properties("sleep", QoS::AtLeastOnce, false, "1", props)
        .await
        .unwrap();
    host.wait_for(|s| s.acks_sent.load(Relaxed) == 2).await;
    assert_eq!(host.stats.expired.load(Relaxed), 1);
    assert_eq!(host.stats.succeeded.load(Relaxed), 1);
    host.stop().await;
}

/// A host in shared-subscription group `g`, with a short session expiry so
/// that the broker stops giving it a share soon after it goes away.
async fn share_worker(url: &str, id: &str) -> Running {
    let specs = vec![spec(ECHO_MQTT, &["work/+/reply"], "$share/g/work/+", 1, 4)];
    let r = Running::spawn(
        options_with(url, id, "session_expiry = \"1s\"\n"),
        specs,
        None,
    );
    r.wait_for(|s| s.subscribed.load(Relaxed) >= 1).await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_a_shared_subscription_split_the_work_and_one_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut replies = TestClient::connect(
        broker.port,
        "replies-share",
        &[("work/+/reply", QoS::AtLeastOnce)],
    )
    .await;
    let url = broker.url();
    let a = share_worker(&url, "host-share-a").await;
    let b = share_worker(&url, "host-share-b").await;
    let publisher = TestClient::connect(broker.port, "pub-share", &[]).await;
    let n = 100;
    for i in 0..n {
        publisher
            .publish(&format!("work/{i}"), QoS::AtLeastOnce, i.to_string())
            .await;
    }
    let first = replies.collect(|g| payloads(g).len() == n).await;
    // A reply is published (inside the invocation) just before its
    // delivery is counted as succeeded: give the counters a moment.
    let counted = || {
        (
            a.stats.succeeded.load(Relaxed),
            b.stats.succeeded.load(Relaxed),
        )
    };
    let give_up = Instant::now() + Duration::from_secs(10);
    while counted().0 + counted().1 < n as u64 && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (done_a, done_b) = counted();
    assert!(done_a > 0 && done_b > 0, "split: {done_a} + {done_b}");
    assert!(done_a + done_b >= n as u64);
    // One host goes away. While its session lasts Mosquitto keeps queueing
    // its share for it; once the session expired the other host gets every
    // new message.
    a.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in n..2 * n {
        publisher
            .publish(&format!("work/{i}"), QoS::AtLeastOnce, i.to_string())
            .await;
    }
    let mut seen = payloads(&first);
    let rest = replies
        .collect(|g| seen.union(&payloads(g)).count() == 2 * n)
        .await;
    seen.extend(payloads(&rest));
    assert_eq!(seen.len(), 2 * n);
    b.wait_for(|s| s.succeeded.load(Relaxed) >= done_b + n as u64)
        .await;
    assert!(b.stats.succeeded.load(Relaxed) >= done_b + n as u64);
    b.stop().await;
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made
/// with the openssl command line.
pub(crate) fn make_certs(dir: &Path) {
    let script = r#"set -e
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -keyout ca.key -out ca.pem -days 2 -subj /CN=wasmgate-test-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
for who in server client; do
  openssl req $ec -keyout $who.key -out $who.csr -subj /CN=$who
done
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > server.ext
printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' > client.ext
for who in server client; do
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.pem -days 2 -extfile $who.ext
done
"#;
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_certificates_made_by_the_test() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let d = dir.path().display();
    let (plain, tls) = (free_port(), free_port());
    let broker = Mosquitto::start_with(
        dir.path(),
        plain,
        &format!(
            "allow_anonymous true\nlistener {tls} 127.0.0.1\ncafile {d}/ca.pem\n\
             certfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\n"
        ),
        &[tls],
    );
    let url = format!("mqtts://127.0.0.1:{tls}");
    // Without a client certificate the broker refuses the handshake.
    let refused = Running::spawn(
        options_with(&url, "host-no-cert", &format!("ca = \"{d}/ca.pem\"\n")),
        vec![spec(ECHO_MQTT, &[], "tls/req", 1, 1)],
        None,
    );
    refused
        .wait_for(|s| s.connection_errors.load(Relaxed) >= 2)
        .await;
    assert_eq!(refused.stats.connects.load(Relaxed), 0);
    refused.stop().await;
    // With it, request/response works over TLS.
    let with_cert = options_with(
        &url,
        "host-mtls",
        &format!("ca = \"{d}/ca.pem\"\ncert = \"{d}/client.pem\"\nkey = \"{d}/client.key\"\n"),
    );
    let host = Running::spawn(
        with_cert,
        vec![replying(spec(ECHO_MQTT, &[], "tls/req", 1, 1), "tls/reply")],
        None,
    );
    host.wait_for(|s| s.subscribed.load(Relaxed) >= 1).await;
    let mut requester = TestClient::connect(
        broker.port,
        "requester-tls",
        &[("tls/reply", QoS::AtLeastOnce)],
    )
    .await;
    let props = PublishProperties {
        response_topic: Some("tls/reply".into()),
        ..PublishProperties::default()
    };
    requester
        .client
        .publish_with_properties("tls/req", QoS::AtLeastOnce, false, "over tls", props)
        .await
        .unwrap();
    let got = requester.collect(|g| !g.is_empty()).await;
    assert_eq!(&got[0].payload[..], b"over tls");
    host.stop().await;
}

#[test]
fn refused_credentials_are_logged_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    let status = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwords)
        .args(["gw", "right"])
        .status()
        .unwrap();
    assert!(status.success());
    let port = free_port();
    let _broker = Mosquitto::start_with(
        dir.path(),
        port,
        &format!(
            "allow_anonymous false\npassword_file {}\n",
            passwords.display()
        ),
        &[],
    );
    let file = dir.path().join("wasmgate.toml");
    std::fs::write(
        &file,
        format!(
            "[gateway]\nstate_dir = \"{state}\"\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\n\
             username = \"gw\"\npassword = \"wrong\"\n[component.hostile]\nsource = \"{HOSTILE}\"\nallow = {{ mqtt_publish = [] }}\n\
             [[trigger.mqtt]]\ncomponent = \"hostile\"\ntopic = \"ok\"\n",
            state = dir.path().join("state").display()
        ),
    )
    .unwrap();
    let (mut host, lines) = spawn_host(file.to_str().unwrap());
    wait_line(&lines, "check mqtt.username and mqtt.password");
    host.kill().unwrap();
    host.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_messages_in_flight_finish_and_acks_them() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let file = dir.path().join("wasmgate.toml");
    std::fs::write(
        &file,
        format!(
            "[gateway]\nname = \"drain-host\"\nstate_dir = \"{state}\"\n[mqtt]\nbroker = \"{url}\"\n\
             [component.hostile]\nsource = \"{HOSTILE}\"\nallow = {{ mqtt_publish = [] }}\n\
             [[trigger.mqtt]]\ncomponent = \"hostile\"\ntopic = \"sleep\"\nmax_in_flight = 4\n",
            state = dir.path().join("state").display(),
            url = broker.url(),
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap().to_string();
    let run = |file: String| {
        spawn_host_with(
            &file,
            &["--log-format", "json"],
            &[("WASMGATE_LOG", "info,wasmgate_trigger_mqtt=debug")],
        )
    };
    let (host, lines) = run(file.clone());
    wait_line(&lines, "MQTT subscribed");
    let publisher = TestClient::connect(broker.port, "pub-drain", &[]).await;
    for _ in 0..3 {
        publisher.publish("sleep", QoS::AtLeastOnce, "2000").await;
    }
    // Once the three handlers run (they sleep 2 s), ask the host to stop.
    for _ in 0..3 {
        wait_line(&lines, "MQTT delivery started");
    }
    let _ = Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    let stop = |mut host: KillOnDrop, lines: std::sync::mpsc::Receiver<String>| {
        let code = host.wait().unwrap().code();
        let invocations: Vec<serde_json::Value> = lines
            .into_iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .filter(|v| v["message"] == "invocation")
            .collect();
        (code, invocations)
    };
    let (code, invocations) = stop(host, lines);
    assert_eq!(code, Some(0));
    assert_eq!(invocations.len(), 3, "the in-flight messages finished");
    assert!(invocations.iter().all(|v| v["outcome"] == "ok"));
    // Their acks went out before the disconnect: a restarted host (same
    // session) gets nothing redelivered.
    let (host, lines) = run(file);
    wait_line(&lines, "MQTT subscribed");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    let (code, invocations) = stop(host, lines);
    assert_eq!(code, Some(0));
    assert!(invocations.is_empty(), "redelivered: {invocations:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_empty_and_large_payloads_arrive_intact_and_oversized_ones_are_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut replies = TestClient::connect(
        broker.port,
        "replies-size",
        &[("size/+/reply", QoS::AtLeastOnce)],
    )
    .await;
    let specs = vec![spec(ECHO_MQTT, &["size/+/reply"], "size/+", 1, 4)];
    let host = Running::start(&broker.url(), "host-size", specs, None).await;
    let publisher = TestClient::connect(broker.port, "pub-size", &[]).await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let large: Vec<u8> = (0..900 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    // Past the 1 MiB Maximum Packet Size the host announces: the broker
    // does not send it.
    let oversized = vec![0xAB; 2 * 1024 * 1024];
    publisher
        .publish("size/empty", QoS::AtLeastOnce, Vec::new())
        .await;
    publisher
        .publish("size/binary", QoS::AtLeastOnce, binary.clone())
        .await;
    publisher
        .publish("size/oversized", QoS::AtLeastOnce, oversized)
        .await;
    publisher
        .publish("size/large", QoS::AtLeastOnce, large.clone())
        .await;
    let got = replies.collect(|g| g.len() == 3).await;
    let by_topic = |t: &str| {
        got.iter()
            .find(|p| p.topic == t.as_bytes())
            .unwrap_or_else(|| panic!("no reply on {t}"))
            .payload
            .to_vec()
    };
    assert_eq!(by_topic("size/empty/reply"), Vec::<u8>::new());
    assert_eq!(by_topic("size/binary/reply"), binary);
    assert_eq!(by_topic("size/large/reply"), large);
    assert_eq!(
        host.stats.received.load(Relaxed),
        3,
        "the oversized one never came"
    );
    host.stop().await;
}

#[test]
fn an_unreadable_certificate_stops_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wasmgate.toml");
    std::fs::write(
        &file,
        format!(
            "[gateway]\nstate_dir = \"{state}\"\n[mqtt]\nbroker = \"mqtts://127.0.0.1:8883\"\n\
             ca = \"missing-ca.pem\"\n[component.hostile]\nsource = \"{HOSTILE}\"\nallow = {{ mqtt_publish = [] }}\n\
             [[trigger.mqtt]]\ncomponent = \"hostile\"\ntopic = \"ok\"\n",
            state = dir.path().join("state").display()
        ),
    )
    .unwrap();
    let out = wasmgate()
        .args(["up", "-f", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mqtt.ca: cannot read") && stderr.contains("missing-ca.pem"),
        "{stderr}"
    );
}

fn spooled(i: usize) -> MqttMessage {
    MqttMessage {
        topic: format!("out/{}", i % 3),
        payload: i.to_string().into_bytes(),
        // QoS 1 and 2 both wait in the spool.
        qos: 1 + (i % 2) as u8,
        ..MqttMessage::default()
    }
}

/// Payloads in the order they first arrived (a resent one counts once).
fn first_arrivals(got: &[rumqttc::v5::mqttbytes::v5::Publish]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    got.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .filter(|p| seen.insert(p.clone()))
        .collect()
}

/// Asserts that the [`spooled`] messages `want` all arrived, and in order
/// within each QoS: MQTT orders messages of one QoS (§4.6); a broker may
/// forward a QoS 2 message after a QoS 1 message published later, as it
/// completes the QoS 2 exchange first.
fn assert_arrived_in_order(
    got: &[rumqttc::v5::mqttbytes::v5::Publish],
    want: std::ops::Range<usize>,
) {
    let arrived: Vec<usize> = first_arrivals(got)
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    for parity in 0..2 {
        let of =
            |v: Vec<usize>| -> Vec<usize> { v.into_iter().filter(|i| i % 2 == parity).collect() };
        assert_eq!(
            of(arrived.clone()),
            of(want.clone().collect()),
            "QoS {} publishes: all arrived, in order",
            1 + parity
        );
    }
}

/// The host's own publishes (here through the outbox, the way a timer's or
/// an HTTP handler's go) while the broker is down: written to the spool on
/// disk, kept across a restart of the host, and sent in order once the
/// broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_made_while_the_broker_is_down_wait_on_disk_and_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    let mut sub =
        TestClient::connect(broker.port, "spool-sub", &[("out/#", QoS::AtLeastOnce)]).await;
    let path = dir
        .path()
        .join("state")
        .join(wasmgate_store::spool::FILE_NAME);
    let host_with_spool = |url: &str| {
        let tx = SinkHandle::default();
        let spool = Spool::open(&path, SpoolBounds::default()).unwrap();
        let host = Running::spawn_built(options(url, "spool-host"), vec![], |t| {
            tx.take_from(t).with_spool(spool)
        });
        (host, tx)
    };
    let (host, outbox) = host_with_spool(&broker.url());
    host.wait_for(|s| s.connects.load(Relaxed) >= 1).await;
    let n = 300;
    for i in 0..50 {
        outbox.send(spooled(i)).await.unwrap();
    }
    let mut got = sub.collect(|g| payloads(g).len() >= 50).await;
    broker.stop();
    host.wait_for(|s| s.connection_errors.load(Relaxed) >= 1)
        .await;
    for i in 50..n {
        outbox.send(spooled(i)).await.unwrap();
    }
    host.wait_for(|s| s.spooled.load(Relaxed) >= (n - 50) as u64)
        .await;
    assert_eq!(host.stats.published.load(Relaxed), 50);
    host.stop().await;

    // On disk, in order, after the host stopped.
    {
        let spool = Spool::open(&path, SpoolBounds::default()).unwrap();
        let waiting: Vec<String> = spool
            .peek(1000)
            .unwrap()
            .into_iter()
            .map(|(_, m)| String::from_utf8(m.payload).unwrap())
            .collect();
        let want: Vec<String> = (50..n).map(|i| i.to_string()).collect();
        // Publishes of the first 50 the broker had not acknowledged when it
        // stopped wait too, in front.
        assert!(waiting.ends_with(&want), "{waiting:?}");
    }

    // A new host on the same spool sends them once the broker is back.
    broker.restart();
    let (host, _outbox) = host_with_spool(&broker.url());
    host.wait_for(|s| {
        s.spool_sent.load(Relaxed) >= (n - 50) as u64 && s.spool_waiting.load(Relaxed) == 0
    })
    .await;
    got.extend(
        sub.collect(|g| {
            let seen = payloads(g);
            // The last of each QoS: the rest came before them.
            [n - 2, n - 1].iter().all(|i| seen.contains(&i.to_string()))
        })
        .await,
    );
    assert_arrived_in_order(&got, 0..n);
    host.stop().await;
}

/// A full spool applies its policy and counts what it lost: `drop_oldest`
/// keeps the newest publishes, `refuse_new` the oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_the_oldest_or_refuses_new_publishes_and_counts_them() {
    for (on_full, want) in [(OnFull::DropOldest, 20..30), (OnFull::RefuseNew, 0..10)] {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens there yet.
        let port = free_port();
        let bounds = SpoolBounds {
            max_messages: 10,
            max_bytes: 1 << 20,
            on_full,
        };
        let outbox = SinkHandle::default();
        let host = Running::spawn_built(
            options(&format!("mqtt://127.0.0.1:{port}"), "full-spool-host"),
            vec![],
            |t| {
                outbox
                    .take_from(t)
                    .with_spool(Spool::open_in_memory(bounds).unwrap())
            },
        );
        let mut refused = 0;
        for i in 0..30 {
            if outbox.send(spooled(i)).await.is_err() {
                refused += 1;
            }
        }
        // Each refused publish is reported to its sender; drop_oldest
        // takes every new one (and drops older ones, counted below).
        let want_refused = if on_full == OnFull::RefuseNew { 20 } else { 0 };
        assert_eq!(refused, want_refused, "{on_full:?}");
        host.wait_for(|s| {
            s.spool_waiting.load(Relaxed) == 10
                && s.spool_dropped.load(Relaxed) + s.spool_refused.load(Relaxed) == 20
        })
        .await;
        match on_full {
            OnFull::DropOldest => assert_eq!(host.stats.spool_dropped.load(Relaxed), 20),
            OnFull::RefuseNew => assert_eq!(host.stats.spool_refused.load(Relaxed), 20),
        }
        let broker = Mosquitto::start_on(dir.path(), port);
        let mut sub = TestClient::connect(
            broker.port,
            "full-spool-sub",
            &[("out/#", QoS::AtLeastOnce)],
        )
        .await;
        let got = sub.collect(|g| payloads(g).len() >= 10).await;
        assert_arrived_in_order(&got, want);
        host.stop().await;
    }
}

/// SIGKILL of `wasmgate up` while its timer publishes into the spool (the
/// broker unreachable from the start): what was spooled is on disk, and the
/// next run sends it, in order, before anything newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_publishes_survive_a_sigkill_of_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let file = dir.path().join("wasmgate.toml");
    std::fs::write(
        &file,
        format!(
            r#"[gateway]
name = "spool-kill"
state_dir = "{state}"

[mqtt]
broker = "mqtt://127.0.0.1:{port}"
keep_alive = "5s"

[component.tick]
source = "{source}"
env = {{ PUBLISH_TOPIC = "gw/ticks" }}
allow = {{ mqtt_publish = ["gw/#"] }}

[[trigger.timer]]
component = "tick"
every = "100ms"
"#,
            state = dir.path().join("state").display(),
            source = wasmgate_test_artifacts::PUBLISH_TIMER,
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let path = dir
        .path()
        .join("state")
        .join(wasmgate_store::spool::FILE_NAME);
    let (mut host, lines) = spawn_host(file);
    wait_line(&lines, "ready");
    let read_spool = || -> Vec<String> {
        if !path.exists() {
            return Vec::new();
        }
        Spool::open(&path, SpoolBounds::default())
            .unwrap()
            .peek(100_000)
            .unwrap()
            .into_iter()
            .map(|(_, m)| String::from_utf8(m.payload).unwrap())
            .collect()
    };
    let deadline = Instant::now() + PATIENCE;
    while read_spool().len() < 5 {
        assert!(Instant::now() < deadline, "nothing was spooled");
        std::thread::sleep(Duration::from_millis(50));
    }
    host.kill().unwrap(); // SIGKILL
    host.wait().unwrap();
    let spooled = read_spool();
    let ms = |p: &str| -> u64 { p.strip_prefix("tick ").unwrap().parse().unwrap() };
    assert!(
        spooled.windows(2).all(|w| ms(&w[0]) < ms(&w[1])),
        "spooled in tick order: {spooled:?}"
    );

    let broker = Mosquitto::start_on(dir.path(), port);
    let mut sub = TestClient::connect(
        broker.port,
        "spool-kill-sub",
        &[("gw/ticks", QoS::AtLeastOnce)],
    )
    .await;
    let (mut host, lines) = spawn_host(file);
    wait_line(&lines, "will be sent once connected");
    let got = sub
        .collect(|g| first_arrivals(g).len() > spooled.len())
        .await;
    let arrived = first_arrivals(&got);
    assert_eq!(
        arrived[..spooled.len()],
        spooled[..],
        "the spooled publishes arrive first, in order"
    );
    assert!(ms(&arrived[spooled.len()]) > ms(spooled.last().unwrap()));
    let _ = Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    assert_eq!(host.wait().unwrap().code(), Some(0));
}

/// The host stops (SIGTERM's path) in the middle of a QoS 2 stream and a new
/// one takes over its session: whatever QoS 2 exchanges the broker still
/// holds for it (PUBRELs it resends for messages the old host PUBREC'd) are
/// completed on the first connection, and every message is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_restart_mid_qos2_stream_completes_the_session_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut replies = TestClient::connect(
        broker.port,
        "replies-host-restart",
        &[("q2/+/reply", QoS::ExactlyOnce)],
    )
    .await;
    let specs = || vec![spec(ECHO_MQTT, &["q2/+/reply"], "q2/+", 2, 8)];
    let host = Running::start(&broker.url(), "host-restart-q2", specs(), None).await;
    let publisher = TestClient::connect(broker.port, "pub-host-restart", &[]).await;
    let n = 300;
    for i in 0..n {
        publisher
            .publish(&format!("q2/{i}"), QoS::ExactlyOnce, i.to_string())
            .await;
    }
    let first = replies.collect(|g| payloads(g).len() >= 30).await;
    host.stop().await;
    let host = Running::start(&broker.url(), "host-restart-q2", specs(), None).await;
    let mut seen = payloads(&first);
    let rest = replies
        .collect(|g| seen.union(&payloads(g)).count() == n)
        .await;
    seen.extend(payloads(&rest));
    assert_eq!(seen.len(), n);
    // One connection: no reconnect loop over the resent PUBRELs.
    assert_eq!(host.stats.connection_errors.load(Relaxed), 0);
    host.stop().await;
}

/// A broker that accepts smaller packets than the host sends (its CONNACK
/// says so): a publish over its limit breaks the connection once, is
/// dropped, counted and reported lost, and does not come back to break the
/// next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_larger_than_the_broker_accepts_is_dropped_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = Mosquitto::start_with(
        dir.path(),
        port,
        "allow_anonymous true\nmax_packet_size 131072\n",
        &[],
    );
    let mut sub =
        TestClient::connect(broker.port, "small-sub", &[("out/#", QoS::AtLeastOnce)]).await;
    let outbox = SinkHandle::default();
    let host = Running::spawn_built(
        options(&format!("mqtt://127.0.0.1:{port}"), "small-host"),
        vec![],
        |t| outbox.take_from(t),
    );
    host.wait_for(|s| s.connects.load(Relaxed) >= 1).await;
    for (i, size) in [(0, 10), (1, 200_000), (2, 10)] {
        let mut m = spooled(i);
        m.qos = 1;
        m.payload = vec![b'x'; size];
        // The large one is reported lost to its sender (its invocation
        // fails), not just counted.
        assert_eq!(outbox.send(m).await.is_ok(), size == 10, "size {size}");
    }
    let got = sub.collect(|g| g.len() >= 2).await;
    let sizes: Vec<usize> = got.iter().map(|p| p.payload.len()).collect();
    assert_eq!(sizes, [10, 10]);
    host.wait_for(|s| s.publish_failed.load(Relaxed) == 1).await;
    // One broken connection, then a healthy one.
    assert!(host.stats.connection_errors.load(Relaxed) <= 1);
    host.stop().await;
}

/// The connection's publish sink, as a test publishes through it (the way a
/// timer's or an HTTP handler's publishes go).
#[derive(Clone, Default)]
struct SinkHandle(Arc<std::sync::OnceLock<Arc<wasmgate_trigger_mqtt::Outbox>>>);

impl SinkHandle {
    /// Keeps `t`'s publish sink.
    fn take_from(&self, t: MqttTriggers) -> MqttTriggers {
        let _ = self.0.set(t.publish_sink());
        t
    }

    /// Publishes `m` and waits until it is handed to the connection or on disk.
    async fn send(&self, m: MqttMessage) -> Result<(), ()> {
        let lost = self.send_all(vec![m]).await;
        if lost.is_empty() { Ok(()) } else { Err(()) }
    }

    /// Publishes `ms`; returns those lost.
    async fn send_all(&self, ms: Vec<MqttMessage>) -> Vec<wasmgate_runtime::sink::Lost> {
        use wasmgate_runtime::sink::PublishSink as _;
        self.sink().publish("test", ms).await
    }

    fn sink(&self) -> Arc<wasmgate_trigger_mqtt::Outbox> {
        self.0.get().expect("the sink was taken").clone()
    }
}

/// A publish the spool refuses (`on_full = "refuse_new"`, full) is reported
/// per message, and the invocation that made it fails after the fact (a
/// `retry`), so its event is retried and dead-lettered, not counted as
/// handled with its output gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_spool_refuses_fails_the_invocation_that_made_it() {
    use wasmgate_runtime::invoke::{Admission, InvocationContext};
    // Nothing listens there: every QoS 1/2 publish goes to the spool.
    let port = free_port();
    let bounds = SpoolBounds {
        max_messages: 2,
        max_bytes: 1 << 20,
        on_full: OnFull::RefuseNew,
    };
    let outbox = SinkHandle::default();
    let host = Running::spawn_built(
        options(&format!("mqtt://127.0.0.1:{port}"), "refusing-spool-host"),
        vec![],
        |t| {
            outbox
                .take_from(t)
                .with_spool(Spool::open_in_memory(bounds).unwrap())
        },
    );
    // One batch: the first two fit, the third is refused, and only it is
    // reported lost.
    let lost = outbox
        .send_all(vec![spooled(0), spooled(1), spooled(2)])
        .await;
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].topic, "out/2");
    assert!(lost[0].reason.contains("refuse_new"), "{lost:?}");

    let echo = invocable(ECHO_MQTT, Limits::default(), &["dev/+/temp/reply"]);
    echo.set_publish_sink(outbox.sink());
    let out = echo
        .invoke(
            crate::util::mqtt("dev/1/temp", "21.5"),
            InvocationContext::new("test"),
            Admission::Wait,
        )
        .await;
    assert_eq!(out.status.name(), "retry", "{out:?}");
    assert!(
        format!("{:?}", out.status).contains("could neither be sent nor spooled"),
        "{out:?}"
    );
    host.stop().await;
}

/// A flood on a slow trigger (one delivery at a time, 1.5 s each) does not
/// hold back another trigger: the fast trigger's reply comes while the slow
/// one has finished at most one of its five messages. (Before each trigger
/// had its own queue, the fast message waited until the fifth slow one had
/// a slot: four slow deliveries first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_trigger_does_not_hold_back_another_triggers_messages() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut requester = TestClient::connect(
        broker.port,
        "requester-fast",
        &[("replies/fast", QoS::AtLeastOnce)],
    )
    .await;
    let specs = vec![
        spec(HOSTILE, &[], "sleep", 1, 1),
        replying(spec(ECHO_MQTT, &[], "fast/+", 1, 4), "replies/#"),
    ];
    let host = Running::start(&broker.url(), "host-fair", specs, None).await;
    for _ in 0..5 {
        requester.publish("sleep", QoS::AtLeastOnce, "1500").await;
    }
    let props = PublishProperties {
        response_topic: Some("replies/fast".into()),
        ..PublishProperties::default()
    };
    requester
        .client
        .publish_with_properties("fast/1", QoS::AtLeastOnce, false, "now", props)
        .await
        .unwrap();
    let got = requester.collect(|g| !g.is_empty()).await;
    assert_eq!(&got[0].payload[..], b"now");
    // The fast delivery itself may be counted already; at most one slow one.
    let done = host.stats.succeeded.load(Relaxed);
    assert!(
        done <= 2,
        "{done} deliveries had finished when the fast reply came"
    );
    host.wait_for(|s| s.acks_sent.load(Relaxed) == 6).await;
    host.stop().await;
}

/// The loop that reads the connection never waits on a handler: a QoS 0
/// flood on a slow trigger fills its queue, QoS 1 messages follow, and the
/// host keeps answering the broker's keep-alive (5 s, the shortest there
/// is, so the broker drops a silent client after 7.5 s): no connection is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_on_a_slow_trigger_does_not_stall_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let text = format!(
        "[gateway]\nname = \"host-flood\"\n[mqtt]\nbroker = \"{}\"\nkeep_alive = \"5s\"\n",
        broker.url()
    );
    let m = Manifest::parse(Path::new("wasmgate.toml"), text).unwrap();
    let (o, receive_maximum) = client_options(&m).unwrap().unwrap();
    let slow = spec(HOSTILE, &[], "sleep", 1, 1);
    let host = Running::start_with((o, receive_maximum), vec![slow], None).await;
    let publisher = TestClient::connect(broker.port, "pub-flood", &[]).await;
    let flood = wasmgate_trigger_mqtt::QOS0_BUFFER + receive_maximum as usize + 500;
    for _ in 0..flood {
        publisher.publish("sleep", QoS::AtMostOnce, "2000").await;
    }
    // Each would have waited 2 s for the slow trigger's slot in the old
    // shared queue, with the loop blocked: 20 s without a ping.
    for _ in 0..10 {
        publisher.publish("sleep", QoS::AtLeastOnce, "1").await;
    }
    host.wait_for(|s| s.received.load(Relaxed) >= flood as u64 + 10)
        .await;
    // Longer than the broker's patience with a silent client.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(host.stats.connection_errors.load(Relaxed), 0);
    assert_eq!(host.stats.connects.load(Relaxed), 1);
    assert!(host.stats.dropped_qos0.load(Relaxed) >= 400);
    host.stop().await;
}

mod puback;
mod receive_max;
mod wire;
