//! The dashboard in a real headless Chromium against the real `lrtune serve`: the job list, a
//! job's page with its charts, the submit and upload forms, the token prompt, and no errors in
//! the browser console. Screenshots are left in `target/dashboard-screenshots/`.
//!
//! The browser tests are in `in_chromium`; the others ask the server for its files directly.

mod in_chromium;
mod server;
#[path = "../support/mod.rs"]
mod support;

use server::Server;

#[test]
fn the_dashboard_is_served_from_the_binary_with_types_and_cache_headers() {
    let server = Server::start(None);
    let cases = [
        (
            "/",
            "text/html; charset=utf-8",
            "<title>lrtune: jobs</title>",
        ),
        (
            "/jobs/job_anything",
            "text/html; charset=utf-8",
            "id=\"range-chart\"",
        ),
        ("/js/job.js", "text/javascript; charset=utf-8", "readEvents"),
        ("/css/app.css", "text/css; charset=utf-8", ".card"),
        (
            "/vendor/uplot/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
            "uPlot",
        ),
        ("/vendor/uplot/LICENSE", "text/plain; charset=utf-8", "MIT"),
    ];
    for (path, content_type, needle) in cases {
        let (status, headers, body) = server.request("GET", path, None);
        assert_eq!(status, 200, "{path}");
        let header = |name: &str| {
            headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
                .unwrap_or_default()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        assert!(String::from_utf8_lossy(&body).contains(needle), "{path}");
        let etag = header("etag");
        assert!(etag.starts_with('"'), "{path}: {etag}");
        let (status, _, body) =
            server.request_with("GET", path, None, &format!("If-None-Match: {etag}\r\n"));
        assert_eq!((status, body.len()), (304, 0), "{path} unchanged");
    }
    let (_, headers, _) = server.request("GET", "/", None);
    let policy = headers
        .iter()
        .find(|(name, _)| name == "content-security-policy")
        .map(|(_, value)| value.as_str());
    assert!(
        policy.is_some_and(|p| p.contains("default-src 'self'")),
        "{policy:?}"
    );
    let (status, _, _) = server.request("GET", "/nothing-here.js", None);
    assert_eq!(status, 404);
    let (status, _, _) = server.request("GET", "/../Cargo.toml", None);
    assert_eq!(status, 404);
    let (status, _, _) = server.request("GET", "/jobs/", None);
    assert_eq!(status, 404);
}

#[test]
fn with_static_dir_the_files_found_there_replace_the_built_in_ones() {
    let overlay = tempfile::tempdir().unwrap();
    std::fs::write(overlay.path().join("index.html"), "<p>edited</p>").unwrap();
    let folder = overlay.path().to_str().unwrap();
    let server = Server::start_with(None, &["--static-dir", folder]);
    let (status, _, body) = server.request("GET", "/", None);
    assert_eq!(
        (status, body.as_slice()),
        (200, b"<p>edited</p>".as_slice())
    );
    // Not in the folder: the built-in copy.
    let (status, _, body) = server.request("GET", "/js/api.js", None);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("readEvents"));
    // Only the dashboard's own file names are looked up there.
    std::fs::write(overlay.path().join("secret.txt"), "no").unwrap();
    let (status, _, _) = server.request("GET", "/secret.txt", None);
    assert_eq!(status, 404);
}
