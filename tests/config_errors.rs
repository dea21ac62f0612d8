//! The coordinator binary rejects bad job files before it binds its port.
mod common;

use std::io::Write;
use std::process::Command;

/// Runs `coordinator serve` on `body` while this test holds the port the coordinator would
/// bind: a config error must win (exit 2) over "address in use" (exit 1), which proves the
/// config is checked before any binding.
fn serve(body: &str) -> (Option<i32>, String) {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(body.as_bytes()).unwrap();
    let out = Command::new(common::bin("coordinator"))
        .args(["serve", "--config"])
        .arg(file.path())
        .args(["--listen", &addr])
        .output()
        .unwrap();
    drop(held);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn unknown_key_is_named() {
    let (code, stderr) = serve("[job]\nname = \"x\"\n[train]\nsteps = 1\nlearning_rate = 0.1\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("train.learning_rate"), "{stderr}");
}

#[test]
fn wrong_type_is_named() {
    let (code, stderr) = serve("[job]\nname = \"x\"\n[train]\nsteps = \"many\"\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("train.steps") && stderr.contains("many"), "{stderr}");
}

#[test]
fn missing_required_field_is_named() {
    let (code, stderr) = serve("[job]\nseed = 3\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("job.name"), "{stderr}");
}

#[test]
fn invalid_value_is_named() {
    let (code, stderr) = serve("[job]\nname = \"x\"\n[rendezvous]\nmin_workers = 0\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("rendezvous.min_workers"), "{stderr}");
}

#[test]
fn a_valid_file_gets_past_config_to_the_bind() {
    // The control case: with a valid file the coordinator reaches the bind and fails there.
    let (code, stderr) = serve("[job]\nname = \"x\"\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
}

#[test]
fn tls_needs_a_certificate_and_its_key() {
    let (code, stderr) = serve("[job]\nname = \"x\"\n[server]\ntls_cert = \"cert.pem\"\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("server.tls_key") && stderr.contains("must be set with server.tls_cert"),
        "{stderr}"
    );
}

#[test]
fn an_unreadable_tls_file_is_named_before_the_bind() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let (code, stderr) = serve(&format!(
        "[job]\nname = \"x\"\n[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        missing.display(),
        missing.display()
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&format!("server.tls_cert = {}", missing.display())), "{stderr}");

    // A file that exists but holds no certificate.
    let not_pem = dir.path().join("cert.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let (code, stderr) = serve(&format!(
        "[job]\nname = \"x\"\n[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        not_pem.display(),
        missing.display()
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("server.tls_cert") && stderr.contains("no PEM block"), "{stderr}");
}
