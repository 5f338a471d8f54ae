//! A broker that sends more unacknowledged messages than the host's Receive
//! Maximum (Mosquitto before 2.0.13 does: each in-order PUBACK moves up to
//! Receive Maximum queued messages into flight, however many are in flight
//! already, so with a backlog it sends everything). The host takes what its
//! queues hold, leaves the rest unacknowledged, and once the messages it took
//! are handled and acknowledged it reconnects, so the broker sends the rest
//! again. Tested against a broker written here that sends its whole backlog
//! at once on every connection: Mosquitto's behaviour depends on its version.

use super::wire::{Got, accept_until, read_packet, suback, varint_at};
use super::*;
use std::io::Write;
use std::net::TcpListener;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

#[derive(Debug, Default)]
struct FloodState {
    /// Per message (packet id = index + 1): acknowledged yet?
    acked: Vec<bool>,
    /// Per message: sent at least once (a resend carries DUP).
    sent: Vec<bool>,
    connections: usize,
    /// PUBLISH packets sent, resends included.
    publishes: usize,
    /// PUBACKs for a packet id older than one acknowledged before on the
    /// same connection (MQTT 5 §4.6: acks go out in order).
    out_of_order: usize,
    /// PUBACKs for a message acknowledged already.
    repeated: usize,
    /// Payloads of the QoS 1 messages the host published, resends included.
    from_host: Vec<String>,
}

/// A broker with one persistent session holding `n` QoS 1 messages on
/// topic `sleep` (payload `5`: the hostile guest sleeps 5 ms), payload
/// `5` each. It sends every unacknowledged message at once, ignoring the
/// client's Receive Maximum: after the first SUBACK, and on each later
/// connection right after the CONNACK (session present), as brokers do. It
/// acknowledges the host's own QoS 1 publishes and records them.
struct FloodBroker {
    port: u16,
    state: Arc<Mutex<FloodState>>,
    stop: Arc<AtomicBool>,
}

impl FloodBroker {
    fn start(n: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(FloodState {
            acked: vec![false; n],
            sent: vec![false; n],
            ..FloodState::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        accept_until(listener, stop.clone(), move |stream, number| {
            {
                let mut s = s.lock().unwrap();
                s.connections = s.connections.max(number);
            }
            flood(stream, number, &s, &st);
        });
        Self { port, state, stop }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn acked(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .acked
            .iter()
            .filter(|a| **a)
            .count()
    }
}

impl Drop for FloodBroker {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every unacknowledged message as one buffer of QoS 1 PUBLISH packets.
fn backlog(state: &mut FloodState) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..state.acked.len() {
        if state.acked[i] {
            continue;
        }
        let dup = if state.sent[i] { 0x08 } else { 0 };
        state.sent[i] = true;
        state.publishes += 1;
        let [hi, lo] = ((i + 1) as u16).to_be_bytes();
        // topic "sleep", packet id, no properties, payload "5"
        out.extend([0x32 | dup, 11, 0, 5]);
        out.extend(b"sleep");
        out.extend([hi, lo, 0, b'5']);
    }
    out
}

/// One connection of the session.
fn flood(
    mut stream: std::net::TcpStream,
    number: usize,
    state: &Mutex<FloodState>,
    stop: &AtomicBool,
) {
    stream.set_nodelay(true).unwrap();
    let mut last_acked = 0u16;
    while !stop.load(Relaxed) {
        let (first, body) = match read_packet(&mut stream, Duration::from_millis(20)) {
            Got::Packet(first, body) => (first, body),
            Got::Idle => continue,
            Got::Closed => return,
        };
        let reply: Vec<u8> = match first >> 4 {
            // CONNACK: the session is present from the second connection
            // on, and what it holds unacknowledged follows at once.
            1 if number > 1 => {
                let mut p = vec![0x20, 3, 1, 0, 0];
                p.extend(backlog(&mut state.lock().unwrap()));
                p
            }
            1 => vec![0x20, 3, 0, 0, 0],
            // SUBSCRIBE → SUBACK granting QoS 1; on the first connection the
            // whole backlog follows.
            8 => {
                let mut p = suback(&body);
                if number == 1 {
                    p.extend(backlog(&mut state.lock().unwrap()));
                }
                p
            }
            // A QoS 1 PUBLISH from the host: recorded, acknowledged.
            3 if (first >> 1) & 3 == 1 => {
                let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                let at = 2 + topic_len;
                let (props, after) = varint_at(&body, at + 2);
                state
                    .lock()
                    .unwrap()
                    .from_host
                    .push(String::from_utf8_lossy(&body[after + props..]).into_owned());
                vec![0x40, 2, body[at], body[at + 1]]
            }
            // PUBACK
            4 => {
                let pkid = u16::from_be_bytes([body[0], body[1]]);
                let mut s = state.lock().unwrap();
                if pkid < last_acked {
                    s.out_of_order += 1;
                }
                last_acked = pkid;
                match s.acked.get_mut(pkid as usize - 1) {
                    Some(a) if *a => s.repeated += 1,
                    Some(a) => *a = true,
                    None => panic!("a PUBACK for packet id {pkid}, never sent"),
                }
                Vec::new()
            }
            12 => vec![0xd0, 0],
            14 => return,
            _ => Vec::new(),
        };
        if !reply.is_empty() && stream.write_all(&reply).is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_past_the_receive_maximum_are_received_again_after_a_reconnect() {
    let n = 1500;
    let broker = FloodBroker::start(n);
    // Queues of 10 + 1,024: the 1,500 sent at once do not fit.
    let host = Running::start_with(
        options_with(&broker.url(), "flood-host", "receive_maximum = 10"),
        vec![spec(HOSTILE, &[], "sleep", 1, 4)],
        None,
    )
    .await;
    let deadline = Instant::now() + PATIENCE;
    while broker.acked() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} messages acknowledged; the broker: {:?}; the host: {:?}",
            broker.acked(),
            broker.state.lock().unwrap().connections,
            host.stats
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = &host.stats;
    assert!(s.overflow.load(Relaxed) > 0, "{s:?}");
    assert!(s.resyncs.load(Relaxed) >= 1, "{s:?}");
    assert_eq!(
        s.succeeded.load(Relaxed),
        n as u64,
        "each message handled once: {s:?}"
    );
    assert_eq!(s.acks_discarded.load(Relaxed), 0, "{s:?}");
    {
        let b = broker.state.lock().unwrap();
        assert!(b.connections >= 2, "{b:?}");
        assert_eq!(b.out_of_order, 0, "acks in order");
        assert_eq!(b.repeated, 0, "no message acknowledged twice");
        assert!(b.publishes > n, "some were sent again: {b:?}");
    }
    host.stop().await;
}

/// The same with a handler that publishes a reply for each message: each
/// reply reaches the broker once, although the connection is renewed while
/// the host publishes (it waits for its publishes' acknowledgements first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_sends_the_hosts_own_publishes_once() {
    let n = 3000;
    let broker = FloodBroker::start(n);
    let host = Running::start_with(
        options_with(&broker.url(), "flood-replies", "receive_maximum = 10"),
        vec![spec(ECHO_MQTT, &["sleep/reply"], "sleep", 1, 4)],
        None,
    )
    .await;
    let deadline = Instant::now() + PATIENCE;
    while broker.acked() < n || broker.state.lock().unwrap().from_host.len() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} acknowledged; the host: {:?}",
            broker.acked(),
            host.stats
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = &host.stats;
    assert!(s.resyncs.load(Relaxed) >= 1, "{s:?}");
    assert_eq!(s.succeeded.load(Relaxed), n as u64, "{s:?}");
    {
        let b = broker.state.lock().unwrap();
        assert_eq!(b.from_host.len(), n, "each reply published once");
        assert_eq!((b.out_of_order, b.repeated), (0, 0));
    }
    host.stop().await;
}

/// Without a session that outlives the connection (`session_expiry = 0`)
/// a renewed connection would lose what the broker holds: the host does
/// not renew it, and leaves what did not fit unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_kept_session_the_connection_is_not_renewed() {
    let n = 1500;
    let broker = FloodBroker::start(n);
    let host = Running::start_with(
        options_with(
            &broker.url(),
            "flood-no-session",
            "receive_maximum = 10\nsession_expiry = \"0s\"",
        ),
        vec![spec(HOSTILE, &[], "sleep", 1, 4)],
        None,
    )
    .await;
    host.wait_for(|s| {
        s.overflow.load(Relaxed) > 0
            && s.succeeded.load(Relaxed) + s.overflow.load(Relaxed) == n as u64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host.stats.resyncs.load(Relaxed), 0, "{:?}", host.stats);
    assert_eq!(broker.state.lock().unwrap().connections, 1);
    host.stop().await;
}
