//! Shared helpers: the binary, a shared runtime, invocables with given limits.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::LazyLock;
use wasmgate_manifest::limits::Limits;
use wasmgate_manifest::topic::TopicFilter;
use wasmgate_runtime::component::Cache;
use wasmgate_runtime::deployment::Runtime;
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_runtime::invoke::{
    Admission, Event, Invocable, InvocationContext, MqttMessage, Outcome, TimerTick,
};

/// The repository root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Precompiled components shared by every test process and run.
pub(crate) fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("precompiled")
}

/// The `wasmgate` binary, run from the repository root with a shared cache.
pub(crate) fn wasmgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmgate"));
    cmd.current_dir(root())
        .env("WASMGATE_CACHE_DIR", cache_dir())
        .env_remove("WASMGATE_LOG")
        .env("NO_COLOR", "1");
    cmd
}

/// `GET path` from `http` (`host:port`) → (status, body without its
/// trailing newline); HTTP/1.0, so the body is not chunked.
pub(crate) fn http_get(http: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: edge\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let code = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim_end().to_string())
        .unwrap_or_default();
    (code, body)
}

/// A TCP port free on 127.0.0.1 a moment ago (for a process that must be
/// told its port before it starts, e.g. an embedded broker).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the binary and returns its output.
pub(crate) fn run(args: &[&str]) -> Output {
    wasmgate().args(args).output().expect("running wasmgate")
}

/// Parses `invoke`'s stdout.
/// A finished command's exit code and output, for assertion messages.
pub(crate) fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub(crate) fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One runtime for the in-process tests of this test binary.
pub(crate) static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    Runtime::new(EngineOptions::default(), Cache::new(Some(cache_dir()))).expect("runtime")
});

/// An invocable of a guest file with the given limits and publish grants.
pub(crate) fn invocable(path: &str, limits: Limits, publish: &[&str]) -> Invocable {
    let compiled = RUNTIME.compile(Path::new(path)).expect("guest compiles");
    let acl = publish
        .iter()
        .map(|f| TopicFilter::parse(f).unwrap())
        .collect();
    let name = Path::new(path)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    Invocable::new(
        name,
        compiled.pre,
        limits,
        acl,
        Vec::new(),
        RUNTIME.engine(),
    )
}

/// An MQTT event on `topic` with `payload`.
pub(crate) fn mqtt(topic: &str, payload: &str) -> Event {
    Event::Mqtt(MqttMessage {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        qos: 1,
        ..MqttMessage::default()
    })
}

/// A timer tick.
pub(crate) fn tick() -> Event {
    Event::Timer(TimerTick {
        schedule: "every 1s".into(),
        ..TimerTick::default()
    })
}

/// Invokes, waiting for a concurrency slot.
pub(crate) async fn call(inv: &Invocable, event: Event) -> Outcome {
    inv.invoke(event, InvocationContext::new("test"), Admission::Wait)
        .await
}

/// Whether the tests run as root (CI does): mounting a tmpfs needs it.
pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A small tmpfs mounted for the test's lifetime: a disk that fills up.
pub(crate) struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"2m"`) on the existing directory `at`.
    pub(crate) fn mount(at: &Path, size: &str) -> Self {
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "cannot mount a tmpfs at {}",
            at.display()
        );
        Self(at.to_path_buf())
    }

    /// Fills it up with a file at `name`; returns the file's path.
    pub(crate) fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write as _;
        let path = self.0.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A child process killed (SIGKILL) and reaped when dropped, so a test that
/// panics leaves no `wasmgate up` running after the test run.
pub(crate) struct KillOnDrop(pub(crate) std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `command`, to be killed when the guard drops.
pub(crate) fn spawn_guarded(command: &mut Command) -> KillOnDrop {
    KillOnDrop(command.spawn().expect("the process starts"))
}
