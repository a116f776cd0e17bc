//! The dashboard: the files of `static/`, compiled into the binary so `lrtune serve` works from
//! any directory. `/` is the job list, `/jobs/{id}` one job (the page reads the id from its
//! location). With `--static-dir`, a file present in that folder is served instead of the
//! built-in copy, so the dashboard can be edited without rebuilding.

use std::borrow::Cow;
use std::path::Path;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rust_embed::RustEmbed;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};

/// Every file under `static/`, by its path there. `debug-embed`: debug builds embed them too,
/// so that the tests serve what a release serves.
#[derive(RustEmbed)]
#[folder = "static/"]
struct Dashboard;

/// The pages only load their own files and talk only to this server.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index_page))
        .route("/jobs/{id}", get(job_page))
        .fallback(file)
}

async fn index_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    serve(&state, "index.html", &headers).await
}

async fn job_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    serve(&state, "job.html", &headers).await
}

/// Any other path: a dashboard file by its path under `static/`, or a 404.
async fn file(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return ApiError::NotFound(format!("{method} {}", uri.path())).into_response();
    }
    serve(&state, uri.path().trim_start_matches('/'), &headers).await
}

/// The content type, by extension; every file of `static/` has one of these.
fn content_type(path: &str) -> &'static str {
    match Path::new(path).extension().and_then(|ext| ext.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "text/plain; charset=utf-8",
    }
}

fn etag_of(body: &[u8]) -> String {
    etag_of_digest(&Sha256::digest(body))
}

/// The first 8 bytes of a SHA-256, quoted.
fn etag_of_digest(digest: &[u8]) -> String {
    let hex: String = digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("\"{hex}\"")
}

async fn serve(state: &AppState, path: &str, request: &HeaderMap) -> Response {
    let Some(asset) = Dashboard::get(path) else {
        return ApiError::NotFound(format!("page /{path}")).into_response();
    };
    // Only the names of built-in files are looked up on disk: no other path from the request
    // reaches the file system.
    let from_disk = match &state.settings.static_dir {
        Some(overlay) if !overlay.as_os_str().is_empty() => {
            tokio::fs::read(overlay.join(path)).await.ok()
        }
        _ => None,
    };
    let (body, etag) = match from_disk {
        Some(bytes) => {
            let etag = etag_of(&bytes);
            (axum::body::Body::from(bytes), etag)
        }
        None => {
            let etag = etag_of_digest(&asset.metadata.sha256_hash());
            let body = match asset.data {
                Cow::Borrowed(bytes) => axum::body::Body::from(bytes),
                Cow::Owned(bytes) => axum::body::Body::from(bytes),
            };
            (body, etag)
        }
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    // The files keep their names from release to release (there is no build step to add a
    // hash), so browsers revalidate every time; the ETag makes that a cheap 304.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if path.ends_with(".html") {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
    }
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    let unchanged = request
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (StatusCode::OK, headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_and_their_files_are_built_in() {
        for path in [
            "index.html",
            "job.html",
            "js/api.js",
            "vendor/uplot/LICENSE",
        ] {
            assert!(Dashboard::get(path).is_some(), "{path}");
        }
        assert!(Dashboard::get("../Cargo.toml").is_none());
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("js/job.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("css/app.css"), "text/css; charset=utf-8");
        assert_eq!(
            content_type("vendor/uplot/LICENSE"),
            "text/plain; charset=utf-8"
        );
        for path in Dashboard::iter() {
            let ext = Path::new(path.as_ref())
                .extension()
                .and_then(|e| e.to_str());
            if matches!(ext, Some("html" | "js" | "css")) {
                assert_ne!(content_type(&path), "text/plain; charset=utf-8");
            }
        }
    }

    #[test]
    fn etags_are_quoted_and_change_with_the_content() {
        let a = etag_of(b"one");
        assert!(
            a.starts_with('"') && a.ends_with('"') && a.len() == 18,
            "{a}"
        );
        assert_ne!(a, etag_of(b"two"));
        let index = Dashboard::get("index.html").expect("index.html");
        assert_eq!(
            etag_of_digest(&index.metadata.sha256_hash()),
            etag_of(&index.data)
        );
    }
}
