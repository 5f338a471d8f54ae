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
        Self::start_on("127.0.0.1:0", body, ready_message)
    }

    /// [`Host::start`] with the embedded broker on `listen`.
    fn start_on(listen: &str, body: &str, ready_message: &str) -> Host {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("wasmgate.toml");
        std::fs::write(
            &manifest,
            format!(
                "[gateway]\nstate_dir = \"state\"\n[mqtt]\nbroker = \"embedded\"\nembedded = {{ listen = \"{listen}\" }}\n{body}"
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

/// A gateway restarted right after it stopped gets its broker port back,
/// although the connections its devices had are still in TIME-WAIT on that
/// port (the host closed them first): the listener sets SO_REUSEADDR. It
/// did not, and the new `up` failed with "Address already in use" for a
/// minute after every restart.
#[test]
fn the_embedded_broker_listens_again_right_after_a_restart() {
    let port = crate::util::free_port();
    let listen = format!("127.0.0.1:{port}");
    let body = format!(
        "[component.echo]\nsource = \"{}\"\n[[trigger.mqtt]]\ncomponent = \"echo\"\ntopic = \"t\"\n",
        wasmgate_test_artifacts::ECHO_MQTT
    );
    for round in 1..=2 {
        let host = Host::start_on(&listen, &body, "MQTT subscribed");
        assert_eq!(host.port, port);
        // A device stays connected until the host goes away.
        let mut device = sub(port, &["-t", "devices/#", "-W", "30"]);
        std::thread::sleep(Duration::from_millis(500));
        let status = Command::new("kill")
            .args(["-TERM", &host.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut host = host;
        assert_eq!(
            host.child.wait().unwrap().code(),
            Some(0),
            "round {round}: {}",
            host.logs()
        );
        let _ = device.kill();
        let _ = device.wait();
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

/// `mosquitto_pub` with extra arguments; its exit status and stderr.
fn pub_with(port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A broker open to the network faces devices it does not trust: unknown
/// and anonymous clients are refused, a user publishes and subscribes only
/// within its filters, nobody can take the gateway's client id (and with it
/// its session), and the number of sessions is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_authenticates_clients_and_enforces_their_acls() {
    use wasmgate_manifest::topic::TopicFilter;
    use wasmgate_trigger_mqtt::broker::{BrokerUser, hash_password};
    let broker = EmbeddedBroker::start(EmbeddedOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        allow_anonymous: false,
        max_sessions: 4,
        gateway_client_id: "gw".into(),
        users: vec![BrokerUser {
            username: "sensor-7".into(),
            password_hash: hash_password("s3cret").unwrap(),
            publish: vec![TopicFilter::parse("devices/7/#").unwrap()],
            subscribe: vec![TopicFilter::parse("devices/7/cmd/#").unwrap()],
        }],
        ..EmbeddedOptions::default()
    })
    .await
    .unwrap();
    let port = broker.local_addr().port();
    let (gw_user, gw_password) = broker.gateway_credentials();
    tokio::task::spawn_blocking(move || {
        let sensor = ["-u", "sensor-7", "-P", "s3cret"];
        // The gateway's own client (a superuser) watches every topic.
        let watch = sub(
            port,
            &[
                "-i",
                "gw",
                "-u",
                &gw_user,
                "-P",
                &gw_password,
                "-t",
                "#",
                "-v",
                "-W",
                "6",
            ],
        );
        std::thread::sleep(Duration::from_millis(500));

        let (ok, err) = pub_with(port, &["-t", "devices/7/t", "-m", "anon"]);
        assert!(!ok, "an anonymous client was let in: {err}");
        let (ok, _) = pub_with(
            port,
            &[
                "-u",
                "sensor-7",
                "-P",
                "wrong",
                "-t",
                "devices/7/t",
                "-m",
                "bad",
            ],
        );
        assert!(!ok, "a wrong password was let in");
        let (ok, _) = pub_with(
            port,
            &[
                "-u",
                "nobody",
                "-P",
                "s3cret",
                "-t",
                "devices/7/t",
                "-m",
                "bad",
            ],
        );
        assert!(!ok, "an unknown user was let in");
        // The gateway's client id, with a device's valid credentials: refused,
        // and the gateway's session is not taken over.
        let (ok, _) = pub_with(
            port,
            &[
                &sensor[..],
                &["-i", "gw", "-t", "devices/7/t", "-m", "takeover"],
            ]
            .concat(),
        );
        assert!(!ok, "a device took the gateway's client id");

        let (ok, err) = pub_with(
            port,
            &[&sensor[..], &["-t", "devices/7/t", "-m", "mine"]].concat(),
        );
        assert!(ok, "{err}");
        // Outside its filters: the broker refuses it (MQTT 5 PUBACK
        // "not authorized" for QoS 1) and routes nothing.
        let _ = pub_with(
            port,
            &[
                &sensor[..],
                &["-q", "1", "-t", "devices/8/t", "-m", "not-mine"],
            ]
            .concat(),
        );
        let denied = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"])
            .args(sensor)
            .args(["-t", "#", "-W", "2"])
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&denied.stdout),
            String::from_utf8_lossy(&denied.stderr)
        );
        assert!(
            said.contains("denied"),
            "subscribing to # was not refused: {said}"
        );

        let seen = output(watch);
        assert!(seen.contains("devices/7/t mine"), "{seen}");
        for not in ["anon", "bad", "takeover", "not-mine"] {
            assert!(!seen.contains(not), "{not} reached the gateway:\n{seen}");
        }
        // The gateway's watch ran to its end (-W): it was never kicked off.
    })
    .await
    .unwrap();
}

/// Sessions are bounded: with the broker's four held, a fifth client is
/// refused (and one that held a session may come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_holds_at_most_max_sessions() {
    let broker = EmbeddedBroker::start(EmbeddedOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_sessions: 4,
        ..EmbeddedOptions::default()
    })
    .await
    .unwrap();
    let port = broker.local_addr().port();
    tokio::task::spawn_blocking(move || {
        let held: Vec<_> = (0..4)
            .map(|i| sub(port, &["-i", &format!("s{i}"), "-t", "x", "-W", "4"]))
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        let (ok, err) = pub_with(port, &["-i", "s5", "-t", "x", "-m", "x"]);
        assert!(!ok, "a fifth session was accepted");
        assert!(err.to_lowercase().contains("unavailable"), "{err}");
        for h in held {
            let _ = output(h);
        }
        let (ok, err) = pub_with(port, &["-i", "s5", "-t", "x", "-m", "x"]);
        assert!(ok, "no session after the others ended: {err}");
    })
    .await
    .unwrap();
}
