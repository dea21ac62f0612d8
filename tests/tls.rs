//! The control plane over TLS (docs/SECURITY.md): a throw-away CA and certificates made at run
//! time, a coordinator serving `https://`, workers and `coordinator status` that trust that CA.
//! A client that does not trust the coordinator's certificate stops with a message saying so,
//! and with mutual TLS a client without a certificate signed by the job's CA is refused.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, job, spawn_worker_with, tiny_data, wait, InProcessCoordinator};
use mtl_coordinator::{JobConfig, JobOutcome};
use mtl_proto::v1::MetricsKind;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// One test at a time: each runs training processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// PEM files of a CA, a server and a client certificate it signed, and an unrelated CA.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn pki(dir: &Path) -> Pki {
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let job_ca = ca("job CA");
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &job_ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(vec!["worker".into()]);
    Pki {
        ca: write("ca.pem", job_ca.pem()),
        server_cert: write("server.pem", server_cert),
        server_key: write("server.key", server_key),
        client_cert: write("client.pem", client_cert),
        client_key: write("client.key", client_key),
        other_ca: write("other-ca.pem", ca("someone else's CA").pem()),
    }
}

/// A 2-worker job served over TLS with `pki` (mutual TLS when `mutual`).
fn tls_job(dir: &Path, pki: &Pki, mutual: bool) -> JobConfig {
    let mut cfg = job(&format!(
        "{}[rendezvous]\nmin_workers = 2\n[train]\nsteps = 4\nbatch_size = 4\nlr = 0.05\nlog_every_steps = 2\n",
        tiny_data(&dir.join("data"), 32)
    ));
    cfg.server.tls_cert = pki.server_cert.display().to_string();
    cfg.server.tls_key = pki.server_key.display().to_string();
    if mutual {
        cfg.server.tls_client_ca = pki.ca.display().to_string();
    }
    cfg
}

/// The coordinator's `https://` URL.
fn https(coord: &InProcessCoordinator) -> String {
    coord.url.replacen("http://", "https://", 1)
}

/// `coordinator status` against `url` with `args`.
fn status(url: &str, token: &str, args: &[&Path]) -> Output {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["status", "--addr", url]).env("MTL_JOB_TOKEN", token);
    for pair in args.chunks(2) {
        cmd.arg(pair[0]).arg(pair[1]);
    }
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_over_mutual_tls_and_clients_without_a_certificate_are_refused() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let coord = InProcessCoordinator::start(tls_job(dir.path(), &pki, true)).await;
    let url = https(&coord);
    let flag = |s: &'static str| Path::new(s);

    // While the job waits for its workers: a client with the CA and a certificate is served...
    let out = status(
        &url,
        &coord.token,
        &[
            flag("--ca"),
            &pki.ca,
            flag("--client-cert"),
            &pki.client_cert,
            flag("--client-key"),
            &pki.client_key,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("job test:"), "{stdout}");
    // ...one without a client certificate is not, nor one that speaks plain HTTP/2.
    let out = status(&url, &coord.token, &[flag("--ca"), &pki.ca]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("pass --client-cert and --client-key"), "{stderr}");
    let stranger = spawn_worker_with(&url, &coord.token, "stranger", &["--ca", pki.ca.to_str().unwrap()]);
    let (code, stderr) = wait(stranger).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("coordinator rejected Register") && stderr.contains("pass --client-cert"),
        "{stderr}"
    );
    let out = status(&coord.url, &coord.token, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));

    let tls_args = [
        "--ca",
        pki.ca.to_str().unwrap(),
        "--client-cert",
        pki.client_cert.to_str().unwrap(),
        "--client-key",
        pki.client_key.to_str().unwrap(),
    ];
    let workers: Vec<_> =
        (0..2).map(|i| spawn_worker_with(&url, &coord.token, &format!("w{i}"), &tls_args)).collect();
    let report = coord.report().await;
    for (i, w) in workers.into_iter().enumerate() {
        let (code, stderr) = wait(w).await;
        assert_eq!(code, Some(0), "worker {i}:\n{stderr}");
    }
    assert_eq!(report.outcome, JobOutcome::Finished);
    let train = report.status.history.iter().filter(|p| p.kind == MetricsKind::Train as i32);
    assert_eq!(train.map(|p| p.step).collect::<Vec<_>>(), [2, 4], "rank 0 reports every log step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_certificate_stops_with_a_clear_error() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let coord = InProcessCoordinator::start(tls_job(dir.path(), &pki, false)).await;
    let url = https(&coord);

    let worker = spawn_worker_with(&url, &coord.token, "w0", &["--ca", pki.other_ca.to_str().unwrap()]);
    let (code, stderr) = wait(worker).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot connect to the coordinator at {url}")), "{stderr}");
    assert!(stderr.contains("certificate is not trusted; pass the CA that signed it with --ca"), "{stderr}");

    let out = status(&url, &coord.token, &[Path::new("--ca"), &pki.other_ca]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not trusted"), "{stderr}");
    // With the right CA the same command works: the refusal was the certificate's.
    assert!(status(&url, &coord.token, &[Path::new("--ca"), &pki.ca]).status.success());
    let report = coord.stop().await;
    assert_eq!(report.outcome, JobOutcome::Interrupted);
}

#[test]
fn local_workers_reach_a_mutual_tls_coordinator_with_the_ca_from_the_environment() {
    // `serve --local-workers`: the workers connect to https://127.0.0.1 and take the CA and
    // their certificate from the environment they inherit, never from argv.
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let mut cfg = tls_job(dir.path(), &pki, true);
    cfg.job.token = mtl_job::JobToken::default();
    let file = dir.path().join("job.toml");
    std::fs::write(&file, cfg.to_toml()).unwrap();
    let out = Command::new(bin("coordinator"))
        .args(["serve", "--config", file.to_str().unwrap(), "--local-workers", "2", "--local-device", "cpu"])
        .env_remove("MTL_JOB_TOKEN")
        .env("MTL_CA", &pki.ca)
        .env("MTL_CLIENT_CERT", &pki.client_cert)
        .env("MTL_CLIENT_KEY", &pki.client_key)
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("coordinator serving over mutual TLS"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("local-1"), "{stderr}");
}
