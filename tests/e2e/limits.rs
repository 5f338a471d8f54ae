//! Every hostile guest ends in its outcome, and the host goes on.

use crate::util::{call, invocable, mqtt, tick};
use http_body_util::BodyExt as _;
use std::sync::Arc;
use std::time::Duration;
use wasmgate_manifest::limits::Limits;
use wasmgate_runtime::invoke::{
    Admission, HandlerErrorKind, HttpExchange, InvocationContext, OUTPUT_CAPTURE_BYTES, Scheme,
    Status,
};
use wasmgate_test_artifacts::{COUNTER, HOSTILE, HTTP_PROBE};

/// A hang guard, not a performance claim: each case ends within its own
/// limits (well under a second here); this only turns a hang into a failure.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn limits(fuel: u64, memory: u64, timeout_ms: u64) -> Limits {
    Limits {
        fuel,
        memory,
        timeout: Duration::from_millis(timeout_ms),
        concurrency: 4,
        ..Limits::default()
    }
}

#[tokio::test]
async fn each_hostile_guest_yields_its_outcome_and_the_next_invocation_succeeds() {
    let cases: Vec<(&str, &str, Limits, &str)> = vec![
        (
            "loop",
            "",
            limits(200_000_000, 16 << 20, 60_000),
            "fuel_exhausted",
        ),
        (
            "loop",
            "",
            limits(Limits::MAX_FUEL, 16 << 20, 300),
            "timeout",
        ),
        (
            "memory-bomb",
            "",
            limits(Limits::MAX_FUEL, 16 << 20, 60_000),
            "memory_limit",
        ),
        (
            "stack-overflow",
            "",
            limits(Limits::MAX_FUEL, 16 << 20, 60_000),
            "trap",
        ),
        ("trap", "", Limits::default(), "trap"),
        ("panic", "", Limits::default(), "trap"),
        (
            "sleep",
            "60000",
            limits(Limits::MAX_FUEL, 16 << 20, 300),
            "timeout",
        ),
        ("retry", "try later", Limits::default(), "retry"),
        ("reject", "bad payload", Limits::default(), "reject"),
    ];
    for (behaviour, payload, limits, want) in cases {
        let inv = invocable(HOSTILE, limits, &[]);
        let outcome = tokio::time::timeout(HANG_GUARD, call(&inv, mqtt(behaviour, payload)))
            .await
            .unwrap_or_else(|_| panic!("{behaviour} hung"));
        assert_eq!(outcome.status.name(), want, "{behaviour}: {outcome:?}");
        match (&outcome.status, behaviour) {
            (Status::FuelExhausted { fuel_limit }, _) => {
                assert_eq!(*fuel_limit, limits.fuel);
                assert_eq!(outcome.fuel_consumed, limits.fuel);
            }
            (Status::MemoryLimit { memory_limit }, _) => {
                assert_eq!(*memory_limit, limits.memory);
                assert!(outcome.memory_peak_bytes <= limits.memory, "{outcome:?}");
                assert!(outcome.memory_peak_bytes > limits.memory / 2, "{outcome:?}");
            }
            (Status::Trap { message }, "stack-overflow") => {
                assert!(message.contains("call stack exhausted"), "{message}")
            }
            (Status::Trap { message }, "trap") => {
                assert!(message.contains("unreachable"), "{message}")
            }
            (Status::Trap { .. }, "panic") => {
                assert!(
                    outcome.stderr.contains("hostile guest panics on purpose"),
                    "{}",
                    outcome.stderr
                )
            }
            (Status::HandlerError { kind, message }, _) => {
                let want_kind = if behaviour == "retry" {
                    HandlerErrorKind::Retry
                } else {
                    HandlerErrorKind::Reject
                };
                assert_eq!(*kind, want_kind);
                assert_eq!(message, payload);
            }
            _ => {}
        }
        // The same component, the same host: the next invocation is fine.
        let next = call(&inv, mqtt("ok", "")).await;
        assert_eq!(next.status, Status::Ok, "after {behaviour}: {next:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breach_ends_only_its_own_invocation() {
    let looping = Arc::new(invocable(
        HOSTILE,
        limits(Limits::MAX_FUEL, 16 << 20, 1_000),
        &[],
    ));
    let fine = Arc::new(invocable(HOSTILE, Limits::default(), &[]));
    let spinning = {
        let looping = looping.clone();
        tokio::spawn(async move { call(&looping, mqtt("loop", "")).await })
    };
    let mut ok = 0;
    for _ in 0..20 {
        let outcome = call(&fine, mqtt("ok", "")).await;
        assert_eq!(outcome.status, Status::Ok, "{outcome:?}");
        ok += 1;
    }
    let spun = tokio::time::timeout(HANG_GUARD, spinning)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(spun.status.name(), "timeout", "{spun:?}");
    assert_eq!(ok, 20);
}

#[tokio::test]
async fn every_invocation_gets_a_fresh_instance() {
    let counter = invocable(COUNTER, Limits::default(), &[]);
    for _ in 0..5 {
        let outcome = call(&counter, tick()).await;
        assert_eq!(outcome.status, Status::Ok, "{outcome:?}");
        assert_eq!(outcome.stdout, "count=1\n");
    }
    assert_eq!(counter.invocations(), 5);
}

/// `reuse = 3`: one instance handles three ticks in a row (its global
/// counter goes on), then a fresh one takes over.
#[tokio::test]
async fn with_reuse_an_instance_serves_that_many_invocations_then_a_fresh_one() {
    let counter = invocable(COUNTER, Limits::default(), &[]).with_reuse(3);
    let mut counts = Vec::new();
    for _ in 0..7 {
        let outcome = call(&counter, tick()).await;
        assert_eq!(outcome.status, Status::Ok, "{outcome:?}");
        counts.push(outcome.stdout.trim().to_string());
    }
    assert_eq!(
        counts,
        [
            "count=1", "count=2", "count=3", "count=1", "count=2", "count=3", "count=1"
        ]
    );
}

/// With reuse, only an instance whose handler returned `ok` is kept: an
/// error result, a trap or a breached limit drops it.
#[tokio::test]
async fn with_reuse_a_failed_invocation_drops_its_instance() {
    let hostile = invocable(HOSTILE, limits(50_000_000, 8 << 20, 2_000), &[]).with_reuse(100);
    assert_eq!(call(&hostile, mqtt("ok", "")).await.status, Status::Ok);
    assert_eq!(hostile.warm_instances(), 1);
    for topic in ["trap", "loop", "reject", "retry"] {
        let outcome = call(&hostile, mqtt(topic, "")).await;
        assert_ne!(outcome.status, Status::Ok, "{topic}");
        assert_eq!(hostile.warm_instances(), 0, "{topic} dropped the instance");
        assert_eq!(call(&hostile, mqtt("ok", "")).await.status, Status::Ok);
        assert_eq!(hostile.warm_instances(), 1);
    }
}

/// An HTTP exchange — the HTTP trigger's way in — goes through the same
/// invocation path: a guest that returns without a response, or answers
/// with an error code, has failed (a trap, logged as such), and its instance
/// is not reused; one that answers is kept.
#[tokio::test]
async fn with_reuse_an_http_guest_that_answers_badly_fails_and_drops_its_instance() {
    let probe = invocable(HTTP_PROBE, Limits::default(), &[]).with_reuse(100);
    let exchange = |path: &str| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = hyper::Request::get(format!("http://probe{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        (HttpExchange::new(req, Scheme::Http, tx), rx)
    };
    let (ok, answered) = exchange("/count");
    let outcome = probe
        .invoke(ok, InvocationContext::new("test"), Admission::Wait)
        .await;
    assert_eq!(outcome.status, Status::Ok);
    assert_eq!(answered.await.unwrap().unwrap().status(), 200);
    assert_eq!(probe.warm_instances(), 1);
    for (path, why) in [
        (
            "/no-response",
            "the guest returned without setting a response",
        ),
        ("/error-code", "the guest answered with an error"),
    ] {
        let (ex, answered) = exchange(path);
        let outcome = probe
            .invoke(ex, InvocationContext::new("test"), Admission::Wait)
            .await;
        match &outcome.status {
            Status::Trap { message } => assert!(message.starts_with(why), "{path}: {message}"),
            other => panic!("{path}: {other:?}"),
        }
        assert!(!matches!(answered.await, Ok(Ok(_))), "{path}: no response");
        assert_eq!(probe.warm_instances(), 0, "{path} dropped the instance");
        let (ok, answered) = exchange("/count");
        let outcome = probe
            .invoke(ok, InvocationContext::new("test"), Admission::Wait)
            .await;
        assert_eq!(outcome.status, Status::Ok);
        let body = answered.await.unwrap().unwrap().into_body();
        let body = body.collect().await.unwrap().to_bytes();
        assert_eq!(
            body.as_ref(),
            b"count=1\n",
            "after {path}: a fresh instance"
        );
        assert_eq!(probe.warm_instances(), 1);
    }
}

#[tokio::test]
async fn fuel_consumed_is_identical_for_identical_input() {
    let inv = invocable(HOSTILE, Limits::default(), &[]);
    let a = call(&inv, mqtt("spin", "100000")).await;
    let b = call(&inv, mqtt("spin", "100000")).await;
    let c = call(&inv, mqtt("spin", "200000")).await;
    assert_eq!(a.status, Status::Ok);
    assert_eq!(a.fuel_consumed, b.fuel_consumed);
    assert_eq!(a.stdout, b.stdout);
    assert!(
        c.fuel_consumed > a.fuel_consumed,
        "{} vs {}",
        c.fuel_consumed,
        a.fuel_consumed
    );
}

#[tokio::test]
async fn the_sandbox_denies_host_files_and_sockets() {
    let inv = invocable(HOSTILE, Limits::default(), &[]);
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), b"host secret").unwrap();
    let read = call(&inv, mqtt("read-file", secret.path().to_str().unwrap())).await;
    match &read.status {
        Status::HandlerError {
            kind: HandlerErrorKind::Reject,
            message,
        } => {
            assert!(message.starts_with("read-file denied"), "{message}")
        }
        other => panic!("the guest read a host file: {other:?} {}", read.stdout),
    }

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let connect = call(&inv, mqtt("open-socket", &addr)).await;
    match &connect.status {
        Status::HandlerError {
            kind: HandlerErrorKind::Reject,
            message,
        } => {
            assert!(message.starts_with("open-socket denied"), "{message}")
        }
        other => panic!("the guest opened a socket: {other:?}"),
    }
    assert!(
        listener.accept().is_err(),
        "a connection reached the host listener"
    );
}

#[tokio::test]
async fn a_log_flood_is_captured_up_to_the_limit() {
    let inv = invocable(HOSTILE, limits(Limits::MAX_FUEL, 16 << 20, 60_000), &[]);
    let outcome = call(&inv, mqtt("log-flood", "1")).await;
    assert_eq!(outcome.status, Status::Ok, "{:?}", outcome.status);
    assert_eq!(outcome.stdout.len(), OUTPUT_CAPTURE_BYTES);
    assert_eq!(outcome.stderr.len(), OUTPUT_CAPTURE_BYTES);
    let total = 1024 * 1024;
    assert_eq!(
        outcome.stdout_dropped_bytes,
        (total - OUTPUT_CAPTURE_BYTES) as u64
    );
    assert_eq!(
        outcome.stderr_dropped_bytes,
        (total - OUTPUT_CAPTURE_BYTES) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_concurrency_a_component_is_throttled() {
    let inv = Arc::new(invocable(
        HOSTILE,
        Limits {
            concurrency: 1,
            ..Limits::default()
        },
        &[],
    ));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let busy = {
        let inv = inv.clone();
        tokio::spawn(async move {
            let f = call(&inv, mqtt("sleep", "1000"));
            let _ = started_tx.send(());
            f.await
        })
    };
    started_rx.await.unwrap();
    // Wait until the first invocation holds the only slot.
    while inv.invocations() == 0 {
        tokio::task::yield_now().await;
    }
    let refused = inv
        .invoke(
            mqtt("ok", ""),
            InvocationContext::new("test"),
            Admission::Reject,
        )
        .await;
    assert_eq!(refused.status, Status::Throttled { concurrency: 1 });
    assert_eq!(busy.await.unwrap().status, Status::Ok);
    let after = inv
        .invoke(
            mqtt("ok", ""),
            InvocationContext::new("test"),
            Admission::Reject,
        )
        .await;
    assert_eq!(after.status, Status::Ok);
}

#[tokio::test]
async fn publishes_follow_the_acl_and_replies_need_a_response_grant() {
    use wasmgate_manifest::topic::TopicFilter;
    use wasmgate_runtime::invoke::{Event, MqttMessage};
    use wasmgate_test_artifacts::ECHO_MQTT;
    let denied = invocable(ECHO_MQTT, Limits::default(), &[]);
    let out = call(&denied, mqtt("dev/1/temp", "21.5")).await;
    assert_eq!(out.status.name(), "reject", "{out:?}");
    assert_eq!(out.publish_denied, 1);
    assert!(out.published.is_empty());

    let request = |response_topic: &str| {
        Event::Mqtt(MqttMessage {
            topic: "dev/1/temp".into(),
            payload: b"21.5".to_vec(),
            qos: 1,
            response_topic: Some(response_topic.into()),
            correlation_data: Some(vec![0, 1, 2, 255]),
            ..MqttMessage::default()
        })
    };
    // The publisher of the message chose the response topic: without
    // `allow.mqtt_response` the guest cannot reply there.
    let out = call(&denied, request("replies/42")).await;
    assert_eq!(out.status.name(), "reject", "{out:?}");
    assert!(
        format!("{:?}", out.status).contains("allow.mqtt_response"),
        "{out:?}"
    );
    assert_eq!(out.publish_denied, 1);

    let replying = invocable(ECHO_MQTT, Limits::default(), &[])
        .with_response_acl(vec![TopicFilter::parse("replies/+").unwrap()]);
    let out = call(&replying, request("replies/42")).await;
    assert_eq!(out.status, Status::Ok, "{out:?}");
    assert_eq!(out.published.len(), 1);
    assert_eq!(out.published[0].topic, "replies/42");
    assert_eq!(out.published[0].correlation_data, Some(vec![0, 1, 2, 255]));
    assert_eq!(out.published[0].payload, b"21.5");
    // A response topic outside the grant (a device's command topic).
    let out = call(&replying, request("devices/9/command")).await;
    assert_eq!(out.status.name(), "reject", "{out:?}");
    assert!(out.published.is_empty());

    // A reply on the response topic is never retained.
    let hostile = invocable(HOSTILE, Limits::default(), &[])
        .with_response_acl(vec![TopicFilter::parse("#").unwrap()]);
    let mut retained = request("replies/42");
    if let Event::Mqtt(m) = &mut retained {
        m.topic = "reply-retained".into();
    }
    let out = call(&hostile, retained).await;
    assert_eq!(out.status.name(), "reject", "{out:?}");
    assert!(
        format!("{:?}", out.status).contains("cannot be retained"),
        "{out:?}"
    );
    assert!(out.published.is_empty());

    let allowed = invocable(ECHO_MQTT, Limits::default(), &["dev/+/temp/reply"]);
    let out = call(&allowed, mqtt("dev/1/temp", "21.5")).await;
    assert_eq!(out.status, Status::Ok, "{out:?}");
    assert_eq!(out.published[0].topic, "dev/1/temp/reply");

    // A publish over the host's 1 MiB − 1 KiB is refused to the guest
    // (`unavailable`, which echo-mqtt turns into a retry); just under it
    // goes through.
    let limit = wasmgate_runtime::invoke::MAX_PUBLISH_SIZE as usize;
    let topic = "dev/1/temp";
    let reply_topic_len = "dev/1/temp/reply".len();
    let big = "x".repeat(limit - reply_topic_len + 1);
    let out = call(&allowed, mqtt(topic, &big)).await;
    assert_eq!(out.status.name(), "retry", "{:?}", out.status);
    assert!(out.published.is_empty());
    let fits = "x".repeat(limit - reply_topic_len);
    let out = call(&allowed, mqtt(topic, &fits)).await;
    assert_eq!(out.status, Status::Ok, "{:?}", out.status);
    assert_eq!(out.published[0].payload.len(), fits.len());
}

/// A guest that publishes 1 MB messages in a loop gets `unavailable` once
/// its invocation's publish budget is spent; the host holds no more than
/// the budget, and the held bytes count against the memory cap.
#[tokio::test]
async fn publishes_are_bounded_per_invocation_and_count_against_memory() {
    let flood = |limits: Limits| async move {
        // Not a test of the deadline: 200 MB of payloads built in the guest
        // take seconds on a loaded machine.
        let limits = Limits {
            timeout: Duration::from_secs(60),
            ..limits
        };
        let inv = invocable(HOSTILE, limits, &["flood/#"]);
        tokio::time::timeout(HANG_GUARD, call(&inv, mqtt("publish-flood", "200")))
            .await
            .expect("publish-flood hung")
    };
    // The default budget, 4 MiB: four messages of 1,000,000 bytes.
    let out = flood(Limits::default()).await;
    // Not `{out:?}`: it holds megabytes of payload.
    assert_eq!(out.status, Status::Ok, "{:?}\n{}", out.status, out.stdout);
    assert_eq!(out.published.len(), 4);
    assert!(out.stdout.contains("ok=4 refused=196"), "{}", out.stdout);
    assert!(
        out.stdout.contains("limits.publish_bytes"),
        "{}",
        out.stdout
    );

    let out = flood(Limits {
        publishes: 2,
        ..Limits::default()
    })
    .await;
    assert_eq!(out.published.len(), 2);
    assert!(out.stdout.contains("ok=2 refused=198"), "{}", out.stdout);
    assert!(out.stdout.contains("limits.publishes"), "{}", out.stdout);

    // A large byte budget under a small memory cap: the held publishes and
    // the guest's memory together stay under the cap.
    let memory = 8 << 20;
    let out = flood(Limits {
        memory,
        publish_bytes: Limits::MAX_PUBLISH_BYTES,
        ..Limits::default()
    })
    .await;
    let held: u64 = out.published.iter().map(|m| m.size()).sum();
    assert!(held < memory, "{held} bytes held");
    assert!(out.memory_peak_bytes <= memory, "{}", out.memory_peak_bytes);
    match out.status.name() {
        "ok" => assert!(out.stdout.contains("memory limit"), "{}", out.stdout),
        "memory_limit" => {}
        other => panic!("unexpected outcome {other}: {}", out.stdout),
    }
}
