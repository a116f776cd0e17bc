//! How good is a recommendation? For each problem a full grid search of the planned run
//! (13 OneCycle peaks a third of a decade apart, 3 seeds, every epoch of the plan) is the
//! ground truth; a `tune` job and the single range-test rules are scored on whether they land
//! in the grid's good band, how far they land from its best peak, and what the tune cost.
//! The learning-rate-free challengers (Prodigy, schedule-free AdamW and SGD) are scored beside
//! them: one planned run each at their libraries' defaults and a fresh seed, its final
//! validation loss against the grid's good band. A fresh-seed check trains the tune's
//! recommended peak again as planned, with seeds no one has seen, and scores its loss the
//! same way: a pick next to a good grid peak can still sit on a cliff where some seeds blow up.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use lrtune::engine::compare::run_compare;
use lrtune::engine::data::{self, Dataset, Targets};
use lrtune::engine::limits::Limits;
use lrtune::engine::rng::Rng;
use lrtune::engine::spec::{JobSpec, SpecError, ValidSpec};
use lrtune::engine::sweep::SweepCandidate;
use lrtune::engine::{load_local_data, run_job, EngineError, Event, LoadedData};

/// Peaks in every grid: four decades, a third of a decade apart.
pub const GRID_PEAKS: usize = 13;
/// Seeds per grid peak: enough to measure a run's seed noise, which the good band allows for.
pub const GRID_SEEDS: usize = 3;
/// The grid's seeds are the tune's seed plus this, so the tune is scored on runs it never saw
/// (other initial weights and batch orders; the data and its split are the same).
const GRID_SEED_OFFSET: u64 = 1000;
/// The challengers' seeds: fresh ones again, neither the tune's nor the grid's.
const CHALLENGER_SEED_OFFSET: u64 = 2000;
/// The fresh-seed check's seeds: fresh ones again, neither the tune's, the grid's nor the
/// challengers'.
const FRESH_SEED_OFFSET: u64 = 3000;
/// Planned runs of the tune's recommended peak in the fresh-seed check: as many as the grid
/// gives each peak, so the two losses are means of the same size.
pub const FRESH_SEEDS: usize = GRID_SEEDS;
/// The learning-rate-free recipes scored, untuned, one planned run each.
pub const CHALLENGERS: [&str; 3] = ["prodigy", "schedule_free_adamw", "schedule_free_sgd"];

const MNIST_CUT_STREAM: u64 = 0x4556_414c_4355_0001;
const LABEL_NOISE_STREAM: u64 = 0x4556_414c_4e4f_0002;

/// Where a problem's rows come from.
#[derive(Debug, Clone, Copy)]
pub enum ProblemData {
    /// What the spec's `data` names, loaded as `lrtune run` would.
    Spec,
    /// Rows the spec's `data` cannot express (a cut of MNIST, label noise, another
    /// generator), made from the evaluation seed. The spec's `data` is then a placeholder
    /// naming the builtin the rows are closest to; it is validated but never loaded.
    Custom(fn(u64) -> Dataset),
}

/// One problem of the evaluation: a tune spec, its data, and where its grid lies.
#[derive(Debug, Clone)]
pub struct Problem {
    pub name: &'static str,
    pub spec: &'static str,
    pub data: ProblemData,
    /// The grid's lowest peak is 10^(lowest_third / 3). Chosen so that the grid's best peak
    /// is inside the window, not at an edge (the report flags one that is).
    pub lowest_third: i32,
}

impl Problem {
    /// The grid's peak learning rates, lowest first.
    pub fn grid_peaks(&self) -> Vec<f64> {
        (0..GRID_PEAKS as i32)
            .map(|k| 10f64.powf(f64::from(self.lowest_third + k) / 3.0))
            .collect()
    }

    /// The rows for evaluation seed `seed`, split once into training and validation: the
    /// tune and the grid train and judge on the same split, as a user's tune and planned run
    /// would.
    fn loaded_data(&self, spec: &JobSpec) -> Result<LoadedData, EngineError> {
        let loaded = match self.data {
            ProblemData::Spec => load_local_data(spec)?,
            ProblemData::Custom(generate) => LoadedData {
                train: generate(spec.seed),
                validation: None,
                initial_weights: None,
            },
        };
        if loaded.validation.is_some() {
            return Ok(loaded);
        }
        let (train, validation) =
            data::train_validation_split(&loaded.train, spec.validation_fraction, spec.seed)?;
        Ok(LoadedData {
            train,
            validation: Some(validation),
            initial_weights: None,
        })
    }
}

/// The problems. The first five have plenty of data for their plan; the rest are the regimes
/// where judging candidates after a short sweep can go wrong (few rows and long plans, label
/// noise, a tiny regression), plus large data with short plans: 3 epochs of a wide MLP, and
/// the README's example, whose default budget cannot run two candidates to its end. Then the
/// cliff regimes, where the best peak sits just under the edge past which some seeds blow up,
/// so that a pick a third of a decade too high fails outright rather than by a little. Batches
/// and rows are small so that the whole evaluation runs in minutes on two cores.
pub fn problems() -> Vec<Problem> {
    vec![
        // Generated classification with a small MLP and SGD: the plain case.
        Problem {
            name: "spirals-mlp-sgd",
            spec: r#"{"data": {"builtin": "spirals", "samples": 2048}, "model": {"arch": "mlp", "hidden": [64, 64]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 32, "plan": {"epochs": 10}}"#,
            data: ProblemData::Spec,
            lowest_third: -9,
        },
        // Easy, nearly linearly separable clusters with Adam: a wide good band.
        Problem {
            name: "blobs-mlp-adam",
            spec: r#"{"data": {"builtin": "blobs", "samples": 4096}, "model": {"arch": "mlp", "hidden": [64]},
                      "optimizer": {"name": "adam"}, "batch_size": 64, "plan": {"epochs": 8}}"#,
            data: ProblemData::Spec,
            lowest_third: -12,
        },
        // Regression with plenty of rows and little noise.
        Problem {
            name: "sine-mlp-sgd",
            spec: r#"{"data": {"builtin": "sine", "samples": 2048}, "model": {"arch": "mlp", "hidden": [64, 64], "activation": "tanh"},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 32, "plan": {"epochs": 10}}"#,
            data: ProblemData::Spec,
            lowest_third: -9,
        },
        // Real images, 8,000 training rows, a short plan.
        Problem {
            name: "mnist-mlp-sgd",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [128]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 64, "plan": {"epochs": 5}}"#,
            data: ProblemData::Spec,
            lowest_third: -9,
        },
        // A convex model with AdamW: no overfitting to speak of.
        Problem {
            name: "mnist-linear-adamw",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "linear"},
                      "optimizer": {"name": "adamw"}, "batch_size": 128, "plan": {"epochs": 5}}"#,
            data: ProblemData::Spec,
            lowest_third: -13,
        },
        // The issue's case: 300 images, a wide MLP and a 30-epoch plan. A high peak that
        // looks best after two epochs memorises the 240 training rows long before thirty.
        Problem {
            name: "mnist300-mlp256-sgd",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [256, 256]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 16, "plan": {"epochs": 30}}"#,
            data: ProblemData::Custom(|seed| mnist_rows(300, seed)),
            lowest_third: -12,
        },
        // The same regime with AdamW and a narrower MLP: 500 images, a 20-epoch plan.
        Problem {
            name: "mnist500-mlp64-adamw",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [64, 64]},
                      "optimizer": {"name": "adamw"}, "batch_size": 16, "plan": {"epochs": 20}}"#,
            data: ProblemData::Custom(|seed| mnist_rows(500, seed)),
            lowest_third: -15,
        },
        // Label noise: 2,000 images of which 40 % carry a wrong label, in training and
        // validation alike. A long run at a high peak fits the wrong labels.
        Problem {
            name: "mnist-noisy-mlp64-sgd",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [64, 64]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 32, "plan": {"epochs": 15}}"#,
            data: ProblemData::Custom(|seed| with_label_noise(mnist_rows(2000, seed), 0.4, seed)),
            lowest_third: -12,
        },
        // Label noise on generated data with a model far larger than the problem: 500
        // points of the 16-dimensional blobs, 30 % of them relabelled, a 256x256 MLP.
        Problem {
            name: "blobs-noisy-mlp256-adamw",
            spec: r#"{"data": {"builtin": "blobs", "samples": 500}, "model": {"arch": "mlp", "hidden": [256, 256]},
                      "optimizer": {"name": "adamw"}, "batch_size": 16, "plan": {"epochs": 30}}"#,
            data: ProblemData::Custom(|seed| with_label_noise(data::blobs(500, seed), 0.3, seed)),
            lowest_third: -16,
        },
        // A tiny regression: 200 rows of Friedman #1 (five of ten features useless) with
        // noise half the signal's spread, 30 epochs of 10 steps each.
        Problem {
            name: "friedman200-mlp64-sgd",
            spec: r#"{"data": {"builtin": "sine", "samples": 200}, "model": {"arch": "mlp", "hidden": [64, 64]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 16, "plan": {"epochs": 30}}"#,
            data: ProblemData::Custom(|seed| data::friedman1(200, 0.5, seed)),
            lowest_third: -11,
        },
        // A large dataset with a short plan: all 8,000 training images for 3 epochs, of
        // which the default sweep runs 2. The short sweep is nearly the planned run here; it
        // is right and must stay so.
        Problem {
            name: "mnist-short-mlp256-adamw",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [256, 256]},
                      "optimizer": {"name": "adamw"}, "batch_size": 128, "plan": {"epochs": 3}}"#,
            data: ProblemData::Spec,
            lowest_third: -13,
        },
        // The README's example: all of `mnist10k`, a 10-epoch plan of 1,250 steps. The
        // default budget is twice the plan here, too little for two full runs, so the
        // candidates are judged at the longest horizon it allows.
        Problem {
            name: "mnist-example-mlp128x128-sgd",
            spec: include_str!("../../examples/mnist-mlp.json"),
            data: ProblemData::Spec,
            lowest_third: -9,
        },
        // Cliff: 180 images, of which 36 judge the run. A few confident mistakes move so
        // small a validation set's loss a long way, and one seed's blow-up ruins the mean.
        Problem {
            name: "cliff-mnist180-mlp64-sgd",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [64, 64]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 16, "plan": {"epochs": 10}}"#,
            data: ProblemData::Custom(|seed| mnist_rows(180, seed)),
            lowest_third: -12,
        },
        // The same cut with a wide MLP, whose larger steps reach the edge at a lower peak.
        Problem {
            name: "cliff-mnist180-mlp256-sgd",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [256, 256]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 16, "plan": {"epochs": 10}}"#,
            data: ProblemData::Custom(|seed| mnist_rows(180, seed)),
            lowest_third: -12,
        },
        // And with AdamW, whose step size does not shrink with the gradient near the edge.
        Problem {
            name: "cliff-mnist180-mlp256-adamw",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [256, 256]},
                      "optimizer": {"name": "adamw"}, "batch_size": 16, "plan": {"epochs": 10}}"#,
            data: ProblemData::Custom(|seed| mnist_rows(180, seed)),
            lowest_third: -15,
        },
        // Cliff: a sharp-edged regression. 4,096 rows of Friedman #1 with noise a tenth of the
        // signal's spread: the best peak is the highest that still converges, and a squared
        // error has no ceiling once a step overshoots.
        Problem {
            name: "cliff-friedman4096-mlp64-sgd",
            spec: r#"{"data": {"builtin": "sine", "samples": 4096}, "model": {"arch": "mlp", "hidden": [64, 64]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 32, "plan": {"epochs": 10}}"#,
            data: ProblemData::Custom(|seed| data::friedman1(4096, 0.1, seed)),
            lowest_third: -11,
        },
        Problem {
            name: "cliff-friedman4096-mlp256-sgd",
            spec: r#"{"data": {"builtin": "sine", "samples": 4096}, "model": {"arch": "mlp", "hidden": [256, 256]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 32, "plan": {"epochs": 10}}"#,
            data: ProblemData::Custom(|seed| data::friedman1(4096, 0.1, seed)),
            lowest_third: -11,
        },
        // Cliff: momentum 0.99 on a wide MLP, which multiplies the effective step by a
        // hundred. OneCycle's momentum cycling is off, or it would replace 0.99 with its
        // 0.85-0.95.
        Problem {
            name: "cliff-mnist2000-mlp256-sgd-m099",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [256, 256]},
                      "optimizer": {"name": "sgd", "momentum": 0.99}, "batch_size": 32, "plan": {"epochs": 8},
                      "sweep": {"schedule": {"cycle_momentum": false}}}"#,
            data: ProblemData::Custom(|seed| mnist_rows(2000, seed)),
            lowest_third: -13,
        },
        // Held out: added after the sweep's defaults were chosen, and never used to choose
        // them. Iris-sized blobs with a long plan.
        Problem {
            name: "holdout-blobs150-mlp64-sgd",
            spec: r#"{"data": {"builtin": "blobs", "samples": 150}, "model": {"arch": "mlp", "hidden": [64, 64]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 16, "plan": {"epochs": 20}}"#,
            data: ProblemData::Spec,
            lowest_third: -10,
        },
        // Noisy two-dimensional spirals (20 % of labels wrong) with a wide MLP and AdamW.
        Problem {
            name: "holdout-spirals600-noisy-mlp256-adamw",
            spec: r#"{"data": {"builtin": "spirals", "samples": 600}, "model": {"arch": "mlp", "hidden": [256, 256]},
                      "optimizer": {"name": "adamw"}, "batch_size": 32, "plan": {"epochs": 15}}"#,
            data: ProblemData::Custom(|seed| with_label_noise(data::spirals(600, seed), 0.2, seed)),
            lowest_third: -12,
        },
        // A small regression with AdamW and a long plan.
        Problem {
            name: "holdout-sine400-mlp64-adamw",
            spec: r#"{"data": {"builtin": "sine", "samples": 400}, "model": {"arch": "mlp", "hidden": [64, 64], "activation": "tanh"},
                      "optimizer": {"name": "adamw"}, "batch_size": 16, "plan": {"epochs": 20}}"#,
            data: ProblemData::Spec,
            lowest_third: -12,
        },
        // 1,500 images, a wide MLP, a short plan.
        Problem {
            name: "holdout-mnist1500-mlp256-adamw",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [256, 256]},
                      "optimizer": {"name": "adamw"}, "batch_size": 32, "plan": {"epochs": 5}}"#,
            data: ProblemData::Custom(|seed| mnist_rows(1500, seed)),
            lowest_third: -13,
        },
        // Held-out cliffs: added with the cliff problems, before the engine's new defaults
        // were chosen, and never used to choose them. 160 points of spirals, a fifth of
        // them relabelled, a [128, 128] MLP and constant momentum 0.95.
        Problem {
            name: "holdout-cliff-spirals160-noisy-mlp128-sgd-m095",
            spec: r#"{"data": {"builtin": "spirals", "samples": 160}, "model": {"arch": "mlp", "hidden": [128, 128]},
                      "optimizer": {"name": "sgd", "momentum": 0.95}, "batch_size": 16, "plan": {"epochs": 20},
                      "sweep": {"schedule": {"cycle_momentum": false}}}"#,
            data: ProblemData::Custom(|seed| with_label_noise(data::spirals(160, seed), 0.2, seed)),
            lowest_third: -10,
        },
        // A sharp-edged regression with tanh, which saturates rather than blows up at first.
        Problem {
            name: "holdout-cliff-friedman2048-tanh-mlp64-sgd",
            spec: r#"{"data": {"builtin": "sine", "samples": 2048}, "model": {"arch": "mlp", "hidden": [64, 64], "activation": "tanh"},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 32, "plan": {"epochs": 10}}"#,
            data: ProblemData::Custom(|seed| data::friedman1(2048, 0.1, seed)),
            lowest_third: -10,
        },
    ]
}

/// `rows` images of the embedded MNIST subset, a seeded choice kept in their original order.
fn mnist_rows(rows: usize, seed: u64) -> Dataset {
    let all = data::mnist10k();
    let mut chosen = Rng::derive(seed, MNIST_CUT_STREAM).permutation(all.rows());
    chosen.truncate(rows);
    chosen.sort_unstable();
    all.select(&chosen)
}

/// Gives round(fraction * rows) rows, chosen by the seed, a label drawn uniformly from the
/// other classes: exactly that share of the labels is wrong.
fn with_label_noise(mut data: Dataset, fraction: f64, seed: u64) -> Dataset {
    let Targets::Classes { labels, classes } = &mut data.targets else {
        return data;
    };
    if *classes < 2 {
        return data;
    }
    let mut rng = Rng::derive(seed, LABEL_NOISE_STREAM);
    let noisy = (fraction * labels.len() as f64).round() as usize;
    for row in rng.permutation(labels.len()).into_iter().take(noisy) {
        let other = rng.below(*classes - 1) as u32;
        labels[row] = if other >= labels[row] {
            other + 1
        } else {
            other
        };
    }
    data
}

/// Whether a learning rate lands in the grid's good band: the grid peak nearest to it (in
/// log space) is good.
fn lands_among(lr: Option<f64>, grid: &[GridPoint]) -> bool {
    let Some(lr) = lr else { return false };
    nearest_index(grid.iter().map(|p| p.peak_lr), lr).is_some_and(|index| grid[index].good)
}

/// The good band's allowance above the best mean loss: 5 % of it, or one standard deviation
/// of the best peak's loss across the grid seeds when that is larger. 5 % is the sweep's own
/// tolerance for one seed, a gap rarely worth a rerun; and where three seeds of the best
/// peak spread wider than that, a peak within the spread is one the grid itself cannot tell
/// from the best, so scoring it a miss would score seed noise.
fn good_tolerance(best_loss: f64, best_std: f64) -> f64 {
    (0.05 * best_loss.abs()).max(best_std)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridPoint {
    pub peak_lr: f64,
    /// Mean over the grid seeds (infinite when any seed diverged).
    pub val_loss: f64,
    pub val_loss_std: f64,
    /// In the good band (see `good_tolerance`).
    pub good: bool,
}

/// A learning rate picked by the tune or a range-test rule, and how it fares on the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pick {
    /// None when a rule gave no suggestion.
    pub lr: Option<f64>,
    pub hit: bool,
    /// |log10(lr / grid best)|; None without a suggestion.
    pub log10_error: Option<f64>,
}

impl Pick {
    fn new(lr: Option<f64>, grid: &[GridPoint], grid_best: f64) -> Self {
        Pick {
            lr,
            hit: lands_among(lr, grid),
            log10_error: lr.map(|lr| (lr / grid_best).log10().abs()),
        }
    }
}

/// A learning-rate-free optimizer at its defaults: one planned run at a fresh seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChallengerScore {
    pub recipe: String,
    /// The run's final validation loss; `None` when it diverged.
    pub val_loss: Option<f64>,
    /// Within the grid's good band (`val_loss <= grid_best_loss + good_tolerance`).
    pub hit: bool,
    /// val_loss / grid_best_loss (infinite when it diverged).
    pub loss_ratio: f64,
}

impl ChallengerScore {
    fn new(recipe: &str, val_loss: Option<f64>, best_loss: f64, tolerance: f64) -> Self {
        let finite = val_loss.filter(|loss| loss.is_finite());
        ChallengerScore {
            recipe: recipe.to_string(),
            val_loss: finite,
            hit: in_good_band(finite, best_loss, tolerance),
            loss_ratio: loss_ratio(finite, best_loss),
        }
    }
}

/// The tune's recommended peak trained as planned again, at seeds that neither the tune, the
/// grid nor the challengers used: what a user who takes the recommendation gets. Beside it, the
/// grid's best peak trained at the same fresh seeds: the grid's best mean is the lowest of 13
/// noisy means, so it sits below what that very peak gives on new seeds, and only the paired
/// comparison asks the question a user has (would the grid's best have done better with my
/// seeds?) without that selection in the yardstick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FreshScore {
    pub peak_lr: f64,
    /// Mean final validation loss over the `FRESH_SEEDS` runs; `None` when any diverged.
    pub val_loss: Option<f64>,
    /// Within the grid's good band (`val_loss <= grid_best_loss + good_tolerance`).
    pub hit: bool,
    /// val_loss / grid_best_loss (infinite when a run diverged).
    pub loss_ratio: f64,
    /// The worst single run's val_loss / grid_best_loss: a mean inside the band can still
    /// hide one seed that did badly.
    pub worst_seed_ratio: f64,
    /// The grid's best peak's mean over the same fresh seeds (`None` when any diverged).
    pub reference_loss: Option<f64>,
    /// The paired score: `val_loss <= reference_loss + good_tolerance`.
    pub paired_hit: bool,
    /// The grid's best peak itself, at the fresh seeds, inside the grid's good band: how many
    /// unpaired fresh hits a perfect pick could score.
    pub reference_hit: bool,
}

/// A fresh-seed check's runs of one peak: the mean loss (infinite or NaN when any diverged)
/// and the worst run's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreshRuns {
    pub mean_loss: f64,
    pub worst_loss: f64,
}

impl FreshScore {
    /// From the pick's fresh runs and the grid's best peak's runs at the same seeds.
    fn new(
        peak_lr: f64,
        pick: FreshRuns,
        reference: FreshRuns,
        best_loss: f64,
        tolerance: f64,
    ) -> Self {
        let finite = Some(pick.mean_loss).filter(|loss| loss.is_finite());
        let reference_loss = Some(reference.mean_loss).filter(|loss| loss.is_finite());
        FreshScore {
            peak_lr,
            val_loss: finite,
            hit: in_good_band(finite, best_loss, tolerance),
            loss_ratio: loss_ratio(finite, best_loss),
            worst_seed_ratio: loss_ratio(
                Some(pick.worst_loss).filter(|loss| loss.is_finite()),
                best_loss,
            ),
            reference_loss,
            // A reference that diverged on these seeds is beaten by any pick that did not.
            paired_hit: finite.is_some()
                && reference_loss
                    .is_none_or(|reference| in_good_band(finite, reference, tolerance)),
            reference_hit: in_good_band(reference_loss, best_loss, tolerance),
        }
    }

    /// The pick's fresh mean over the grid's best peak's at the same seeds: infinite when the
    /// pick diverged, 0 when only the reference did.
    pub fn paired_ratio(&self) -> f64 {
        match self.reference_loss {
            Some(reference) => loss_ratio(self.val_loss, reference),
            None if self.val_loss.is_some() => 0.0,
            None => f64::INFINITY,
        }
    }
}

/// The index of the peak nearest `lr` in log space (the first of equally near ones); `None`
/// without peaks.
fn nearest_index(peaks: impl IntoIterator<Item = f64>, lr: f64) -> Option<usize> {
    peaks
        .into_iter()
        .map(|peak| (peak / lr).ln().abs())
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(index, _)| index)
}

/// Whether a finite loss is inside the grid's good band; a diverged run (`None`) never is.
fn in_good_band(loss: Option<f64>, best_loss: f64, tolerance: f64) -> bool {
    loss.is_some_and(|loss| loss <= best_loss + tolerance)
}

/// A loss over the grid's best; a diverged run (`None`) is infinitely worse.
fn loss_ratio(loss: Option<f64>, best_loss: f64) -> f64 {
    loss.map_or(f64::INFINITY, |loss| {
        loss / best_loss.abs().max(f64::MIN_POSITIVE)
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemScore {
    pub problem: String,
    pub seed: u64,
    pub grid: Vec<GridPoint>,
    /// The peak with the lowest mean validation loss.
    pub grid_best: f64,
    pub grid_best_loss: f64,
    /// How far above `grid_best_loss` a good peak may be.
    pub good_tolerance: f64,
    /// The best peak is the grid's lowest or highest: the window should move.
    pub grid_best_at_edge: bool,
    /// Optimizer steps of one planned run.
    pub plan_steps: usize,
    /// Optimizer steps of the whole grid as planned (peaks x seeds x plan; a diverged run
    /// that stops early is still counted whole, so the yardstick is the same for every tune).
    pub grid_steps: usize,
    /// Optimizer steps the tune took (range test and sweep).
    pub tune_steps: usize,
    /// tune_steps / grid_steps.
    pub compute_share: f64,
    /// tune_steps / plan_steps.
    pub plan_multiple: f64,
    pub tune: Pick,
    pub valley: Pick,
    pub steepest: Pick,
    pub minimum: Pick,
    /// The tune's sweep: every candidate it judged, at each horizon it trained to.
    pub tune_sweep: Vec<SweepCandidate>,
    /// The challengers, in `CHALLENGERS` order; each cost one planned run (`plan_steps`).
    pub challengers: Vec<ChallengerScore>,
    /// The tune's recommendation on fresh seeds. The evaluation's cost, not the tune's: its
    /// runs are not in `tune_steps`.
    pub fresh: FreshScore,
    /// Wall time of the whole score: the tune, the grid, the challengers and the fresh seeds.
    pub seconds: f64,
}

impl ProblemScore {
    /// The tune's recommended peak.
    pub fn recommended(&self) -> f64 {
        self.tune.lr.unwrap_or(f64::NAN)
    }

    /// The tune and the three rules, with their names, in report order.
    pub fn picks(&self) -> [(&'static str, &Pick); 4] {
        [
            ("tune", &self.tune),
            ("valley", &self.valley),
            ("steepest", &self.steepest),
            ("minimum", &self.minimum),
        ]
    }
}

/// Overrides of the tune's sweep settings, to compare other defaults on the same grids.
#[derive(Debug, Clone, Copy, Default)]
pub struct SweepOverrides {
    pub count: Option<usize>,
    pub epochs: Option<usize>,
    /// The tune's `budget.plan_multiple` (the default budget otherwise).
    pub plan_multiple: Option<f64>,
}

/// The planned run at each of `peaks`, `seeds` times from `seed` on: a sweep of an explicit
/// list with the plan's epochs, so that nothing is screened, extended or probed.
fn planned_runs_spec(
    problem: &Problem,
    limits: &Limits,
    peaks: &[f64],
    plan_epochs: usize,
    seed: u64,
    seeds: usize,
) -> Result<ValidSpec, SpecError> {
    spec_with(problem, limits, |spec| {
        spec["kind"] = json!("sweep");
        spec["seed"] = json!(seed);
        spec["sweep"]["candidates"] = json!(peaks);
        spec["sweep"]["epochs"] = json!(plan_epochs);
        spec["sweep"]["seeds"] = json!(seeds);
    })
}

/// The problem's spec with edits applied to its JSON, as a user would write them, so the
/// harness depends on the spec's field names rather than on how they are held in memory;
/// parsed and checked as a user's would be.
fn spec_with(
    problem: &Problem,
    limits: &Limits,
    edit: impl FnOnce(&mut Value),
) -> Result<ValidSpec, SpecError> {
    let mut value: Value = serde_json::from_str(problem.spec)
        .map_err(|error| SpecError::new("spec", format!("{}: {error}", problem.name)))?;
    edit(&mut value);
    ValidSpec::from_value(value, limits)
}

pub fn score(
    problem: &Problem,
    seed: u64,
    overrides: SweepOverrides,
    progress: &mut dyn FnMut(&str),
) -> Result<ProblemScore, EngineError> {
    let started = Instant::now();
    let limits = Limits {
        max_sweep_epochs: 10_000,
        ..Limits::default()
    };
    let cancel = AtomicBool::new(false);
    let tune_spec = spec_with(problem, &limits, |spec| {
        spec["seed"] = json!(seed);
        if let Some(count) = overrides.count {
            spec["sweep"]["count"] = json!(count);
        }
        if let Some(epochs) = overrides.epochs {
            spec["sweep"]["epochs"] = json!(epochs);
        }
        if let Some(multiple) = overrides.plan_multiple {
            spec["budget"] = json!({ "plan_multiple": multiple });
        }
    })?;
    let loaded = problem.loaded_data(&tune_spec)?;

    progress(&format!("{}: tune", problem.name));
    let tune = run_job(
        &tune_spec,
        loaded.clone(),
        &limits,
        &cancel,
        &mut |_: Event| {},
    )?;

    let plan_epochs = tune_spec.plan.epochs;
    let grid_spec = planned_runs_spec(
        problem,
        &limits,
        &problem.grid_peaks(),
        plan_epochs,
        seed + GRID_SEED_OFFSET,
        GRID_SEEDS,
    )?;
    progress(&format!("{}: grid", problem.name));
    let grid_run = run_job(
        &grid_spec,
        loaded.clone(),
        &limits,
        &cancel,
        &mut |_: Event| {},
    )?;

    // The challengers race untuned, so the race is just their planned runs.
    let challenger_spec = spec_with(problem, &limits, |spec| {
        spec["kind"] = json!("compare");
        spec["seed"] = json!(seed + CHALLENGER_SEED_OFFSET);
        spec["recipes"] = json!(CHALLENGERS);
        spec["seeds"] = json!(1);
    })?;
    progress(&format!("{}: challengers", problem.name));
    let race = run_compare(
        &challenger_spec,
        loaded.clone(),
        &limits,
        &cancel,
        &mut |_: Event| {},
    )?;

    let best = grid_run
        .result
        .sweep
        .iter()
        .filter(|c| c.val_loss.is_finite())
        .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
        .ok_or_else(|| {
            SpecError::new(
                "grid",
                format!(
                    "{}: every grid peak diverged; move lowest_third down",
                    problem.name
                ),
            )
        })?;
    let recommended = tune.result.recommendation.peak_lr;
    // The pick and the grid's best at the same fresh seeds (one run set when they coincide).
    let same_peak = (recommended / best.peak_lr - 1.0).abs() < 1e-9;
    let fresh_peaks = if same_peak {
        vec![recommended]
    } else {
        vec![recommended, best.peak_lr]
    };
    let fresh_spec = planned_runs_spec(
        problem,
        &limits,
        &fresh_peaks,
        plan_epochs,
        seed + FRESH_SEED_OFFSET,
        FRESH_SEEDS,
    )?;
    progress(&format!("{}: fresh seeds", problem.name));
    // The result keeps the mean over seeds; the worst seed is read off the runs as they end.
    let mut worst_fresh_loss = vec![f64::NEG_INFINITY; fresh_peaks.len()];
    let fresh_run = run_job(
        &fresh_spec,
        loaded,
        &limits,
        &cancel,
        &mut |event: Event| {
            if let Event::SweepRun(run) = event {
                // A diverged run is the worst there is (its loss may be NaN, which `max`
                // would pass over).
                let loss = if run.diverged || !run.val_loss.is_finite() {
                    f64::INFINITY
                } else {
                    run.val_loss
                };
                if let Some(index) = nearest_index(fresh_peaks.iter().copied(), run.peak_lr) {
                    worst_fresh_loss[index] = worst_fresh_loss[index].max(loss);
                }
            }
        },
    )?;
    let fresh_runs: Vec<FreshRuns> = fresh_peaks
        .iter()
        .zip(&worst_fresh_loss)
        .map(|(&peak, &worst_loss)| FreshRuns {
            mean_loss: fresh_run
                .result
                .sweep
                .iter()
                .find(|c| (c.peak_lr / peak - 1.0).abs() < 1e-9)
                .map_or(f64::INFINITY, |candidate| candidate.val_loss),
            worst_loss,
        })
        .collect();
    let tolerance = good_tolerance(best.val_loss, best.val_loss_std);
    let grid: Vec<GridPoint> = grid_run
        .result
        .sweep
        .iter()
        .map(|c| GridPoint {
            peak_lr: c.peak_lr,
            val_loss: c.val_loss,
            val_loss_std: c.val_loss_std,
            good: c.val_loss.is_finite() && c.val_loss <= best.val_loss + tolerance,
        })
        .collect();
    let grid_best = best.peak_lr;
    let lowest = grid.iter().map(|p| p.peak_lr).fold(f64::INFINITY, f64::min);
    let highest = grid.iter().map(|p| p.peak_lr).fold(0.0, f64::max);
    let suggestions = tune
        .result
        .range_test
        .as_ref()
        .map(|r| r.suggestions)
        .unwrap_or_default();
    let plan_steps = plan_epochs * tune.result.model.steps_per_epoch;
    let grid_steps = GRID_PEAKS * GRID_SEEDS * plan_steps;
    let tune_steps = tune.result.timing.total_steps;
    Ok(ProblemScore {
        problem: problem.name.to_string(),
        seed,
        tune: Pick::new(Some(recommended), &grid, grid_best),
        valley: Pick::new(suggestions.valley, &grid, grid_best),
        steepest: Pick::new(suggestions.steepest, &grid, grid_best),
        minimum: Pick::new(suggestions.minimum, &grid, grid_best),
        tune_sweep: tune.result.sweep.clone(),
        challengers: CHALLENGERS
            .iter()
            .map(|name| {
                let val_loss = race
                    .recipes
                    .iter()
                    .find(|r| r.name == *name)
                    .and_then(|r| r.final_val_loss.mean);
                ChallengerScore::new(name, val_loss, best.val_loss, tolerance)
            })
            .collect(),
        fresh: FreshScore::new(
            recommended,
            fresh_runs[0],
            *fresh_runs.last().expect("one fresh peak at least"),
            best.val_loss,
            tolerance,
        ),
        grid_best_loss: best.val_loss,
        good_tolerance: tolerance,
        grid_best_at_edge: grid_best == lowest || grid_best == highest,
        grid,
        grid_best,
        plan_steps,
        grid_steps,
        tune_steps,
        compute_share: tune_steps as f64 / grid_steps.max(1) as f64,
        plan_multiple: tune_steps as f64 / plan_steps.max(1) as f64,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// How one way of picking the learning rate did over all scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodSummary {
    pub method: String,
    pub hits: usize,
    /// Median of |log10(lr / grid best)|; a rule that gave no suggestion counts as
    /// infinitely far (serialized as null when the median itself is).
    pub median_log10_error: f64,
}

/// How one challenger did over all scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChallengerSummary {
    pub recipe: String,
    pub hits: usize,
    /// Median and worst of val_loss / grid best loss (a diverged run is infinitely worse).
    pub median_loss_ratio: f64,
    pub worst_loss_ratio: f64,
    /// Its planned runs' steps over all grids' steps.
    pub compute_share: f64,
}

/// The tune's two scores side by side over one group of scores: by the grid peak nearest its
/// recommendation, and by the recommendation trained on fresh seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TuneSummary {
    /// `all`, `held out` (problems named `holdout...`) or `the rest`.
    pub group: String,
    pub scores: usize,
    /// Hits by the grid peak nearest the recommendation, and the median |log10(lr / grid
    /// best)|: the `tune` method's numbers, over this group.
    pub grid_hits: usize,
    pub median_log10_error: f64,
    /// Hits by the fresh seeds' mean loss, against the grid's best mean loss.
    pub fresh_hits: usize,
    /// Hits by the fresh seeds' mean loss against the grid's best peak at the same seeds.
    pub paired_hits: usize,
    /// How often the grid's best peak itself, at the fresh seeds, is inside the grid's good
    /// band: the most unpaired fresh hits any pick could score.
    pub reference_hits: usize,
    /// Median and worst of the fresh mean loss over the grid's best (a diverged run is
    /// infinitely worse).
    pub median_loss_ratio: f64,
    pub worst_loss_ratio: f64,
    /// The worst single fresh run over the grid's best.
    pub worst_seed_ratio: f64,
}

impl TuneSummary {
    fn new(group: &str, scores: &[&ProblemScore]) -> Self {
        let worst = |ratio: fn(&ProblemScore) -> f64| {
            scores.iter().map(|s| ratio(s)).fold(f64::NAN, f64::max)
        };
        TuneSummary {
            group: group.to_string(),
            scores: scores.len(),
            grid_hits: scores.iter().filter(|s| s.tune.hit).count(),
            median_log10_error: median(
                scores
                    .iter()
                    .map(|s| s.tune.log10_error.unwrap_or(f64::INFINITY))
                    .collect(),
            ),
            fresh_hits: scores.iter().filter(|s| s.fresh.hit).count(),
            paired_hits: scores.iter().filter(|s| s.fresh.paired_hit).count(),
            reference_hits: scores.iter().filter(|s| s.fresh.reference_hit).count(),
            median_loss_ratio: median(scores.iter().map(|s| s.fresh.loss_ratio).collect()),
            worst_loss_ratio: worst(|s| s.fresh.loss_ratio),
            worst_seed_ratio: worst(|s| s.fresh.worst_seed_ratio),
        }
    }
}

/// Whether a problem is held out (named `holdout...`): never used to choose the defaults it
/// judges.
pub fn held_out(problem: &str) -> bool {
    problem.starts_with("holdout")
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Scores summarised (problems x seeds).
    pub scores: usize,
    /// The tune, then valley, steepest and minimum.
    pub methods: Vec<MethodSummary>,
    /// The tune by the nearest grid peak and by fresh seeds: all scores, then the held-out
    /// problems and the rest, each where it has scores.
    pub tune: Vec<TuneSummary>,
    /// All tunes' steps over all grids' steps.
    pub compute_share: f64,
    pub median_plan_multiple: f64,
    /// The challengers, scored by their loss against the grid's best as the fresh seeds
    /// score the tune.
    pub challengers: Vec<ChallengerSummary>,
    pub seconds: f64,
}

pub fn summarize(scores: &[ProblemScore]) -> Summary {
    let names = ["tune", "valley", "steepest", "minimum"];
    let methods = names
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let picks: Vec<&Pick> = scores.iter().map(|s| s.picks()[index].1).collect();
            MethodSummary {
                method: name.to_string(),
                hits: picks.iter().filter(|p| p.hit).count(),
                median_log10_error: median(
                    picks
                        .iter()
                        .map(|p| p.log10_error.unwrap_or(f64::INFINITY))
                        .collect(),
                ),
            }
        })
        .collect();
    let tune_steps: usize = scores.iter().map(|s| s.tune_steps).sum();
    let grid_steps: usize = scores.iter().map(|s| s.grid_steps).sum();
    let plan_steps: usize = scores.iter().map(|s| s.plan_steps).sum();
    let challengers = CHALLENGERS
        .iter()
        .map(|name| {
            let mine: Vec<&ChallengerScore> = scores
                .iter()
                .flat_map(|s| s.challengers.iter().filter(|c| c.recipe == *name))
                .collect();
            ChallengerSummary {
                recipe: name.to_string(),
                hits: mine.iter().filter(|c| c.hit).count(),
                median_loss_ratio: median(mine.iter().map(|c| c.loss_ratio).collect()),
                worst_loss_ratio: mine.iter().map(|c| c.loss_ratio).fold(f64::NAN, f64::max),
                compute_share: plan_steps as f64 / grid_steps.max(1) as f64,
            }
        })
        .collect();
    let all: Vec<&ProblemScore> = scores.iter().collect();
    let (held, rest): (Vec<&ProblemScore>, Vec<&ProblemScore>) =
        scores.iter().partition(|s| held_out(&s.problem));
    let tune = [("all", all), ("held out", held), ("the rest", rest)]
        .into_iter()
        .filter(|(_, group)| !group.is_empty())
        .map(|(name, group)| TuneSummary::new(name, &group))
        .collect();
    Summary {
        scores: scores.len(),
        methods,
        tune,
        compute_share: tune_steps as f64 / grid_steps.max(1) as f64,
        median_plan_multiple: median(scores.iter().map(|s| s.plan_multiple).collect()),
        challengers,
        seconds: scores.iter().map(|s| s.seconds).sum(),
    }
}

/// The middle value (the mean of the two middle ones for an even count); NaN when empty.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn grid(points: &[(f64, bool)]) -> Vec<GridPoint> {
        points
            .iter()
            .map(|&(peak_lr, good)| GridPoint {
                peak_lr,
                val_loss: 0.0,
                val_loss_std: 0.0,
                good,
            })
            .collect()
    }

    #[test]
    fn a_learning_rate_lands_among_the_best_when_its_nearest_grid_point_is_good() {
        let grid = grid(&[(0.001, false), (0.01, true), (0.1, false)]);
        assert!(lands_among(Some(0.012), &grid));
        assert!(
            lands_among(Some(0.025), &grid),
            "nearer 0.01 than 0.1 in log space"
        );
        assert!(!lands_among(Some(0.04), &grid));
        assert!(!lands_among(Some(0.002), &grid));
        assert!(!lands_among(None, &grid));
    }

    #[test]
    fn the_good_band_is_five_percent_or_one_seed_deviation_whichever_is_wider() {
        assert!((good_tolerance(2.0, 0.01) - 0.1).abs() < 1e-12);
        assert!((good_tolerance(2.0, 0.3) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn every_problem_spec_parses_and_validates_with_a_grid_of_thirds_of_a_decade() {
        let all = problems();
        assert!(all.len() >= 9);
        for problem in &all {
            ValidSpec::parse(problem.spec, &Limits::default())
                .unwrap_or_else(|e| panic!("{}: {e}", problem.name));
            let peaks = problem.grid_peaks();
            assert_eq!(peaks.len(), 13, "{}", problem.name);
            for pair in peaks.windows(2) {
                assert!(((pair[1] / pair[0]).log10() - 1.0 / 3.0).abs() < 1e-9);
            }
        }
        let mut names: Vec<&str> = all.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "problem names are unique");
    }

    fn custom(name: &str) -> fn(u64) -> Dataset {
        let problem = problems()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no problem {name}"));
        match problem.data {
            ProblemData::Custom(generate) => generate,
            ProblemData::Spec => panic!("{name} loads its spec's data"),
        }
    }

    fn labels(data: &Dataset) -> &[u32] {
        match &data.targets {
            Targets::Classes { labels, .. } => labels,
            _ => panic!("expected classes"),
        }
    }

    #[test]
    fn custom_problem_data_is_deterministic_per_seed_with_the_intended_rows_and_noise() {
        for problem in problems() {
            if let ProblemData::Custom(generate) = problem.data {
                assert_eq!(generate(2), generate(2), "{}", problem.name);
                assert_ne!(generate(2), generate(3), "{}", problem.name);
            }
        }

        let small = custom("mnist300-mlp256-sgd")(5);
        assert_eq!(small.rows(), 300);
        assert_eq!(small.sample_shape(), vec![1, 28, 28]);
        assert_eq!(small.output_dim(), 10);
        assert_eq!(custom("mnist500-mlp64-adamw")(5).rows(), 500);

        // Exactly 40 % of the cut's labels differ from MNIST's own, the rest are untouched.
        let noisy = custom("mnist-noisy-mlp64-sgd")(7);
        let clean = mnist_rows(2000, 7);
        assert_eq!(noisy.features, clean.features);
        let wrong = labels(&noisy)
            .iter()
            .zip(labels(&clean))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(wrong, 800);
        assert!(labels(&noisy).iter().all(|&label| label < 10));

        let blobs = custom("blobs-noisy-mlp256-adamw")(7);
        let clean = data::blobs(500, 7);
        assert_eq!(blobs.features, clean.features);
        let wrong = labels(&blobs)
            .iter()
            .zip(labels(&clean))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(wrong, 150);

        let regression = custom("friedman200-mlp64-sgd")(7);
        assert_eq!(regression, data::friedman1(200, 0.5, 7));
        assert_eq!(regression.rows(), 200);
        assert_eq!(regression.task(), data::Task::Regression);

        // The cliffs: three models on one 180-image cut, Friedman #1 with little noise.
        let tiny = custom("cliff-mnist180-mlp64-sgd")(7);
        assert_eq!(tiny, mnist_rows(180, 7));
        assert_eq!(tiny, custom("cliff-mnist180-mlp256-adamw")(7));
        assert_eq!(custom("cliff-mnist2000-mlp256-sgd-m099")(7).rows(), 2000);
        assert_eq!(
            custom("cliff-friedman4096-mlp256-sgd")(7),
            data::friedman1(4096, 0.1, 7)
        );
        let spirals = custom("holdout-cliff-spirals160-noisy-mlp128-sgd-m095")(7);
        let clean = data::spirals(160, 7);
        assert_eq!(spirals.features, clean.features);
        let wrong = labels(&spirals)
            .iter()
            .zip(labels(&clean))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(wrong, 32);
    }

    #[test]
    fn a_custom_problem_is_split_once_the_same_way_for_tune_and_grid() {
        let problem = problems()
            .into_iter()
            .find(|p| p.name == "friedman200-mlp64-sgd")
            .expect("the tiny regression is a problem");
        let mut spec = JobSpec::from_json(problem.spec).expect("valid spec");
        spec.seed = 4;
        let first = problem.loaded_data(&spec).expect("data");
        let again = problem.loaded_data(&spec).expect("data");
        assert_eq!(first.train, again.train);
        assert_eq!(first.validation, again.validation);
        assert_eq!(first.train.rows(), 160);
        assert_eq!(first.validation.map(|v| v.rows()), Some(40));
    }

    fn pick(lr: Option<f64>, hit: bool, best: f64) -> Pick {
        Pick {
            lr,
            hit,
            log10_error: lr.map(|lr| (lr / best).log10().abs()),
        }
    }

    /// A score made by hand, with grid best 0.01 and best loss 1 (eval.rs's tests use it too).
    pub(crate) fn scored(
        tune: f64,
        valley: Option<f64>,
        hits: [bool; 2],
        tune_steps: usize,
        plan_steps: usize,
    ) -> ProblemScore {
        let best = 0.01;
        let grid_steps = GRID_PEAKS * GRID_SEEDS * plan_steps;
        ProblemScore {
            problem: "hand-made".to_string(),
            seed: 0,
            grid: Vec::new(),
            grid_best: best,
            grid_best_loss: 1.0,
            good_tolerance: 0.05,
            grid_best_at_edge: false,
            plan_steps,
            grid_steps,
            tune_steps,
            compute_share: tune_steps as f64 / grid_steps as f64,
            plan_multiple: tune_steps as f64 / plan_steps as f64,
            tune: pick(Some(tune), hits[0], best),
            valley: pick(valley, hits[1], best),
            steepest: pick(Some(best), true, best),
            minimum: pick(None, false, best),
            tune_sweep: Vec::new(),
            challengers: vec![
                ChallengerScore::new("prodigy", Some(2.0), 1.0, 0.05),
                ChallengerScore::new("schedule_free_adamw", Some(1.04), 1.0, 0.05),
                ChallengerScore::new("schedule_free_sgd", None, 1.0, 0.05),
            ],
            fresh: FreshScore::new(tune, runs(1.0, 1.0), runs(1.0, 1.0), 1.0, 0.05),
            seconds: 1.5,
        }
    }

    #[test]
    fn the_summary_takes_medians_of_log_errors_and_plan_multiples_and_pools_the_compute() {
        // Grid best 0.01 everywhere. Tune errors: 0, 1, 2/3 (decades); valley: 1/3, none,
        // 1/3 + 1/3. Plan steps 100, 200, 300 (grids of 3,900, 7,800 and 11,700 steps).
        let mut scores = vec![
            scored(
                0.01,
                Some(0.01 * 10f64.powf(1.0 / 3.0)),
                [true, true],
                250,
                100,
            ),
            scored(0.1, None, [false, false], 300, 200),
            scored(
                0.01 / 10f64.powf(2.0 / 3.0),
                Some(0.1 / 10f64.powf(1.0 / 3.0)),
                [false, false],
                1200,
                300,
            ),
        ];
        // Fresh seeds (grid best loss 1, band 0.05): a hit with one seed at 1.04, the grid's
        // best at 1.0 on the same seeds; a diverged seed, the grid's best at 1.1; and, held
        // out, a mean of 1.2 with its worst seed at 1.5, the grid's best at 1.18 (a paired hit
        // only).
        scores[0].fresh = FreshScore::new(0.01, runs(1.02, 1.04), runs(1.0, 1.01), 1.0, 0.05);
        scores[1].fresh = FreshScore::new(
            0.1,
            runs(f64::INFINITY, f64::INFINITY),
            runs(1.1, 1.2),
            1.0,
            0.05,
        );
        scores[2].problem = "holdout-hand-made".to_string();
        scores[2].fresh = FreshScore::new(0.002, runs(1.2, 1.5), runs(1.18, 1.3), 1.0, 0.05);
        let summary = summarize(&scores);
        assert_eq!(summary.scores, 3);
        let groups: Vec<&str> = summary.tune.iter().map(|t| t.group.as_str()).collect();
        assert_eq!(groups, ["all", "held out", "the rest"]);
        let [all, held, rest] = &summary.tune[..] else {
            panic!("three groups")
        };
        assert_eq!((all.scores, all.grid_hits, all.fresh_hits), (3, 1, 1));
        assert_eq!((all.paired_hits, all.reference_hits), (2, 1));
        assert_eq!((held.paired_hits, held.reference_hits), (1, 0));
        assert_eq!((rest.paired_hits, rest.reference_hits), (1, 1));
        assert!((all.median_log10_error - 2.0 / 3.0).abs() < 1e-9);
        assert!((all.median_loss_ratio - 1.2).abs() < 1e-12);
        assert_eq!(all.worst_loss_ratio, f64::INFINITY);
        assert_eq!(all.worst_seed_ratio, f64::INFINITY);
        assert_eq!((held.scores, held.grid_hits, held.fresh_hits), (1, 0, 0));
        assert!((held.median_loss_ratio - 1.2).abs() < 1e-12);
        assert!((held.worst_loss_ratio - 1.2).abs() < 1e-12);
        assert!((held.worst_seed_ratio - 1.5).abs() < 1e-12);
        assert_eq!((rest.scores, rest.grid_hits, rest.fresh_hits), (2, 1, 1));
        // Errors 0 and 1 decade; ratios 1.02 and a diverged run's infinity.
        assert!((rest.median_log10_error - 0.5).abs() < 1e-12);
        assert_eq!(rest.median_loss_ratio, f64::INFINITY);
        assert_eq!(rest.worst_loss_ratio, f64::INFINITY);
        let method = |name: &str| {
            summary
                .methods
                .iter()
                .find(|m| m.method == name)
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(method("tune").hits, 1);
        assert!((method("tune").median_log10_error - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(method("valley").hits, 1);
        // 1/3, 2/3 and infinity (no suggestion): the median is 2/3.
        assert!((method("valley").median_log10_error - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(method("steepest").hits, 3);
        assert_eq!(method("steepest").median_log10_error, 0.0);
        assert_eq!(method("minimum").hits, 0);
        assert_eq!(method("minimum").median_log10_error, f64::INFINITY);
        // Pooled, not averaged: (250 + 300 + 1200) / (3900 + 7800 + 11700).
        assert!((summary.compute_share - 1750.0 / 23_400.0).abs() < 1e-12);
        // Plan multiples 2.5, 1.5 and 4: the median is 2.5.
        assert!((summary.median_plan_multiple - 2.5).abs() < 1e-12);
        assert!((summary.seconds - 4.5).abs() < 1e-12);
        // Each challenger ran once per score: (100 + 200 + 300) / 23,400 of the grids' steps.
        let challenger = |name: &str| {
            summary
                .challengers
                .iter()
                .find(|c| c.recipe == name)
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(challenger("prodigy").hits, 0);
        assert_eq!(challenger("prodigy").median_loss_ratio, 2.0);
        assert_eq!(challenger("schedule_free_adamw").hits, 3);
        assert!((challenger("schedule_free_adamw").worst_loss_ratio - 1.04).abs() < 1e-12);
        assert_eq!(challenger("schedule_free_sgd").hits, 0);
        assert_eq!(
            challenger("schedule_free_sgd").worst_loss_ratio,
            f64::INFINITY
        );
        assert!((challenger("prodigy").compute_share - 600.0 / 23_400.0).abs() < 1e-12);
    }

    #[test]
    fn a_challenger_hits_inside_the_band_and_a_diverged_one_is_infinitely_worse() {
        let inside = ChallengerScore::new("prodigy", Some(1.05), 1.0, 0.05);
        assert!(inside.hit);
        assert!((inside.loss_ratio - 1.05).abs() < 1e-12);
        assert!(!ChallengerScore::new("prodigy", Some(1.0501), 1.0, 0.05).hit);
        let diverged = ChallengerScore::new("prodigy", Some(f64::NAN), 1.0, 0.05);
        assert_eq!((diverged.hit, diverged.val_loss), (false, None));
        assert_eq!(diverged.loss_ratio, f64::INFINITY);
    }

    #[test]
    fn a_fresh_check_hits_when_its_mean_is_inside_the_band_and_a_diverged_seed_is_infinitely_worse()
    {
        let inside = FreshScore::new(0.01, runs(1.05, 1.3), runs(1.0, 1.0), 1.0, 0.05);
        assert_eq!(
            (inside.peak_lr, inside.val_loss, inside.hit),
            (0.01, Some(1.05), true)
        );
        assert!((inside.loss_ratio - 1.05).abs() < 1e-12);
        assert!((inside.worst_seed_ratio - 1.3).abs() < 1e-12);
        assert!(!FreshScore::new(0.01, runs(1.0501, 1.1), runs(1.0, 1.0), 1.0, 0.05).hit);
        // A band widened by the grid's seed spread.
        assert!(FreshScore::new(0.01, runs(1.25, 1.4), runs(1.0, 1.0), 1.0, 0.3).hit);
        let diverged = FreshScore::new(
            0.01,
            runs(f64::INFINITY, f64::INFINITY),
            runs(1.0, 1.0),
            1.0,
            0.05,
        );
        assert_eq!((diverged.hit, diverged.val_loss), (false, None));
        assert_eq!(diverged.loss_ratio, f64::INFINITY);
        assert_eq!(diverged.worst_seed_ratio, f64::INFINITY);
        let not_a_number = FreshScore::new(0.01, runs(f64::NAN, 1.1), runs(1.0, 1.0), 1.0, 0.05);
        assert_eq!(
            (not_a_number.hit, not_a_number.loss_ratio),
            (false, f64::INFINITY)
        );
    }

    fn runs(mean_loss: f64, worst_loss: f64) -> FreshRuns {
        FreshRuns {
            mean_loss,
            worst_loss,
        }
    }

    #[test]
    fn the_paired_fresh_score_measures_the_pick_against_the_grid_best_on_the_same_seeds() {
        // Grid best mean 1.0 (band 0.05): on the fresh seeds the grid's best peak itself ends
        // at 1.28, outside its own band, and the pick at 1.3 is a miss unpaired, a hit paired.
        let beside = FreshScore::new(0.01, runs(1.3, 1.4), runs(1.28, 1.35), 1.0, 0.05);
        assert_eq!(
            (beside.hit, beside.paired_hit, beside.reference_hit),
            (false, true, false)
        );
        assert_eq!(beside.reference_loss, Some(1.28));
        assert!((beside.paired_ratio() - 1.3 / 1.28).abs() < 1e-12);
        assert!((beside.loss_ratio - 1.3).abs() < 1e-12);
        // More than the band above the reference: a miss both ways.
        let above = FreshScore::new(0.01, runs(1.34, 1.4), runs(1.28, 1.35), 1.0, 0.05);
        assert_eq!((above.hit, above.paired_hit), (false, false));
        // A reference that diverged on these seeds loses to any finite pick; a diverged pick
        // never hits.
        let reference_diverged = FreshScore::new(
            0.01,
            runs(1.5, 1.6),
            runs(f64::INFINITY, f64::INFINITY),
            1.0,
            0.05,
        );
        assert_eq!(
            (
                reference_diverged.paired_hit,
                reference_diverged.reference_loss
            ),
            (true, None)
        );
        assert_eq!(reference_diverged.paired_ratio(), 0.0);
        let both_diverged = FreshScore::new(
            0.01,
            runs(f64::INFINITY, f64::INFINITY),
            runs(f64::NAN, f64::INFINITY),
            1.0,
            0.05,
        );
        assert!(!both_diverged.paired_hit);
        assert_eq!(both_diverged.paired_ratio(), f64::INFINITY);
        // A reference inside the grid's band counts towards the ceiling.
        let good_reference = FreshScore::new(0.01, runs(1.2, 1.3), runs(1.04, 1.1), 1.0, 0.05);
        assert_eq!(
            (good_reference.reference_hit, good_reference.paired_hit),
            (true, false)
        );
    }

    #[test]
    fn the_nearest_index_is_taken_in_log_space() {
        assert_eq!(nearest_index([0.1, 0.2], 0.14), Some(0));
        assert_eq!(nearest_index([0.1, 0.2], 0.15), Some(1));
        assert_eq!(nearest_index([0.3], 7.0), Some(0));
        assert_eq!(nearest_index([], 7.0), None);
    }

    #[test]
    fn held_out_problems_are_the_ones_named_holdout() {
        assert!(held_out("holdout-cliff-friedman2048-tanh-mlp64-sgd"));
        assert!(!held_out("cliff-mnist180-mlp64-sgd"));
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(median(Vec::new()).is_nan());
    }
}
