//! What the MQTT and soak benchmarks share: a Mosquitto of their own, a
//! polled rumqttc client, percentiles.

#![allow(dead_code, unreachable_pub)]

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct Broker {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
                 max_queued_messages 0\nlog_dest stderr\nlog_type error\n"
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .expect("mosquitto on the PATH");
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client_opts(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(1024 * 1024));
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    o
}

/// Connects a client and polls it in a task; `on_publish` sees every
/// incoming publish. Returns once subscribed (or connected).
pub async fn spawn_client(
    o: MqttOptions,
    subscribe: Option<&str>,
    mut on_publish: impl FnMut(&AsyncClient, rumqttc::v5::mqttbytes::v5::Publish) + Send + 'static,
    stop: CancellationToken,
) -> AsyncClient {
    let (client, mut eventloop) = AsyncClient::new(o, 65_536);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let c = client.clone();
    let sub = subscribe.map(str::to_string);
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => break,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => match &sub {
                    Some(t) => c.subscribe(t.clone(), QoS::AtLeastOnce).await.unwrap(),
                    None => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                },
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => on_publish(&c, p),
                Ok(_) => {}
                Err(e) => panic!("benchmark client {e}"),
            }
        }
    });
    ready_rx.await.unwrap();
    client
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}
