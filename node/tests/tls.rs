//! Issue 20 §1: HTTPS on the client API, the cluster admin and the dashboard (`server.tls_*`),
//! plain HTTP refused there, a certificate rotated in place taken on SIGHUP without a restart,
//! and the node's own clients (`stemedb cluster`, `bench`, `backup create`) over HTTPS with
//! `--ca`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start_line_url, NodeProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GETs `path` over TLS trusting `ca`; returns the status line and the server's certificate.
async fn https_get(addr: &str, ca: &Path, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).map_err(std::io::Error::other)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?.to_owned();
    let mut tls = connector.connect(name, stream).await?;
    let served = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    tls.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.or_else(|e| if answer.is_empty() { Err(e) } else { Ok(0) })?;
    Ok((answer.lines().next().unwrap_or_default().to_string(), served))
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect()
}

/// A node whose HTTP ports speak HTTPS with a certificate for 127.0.0.1 from a test CA in `dir`:
/// the process, its client API URL, the CA's directory and the certificate's files.
async fn https_node(dir: &Path) -> (NodeProcess, String, std::path::PathBuf, stemedb::tls::Written) {
    let ca_dir = dir.join("ca");
    stemedb::tls::create_ca(&ca_dir, "test CA", 30).expect("ca");
    let web =
        stemedb::tls::create_node(&ca_dir, &dir.join("live"), "web", &["127.0.0.1".into()], 30, false).expect("cert");
    let file = dir.join("stemedb.toml");
    let (cert, key) = (web.cert.display().to_string(), web.key.display().to_string());
    std::fs::write(&file, format!("[server]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n")).expect("config");
    let config_arg = file.to_string_lossy().to_string();
    let mut process = NodeProcess::spawn_with_args(&dir.join("data"), 1, &["--config", &config_arg], &[]);
    let url = process.wait_listening(Duration::from_secs(60)).await;
    assert!(url.starts_with("https://"), "{url}");
    (process, url, ca_dir, web)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_both_apis_refuses_plain_http_and_takes_a_rotated_certificate_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (process, url, ca_dir, first) = https_node(dir.path()).await;
    let addr = url.trim_start_matches("https://").to_string();
    let ca = ca_dir.join("ca.pem");
    let deadline = Instant::now() + Duration::from_secs(60);
    let served_first = loop {
        match https_get(&addr, &ca, "/health").await {
            Ok((status, cert)) if status.contains("200") => break cert,
            other => {
                assert!(Instant::now() < deadline, "never healthy over HTTPS: {other:?}\n{}", process.output());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    plain.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "plain HTTP was served");

    // Rotate in place: new files at the same paths, then SIGHUP.
    let second = stemedb::tls::create_node(&ca_dir, &dir.path().join("next"), "web", &["127.0.0.1".into()], 30, false)
        .expect("cert");
    std::fs::copy(&second.cert, &first.cert).expect("copy cert");
    std::fs::copy(&second.key, &first.key).expect("copy key");
    // SAFETY: kill(2) with a child's pid has no memory-safety preconditions.
    unsafe { libc::kill(process.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, served) = https_get(&addr, &ca, "/health").await.expect("https after the reload");
        assert!(status.contains("200"), "{status}");
        if served != served_first {
            break;
        }
        assert!(Instant::now() < deadline, "the rotated certificate was never served\n{}", process.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken file on reload keeps the served certificate.
    std::fs::write(&first.key, "not a key").expect("write");
    process.reload_until("HTTP certificate not reloaded").await;
    let (status, _) = https_get(&addr, &ca, "/health").await.expect("https still");
    assert!(status.contains("200"), "{status}");
}

#[tokio::test]
async fn a_node_with_a_missing_certificate_refuses_to_start_and_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("stemedb.toml");
    std::fs::write(
        &file,
        "[server]\ntls_cert_file = \"/nonexistent/web.pem\"\ntls_key_file = \"/nonexistent/web-key.pem\"\n",
    )
    .expect("config");
    let config_arg = file.to_string_lossy().to_string();
    let mut process = NodeProcess::spawn_with_args(&dir.path().join("data"), 1, &["--config", &config_arg], &[]);
    let (status, output) = process.wait_exit(Duration::from_secs(60)).await.expect("it exits");
    assert!(!status.success());
    assert!(output.contains("/nonexistent/web.pem"), "{output}");
}

/// Runs the `stemedb` binary with `args`; (success, stdout and stderr).
async fn stemedb(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let output =
            std::process::Command::new(env!("CARGO_BIN_EXE_stemedb")).args(&args).output().expect("run stemedb");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_operator_commands_speak_https_with_a_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (process, api, ca_dir, _) = https_node(dir.path()).await;
    let ca = ca_dir.join("ca.pem");
    let ca_arg = ca.display().to_string();
    let output = process.output();
    let admin = start_line_url(&output, "cluster admin").expect("the admin URL");
    let dashboard = start_line_url(&output, "dashboard").expect("the dashboard URL");
    assert!(admin.starts_with("https://") && dashboard.starts_with("https://"), "{output}");
    // The cluster status through `stemedb cluster` over HTTPS, once the node is up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, text) =
            stemedb(["cluster", "--admin", &admin, "--ca", &ca_arg, "status"].map(String::from).to_vec()).await;
        if ok && text.contains("healthy") {
            break;
        }
        assert!(Instant::now() < deadline, "stemedb cluster status over HTTPS: {text}\n{}", process.output());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Without the CA, the node's certificate is not trusted.
    let (ok, text) = stemedb(["cluster", "--admin", &admin, "status"].map(String::from).to_vec()).await;
    assert!(!ok, "a certificate of an unknown CA was trusted: {text}");
    // The dashboard over HTTPS.
    let (status, _) = https_get(dashboard.trim_start_matches("https://"), &ca, "/session").await.expect("https");
    assert!(status.contains("200"), "{status}");
    // `stemedb bench` over HTTPS: its load connections and its set-up client.
    let (ok, text) = stemedb(
        ["bench", "--url", &api, "--ca", &ca_arg, "--writers", "2", "--duration", "1", "--json"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(ok, "{text}");
    let start = text.find('{').expect("a JSON report");
    let report: serde_json::Value =
        serde_json::Deserializer::from_str(&text[start..]).into_iter().next().expect("JSON").expect("JSON");
    let writes =
        report["results"].as_array().and_then(|r| r.iter().find(|s| s["name"] == "write")).expect("writes").clone();
    assert!(
        writes["ops"].as_u64().unwrap_or(0) > 0 && writes["errors"].as_object().is_none_or(|e| e.is_empty()),
        "{writes}"
    );
    let (ok, text) =
        stemedb(["bench", "--url", &api, "--writers", "1", "--duration", "1"].map(String::from).to_vec()).await;
    assert!(!ok && text.contains("--ca"), "https:// without --ca: {text}");
    // `stemedb backup create` over HTTPS.
    let backups = dir.path().join("backups").display().to_string();
    let (ok, text) =
        stemedb(["backup", "create", "--node", &api, "--ca", &ca_arg, "--to", &backups].map(String::from).to_vec())
            .await;
    assert!(ok, "{text}");
    // A refusal names the node's status and error code.
    let (ok, text) = stemedb(
        ["backup", "create", "--node", &api, "--ca", &ca_arg, "--to", "ftp://elsewhere"].map(String::from).to_vec(),
    )
    .await;
    assert!(!ok && text.contains("backup_destination_invalid"), "{text}");
}
