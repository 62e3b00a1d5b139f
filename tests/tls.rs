//! HTTPS: `serve --tls-self-signed` answers with the certificate it generated, which a client
//! that trusts that certificate accepts and one that does not refuses.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn self_signed_https_is_trusted_by_a_client_that_has_the_certificate() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tls-{}", std::process::id()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args([
                "serve",
                "--engine",
                "echo",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--tls-self-signed",
                "--tls-dir",
            ])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let cert_path = dir.join("cert.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cert_path.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cert = reqwest::Certificate::from_pem(
        &std::fs::read(&cert_path).expect("the certificate was written"),
    )
    .unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(cert)
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/health");
    let mut response = None;
    while response.is_none() && Instant::now() < deadline {
        match trusting.get(&url).send().await {
            Ok(r) => response = Some(r),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let response = response.expect("the server never answered over HTTPS");
    assert_eq!(response.status(), 200);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("\"engine\":\"echo\"")
    );
    let untrusting = reqwest::Client::new();
    let err = untrusting
        .get(&url)
        .send()
        .await
        .expect_err("an unknown certificate must be refused");
    assert!(
        err.is_connect() || err.to_string().contains("certificate"),
        "{err}"
    );
    // Plain HTTP on the same port is not served.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/health"))
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
    );
}
