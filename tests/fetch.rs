//! `duplex fetch` against a local stand-in for the Hugging Face Hub (HF_ENDPOINT; no network):
//! the files land in the standard cache where `serve` finds them, and a gated repository's
//! refusal is explained.

use axum::Router;
use axum::extract::Path as UrlPath;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

/// The bytes of one repository file; `voices.tgz` is packed from the fixture's voices/.
fn file_bytes(name: &str) -> Option<Vec<u8>> {
    if name == "voices.tgz" {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        builder
            .append_dir_all("voices", tiny().join("voices"))
            .ok()?;
        return builder.into_inner().ok()?.finish().ok();
    }
    std::fs::read(tiny().join(name)).ok()
}

/// `GET /{org}/{repo}/resolve/{revision}/{file}` with the headers and ranges the hub serves.
async fn resolve(
    UrlPath((_org, _repo, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(bytes) = file_bytes(&file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let size = bytes.len();
    let (start, end) = headers
        .get(header::RANGE)
        .and_then(|r| {
            r.to_str()
                .ok()?
                .strip_prefix("bytes=")?
                .split_once('-')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
        })
        .map(|(a, b)| {
            (
                a.parse().unwrap_or(0),
                b.parse().unwrap_or(size - 1).min(size - 1),
            )
        })
        .unwrap_or((0, size - 1));
    let mut response = (StatusCode::PARTIAL_CONTENT, bytes[start..=end].to_vec()).into_response();
    let h = response.headers_mut();
    h.insert(
        "x-repo-commit",
        HeaderValue::from_static("0123456789abcdef"),
    );
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{file}-{size}\"")).unwrap(),
    );
    h.insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")).unwrap(),
    );
    response
}

async fn hub(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

fn fetch(endpoint: &str, hf_home: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["fetch", "--repo", "nvidia/personaplex-7b-v1"])
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", hf_home)
        .env_remove("HF_TOKEN")
        .output()
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fetch-{name}-{}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_land_in_the_cache_where_serve_finds_them() {
    let endpoint =
        hub(Router::new().route("/{org}/{repo}/resolve/{rev}/{*file}", get(resolve))).await;
    let hf_home = scratch("ok");
    let output = tokio::task::spawn_blocking({
        let hf_home = hf_home.clone();
        move || fetch(&endpoint, &hf_home)
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "fetch failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        dir.starts_with(hf_home.join("hub/models--nvidia--personaplex-7b-v1/snapshots")),
        "{}",
        dir.display()
    );
    let found = duplex::model::files::ModelFiles::in_dir(&dir).unwrap();
    assert!(
        found.voices.join("NATF0.pt").is_file(),
        "voices.tgz was unpacked"
    );
    assert_eq!(
        std::fs::read(&found.lm).unwrap(),
        std::fs::read(tiny().join("model.safetensors")).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_repository_explains_how_to_get_access() {
    let endpoint = hub(Router::new().fallback(|| async { StatusCode::UNAUTHORIZED })).await;
    let hf_home = scratch("gated");
    let output = tokio::task::spawn_blocking(move || fetch(&endpoint, &hf_home))
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("gated") && stderr.contains("HF_TOKEN") && stderr.contains("licence"),
        "{stderr}"
    );
}
