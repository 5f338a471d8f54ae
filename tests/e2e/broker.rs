//! The embedded broker: real clients (`mosquitto_pub`/`mosquitto_sub`)
//! against it on an ephemeral port.

use std::process::Command;
use std::time::Duration;
use wasmgate_trigger_mqtt::broker::{EmbeddedBroker, EmbeddedOptions};

fn sub(port: u16, args: &[&str]) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub is installed (CI installs mosquitto-clients)")
}

fn publish(port: u16, topic: &str, message: &str) {
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .args(["-t", topic, "-m", message])
        .status()
        .unwrap();
    assert!(status.success());
}

fn output(child: std::process::Child) -> String {
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_routes_queues_for_offline_sessions_and_shares() {
    let broker = EmbeddedBroker::start(EmbeddedOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..EmbeddedOptions::default()
    })
    .await
    .unwrap();
    let port = broker.local_addr().port();
    tokio::task::spawn_blocking(move || {
        // A persistent session: subscribe, go away, miss five messages, come back.
        let first = sub(
            port,
            &[
                "-t", "dev/#", "-q", "1", "-c", "-i", "gw-test", "-x", "3600", "-W", "1",
            ],
        );
        let _ = output(first);
        for i in 1..=5 {
            publish(port, "dev/7/temp", &format!("m{i}"));
        }
        let back = sub(
            port,
            &[
                "-t", "dev/#", "-q", "1", "-c", "-i", "gw-test", "-x", "3600", "-C", "5", "-W",
                "10",
            ],
        );
        assert_eq!(output(back), "m1\nm2\nm3\nm4\nm5\n");

        // A shared subscription gets what is published to its filter.
        let shared = sub(
            port,
            &["-t", "$share/g/jobs/#", "-q", "1", "-C", "1", "-W", "10"],
        );
        std::thread::sleep(Duration::from_millis(300));
        publish(port, "jobs/1", "work");
        assert_eq!(output(shared), "work\n");
    })
    .await
    .unwrap();

    // A port in use is an error that names the setting.
    let taken = EmbeddedBroker::start(EmbeddedOptions {
        listen: broker.local_addr(),
        ..EmbeddedOptions::default()
    })
    .await
    .unwrap_err();
    assert!(
        taken.starts_with("mqtt.embedded.listen: cannot listen on"),
        "{taken}"
    );
}

/// A running `wasmgate up` on the embedded broker.
struct Host {
    child: std::process::Child,
    port: u16,
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Host {
    /// Starts `up` on `body` (after an `[mqtt]` with the embedded broker on
    /// a free port) and waits until `ready_message` is logged.
    fn start(body: &str, ready_message: &str) -> Host {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("wasmgate.toml");
        std::fs::write(
            &manifest,
            format!(
                "[gateway]\nstate_dir = \"state\"\n[mqtt]\nbroker = \"embedded\"\nembedded = {{ listen = \"127.0.0.1:0\" }}\n{body}"
            ),
        )
        .unwrap();
        let mut child = crate::util::wasmgate()
            .args([
                "up",
                "-f",
                manifest.to_str().unwrap(),
                "--log-format",
                "json",
            ])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        let ready_message = ready_message.to_string();
        std::thread::spawn(move || {
            let mut port = None;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "embedded MQTT broker listening" {
                        let addr: std::net::SocketAddr =
                            v["address"].as_str().unwrap().parse().unwrap();
                        port = Some(addr.port());
                    }
                    if v["message"] == ready_message.as_str() {
                        let _ = tx.send(port);
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(120))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("not ready; saw:\n{}", logs.lock().unwrap().join("\n")));
        Host {
            child,
            port,
            logs,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `up` with `broker = "embedded"`: devices publish to the host's own
/// broker and the MQTT trigger answers on the response topic.
#[test]
fn up_serves_mqtt_triggers_through_the_embedded_broker() {
    let host = Host::start(
        &format!(
            r#"
[component.echo]
source = "{}"
allow = {{ mqtt_response = ["replies/#"] }}
[[trigger.mqtt]]
component = "echo"
topic = "devices/+/temperature"
qos = 1
"#,
            wasmgate_test_artifacts::ECHO_MQTT
        ),
        "MQTT subscribed",
    );
    let port = host.port;
    let reply = sub(port, &["-t", "replies/#", "-C", "1", "-W", "20", "-v"]);
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .args(["-t", "devices/7/temperature", "-m", "21.5"])
        .args(["-D", "publish", "response-topic", "replies/7"])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(output(reply), "replies/7 21.5\n", "{}", host.logs());

    // A device names a response topic outside `allow.mqtt_response` (another
    // device's command topic): no reply is published there.
    let hijack = sub(
        port,
        &["-t", "devices/+/command", "-C", "1", "-W", "3", "-v"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"])
        .args(["-q", "1", "-t", "devices/7/temperature", "-m", "open"])
        .args(["-D", "publish", "response-topic", "devices/9/command"])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(output(hijack), "", "{}", host.logs());
    assert!(host.logs().contains("publish denied"), "{}", host.logs());
}

/// A timer guest's publishes reach subscribers through the outbox and the
/// host's MQTT connection (here to the embedded broker).
#[test]
fn a_timer_guests_publishes_reach_the_broker() {
    let host = Host::start(
        &format!(
            r#"
[component.tick]
source = "{}"
env = {{ PUBLISH_TOPIC = "gateway/ticks" }}
allow = {{ mqtt_publish = ["gateway/#"] }}
[[trigger.timer]]
component = "tick"
every = "300ms"
"#,
            wasmgate_test_artifacts::PUBLISH_TIMER
        ),
        "ready",
    );
    let got = output(sub(
        host.port,
        &["-t", "gateway/#", "-C", "2", "-W", "20", "-v"],
    ));
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(got.len(), 2, "{got:?}\n{}", host.logs());
    for line in got {
        assert!(line.starts_with("gateway/ticks tick "), "{line}");
    }
}

/// `[dead_letters] mqtt_topic`: each committed dead letter is also
/// published, as JSON.
#[test]
fn dead_letters_are_also_published_to_their_topic() {
    let host = Host::start(
        &format!(
            r#"
[dead_letters]
mqtt_topic = "gateway/dead-letters"
[component.tick]
source = "{}"
env = {{ TICK_REJECT = "sensor unplugged" }}
[[trigger.timer]]
component = "tick"
every = "300ms"
"#,
            wasmgate_test_artifacts::TICK_TIMER
        ),
        "ready",
    );
    let got = output(sub(
        host.port,
        &["-t", "gateway/dead-letters", "-C", "1", "-W", "20"],
    ));
    let record: serde_json::Value = serde_json::from_str(got.trim())
        .unwrap_or_else(|e| panic!("not a JSON dead letter ({e}): {got:?}\n{}", host.logs()));
    assert_eq!(record["component"], "tick");
    assert_eq!(record["condition"], "rejected");
    assert_eq!(record["attempts"], 1);
}
