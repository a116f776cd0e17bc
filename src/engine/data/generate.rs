//! Seeded synthetic datasets for demos and tests: small enough to train in seconds, hard
//! enough that the learning rate visibly matters. The same (samples, seed) always gives the
//! same rows; classes are interleaved (row i has class i % k), so any prefix is balanced.

use std::f64::consts::TAU;

use super::{Dataset, Features, Targets};
use crate::engine::rng::Rng;

const SPIRALS_STREAM: u64 = 0x5350_4952_414c_0003;
const BLOBS_STREAM: u64 = 0x424c_4f42_5300_0004;
const SINE_STREAM: u64 = 0x5349_4e45_0000_0005;
const FRIEDMAN_STREAM: u64 = 0x4652_4945_4400_0006;

pub const SPIRAL_ARMS: usize = 3;
pub const SPIRAL_FEATURES: usize = 2;
pub const BLOB_FEATURES: usize = 16;
pub const BLOB_CLUSTERS: usize = 5;
pub const FRIEDMAN_FEATURES: usize = 10;
/// The mean and standard deviation of Friedman's function over its inputs (by Monte Carlo,
/// two million draws), so that its targets come out centred with unit variance.
const FRIEDMAN_MEAN: f64 = 14.41;
const FRIEDMAN_STD: f64 = 4.88;
/// Cluster centres sit this far from the origin in random directions, about 3.5 apart with
/// unit-variance noise: neighbours overlap enough that about one point in ten is ambiguous.
const BLOB_CENTER_RADIUS: f64 = 2.5;

/// Three interleaved spiral arms in the plane (2 features, 3 classes). Each arm turns about
/// two thirds of a circle; angle noise blurs the arms into each other near the centre.
pub fn spirals(samples: usize, seed: u64) -> Dataset {
    let mut rng = Rng::derive(seed, SPIRALS_STREAM);
    let mut values = Vec::with_capacity(samples * SPIRAL_FEATURES);
    let mut labels = Vec::with_capacity(samples);
    for row in 0..samples {
        let arm = row % SPIRAL_ARMS;
        let radius = rng.next_f64();
        let angle = arm as f64 * TAU / SPIRAL_ARMS as f64 + 4.0 * radius + 0.2 * rng.normal();
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
        labels.push(arm as u32);
    }
    Dataset {
        features: Features::Dense {
            values,
            sample_shape: vec![SPIRAL_FEATURES],
        },
        targets: Targets::Classes {
            labels,
            classes: SPIRAL_ARMS,
        },
    }
}

/// Five Gaussian clusters in 16 dimensions (5 classes), unit variance around centres drawn
/// from the seed, overlapping so that even the best classifier misses some points.
pub fn blobs(samples: usize, seed: u64) -> Dataset {
    let mut rng = Rng::derive(seed, BLOBS_STREAM);
    let centers = blob_centers(&mut rng);
    let mut values = Vec::with_capacity(samples * BLOB_FEATURES);
    let mut labels = Vec::with_capacity(samples);
    for row in 0..samples {
        let cluster = row % BLOB_CLUSTERS;
        for &center in &centers[cluster] {
            values.push((center + rng.normal()) as f32);
        }
        labels.push(cluster as u32);
    }
    Dataset {
        features: Features::Dense {
            values,
            sample_shape: vec![BLOB_FEATURES],
        },
        targets: Targets::Classes {
            labels,
            classes: BLOB_CLUSTERS,
        },
    }
}

fn blob_centers(rng: &mut Rng) -> Vec<[f64; BLOB_FEATURES]> {
    (0..BLOB_CLUSTERS)
        .map(|_| {
            let mut direction = [0.0; BLOB_FEATURES];
            for coordinate in &mut direction {
                *coordinate = rng.normal();
            }
            let length = direction
                .iter()
                .map(|c| c * c)
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            direction.map(|c| c / length * BLOB_CENTER_RADIUS)
        })
        .collect()
}

/// Regression: x uniform in [-3, 3] (1 feature), y = sin(2x) + N(0, 0.1^2) noise (1 dim).
pub fn sine(samples: usize, seed: u64) -> Dataset {
    let mut rng = Rng::derive(seed, SINE_STREAM);
    let mut xs = Vec::with_capacity(samples);
    let mut ys = Vec::with_capacity(samples);
    for _ in 0..samples {
        let x = rng.uniform(-3.0, 3.0);
        xs.push(x as f32);
        ys.push(((2.0 * x).sin() + 0.1 * rng.normal()) as f32);
    }
    Dataset {
        features: Features::Dense {
            values: xs,
            sample_shape: vec![1],
        },
        targets: Targets::Values {
            values: ys,
            dims: 1,
        },
    }
}

/// Regression: Friedman's #1 benchmark (Friedman 1991; scikit-learn's `make_friedman1`).
/// Ten features uniform in [0, 1], of which only the first five matter:
/// f(x) = 10 sin(pi x0 x1) + 20 (x2 - 0.5)^2 + 10 x3 + 5 x4. The target is f standardised
/// (mean 0, standard deviation 1) plus N(0, noise^2), so `noise` is in units of the signal's
/// spread; the five useless features give a small model something to overfit.
pub fn friedman1(samples: usize, noise: f64, seed: u64) -> Dataset {
    let mut rng = Rng::derive(seed, FRIEDMAN_STREAM);
    let mut values = Vec::with_capacity(samples * FRIEDMAN_FEATURES);
    let mut ys = Vec::with_capacity(samples);
    for _ in 0..samples {
        let x: [f64; FRIEDMAN_FEATURES] = std::array::from_fn(|_| rng.next_f64());
        values.extend(x.iter().map(|&v| v as f32));
        ys.push((friedman1_signal(&x) + noise * rng.normal()) as f32);
    }
    Dataset {
        features: Features::Dense {
            values,
            sample_shape: vec![FRIEDMAN_FEATURES],
        },
        targets: Targets::Values {
            values: ys,
            dims: 1,
        },
    }
}

/// Friedman's #1 function of a row, standardised.
fn friedman1_signal(x: &[f64; FRIEDMAN_FEATURES]) -> f64 {
    let f = 10.0 * (std::f64::consts::PI * x[0] * x[1]).sin()
        + 20.0 * (x[2] - 0.5).powi(2)
        + 10.0 * x[3]
        + 5.0 * x[4];
    (f - FRIEDMAN_MEAN) / FRIEDMAN_STD
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::data::Task;

    fn dense(data: &Dataset) -> &[f32] {
        match &data.features {
            Features::Dense { values, .. } => values,
            Features::Tokens { .. } => panic!("generators make dense data"),
        }
    }

    fn labels(data: &Dataset) -> &[u32] {
        match &data.targets {
            Targets::Classes { labels, .. } => labels,
            _ => panic!("expected classes"),
        }
    }

    #[test]
    fn generators_are_deterministic_per_seed() {
        for generate in [spirals, blobs, sine] {
            assert_eq!(generate(60, 3), generate(60, 3));
            assert_ne!(generate(60, 3), generate(60, 4));
            assert_eq!(generate(0, 3).rows(), 0);
        }
    }

    #[test]
    fn spirals_are_three_balanced_arms_in_the_unit_disc() {
        let data = spirals(300, 1);
        assert_eq!(data.rows(), 300);
        assert_eq!(data.sample_shape(), vec![2]);
        assert_eq!(data.task(), Task::Classification);
        assert_eq!(data.output_dim(), 3);
        for arm in 0..3 {
            assert_eq!(labels(&data).iter().filter(|&&l| l == arm).count(), 100);
        }
        assert!(dense(&data)
            .chunks_exact(2)
            .all(|p| p[0].hypot(p[1]) <= 1.0 + 1e-6));
    }

    #[test]
    fn blobs_overlap_so_the_nearest_centre_is_sometimes_wrong() {
        let samples = 2000;
        let data = blobs(samples, 7);
        assert_eq!(data.sample_shape(), vec![16]);
        assert_eq!(data.output_dim(), 5);
        // The nearest true centre is the Bayes-optimal rule for equal unit-variance clusters.
        let centers = blob_centers(&mut Rng::derive(7, BLOBS_STREAM));
        let correct = dense(&data)
            .chunks_exact(BLOB_FEATURES)
            .zip(labels(&data))
            .filter(|(point, &label)| {
                let distance = |center: &[f64; BLOB_FEATURES]| {
                    point
                        .iter()
                        .zip(center)
                        .map(|(p, c)| (f64::from(*p) - c).powi(2))
                        .sum::<f64>()
                };
                let nearest = (0..BLOB_CLUSTERS)
                    .min_by(|&a, &b| distance(&centers[a]).total_cmp(&distance(&centers[b])))
                    .unwrap_or(0);
                nearest == label as usize
            })
            .count();
        let accuracy = correct as f64 / samples as f64;
        assert!((0.75..0.97).contains(&accuracy), "best accuracy {accuracy}");
    }

    #[test]
    fn sine_targets_follow_sin_2x_with_small_noise() {
        let data = sine(1000, 2);
        assert_eq!(data.task(), Task::Regression);
        assert_eq!(data.output_dim(), 1);
        let Targets::Values { values: ys, .. } = &data.targets else {
            panic!("sine is regression");
        };
        let xs = dense(&data);
        assert!(xs.iter().all(|x| (-3.0..3.0).contains(x)));
        let residual_var = xs
            .iter()
            .zip(ys)
            .map(|(x, y)| (f64::from(*y) - (2.0 * f64::from(*x)).sin()).powi(2))
            .sum::<f64>()
            / 1000.0;
        assert!(
            (residual_var.sqrt() - 0.1).abs() < 0.01,
            "noise std {}",
            residual_var.sqrt()
        );
    }

    #[test]
    fn friedman1_is_standardised_with_the_asked_noise_and_five_useless_features() {
        assert_eq!(friedman1(50, 0.5, 3), friedman1(50, 0.5, 3));
        assert_ne!(friedman1(50, 0.5, 3), friedman1(50, 0.5, 4));
        let samples = 20_000;
        let data = friedman1(samples, 0.5, 9);
        assert_eq!(data.task(), Task::Regression);
        assert_eq!(data.sample_shape(), vec![FRIEDMAN_FEATURES]);
        let Targets::Values { values: ys, .. } = &data.targets else {
            panic!("friedman1 is regression");
        };
        let rows: Vec<[f64; FRIEDMAN_FEATURES]> = dense(&data)
            .chunks_exact(FRIEDMAN_FEATURES)
            .map(|row| std::array::from_fn(|i| f64::from(row[i])))
            .collect();
        assert!(rows.iter().flatten().all(|v| (0.0..1.0).contains(v)));
        let signal: Vec<f64> = rows.iter().map(friedman1_signal).collect();
        let mean = signal.iter().sum::<f64>() / samples as f64;
        let std = (signal.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / samples as f64).sqrt();
        assert!(mean.abs() < 0.03, "signal mean {mean}");
        assert!((std - 1.0).abs() < 0.03, "signal std {std}");
        let noise = (signal
            .iter()
            .zip(ys)
            .map(|(s, y)| (f64::from(*y) - s).powi(2))
            .sum::<f64>()
            / samples as f64)
            .sqrt();
        assert!((noise - 0.5).abs() < 0.01, "noise std {noise}");
    }
}
