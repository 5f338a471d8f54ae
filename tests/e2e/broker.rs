//! The embedded broker: real clients (`mosquitto_pub`/`mosquitto_sub`)
//! against it on an ephemeral port.

use std::process::Command;
use std::time::Duration;
use wasmgate::broker::{EmbeddedBroker, EmbeddedOptions};

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
