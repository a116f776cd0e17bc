//! A small seeded random number generator (SplitMix64) for everything that must be
//! reproducible: weight initialisation, data generation, splits, shuffles and dropout.
//! candle's own CPU generator cannot be seeded, so the engine never uses it.

/// SplitMix64: fast, tiny state, good enough statistical quality for initialisation and
/// shuffling, and identical on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

/// SplitMix64's increment per draw.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function of a state.
#[inline(always)]
fn mix(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A draw's top 53 bits as a value in [0, 1).
#[inline(always)]
fn unit(draw: u64) -> f64 {
    (draw >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x853c_49e6_748f_ea9b,
        }
    }

    /// A generator for a named purpose derived from a base seed, so that streams used for
    /// different things (init, shuffling, dropout) never overlap.
    pub fn derive(seed: u64, purpose: u64) -> Self {
        let mut mixer = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ purpose);
        Rng::new(mixer.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// What the `index`-th `next_f64` from here (0: the next) will return, without drawing:
    /// SplitMix64's state moves by a constant per draw, so a draw is a function of its
    /// position, and a long stream can be filled in parallel, identical to drawing it in
    /// order.
    #[inline(always)]
    pub fn peek_f64(&self, index: u64) -> f64 {
        unit(mix(self
            .state
            .wrapping_add(GAMMA.wrapping_mul(index.wrapping_add(1)))))
    }

    /// Moves past `count` draws, as `count` calls of `next_u64` would.
    pub fn skip(&mut self, count: u64) {
        self.state = self.state.wrapping_add(GAMMA.wrapping_mul(count));
    }

    /// Uniform in [low, high).
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.next_f64()
    }

    /// Standard normal (Box-Muller; one value per call keeps the stream simple).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln never sees zero
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform integer in [0, n); n must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        // Multiply-shift: unbiased enough for n far below 2^64.
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// A random permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        self.shuffle(&mut order);
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_stream() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
    }

    #[test]
    fn a_permutation_holds_every_index_once() {
        let mut order = Rng::new(1).permutation(1000);
        order.sort_unstable();
        assert_eq!(order, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn peeking_and_skipping_follow_the_stream_drawn_in_order() {
        let mut drawn = Rng::derive(7, 3);
        let ahead = drawn.clone();
        for index in 0..100 {
            assert_eq!(ahead.peek_f64(index), drawn.next_f64(), "draw {index}");
        }
        let mut skipped = ahead.clone();
        skipped.skip(100);
        assert_eq!(skipped.next_u64(), drawn.next_u64());
    }

    #[test]
    fn uniform_and_normal_have_the_expected_moments() {
        let mut rng = Rng::new(3);
        let n = 200_000;
        let mean_u: f64 = (0..n).map(|_| rng.next_f64()).sum::<f64>() / n as f64;
        assert!((mean_u - 0.5).abs() < 0.005, "{mean_u}");
        let samples: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = samples.iter().sum::<f64>() / n as f64;
        let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }
}
