//! The bounds a server or `lrtune run` puts on a job, the byte sizes they are given in, and
//! the machine-memory default: a leaf that the spec (which checks a job against the limits)
//! and the configuration both read, importing nothing of the crate.

use serde::{Deserialize, Serialize};

/// Bounds enforced before any work starts, so one request cannot occupy a worker for hours
/// or exhaust memory. The server makes them configurable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_range_steps: usize,
    /// Candidates x seeds x epochs of the sweep.
    pub max_sweep_epochs: usize,
    pub max_plan_epochs: usize,
    pub max_parameters: usize,
    pub max_samples: usize,
    /// Estimated peak bytes of one job (see `admission`).
    pub max_job_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_range_steps: 5_000,
            max_sweep_epochs: 200,
            max_plan_epochs: 10_000,
            max_parameters: 20_000_000,
            max_samples: 1_000_000,
            max_job_memory: default_job_memory(),
        }
    }
}

/// Bytes in the largest binary unit that keeps the number at or above 1.
pub fn bytes_label(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A byte count as given on the command line: a number with an optional unit (`512MiB`,
/// `4GiB`, `2G`, `1000000`); K, M, G and T are binary, as for memory.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| {
        format!("{text:?} is not a size: give bytes, or a number with KiB, MiB, GiB or TiB")
    })?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use KiB, MiB, GiB or TiB"
            ))
        }
    };
    let bytes = number * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a usable size"));
    }
    Ok(bytes as u64)
}

/// A quarter of the machine's memory (`MemTotal` in /proc/meminfo), 4 GiB where that cannot
/// be read: one job may not take the memory the server and other jobs need.
pub fn default_job_memory() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    total.map_or(4 << 30, |bytes| bytes / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
        assert_eq!(bytes_label(3 << 29), "1.5 GiB");
        assert_eq!(bytes_label(100), "100 bytes");
    }
}
