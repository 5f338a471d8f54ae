//! What the host's QoS 1/2 publishes wait for: the broker's
//! acknowledgement (PUBACK, or PUBREC then PUBCOMP). Tested against a
//! broker written here that answers the host's publishes only when the test
//! says so, or refuses them with a reason code: Mosquitto cannot be told to
//! hold an acknowledgement.

use super::wire::{Got, accept_until, read_packet, suback, varint_at};
use super::*;
use std::io::Write;
use std::net::TcpListener;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// How [`TestBroker`] answers a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Not yet: held until the answer becomes `Ack`.
    Hold,
    /// PUBACK (QoS 1) or PUBREC (QoS 2, PUBCOMP follows the PUBREL).
    Ack,
    /// PUBACK/PUBREC with reason code 0x87, not authorized.
    Refuse,
}

#[derive(Debug)]
struct BrokerState {
    answer: Answer,
    /// Payloads of the publishes received, in order (resends included).
    payloads: Vec<String>,
    /// Held publishes, (QoS, packet id), per connection number.
    held: Vec<(usize, u8, u16)>,
    connections: usize,
    /// Connections up to this number are closed (see [`TestBroker::kick`]).
    kicked: usize,
}

/// An MQTT 5 broker for one client at a time: CONNACK (no session),
/// PINGRESP, SUBACK, PUBCOMP for a PUBREL; publishes are recorded and
/// answered as [`Answer`] says.
struct TestBroker {
    port: u16,
    state: Arc<Mutex<BrokerState>>,
    stop: Arc<AtomicBool>,
}

fn answer_packet(qos: u8, pkid: u16, refuse: bool) -> Vec<u8> {
    let kind = if qos == 1 { 0x40 } else { 0x50 };
    let [hi, lo] = pkid.to_be_bytes();
    if refuse {
        vec![kind, 3, hi, lo, 0x87]
    } else {
        vec![kind, 2, hi, lo]
    }
}

impl TestBroker {
    fn start(answer: Answer) -> Self {
        Self::start_on(free_port(), answer)
    }

    fn start_on(port: u16, answer: Answer) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let state = Arc::new(Mutex::new(BrokerState {
            answer,
            payloads: Vec::new(),
            held: Vec::new(),
            connections: 0,
            kicked: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        accept_until(listener, stop.clone(), move |stream, number| {
            {
                let mut s = s.lock().unwrap();
                s.connections = s.connections.max(number);
            }
            serve(stream, number, &s, &st);
        });
        Self { port, state, stop }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn set_answer(&self, answer: Answer) {
        self.state.lock().unwrap().answer = answer;
    }

    /// Closes the current connection (held acknowledgements are lost with
    /// it, as with a broker that restarts).
    fn kick(&self) {
        let mut s = self.state.lock().unwrap();
        s.kicked = s.connections;
        s.held.clear();
    }

    fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    fn payloads(&self) -> Vec<String> {
        self.state.lock().unwrap().payloads.clone()
    }

    fn wait_for_publishes(&self, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.payloads().len() < n {
            assert!(
                Instant::now() < deadline,
                "the broker got {:?}",
                self.payloads()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // The listener closes within one accept round.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One connection: reads packets (a short timeout, to send held
/// acknowledgements once allowed and to notice the stop) and answers them.
fn serve(
    mut stream: std::net::TcpStream,
    number: usize,
    state: &Mutex<BrokerState>,
    stop: &AtomicBool,
) {
    stream.set_nodelay(true).unwrap();
    while !stop.load(Relaxed) {
        if state.lock().unwrap().kicked >= number {
            return;
        }
        let (first, body) = match read_packet(&mut stream, Duration::from_millis(20)) {
            Got::Packet(first, body) => (first, body),
            Got::Closed => return,
            Got::Idle => {
                let release: Vec<(u8, u16)> = {
                    let mut s = state.lock().unwrap();
                    if s.answer == Answer::Ack {
                        let (mine, rest) = std::mem::take(&mut s.held)
                            .into_iter()
                            .partition(|(c, _, _)| *c == number);
                        s.held = rest;
                        mine.into_iter().map(|(_, q, p)| (q, p)).collect()
                    } else {
                        Vec::new()
                    }
                };
                for (qos, pkid) in release {
                    if stream.write_all(&answer_packet(qos, pkid, false)).is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        let reply: Vec<u8> = match first >> 4 {
            1 => vec![0x20, 3, 0, 0, 0],
            3 => {
                let qos = (first >> 1) & 3;
                let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                let mut at = 2 + topic_len;
                let mut pkid = 0;
                if qos > 0 {
                    pkid = u16::from_be_bytes([body[at], body[at + 1]]);
                    at += 2;
                }
                let (props, after) = varint_at(&body, at);
                let payload = String::from_utf8_lossy(&body[after + props..]).into_owned();
                let mut s = state.lock().unwrap();
                s.payloads.push(payload);
                match (qos, s.answer) {
                    (0, _) => Vec::new(),
                    (_, Answer::Hold) => {
                        s.held.push((number, qos, pkid));
                        Vec::new()
                    }
                    (_, answer) => answer_packet(qos, pkid, answer == Answer::Refuse),
                }
            }
            // PUBREL → PUBCOMP.
            6 => vec![0x70, 2, body[0], body[1]],
            // SUBSCRIBE → SUBACK granting QoS 1 to each filter.
            8 => suback(&body),
            12 => vec![0xd0, 0],
            14 => return,
            _ => Vec::new(),
        };
        if !reply.is_empty() && stream.write_all(&reply).is_err() {
            return;
        }
    }
}

fn message(topic: &str, qos: u8, payload: &str) -> MqttMessage {
    MqttMessage {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        qos,
        ..MqttMessage::default()
    }
}

/// An invocation's QoS 1/2 publishes are done — and its input may be
/// acknowledged, its tick recorded, its HTTP response sent — only when the
/// broker has acknowledged them (PUBACK; PUBREC and PUBCOMP), not when they
/// are handed to the connection; a publish the broker refuses with a
/// reason code is reported lost with that reason (its invocation fails and
/// is retried), and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_done_only_once_the_broker_acknowledges_them() {
    let broker = TestBroker::start(Answer::Hold);
    let outbox = SinkHandle::default();
    let host = Running::spawn_built(options(&broker.url(), "puback-host"), vec![], |t| {
        outbox.take_from(t)
    });
    host.wait_for(|s| s.connects.load(Relaxed) >= 1).await;

    let sending = outbox.clone();
    let send = tokio::spawn(async move {
        sending
            .send_all(vec![message("out/a", 1, "one"), message("out/b", 2, "two")])
            .await
    });
    broker.wait_for_publishes(2);
    // The broker has both and acknowledged neither: the sender still waits
    // (with the old hand-over rule it was done before the broker read them).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !send.is_finished(),
        "the publishes were reported done before the broker acknowledged them"
    );
    broker.set_answer(Answer::Ack);
    let lost = tokio::time::timeout(PATIENCE, send)
        .await
        .expect("done once acknowledged")
        .unwrap();
    assert!(lost.is_empty(), "{lost:?}");

    broker.set_answer(Answer::Refuse);
    let lost = outbox
        .send_all(vec![
            message("out/a", 1, "three"),
            message("out/b", 2, "four"),
        ])
        .await;
    assert_eq!(lost.len(), 2, "{lost:?}");
    for l in &lost {
        assert!(l.reason.contains("NotAuthorized"), "{l:?}");
    }
    assert_eq!(host.stats.broker_refused.load(Relaxed), 2);
    // A refused QoS 2 exchange stays counted as in flight by rumqttc: the
    // host connects again to reset that count.
    host.wait_for(|s| s.connects.load(Relaxed) >= 2).await;
    // Refused messages are not sent again.
    broker.set_answer(Answer::Ack);
    outbox.send(message("out/a", 1, "five")).await.unwrap();
    broker.wait_for_publishes(5);
    assert_eq!(broker.payloads(), ["one", "two", "three", "four", "five"]);
    host.stop().await;
}

/// Spooled publishes stay on disk until the broker acknowledges them: a
/// host killed (SIGKILL) after sending them to a broker that had not
/// acknowledged them still has them all, and sends them, in order, to the
/// broker it finds at the next start. (Before, a spooled message was
/// removed once handed to the connection, and lost with the process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_publishes_stay_on_disk_until_the_broker_acknowledges_them() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let path = state.join(wasmgate_store::spool::FILE_NAME);
    let n = 40;
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    {
        let mut spool = Spool::open(&path, SpoolBounds::default()).unwrap();
        let ms: Vec<MqttMessage> = (0..n).map(spooled).collect();
        assert_eq!(spool.append(&ms).unwrap().stored, n as u64);
    }
    let read_spool = || -> Vec<String> {
        Spool::open(&path, SpoolBounds::default())
            .unwrap()
            .peek(100_000)
            .unwrap()
            .into_iter()
            .map(|(_, m)| String::from_utf8(m.payload).unwrap())
            .collect()
    };
    let port = free_port();
    let file = dir.path().join("wasmgate.toml");
    std::fs::write(
        &file,
        format!(
            r#"[gateway]
name = "spool-ack"
state_dir = "{state}"

[mqtt]
broker = "mqtt://127.0.0.1:{port}"
keep_alive = "5s"

# A publishing component, so the host connects; it never fires here.
[component.tick]
source = "{source}"
env = {{ PUBLISH_TOPIC = "out/tick" }}
allow = {{ mqtt_publish = ["out/#"] }}

[[trigger.timer]]
component = "tick"
every = "24h"
"#,
            state = state.display(),
            source = wasmgate_test_artifacts::PUBLISH_TIMER,
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let broker = TestBroker::start_on(port, Answer::Hold);
    let (mut host, lines) = spawn_host(file);
    wait_line(&lines, "ready");
    broker.wait_for_publishes(n);
    host.kill().unwrap(); // SIGKILL
    host.wait().unwrap();
    assert_eq!(broker.payloads()[..n], want[..], "sent in spool order");
    assert_eq!(
        read_spool(),
        want,
        "every spooled publish is still on disk: the broker acknowledged none"
    );
    drop(broker);

    let broker = Mosquitto::start_on(dir.path(), port);
    let mut sub =
        TestClient::connect(broker.port, "spool-ack-sub", &[("out/#", QoS::AtLeastOnce)]).await;
    let (mut host, lines) = spawn_host(file);
    wait_line(&lines, "ready");
    let got = sub.collect(|g| payloads(g).len() >= n).await;
    assert_arrived_in_order(&got, 0..n);
    // Acknowledged, so removed.
    let deadline = Instant::now() + PATIENCE;
    while !read_spool().is_empty() {
        assert!(Instant::now() < deadline, "left: {:?}", read_spool());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    assert_eq!(host.wait().unwrap().code(), Some(0));
}

/// Spooled messages sent on a connection that drops before the broker
/// acknowledged them are sent again on the next one, from the oldest, even
/// when nothing else happens meanwhile (no new publish to wake the drain),
/// and leave the spool once acknowledged there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_publishes_unacknowledged_on_a_dropped_connection_are_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(wasmgate_store::spool::FILE_NAME);
    let n = 10;
    {
        let mut spool = Spool::open(&path, SpoolBounds::default()).unwrap();
        let ms: Vec<MqttMessage> = (0..n).map(spooled).collect();
        spool.append(&ms).unwrap();
    }
    let broker = TestBroker::start(Answer::Hold);
    let spool = Spool::open(&path, SpoolBounds::default()).unwrap();
    let host = Running::spawn_built(options(&broker.url(), "respool-host"), vec![], |t| {
        t.with_spool(spool)
    });
    broker.wait_for_publishes(n);
    broker.kick();
    host.wait_for(|s| s.connects.load(Relaxed) >= 2).await;
    broker.wait_for_publishes(2 * n);
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(broker.payloads()[n..], want[..], "sent again, in order");
    assert!(broker.connections() >= 2);
    broker.set_answer(Answer::Ack);
    host.wait_for(|s| s.spool_waiting.load(Relaxed) == 0).await;
    host.stop().await;
    assert!(
        Spool::open(&path, SpoolBounds::default())
            .unwrap()
            .is_empty()
    );
}
