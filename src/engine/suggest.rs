//! Reading a range-test curve: the four suggestions (fastai's `valley`,
//! pytorch-lr-finder's `steepest`, `minimum` and `edge`) and the warnings a user needs when
//! the curve cannot be trusted. Pure functions on slices, shared by the engine, the API's
//! `/v1/analyze` and `lrtune analyze`.

use serde::{Deserialize, Serialize};

use super::spec::SpecError;

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Suggestions {
    pub valley: Option<f64>,
    pub steepest: Option<f64>,
    pub minimum: Option<f64>,
    pub edge: Option<f64>,
}

impl Suggestions {
    /// The one suggestion to build on: valley, else minimum / 10, else steepest. The auto
    /// candidates are placed around it, and a job without a sweep recommends it.
    pub fn preferred(&self) -> Option<f64> {
        self.valley.or(self.minimum).or(self.steepest)
    }

    fn present(&self) -> Vec<f64> {
        [self.valley, self.steepest, self.minimum]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// How the test ended, for the warnings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurveEnd {
    /// The number of points the test was configured for (N in the rules below).
    pub planned_steps: usize,
    pub stopped_early: bool,
}

/// The curve's points with their smoothed losses; non-finite points at the end are cut off
/// first (fastai drops from the first NaN on).
pub fn suggest(lrs: &[f64], smoothed: &[f64], planned_steps: usize) -> Suggestions {
    let finite = lrs
        .iter()
        .zip(smoothed)
        .position(|(lr, loss)| !lr.is_finite() || !loss.is_finite())
        .unwrap_or(lrs.len().min(smoothed.len()));
    let (lrs, smoothed) = (&lrs[..finite], &smoothed[..finite]);
    let (minimum, edge) = match minimum_and_edge(lrs, smoothed, planned_steps) {
        Some((minimum, edge)) => (Some(minimum), Some(edge)),
        None => (None, None),
    };
    Suggestions {
        valley: valley(lrs, smoothed, planned_steps),
        steepest: steepest(lrs, smoothed),
        minimum,
        edge,
    }
}

/// The window fastai reads: drop the first N/10 and the last 5 points.
fn fastai_window(len: usize, planned_steps: usize) -> Option<std::ops::Range<usize>> {
    let start = planned_steps / 10;
    let end = len.checked_sub(5)?;
    (start < end).then_some(start..end)
}

/// fastai's `valley`: the longest strictly decreasing run of the smoothed loss (as a
/// subsequence), then a point 1/3 + 1/6 of the way along it.
pub fn valley(lrs: &[f64], smoothed: &[f64], planned_steps: usize) -> Option<f64> {
    let window = fastai_window(lrs.len().min(smoothed.len()), planned_steps)?;
    let lrs = &lrs[window.clone()];
    let losses = &smoothed[window];
    let n = losses.len();
    let mut longest = vec![1usize; n];
    // Signed like fastai's Python: its start can be -1 when the whole window falls, and the
    // best start is recorded when the best end first moves, exactly as in fastai's loop.
    let (mut best_start, mut best_end) = (0isize, 0usize);
    for i in 1..n {
        for j in 0..i {
            if losses[i] < losses[j] && longest[i] < longest[j] + 1 {
                longest[i] = longest[j] + 1;
            }
            if longest[best_end] < longest[i] {
                best_end = i;
                best_start = best_end as isize - longest[best_end] as isize;
            }
        }
    }
    let length = best_end as isize - best_start;
    let index = best_start + length / 3 + length / 6;
    // Python indexing: -1 is the last element.
    let index = if index < 0 { index + n as isize } else { index };
    lrs.get(usize::try_from(index).ok()?).copied()
}

/// pytorch-lr-finder's suggestion: drop the first 10 and last 5 points, then the lr where
/// the loss falls fastest per step (numpy.gradient: central differences inside, one-sided
/// at the ends).
pub fn steepest(lrs: &[f64], smoothed: &[f64]) -> Option<f64> {
    let len = lrs.len().min(smoothed.len());
    let end = len.checked_sub(5)?;
    if end < 10 + 2 {
        return None;
    }
    let lrs = &lrs[10..end];
    let losses = &smoothed[10..end];
    let gradient = numpy_gradient(losses);
    Some(lrs[first_argmin(&gradient)?])
}

fn numpy_gradient(values: &[f64]) -> Vec<f64> {
    let n = values.len();
    (0..n)
        .map(|i| {
            if i == 0 {
                values[1] - values[0]
            } else if i == n - 1 {
                values[n - 1] - values[n - 2]
            } else {
                (values[i + 1] - values[i - 1]) / 2.0
            }
        })
        .collect()
}

/// The index of the lowest value, the first on ties (numpy's `argmin`).
fn first_argmin(values: &[f64]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .fold(None::<(usize, f64)>, |best, (index, &value)| match best {
            Some((_, lowest)) if lowest <= value => best,
            _ => Some((index, value)),
        })
        .map(|(index, _)| index)
}

/// `minimum` (lr at the lowest smoothed loss / 10, as fastai) and `edge` (that lr itself),
/// read in fastai's window, or on the whole curve when it is too short for the window.
fn minimum_and_edge(lrs: &[f64], smoothed: &[f64], planned_steps: usize) -> Option<(f64, f64)> {
    let len = lrs.len().min(smoothed.len());
    let window = fastai_window(len, planned_steps).unwrap_or(0..len);
    let edge = lrs[window.start + first_argmin(&smoothed[window])?];
    Some((edge / 10.0, edge))
}

/// The warnings a user needs, each saying what to change.
pub fn warnings(
    lrs: &[f64],
    smoothed: &[f64],
    suggestions: &Suggestions,
    end: CurveEnd,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let finite: Vec<f64> = smoothed
        .iter()
        .copied()
        .take_while(|loss| loss.is_finite())
        .collect();
    let early_limit = (end.planned_steps / 10).max(5);
    if end.stopped_early && finite.len() <= early_limit {
        warnings.push(format!(
            "diverged at once (after {} of {} steps): start_lr is too high, lower it",
            smoothed.len(),
            end.planned_steps
        ));
    }
    if let (Some(first), Some(lowest)) = (finite.first(), finite.iter().copied().reduce(f64::min)) {
        // A fall of under 1 % is noise, not a decreasing region.
        if lowest >= first * 0.99 {
            warnings.push(
                "no decreasing region: the loss never fell; check the data and model, or lower start_lr"
                    .to_string(),
            );
        }
    }
    if !end.stopped_early {
        warnings.push(
            "never diverged: the loss did not blow up by end_lr; raise end_lr to see where training breaks"
                .to_string(),
        );
        let tail = finite.len().saturating_sub(5);
        if let Some(lowest_index) = finite
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(index, _)| index)
        {
            if lowest_index >= tail && !finite.is_empty() {
                warnings.push(format!(
                    "loss still falling at end_lr ({:.3e}): raise end_lr",
                    lrs.get(finite.len() - 1).copied().unwrap_or(f64::NAN)
                ));
            }
        }
    }
    let present = suggestions.present();
    if let (Some(low), Some(high)) = (
        present.iter().copied().reduce(f64::min),
        present.iter().copied().reduce(f64::max),
    ) {
        if high > 10.0 * low {
            warnings.push(format!(
                "suggestions disagree by {:.0}x ({low:.2e} to {high:.2e}): the curve is noisy; raise range_test.steps or batch_size",
                high / low
            ));
        }
    }
    if suggestions.valley.is_none() {
        warnings.push(format!(
            "too few points for the valley rule ({} finite of {} planned): raise range_test.steps or end_lr",
            finite.len(),
            end.planned_steps
        ));
    }
    warnings
}

/// The bias-corrected exponential moving average fastai smooths with.
#[derive(Debug, Clone)]
pub struct Smoother {
    beta: f64,
    average: f64,
    count: i32,
}

impl Smoother {
    pub fn new(beta: f64) -> Self {
        Self {
            beta,
            average: 0.0,
            count: 0,
        }
    }

    pub fn push(&mut self, loss: f64) -> f64 {
        self.average = self.beta * self.average + (1.0 - self.beta) * loss;
        self.count += 1;
        self.average / (1.0 - self.beta.powi(self.count))
    }
}

/// Smooths a whole raw curve (for curves measured elsewhere).
pub fn smooth(losses: &[f64], beta: f64) -> Vec<f64> {
    let mut smoother = Smoother::new(beta);
    losses.iter().map(|&loss| smoother.push(loss)).collect()
}

/// Suggestions and warnings for a curve measured elsewhere (`POST /v1/analyze`,
/// `lrtune analyze`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub suggestions: Suggestions,
    pub warnings: Vec<String>,
    pub smoothed: Vec<f64>,
    /// True when the curve ends in a blow-up (a non-finite loss, or a smoothed loss above
    /// 4x its best), as a range test that stopped on divergence does.
    pub diverged: bool,
}

/// The fewest points the suggestion rules can read (fastai drops the first tenth and the
/// last 5; pytorch-lr-finder the first 10 and the last 5).
pub const MIN_ANALYZE_POINTS: usize = 20;

/// Reads a measured curve: learning rates rising, losses finite except possibly at the end
/// (where a diverged test stops). Errors name the field and index.
pub fn analyze(lrs: &[f64], losses: &[f64], smoothing: f64) -> Result<Analysis, SpecError> {
    if lrs.len() != losses.len() {
        return Err(SpecError::new(
            "loss",
            format!(
                "has {} values but lr has {}: give one loss per learning rate",
                losses.len(),
                lrs.len()
            ),
        ));
    }
    if lrs.len() < MIN_ANALYZE_POINTS {
        return Err(SpecError::new(
            "lr",
            format!(
                "has {} points; the suggestion rules need at least {MIN_ANALYZE_POINTS}",
                lrs.len()
            ),
        ));
    }
    if !(0.0..1.0).contains(&smoothing) {
        return Err(SpecError::new(
            "smoothing",
            format!("must be in [0, 1), got {smoothing}"),
        ));
    }
    for (index, lr) in lrs.iter().enumerate() {
        if !(lr.is_finite() && *lr > 0.0) {
            return Err(SpecError::new(
                format!("lr[{index}]"),
                format!("must be positive and finite, got {lr}"),
            ));
        }
        if index > 0 && *lr <= lrs[index - 1] {
            return Err(SpecError::new(
                format!("lr[{index}]"),
                format!("must be above the previous value ({}): learning rates rise through a range test", lrs[index - 1]),
            ));
        }
    }
    let finite = losses
        .iter()
        .position(|loss| !loss.is_finite())
        .unwrap_or(losses.len());
    if let Some(index) = losses[finite..].iter().position(|loss| loss.is_finite()) {
        return Err(SpecError::new(
            format!("loss[{}]", finite + index),
            format!("follows a non-finite loss at loss[{finite}]: only a curve's last points may be non-finite"),
        ));
    }
    if finite < MIN_ANALYZE_POINTS {
        return Err(SpecError::new(
            format!("loss[{finite}]"),
            format!(
                "is non-finite after only {finite} points; the rules need {MIN_ANALYZE_POINTS}"
            ),
        ));
    }
    let smoothed = smooth(&losses[..finite], smoothing);
    let best = smoothed.iter().copied().fold(f64::INFINITY, f64::min);
    let diverged = finite < losses.len() || smoothed.last().is_some_and(|last| *last > 4.0 * best);
    let suggestions = suggest(&lrs[..finite], &smoothed, lrs.len());
    let warnings = warnings(
        &lrs[..finite],
        &smoothed,
        &suggestions,
        CurveEnd {
            planned_steps: lrs.len(),
            stopped_early: diverged,
        },
    );
    Ok(Analysis {
        suggestions,
        warnings,
        smoothed,
        diverged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp_lrs(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| 1e-5 * (1e5f64).powf(i as f64 / (n - 1) as f64))
            .collect()
    }

    /// A range-test-like curve: a sigmoid fall, a wiggle, an exponential blow-up at the
    /// end, smoothed as fastai does.
    fn synthetic_curve(n: usize, shift: f64, wiggle: f64) -> (Vec<f64>, Vec<f64>) {
        let lrs: Vec<f64> = (0..n)
            .map(|i| 1e-7 * 1e8f64.powf(i as f64 / (n - 1) as f64))
            .collect();
        let scale = n as f64;
        let raw: Vec<f64> = (0..n)
            .map(|i| {
                let i = i as f64;
                2.3 - 1.5 / (1.0 + (-(i - shift) / (scale / 15.0)).exp())
                    + wiggle * (1.7 * i).sin()
                    + ((i - 0.9 * scale) / (scale / 25.0)).exp()
            })
            .collect();
        (lrs, smooth(&raw, 0.98))
    }

    /// Indices from a line-by-line Python transcription of fastai's `valley` and of
    /// pytorch-lr-finder's `np.gradient(...).argmin()` run on the same curves.
    #[test]
    fn valley_and_steepest_match_the_reference_implementations() {
        for (n, shift, wiggle, valley_index, steepest_index) in [
            (100, 40.0, 0.05, 48, 50),
            (100, 55.0, 0.2, 57, 65),
            (200, 90.0, 0.1, 102, 106),
            (60, 20.0, 0.02, 27, 25),
        ] {
            let (lrs, smoothed) = synthetic_curve(n, shift, wiggle);
            assert_eq!(
                valley(&lrs, &smoothed, n),
                Some(lrs[valley_index]),
                "valley, n={n} shift={shift}"
            );
            assert_eq!(
                steepest(&lrs, &smoothed),
                Some(lrs[steepest_index]),
                "steepest, n={n} shift={shift}"
            );
        }
    }

    #[test]
    fn valley_of_a_window_that_falls_throughout_uses_fastais_start_of_minus_one() {
        // 30 planned points, window 3..25 (22 points) all strictly falling: lds[21] = 22,
        // start = 21 - 22 = -1, length 22, index = -1 + 7 + 3 = 9 -> file index 12.
        let lrs: Vec<f64> = (0..30).map(|i| i as f64).collect();
        let losses: Vec<f64> = (0..30).map(|i| 100.0 - i as f64).collect();
        assert_eq!(valley(&lrs, &losses, 30), Some(12.0));
    }

    #[test]
    fn steepest_finds_the_sharpest_drop_after_the_skipped_points() {
        let lrs: Vec<f64> = (0..40).map(|i| i as f64).collect();
        let mut losses = vec![10.0; 40];
        for (index, loss) in losses.iter_mut().enumerate() {
            *loss = 10.0 - index as f64 * 0.1;
        }
        // Drops of 1.0 after index 20 and 0.5 after 21: numpy.gradient is -0.6 at 20,
        // -0.85 at 21 and -0.35 at 22, so the steepest point is lr 21.
        for loss in losses.iter_mut().skip(21) {
            *loss -= 1.0;
        }
        for loss in losses.iter_mut().skip(22) {
            *loss -= 0.5;
        }
        assert_eq!(steepest(&lrs, &losses), Some(21.0));
        // A steeper drop inside the first 10 points is ignored.
        losses[3] = -100.0;
        assert_eq!(steepest(&lrs, &losses), Some(21.0));
    }

    #[test]
    fn minimum_is_a_tenth_of_the_edge_at_the_lowest_loss() {
        let lrs = exp_lrs(100);
        let losses: Vec<f64> = (0..100).map(|i| ((i as f64) - 70.0).powi(2)).collect();
        let s = suggest(&lrs, &losses, 100);
        assert_eq!(s.edge, Some(lrs[70]));
        assert!((s.minimum.unwrap() - lrs[70] / 10.0).abs() < 1e-18);
    }

    #[test]
    fn smoothing_is_fastais_bias_corrected_average() {
        let smoothed = smooth(&[2.0, 4.0], 0.98);
        assert!((smoothed[0] - 2.0).abs() < 1e-12);
        // avg = 0.98*0.04 + 0.02*4 = 0.1192; / (1 - 0.98^2) = 0.0396 -> 3.01010...
        assert!((smoothed[1] - 0.1192 / 0.0396).abs() < 1e-12);
    }

    #[test]
    fn a_flat_curve_warns_that_the_loss_never_fell() {
        let lrs = exp_lrs(100);
        let losses = vec![2.3; 100];
        let s = suggest(&lrs, &losses, 100);
        let w = warnings(
            &lrs,
            &losses,
            &s,
            CurveEnd {
                planned_steps: 100,
                stopped_early: false,
            },
        );
        assert!(
            w.iter().any(|w| w.starts_with("no decreasing region")),
            "{w:?}"
        );
        assert!(w.iter().any(|w| w.starts_with("never diverged")), "{w:?}");
    }

    #[test]
    fn an_immediate_divergence_says_start_lr_is_too_high() {
        let lrs = exp_lrs(100);
        let losses = vec![2.3, 5.0, 50.0];
        let s = suggest(&lrs[..3], &losses, 100);
        let w = warnings(
            &lrs[..3],
            &losses,
            &s,
            CurveEnd {
                planned_steps: 100,
                stopped_early: true,
            },
        );
        assert!(w.iter().any(|w| w.starts_with("diverged at once")), "{w:?}");
        assert!(!w.iter().any(|w| w.starts_with("never diverged")), "{w:?}");
    }

    #[test]
    fn disagreeing_suggestions_are_flagged() {
        let s = Suggestions {
            valley: Some(1e-4),
            steepest: Some(1e-2),
            minimum: Some(3e-3),
            edge: Some(3e-2),
        };
        let lrs = exp_lrs(100);
        let losses: Vec<f64> = (0..100).map(|i| 3.0 - i as f64 * 0.01).collect();
        let w = warnings(
            &lrs,
            &losses,
            &s,
            CurveEnd {
                planned_steps: 100,
                stopped_early: true,
            },
        );
        assert!(
            w.iter()
                .any(|w| w.starts_with("suggestions disagree by 100x")),
            "{w:?}"
        );
    }

    #[test]
    fn analyze_names_the_bad_index() {
        let lrs = exp_lrs(30);
        let mut losses = vec![1.0; 30];
        losses[4] = f64::NAN;
        let error = analyze(&lrs, &losses, 0.98).unwrap_err();
        assert_eq!(error.field, "loss[5]");
        let mut falling = lrs.clone();
        falling[7] = falling[6];
        let error = analyze(&falling, &vec![1.0; 30], 0.98).unwrap_err();
        assert_eq!(error.field, "lr[7]");
        let error = analyze(&lrs[..10], &losses[..10], 0.98).unwrap_err();
        assert_eq!(error.field, "lr");
    }

    #[test]
    fn analyze_reads_a_measured_curve_that_ends_in_a_blow_up() {
        let (lrs, _) = synthetic_curve(100, 40.0, 0.05);
        let raw: Vec<f64> = (0..100)
            .map(|i| {
                let i = i as f64;
                2.3 - 1.5 / (1.0 + (-(i - 40.0) / (100.0 / 15.0)).exp())
                    + 0.05 * (1.7 * i).sin()
                    + ((i - 90.0) / 4.0).exp()
            })
            .chain([f64::INFINITY])
            .collect();
        let mut lrs = lrs;
        lrs.push(lrs[99] * 1.2);
        let analysis = analyze(&lrs, &raw, 0.98).unwrap();
        assert!(analysis.diverged);
        assert_eq!(analysis.smoothed.len(), 100);
        // Same smoothed curve as the reference test, so the same valley index (48).
        assert_eq!(analysis.suggestions.valley, Some(lrs[48]));
    }
}
