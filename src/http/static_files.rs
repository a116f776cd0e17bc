//! The dashboard: the files of `static/`, compiled into the binary so `lrtune serve` works from
//! any directory. `/` is the job list, `/jobs/{id}` one job (the page reads the id from its
//! location). With `--static-dir`, a file present in that folder is served instead of the
//! built-in copy, so the dashboard can be edited without rebuilding.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};

/// One file of the dashboard, by its path under `static/`.
struct Asset {
    path: &'static str,
    body: &'static [u8],
}

macro_rules! assets {
    ($($path:literal),* $(,)?) => {
        &[$(Asset {
            path: $path,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/static/", $path)),
        }),*]
    };
}

/// Every file under `static/` (a unit test checks that none is missing).
const ASSETS: &[Asset] = assets![
    "favicon.svg",
    "index.html",
    "job.html",
    "css/app.css",
    "js/api.js",
    "js/charts.js",
    "js/format.js",
    "js/job.js",
    "js/jobs.js",
    "js/submit.js",
    "vendor/uplot/LICENSE",
    "vendor/uplot/uPlot.iife.min.js",
    "vendor/uplot/uPlot.min.css",
];

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
    let path = uri.path().trim_start_matches('/');
    match find(path) {
        Some(asset) => serve(&state, asset.path, &headers).await,
        None => ApiError::NotFound(format!("page {}", uri.path())).into_response(),
    }
}

fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|asset| asset.path == path)
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
    let digest = Sha256::digest(body);
    let hex: String = digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("\"{hex}\"")
}

/// ETags of the built-in files, computed once.
fn builtin_etag(path: &'static str) -> &'static str {
    static ETAGS: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
    let etags = ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|asset| (asset.path, etag_of(asset.body)))
            .collect()
    });
    etags.get(path).map_or("", String::as_str)
}

async fn serve(state: &AppState, path: &'static str, request: &HeaderMap) -> Response {
    let Some(asset) = find(path) else {
        return ApiError::NotFound(format!("page /{path}")).into_response();
    };
    // Only names from the fixed list above are looked up on disk: no path from the request
    // reaches the file system.
    let from_disk = match &state.settings.static_dir {
        Some(overlay) if !overlay.as_os_str().is_empty() => {
            tokio::fs::read(overlay.join(asset.path)).await.ok()
        }
        _ => None,
    };
    let (body, etag) = match from_disk {
        Some(bytes) => {
            let etag = etag_of(&bytes);
            (axum::body::Body::from(bytes), etag)
        }
        None => (
            axum::body::Body::from(asset.body),
            builtin_etag(asset.path).to_string(),
        ),
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

    fn files_under(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("static/ is readable") {
            let entry = entry.expect("a directory entry");
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.path().is_dir() {
                files_under(&entry.path(), &format!("{name}/"), out);
            } else {
                out.push(name);
            }
        }
    }

    #[test]
    fn every_file_under_static_is_built_in_and_nothing_else() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("static");
        let mut on_disk = Vec::new();
        files_under(&root, "", &mut on_disk);
        on_disk.sort();
        let mut built_in: Vec<String> = ASSETS.iter().map(|a| a.path.to_string()).collect();
        built_in.sort();
        assert_eq!(
            on_disk, built_in,
            "update ASSETS in src/http/static_files.rs"
        );
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
        for asset in ASSETS {
            let ext = Path::new(asset.path).extension().and_then(|e| e.to_str());
            if matches!(ext, Some("html" | "js" | "css")) {
                assert_ne!(content_type(asset.path), "text/plain; charset=utf-8");
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
        assert_eq!(
            builtin_etag("index.html"),
            etag_of(find("index.html").unwrap().body)
        );
    }
}
