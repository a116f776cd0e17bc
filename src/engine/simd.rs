//! The instruction set the element-wise kernels run with, chosen at run time.
//!
//! The binary is built for baseline x86-64, so a plain loop vectorizes only to SSE2. Each
//! element-wise kernel (activations, the loss, layer norm, pooling, im2col, the optimizer
//! updates) wraps its loops in [`dispatch`], which runs them inside a function compiled for
//! the best instruction set this CPU has (AVX-512 or AVX2 + FMA, through `pulp`, with no
//! unsafe code here), so the same loops vectorize 16 or 8 lanes wide. Matrix products go
//! through `gemm`, which detects the CPU the same way (its `x86-v4` feature).
//!
//! `LRTUNE_SIMD=scalar|avx2|avx512` caps the level for the whole process (to compare levels
//! with `lrtune bench`); the tests run the kernels at every level the machine supports with
//! [`with_level`].

use std::cell::Cell;
use std::sync::OnceLock;

/// An instruction-set level, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Baseline x86-64 (SSE2), or any other architecture.
    Scalar,
    /// x86-64-v3: AVX2, FMA, BMI1/2, F16C.
    Avx2,
    /// x86-64-v4: AVX-512 F, BW, CD, DQ and VL.
    Avx512,
}

/// The environment variable that caps the level.
pub const LEVEL_VAR: &str = "LRTUNE_SIMD";

impl Level {
    pub const ALL: [Level; 3] = [Level::Scalar, Level::Avx2, Level::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    fn parse(text: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|level| level.name().eq_ignore_ascii_case(text.trim()))
    }

    /// Whether this CPU can run the level.
    pub fn supported(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => pulp::x86::V3::try_new().is_some(),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => pulp::x86::V4::try_new().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every level this CPU can run, lowest first.
    pub fn supported_levels() -> Vec<Level> {
        Level::ALL.into_iter().filter(|l| l.supported()).collect()
    }

    /// The best level this CPU runs, capped by `cap`.
    fn best_up_to(cap: Level) -> Level {
        Level::ALL
            .into_iter()
            .rev()
            .find(|level| *level <= cap && level.supported())
            .unwrap_or(Level::Scalar)
    }
}

/// The process-wide level: the best supported, capped by `LRTUNE_SIMD` when it is set.
fn process_level() -> Level {
    static CHOSEN: OnceLock<Level> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let cap = match std::env::var(LEVEL_VAR) {
            Ok(text) => Level::parse(&text).unwrap_or_else(|| {
                tracing::warn!(
                    "{LEVEL_VAR}={text:?} is not one of scalar, avx2, avx512; using the best level"
                );
                Level::Avx512
            }),
            Err(_) => Level::Avx512,
        };
        Level::best_up_to(cap)
    })
}

thread_local! {
    static THREAD_LEVEL: Cell<Option<Level>> = const { Cell::new(None) };
}

/// The level the kernels run with on this thread.
pub fn level() -> Level {
    THREAD_LEVEL.with(Cell::get).unwrap_or_else(process_level)
}

/// Runs `f` with the kernels on this thread at `level` (or the best supported below it).
/// Work `f` hands to other threads keeps their own level; a test that needs a whole step at
/// one level runs it in a thread pool whose threads call [`set_thread_level`].
pub fn with_level<R>(level: Level, f: impl FnOnce() -> R) -> R {
    let previous = THREAD_LEVEL.with(|cell| cell.replace(Some(Level::best_up_to(level))));
    let result = f();
    THREAD_LEVEL.with(|cell| cell.set(previous));
    result
}

/// Fixes this thread's level (a thread pool's start handler).
pub fn set_thread_level(level: Level) {
    THREAD_LEVEL.with(|cell| cell.set(Some(Level::best_up_to(level))));
}

/// Runs `kernel` compiled for this thread's level: its `with_simd` (marked
/// `#[inline(always)]`, as [`simd_kernel!`] writes it) is inlined into a function built with
/// that level's target features, so its loops vectorize for them.
#[inline(always)]
pub fn dispatch<K: pulp::WithSimd>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    match level() {
        Level::Avx512 => {
            if let Some(simd) = pulp::x86::V4::try_new() {
                return pulp::Simd::vectorize(simd, kernel);
            }
        }
        Level::Avx2 => {
            if let Some(simd) = pulp::x86::V3::try_new() {
                return pulp::Simd::vectorize(simd, kernel);
            }
        }
        Level::Scalar => {}
    }
    kernel.with_simd(pulp::Scalar)
}

/// Defines a function whose body runs compiled for the thread's SIMD level ([`dispatch`]).
///
/// A closure handed to a function with target features is compiled with them only if the
/// compiler inlines it there, which it declines for loops of any size (measured: the
/// kernels stayed at SSE2). So each kernel's body becomes the `#[inline(always)]` method of a
/// one-off type holding its arguments, and is always inlined. Arguments are plain
/// `name: Type` pairs; everything else is an ordinary function.
macro_rules! simd_kernel {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            struct Kernel<T>(T);
            impl pulp::WithSimd for Kernel<($($ty,)*)> {
                type Output = $crate::engine::simd::simd_kernel!(@output $($ret)?);
                #[inline(always)]
                fn with_simd<S: pulp::Simd>(self, _simd: S) -> Self::Output {
                    let ($($arg,)*) = self.0;
                    $body
                }
            }
            $crate::engine::simd::dispatch(Kernel(($($arg,)*)))
        }
    };
    (@output) => { () };
    (@output $ret:ty) => { $ret };
}
pub(crate) use simd_kernel;

/// The CPU's model name from /proc/cpuinfo (Linux) with its family and model numbers (a
/// virtual machine may show only "AMD EPYC"), or "unknown", for reports.
pub fn cpu_model() -> String {
    let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") else {
        return "unknown".to_string();
    };
    let field = |name: &str| {
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.trim() == name)
            .map(|(_, value)| value.trim().to_string())
    };
    match (field("model name"), field("cpu family"), field("model")) {
        (Some(name), Some(family), Some(model)) => {
            format!("{name} (family {family}, model {model})")
        }
        (Some(name), _, _) => name,
        _ => "unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_by_name_and_scalar_is_always_supported() {
        assert_eq!(Level::parse(" AVX512 "), Some(Level::Avx512));
        assert_eq!(Level::parse("avx2"), Some(Level::Avx2));
        assert_eq!(Level::parse("scalar"), Some(Level::Scalar));
        assert_eq!(Level::parse("sse9"), None);
        assert!(Level::Scalar.supported());
        assert_eq!(Level::supported_levels()[0], Level::Scalar);
        assert_eq!(Level::best_up_to(Level::Scalar), Level::Scalar);
    }

    #[test]
    fn with_level_sets_this_thread_only_and_restores() {
        let before = level();
        with_level(Level::Scalar, || {
            assert_eq!(level(), Level::Scalar);
            let other = std::thread::spawn(level).join().unwrap();
            assert_eq!(other, before);
        });
        assert_eq!(level(), before);
    }

    simd_kernel! {
        fn doubled_sum(values: &[f32]) -> f32 {
            values.iter().map(|v| v * 2.0).sum::<f32>()
        }
    }

    #[test]
    fn a_kernel_runs_at_every_level() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25).collect();
        for level in Level::supported_levels() {
            let total = with_level(level, || doubled_sum(&values));
            assert_eq!(total, 249_750.0, "{level:?}");
        }
    }
}
