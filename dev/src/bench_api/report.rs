//! The report: latency per phase and per request, answers by status, the verdict.

use super::*;

#[derive(Serialize)]
pub(super) struct Report {
    pub(super) cpu: String,
    pub(super) cores: usize,
    pub(super) rate: f64,
    pub(super) seconds: f64,
    pub(super) connections: usize,
    pub(super) max_p99_ms: f64,
    /// Both phases' p99 under `max_p99_ms`, every response 2xx.
    pub(super) passed: bool,
    pub(super) failures: Vec<String>,
    pub(super) phases: Phases,
}

#[derive(Serialize)]
pub(super) struct Phases {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) idle: Option<PhaseReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) training: Option<PhaseReport>,
    /// `--server`'s one phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) server: Option<PhaseReport>,
}

impl Phases {
    pub(super) fn named(&self) -> Vec<(&'static str, &PhaseReport)> {
        [
            ("idle", &self.idle),
            ("training", &self.training),
            ("server", &self.server),
        ]
        .into_iter()
        .filter_map(|(name, phase)| phase.as_ref().map(|phase| (name, phase)))
        .collect()
    }
}

#[derive(Serialize)]
pub(super) struct PhaseReport {
    pub(super) requests: usize,
    /// `non_2xx` + `failed`.
    pub(super) errors: usize,
    pub(super) non_2xx: usize,
    /// No response (connection error, timeout).
    pub(super) failed: usize,
    /// Answers by status code (`200`, `503`, ...; `none` for no answer).
    pub(super) by_status: std::collections::BTreeMap<String, usize>,
    /// 503 answers without `Retry-After`.
    pub(super) unavailable_without_retry_after: usize,
    pub(super) first_error: Option<String>,
    /// Responses per second, from the start of the timeline to the last response.
    pub(super) achieved_rate: f64,
    /// Client connections to the server opened for this phase (Linux: from /proc/net/tcp).
    pub(super) open_connections: Option<usize>,
    pub(super) latency_ms: Latency,
    pub(super) send_lag_ms: Latency,
    pub(super) by_request: Vec<KindReport>,
    /// The training phase only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) training: Option<TrainingReport>,
}

#[derive(Serialize)]
pub(super) struct TrainingReport {
    pub(super) jobs: Vec<String>,
    /// Share of the checks during the phase that found a job running.
    pub(super) running_fraction: f64,
}

#[derive(Serialize)]
pub(super) struct KindReport {
    pub(super) request: &'static str,
    pub(super) requests: usize,
    pub(super) errors: usize,
    pub(super) latency_ms: Latency,
}

#[derive(Serialize)]
pub(super) struct Latency {
    pub(super) p50: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
    pub(super) p99_9: f64,
    pub(super) max: f64,
}

impl Latency {
    pub(super) fn of(durations: impl Iterator<Item = Duration>) -> Latency {
        let mut ms: Vec<f64> = durations.map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Latency {
            p50: round3(percentile(&ms, 50.0)),
            p90: round3(percentile(&ms, 90.0)),
            p99: round3(percentile(&ms, 99.0)),
            p99_9: round3(percentile(&ms, 99.9)),
            max: round3(ms.last().copied().unwrap_or(0.0)),
        }
    }
}

/// Nearest rank: the smallest value with at least `p` % of the values at or below it.
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // The epsilon keeps 99.9 % of 1000 at rank 999 despite 99.9 not being exact in binary.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn round3(value: f64) -> f64 {
    (value * 1e3).round() / 1e3
}

impl PhaseReport {
    pub(super) fn of(samples: &[Sample], open_connections: Option<usize>) -> PhaseReport {
        let non_2xx = samples
            .iter()
            .filter(|s| matches!(s.response, Response::Status { .. }))
            .count();
        let mut by_status = std::collections::BTreeMap::new();
        for sample in samples {
            let status = match &sample.response {
                Response::Ok => "2xx".to_string(),
                Response::Status { status, .. } => status.to_string(),
                Response::Failed(_) => "none".to_string(),
            };
            *by_status.entry(status).or_insert(0) += 1;
        }
        let unavailable_without_retry_after = samples
            .iter()
            .filter(|s| {
                matches!(
                    s.response,
                    Response::Status {
                        status: 503,
                        retry_after: false,
                        ..
                    }
                )
            })
            .count();
        let failed = samples
            .iter()
            .filter(|s| matches!(s.response, Response::Failed(_)))
            .count();
        let first_error = samples
            .iter()
            .filter(|s| !matches!(s.response, Response::Ok))
            .min_by_key(|s| s.done_at)
            .map(|s| match &s.response {
                Response::Status { text, .. } | Response::Failed(text) => text.clone(),
                Response::Ok => String::new(),
            });
        let wall = samples.iter().map(|s| s.done_at).max().unwrap_or_default();
        let by_request = RequestKind::ALL
            .iter()
            .map(|&kind| {
                let of_kind: Vec<&Sample> = samples.iter().filter(|s| s.kind == kind).collect();
                KindReport {
                    request: kind.label(),
                    requests: of_kind.len(),
                    errors: of_kind
                        .iter()
                        .filter(|s| !matches!(s.response, Response::Ok))
                        .count(),
                    latency_ms: Latency::of(of_kind.iter().map(|s| s.latency)),
                }
            })
            .collect();
        PhaseReport {
            requests: samples.len(),
            errors: non_2xx + failed,
            non_2xx,
            failed,
            by_status,
            unavailable_without_retry_after,
            first_error,
            achieved_rate: if wall.is_zero() {
                0.0
            } else {
                round3(samples.len() as f64 / wall.as_secs_f64())
            },
            open_connections,
            latency_ms: Latency::of(samples.iter().map(|s| s.latency)),
            send_lag_ms: Latency::of(samples.iter().map(|s| s.send_lag)),
            by_request,
            training: None,
        }
    }
}

pub(super) fn failures(phases: &Phases, max_p99_ms: f64) -> Vec<String> {
    let mut failures = Vec::new();
    if let Some(phase) = &phases.server {
        let others = phase
            .by_status
            .iter()
            .filter(|(status, _)| !matches!(status.as_str(), "2xx" | "503"));
        for (status, count) in others {
            failures.push(format!("server: {count} answers {status}"));
        }
        if phase.unavailable_without_retry_after > 0 {
            failures.push(format!(
                "server: {} answers 503 without Retry-After",
                phase.unavailable_without_retry_after
            ));
        }
        return failures;
    }
    for (name, phase) in phases.named() {
        if phase.latency_ms.p99 >= max_p99_ms {
            failures.push(format!(
                "{name}: p99 {:.2} ms is not under {max_p99_ms} ms",
                phase.latency_ms.p99
            ));
        }
        if phase.errors > 0 {
            failures.push(format!(
                "{name}: {} of {} requests failed (first: {})",
                phase.errors,
                phase.requests,
                phase.first_error.as_deref().unwrap_or("?")
            ));
        }
    }
    failures
}

impl Report {
    pub(super) fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "CPU: {} ({} cores); {}/s for {} s per phase over {} connections",
            self.cpu, self.cores, self.rate, self.seconds, self.connections
        );
        let _ = writeln!(
            out,
            "{:<9} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
            "phase", "sent", "errors", "rate/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let phases = self.phases.named();
        for &(name, phase) in &phases {
            let latency = &phase.latency_ms;
            let _ = writeln!(
                out,
                "{name:<9} {:>6} {:>6} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8.2}",
                phase.requests,
                phase.errors,
                phase.achieved_rate,
                latency.p50,
                latency.p90,
                latency.p99,
                latency.p99_9,
                latency.max
            );
        }
        for &(name, phase) in &phases {
            let by_status: Vec<String> = phase
                .by_status
                .iter()
                .map(|(status, count)| format!("{status} x{count}"))
                .collect();
            let _ = writeln!(out, "{name} answers: {}", by_status.join(", "));
            let by_request: Vec<String> = phase
                .by_request
                .iter()
                .map(|kind| format!("{} {:.2}", kind.request, kind.latency_ms.p99))
                .collect();
            let _ = writeln!(out, "{name} p99 ms by request: {}", by_request.join(", "));
            let connections = phase
                .open_connections
                .map_or_else(|| "?".to_string(), |n| n.to_string());
            let _ = writeln!(
                out,
                "{name}: {connections} connections open; send lag p99 {:.2} ms (the bench's own lateness)",
                phase.send_lag_ms.p99
            );
        }
        let training = self
            .phases
            .training
            .as_ref()
            .and_then(|t| t.training.as_ref());
        if let Some(training) = training {
            let _ = writeln!(
                out,
                "training: job {} running for {:.0} % of the phase",
                training.jobs.join(", then "),
                training.running_fraction * 100.0
            );
        }
        if self.passed && self.phases.server.is_some() {
            let _ = writeln!(out, "ok: every answer 2xx or 503 with Retry-After");
        } else if self.passed {
            let _ = writeln!(
                out,
                "ok: p99 under {} ms in both phases, every response 2xx",
                self.max_p99_ms
            );
        } else {
            let _ = writeln!(out, "failed: {}", self.failures.join("; "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 500.0);
        assert_eq!(percentile(&values, 99.0), 990.0);
        assert_eq!(percentile(&values, 99.9), 999.0);
        assert_eq!(percentile(&values, 100.0), 1000.0);
        assert_eq!(percentile(&[7.0], 50.0), 7.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }

    #[test]
    pub(super) fn the_request_mix_has_equal_shares_of_each_kind() {
        let mix = request_mix(2000);
        for kind in RequestKind::ALL {
            assert_eq!(mix.iter().filter(|&&k| k == kind).count(), 500, "{kind:?}");
        }
        assert_eq!(mix, request_mix(2000));
    }

    #[test]
    pub(super) fn the_analyze_curve_is_one_the_suggestion_rules_accept() {
        let body: Value = serde_json::from_str(&analyze_body()).unwrap();
        let lr: Vec<f64> = serde_json::from_value(body["lr"].clone()).unwrap();
        let loss: Vec<f64> = serde_json::from_value(body["loss"].clone()).unwrap();
        assert_eq!((lr.len(), loss.len()), (100, 100));
        assert!(lrtune::engine::suggest::analyze(&lr, &loss, 0.98).is_ok());
    }
}
