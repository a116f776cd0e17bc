//! The CLI tests' own checks: files they write and read, `$GITHUB_OUTPUT` lines and SVG plots.
//! Running the binary and starting a server are the shared harness's (tests/support).

use std::path::Path;

/// Writes a file in the test's folder and gives its path as a string.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a test file");
    path_string(&path)
}

pub fn path_string(path: &Path) -> String {
    path.to_str().expect("a UTF-8 temporary path").to_string()
}

pub fn read_json(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}\n{text}"))
}

/// The `key=value` lines of a `$GITHUB_OUTPUT` file.
pub fn github_outputs(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

/// Checks that an SVG plot exists and draws a curve and the given labels.
pub fn assert_plot(path: &str, labels: &[&str]) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    assert!(
        svg.starts_with("<svg"),
        "{path} is not an SVG: {}",
        &svg[..svg.len().min(200)]
    );
    let longest_line = svg
        .split("<polyline")
        .skip(1)
        .map(|element| {
            let points = element
                .split("points=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("");
            points.split_whitespace().count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        longest_line >= 20,
        "{path} has no curve of 20 or more points (longest polyline: {longest_line})"
    );
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|element| element.split_once('>'))
        .filter_map(|(_, rest)| rest.split("</text>").next())
        .map(str::trim)
        .collect();
    for label in labels {
        assert!(
            texts.iter().any(|text| text.starts_with(label)),
            "{path} has no text starting with {label:?}; its texts: {texts:?}"
        );
    }
}
