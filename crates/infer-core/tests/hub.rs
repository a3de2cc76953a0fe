//! The real hf-hub path: a local HTTP server speaking the Hub's file routes (`HF_ENDPOINT`), a fresh
//! HF cache (`HF_HOME`), then the same model again with `HF_HUB_OFFLINE=1` from the filled cache.
//! One test function: it sets process-wide environment variables.

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use infer_core::loader::{resolve, ModelFiles};
use infer_core::LoadOptions;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "test-org/tiny-llama";

/// Serves `tests/fixtures/tiny-llama` as the Hub repo `test-org/tiny-llama` (revision `main`).
fn serve(downloads: Arc<AtomicUsize>) -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", server.server_addr().to_ip().unwrap());
    let dir = common::fixture("tiny-llama");
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let url = req.url().to_string();
            let range = req.headers().iter().find(|h| h.field.equiv("Range")).map(|h| h.value.to_string());
            let hdr = |k: &str, v: &str| tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap();
            if url == format!("/api/models/{REPO}/revision/main") {
                let files: Vec<String> =
                    std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
                let siblings: Vec<_> = files.iter().map(|f| serde_json::json!({ "rfilename": f })).collect();
                let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
                let _ = req.respond(tiny_http::Response::from_string(body).with_header(hdr("Content-Type", "application/json")));
                continue;
            }
            let prefix = format!("/{REPO}/resolve/main/");
            let Some(file) = url.strip_prefix(&prefix).filter(|f| !f.contains("..")) else {
                let _ = req.respond(tiny_http::Response::empty(404));
                continue;
            };
            let Ok(data) = std::fs::read(dir.join(file)) else {
                let _ = req.respond(tiny_http::Response::empty(404));
                continue;
            };
            let start: usize = range
                .clone()
                .and_then(|r| r.strip_prefix("bytes=").and_then(|r| r.split('-').next()).and_then(|s| s.parse().ok()))
                .unwrap_or(0);
            let end = match range.clone().as_deref() {
                Some("bytes=0-0") => 1,
                _ => {
                    downloads.fetch_add(1, Ordering::SeqCst);
                    data.len()
                }
            };
            let body = data[start.min(data.len())..end.min(data.len())].to_vec();
            let resp = tiny_http::Response::from_data(body)
                .with_status_code(206)
                .with_header(hdr("ETag", &format!("\"etag-{file}-{}\"", data.len())))
                .with_header(hdr("X-Repo-Commit", COMMIT))
                .with_header(hdr("Content-Range", &format!("bytes {start}-{}/{}", end.saturating_sub(1), data.len())));
            let _ = req.respond(resp);
        }
    });
    addr
}

#[test]
fn hub_download_then_offline_cache() {
    let home = std::env::temp_dir().join(format!("infer-hub-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let downloads = Arc::new(AtomicUsize::new(0));
    let endpoint = serve(downloads.clone());
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_HUB_CACHE");

    // Online: files are downloaded into the standard cache layout.
    let files = resolve(REPO, &LoadOptions::default()).unwrap();
    let ModelFiles::Hf { config, weights, tokenizer, .. } = &files else { panic!("expected an HF model") };
    let snapshot = home.join("hub/models--test-org--tiny-llama/snapshots").join(COMMIT);
    assert_eq!(config, &snapshot.join("config.json"));
    assert_eq!(weights, &vec![snapshot.join("model.safetensors")]);
    assert!(tokenizer.exists());
    let mut got = Vec::new();
    std::fs::File::open(&weights[0]).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got, std::fs::read(common::fixture("tiny-llama/model.safetensors")).unwrap(), "downloaded bytes are the served bytes");
    assert_eq!(std::fs::read_to_string(home.join("hub/models--test-org--tiny-llama/refs/main")).unwrap(), COMMIT);
    let n = downloads.load(Ordering::SeqCst);
    assert!(n >= 3, "config, weights and tokenizer were downloaded ({n})");

    // The loaded model generates.
    let model = infer_core::load(REPO, LoadOptions::default()).unwrap();
    assert_eq!(model.config().num_hidden_layers, 2);
    assert_eq!(downloads.load(Ordering::SeqCst), n, "second load comes from the cache");

    // Offline: served from the cache only; an unknown repo says what to do.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let offline = resolve(REPO, &LoadOptions::default()).unwrap();
    let ModelFiles::Hf { weights: w2, .. } = offline else { panic!("expected an HF model") };
    assert_eq!(w2, *weights);
    let err = resolve("test-org/not-cached", &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("not in the HF cache") && err.contains("HF_HUB_OFFLINE"), "{err}");

    // Online again, a repo the server does not know: a clear 404 message.
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::set_var("HF_ENDPOINT", &endpoint);
    let err = resolve("test-org/missing", &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("answered 404"), "{err}");
    let _ = std::fs::remove_dir_all(&home);
}
