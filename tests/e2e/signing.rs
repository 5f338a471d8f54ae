//! Signed components: `keygen`, `sign`, `verify`, and `[gateway]
//! trusted_keys` / `require_signature` enforced wherever a manifest's
//! components load (`check`, `invoke`, `up`).

use crate::util::run;
use std::path::Path;
use std::process::Output;
use wasmgate_test_artifacts::ECHO_MQTT;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn keygen(dir: &Path, name: &str) -> String {
    let key = dir.join(name);
    let out = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    std::fs::read_to_string(dir.join(format!("{name}.pub")))
        .unwrap()
        .trim()
        .to_string()
}

fn sign(file: &Path, key: &Path) {
    let out = run(&[
        "sign",
        file.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

fn manifest(dir: &Path, gateway: &str) -> String {
    let path = dir.join("wasmgate.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nstate_dir = \".wasmgate\"\n{gateway}\n\n[component.echo]\nsource = \"echo.wasm\"\nallow = {{ mqtt_publish = [\"t/reply\"] }}\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// `check -f M`: (exit code, stderr).
fn check(manifest: &str) -> (Option<i32>, String) {
    let out = run(&["check", "-f", manifest]);
    (out.status.code(), stderr(&out))
}

#[test]
fn a_signed_component_loads_and_an_unsigned_tampered_or_foreign_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("echo.wasm");
    std::fs::copy(ECHO_MQTT, &wasm).unwrap();
    let trusted = keygen(dir.path(), "dev.key");
    keygen(dir.path(), "other.key");
    let m = manifest(
        dir.path(),
        &format!("trusted_keys = [\"{trusted}\"]\nrequire_signature = true"),
    );

    // Unsigned: refused, with the command that signs it.
    let (code, err) = check(&m);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("component.echo.source")
            && err.contains("no signature")
            && err.contains("wasmgate sign"),
        "{err}"
    );
    // The same refusal wherever the manifest's components load.
    for args in [
        vec!["invoke", "echo", "-f", &m, "--mqtt-topic", "t"],
        vec!["up", "-f", &m],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("no signature"), "{}", stderr(&out));
    }

    // Signed by the trusted key: loads, and runs.
    sign(&wasm, &dir.path().join("dev.key"));
    let out = run(&["check", "-f", &m]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("  signed by: {trusted}")),
        "{stdout}"
    );
    let out = run(&["invoke", "echo", "-f", &m, "--mqtt-topic", "t"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Changed after signing (its last byte): refused before it is compiled.
    let original = std::fs::read(&wasm).unwrap();
    let mut tampered = original.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    std::fs::write(&wasm, &tampered).unwrap();
    let (code, err) = check(&m);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not the file that was signed"), "{err}");

    // A forged signature file: the right digest, signed by another key
    // that claims to be the trusted one.
    std::fs::write(&wasm, &original).unwrap();
    let sig_path = dir.path().join("echo.wasm.sig");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sig_path).unwrap()).unwrap();
    sign(&wasm, &dir.path().join("other.key"));
    let mut forged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sig_path).unwrap()).unwrap();
    forged["key"] = good["key"].clone();
    std::fs::write(&sig_path, forged.to_string()).unwrap();
    let (code, err) = check(&m);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not verify"), "{err}");

    // Signed by a key the gateway does not trust: refused, naming it.
    sign(&wasm, &dir.path().join("other.key"));
    let (code, err) = check(&m);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("which is not a trusted key"), "{err}");

    // Without require_signature, an unsigned component loads, but a
    // signature that is there must still verify.
    let m = manifest(dir.path(), &format!("trusted_keys = [\"{trusted}\"]"));
    let (code, err) = check(&m);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("which is not a trusted key"), "{err}");
    std::fs::remove_file(&sig_path).unwrap();
    let (code, err) = check(&m);
    assert_eq!(code, Some(0), "{err}");

    // An oversized signature file is not read into memory.
    std::fs::write(&sig_path, vec![b' '; 1 << 20]).unwrap();
    let (code, err) = check(&m);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("larger than 4096 bytes"), "{err}");
}

#[test]
fn signing_settings_are_checked_with_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(ECHO_MQTT, dir.path().join("echo.wasm")).unwrap();
    let m = manifest(dir.path(), "require_signature = true");
    let (code, err) = check(&m);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("gateway.require_signature") && err.contains("trusted_keys"),
        "{err}"
    );
    let m = manifest(dir.path(), "trusted_keys = [\"ed25519:AAAA\"]");
    let (code, err) = check(&m);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("gateway.trusted_keys") && err.contains("not 32"),
        "{err}"
    );
}

#[test]
fn keygen_sign_and_verify_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    let public = keygen(dir.path(), "k.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the private key is the owner's only");
    // Never replaced.
    let out = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("never replaces a key"));

    let wasm = dir.path().join("echo.wasm");
    std::fs::copy(ECHO_MQTT, &wasm).unwrap();
    let verify = |key: &str| run(&["verify", wasm.to_str().unwrap(), "--key", key]);
    let out = verify(&public);
    assert_eq!(out.status.code(), Some(1), "unsigned: {}", stderr(&out));
    assert!(stderr(&out).contains("is not signed"), "{}", stderr(&out));

    sign(&wasm, &key);
    // The key itself, or its .pub file.
    for k in [public.as_str(), &format!("{}.pub", key.display())] {
        let out = verify(k);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("is signed by {public}")),
            "{stdout}"
        );
    }
    let other = keygen(dir.path(), "o.key");
    let out = verify(&other);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // A signature whose digest is not one: malformed, and its text is not
    // echoed back.
    let sig = dir.path().join("echo.wasm.sig");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sig).unwrap()).unwrap();
    v["sha256"] = "\u{1b}[2Jfake".into();
    std::fs::write(&sig, v.to_string()).unwrap();
    let out = verify(&public);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a wasmgate signature: sha256 is not 64 hex digits")
            && !stderr(&out).contains('\u{1b}'),
        "{}",
        stderr(&out)
    );
    // keygen refused to replace the key: it still signs for its .pub.
    sign(&wasm, &key);
    assert_eq!(verify(&public).status.code(), Some(0));
    let out = verify("ed25519:nope");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a public key"));
}

#[test]
fn up_runs_a_signed_component_and_logs_its_signer() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("tick.wasm");
    std::fs::copy(wasmgate_test_artifacts::TICK_TIMER, &wasm).unwrap();
    let trusted = keygen(dir.path(), "dev.key");
    sign(&wasm, &dir.path().join("dev.key"));
    let manifest = dir.path().join("wasmgate.toml");
    std::fs::write(
        &manifest,
        format!(
            "[gateway]\nstate_dir = \".wasmgate\"\ntrusted_keys = [\"{trusted}\"]\nrequire_signature = true\n\n\
             [component.tick]\nsource = \"tick.wasm\"\n\n[[trigger.timer]]\ncomponent = \"tick\"\nevery = \"1h\"\n"
        ),
    )
    .unwrap();
    let manifest = manifest.to_str().unwrap();
    let up = crate::examples::Up::spawn(
        crate::util::wasmgate().args(["up", "-f", manifest]),
        manifest,
    );
    up.wait_for(&["signature verified", "\"component\":\"tick\"", &trusted]);
    up.stop();
}
