//! `lrtune-dev bench`: milliseconds per training step (forward + backward + optimizer) for the
//! reference cases, per step of a whole range-test job on mnist10k for three of them, the wall
//! time of a `tune` job on mnist10k, and peak memory; and, when `torch` is importable, the
//! same work in PyTorch run side by side (bench_pytorch.py). It reports the CPU, the SIMD
//! levels it dispatched to, the threads and PyTorch's CPU capability, and computes the floors
//! from a matrix product timed in the same run.

use std::ffi::OsString;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use serde_json::Value;

use crate::Outcome;
use lrtune::engine::backend::{BatchOrder, DeviceData};
use lrtune::engine::data::{Dataset, Features, Targets, Task};
use lrtune::engine::model::{Model, ModelShape};
use lrtune::engine::optim::Optimizer;
use lrtune::engine::rng::Rng;
use lrtune::engine::spec::{Activation, BackendChoice, ModelSpec, OptimizerSpec};
use lrtune::engine::trainer::Trainer;
use lrtune::engine::{self, kernels, profile, simd, Limits, ValidSpec};

const PYTORCH_SCRIPT: &str = include_str!("bench_pytorch.py");

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Timed steps per case (after the warm-up).
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Rounds, alternating PyTorch and lrtune; each case reports its fastest round's median
    /// on both sides, so that a burst of load from elsewhere on the machine during one
    /// side's turn does not decide the ratio.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip the PyTorch reference even when torch is importable.
    #[arg(long)]
    pub no_pytorch: bool,
    /// Skip the mnist10k tune job.
    #[arg(long)]
    pub no_tune: bool,
    /// Skip the range-test job cases (a whole job's loop on mnist10k, per step).
    #[arg(long)]
    pub no_job: bool,
    /// Only the cases whose name contains this (e.g. `cnn`); the tune job still runs unless
    /// --no-tune.
    #[arg(long)]
    pub case: Option<String>,
    /// Python interpreter for the reference.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Instead of the tables: where one step's time goes, for each case (the batch gather,
    /// each layer's forward and backward pass, every matrix product, the loss, the optimizer),
    /// the median over --steps steps, then PyTorch's profiler on the same step.
    #[arg(long)]
    pub profile: bool,
}

struct Case {
    name: &'static str,
    model: ModelSpec,
    optimizer: OptimizerSpec,
    input: Vec<usize>,
    outputs: usize,
    task: Task,
    batch: usize,
    /// Dense models: 6 x batch x parameters FLOPs is the step's arithmetic.
    dense: bool,
}

fn sgd() -> OptimizerSpec {
    OptimizerSpec::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    }
}

fn adamw() -> OptimizerSpec {
    OptimizerSpec::Adamw {
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

fn mlp(hidden: &[usize]) -> ModelSpec {
    ModelSpec::Mlp {
        hidden: hidden.to_vec(),
        activation: Activation::Relu,
        dropout: 0.0,
    }
}

/// The layer-list case: a CNN with batch norm, dropout, GELU and layer norm (the README's
/// example; `layers_cnn` in bench_pytorch.py).
const LAYER_LIST_CNN: &str = r#"[
    {"type": "conv2d", "out": 32, "kernel": 3, "padding": 1},
    {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool2d", "size": 2},
    {"type": "dropout", "p": 0.1}, {"type": "flatten"},
    {"type": "linear", "out": 128}, {"type": "gelu"}, {"type": "layer_norm"},
    {"type": "linear", "out": 10}]"#;

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "mlp-784-512-512-10-sgd",
            model: mlp(&[512, 512]),
            optimizer: sgd(),
            input: vec![784],
            outputs: 10,
            task: Task::Classification,
            batch: 128,
            dense: true,
        },
        Case {
            name: "mlp-784-512-512-10-adamw",
            model: mlp(&[512, 512]),
            optimizer: adamw(),
            input: vec![784],
            outputs: 10,
            task: Task::Classification,
            batch: 128,
            dense: true,
        },
        Case {
            name: "mlp-64-128-128-10-sgd",
            model: mlp(&[128, 128]),
            optimizer: sgd(),
            input: vec![64],
            outputs: 10,
            task: Task::Classification,
            batch: 128,
            dense: true,
        },
        Case {
            name: "cnn-16-32-sgd",
            model: ModelSpec::Cnn {
                channels: vec![16, 32],
                hidden: 128,
            },
            optimizer: sgd(),
            input: vec![1, 28, 28],
            outputs: 10,
            task: Task::Classification,
            batch: 128,
            dense: false,
        },
        Case {
            name: "layers-cnn-bn-sgd",
            model: ModelSpec::Sequential {
                layers: serde_json::from_str(LAYER_LIST_CNN)
                    .expect("the bench's layer list parses"),
                context: None,
            },
            optimizer: sgd(),
            input: vec![1, 28, 28],
            outputs: 10,
            task: Task::Classification,
            batch: 128,
            dense: false,
        },
        Case {
            name: "transformer-64x2-adamw",
            model: ModelSpec::Transformer {
                d_model: 64,
                heads: 4,
                layers: 2,
                context: 64,
            },
            optimizer: adamw(),
            input: vec![64],
            outputs: 65,
            task: Task::LanguageModel,
            batch: 32,
            dense: false,
        },
    ]
}

/// Random data of the case's shape: 8 batches' worth, cycled.
fn synthetic(case: &Case) -> Dataset {
    let mut rng = Rng::new(7);
    let rows = case.batch * 8;
    let per_row: usize = case.input.iter().product();
    match case.task {
        Task::LanguageModel => {
            let ids = |rng: &mut Rng| -> Vec<u32> {
                (0..rows * per_row)
                    .map(|_| rng.below(case.outputs) as u32)
                    .collect()
            };
            Dataset {
                features: Features::Tokens {
                    ids: ids(&mut rng),
                    context: per_row,
                },
                targets: Targets::Tokens {
                    ids: ids(&mut rng),
                    vocab: case.outputs,
                },
            }
        }
        _ => Dataset {
            features: Features::Dense {
                values: (0..rows * per_row).map(|_| rng.normal() as f32).collect(),
                sample_shape: case.input.clone(),
            },
            targets: Targets::Classes {
                labels: (0..rows).map(|_| rng.below(case.outputs) as u32).collect(),
                classes: case.outputs,
            },
        },
    }
}

struct Timing {
    median_ms: f64,
    parameters: usize,
}

/// A case's model, optimizer and data, stepped as the bench times and profiles it.
struct CaseRun {
    trainer: Trainer,
    train: DeviceData,
    optimizer: Optimizer,
    order: BatchOrder,
    dropout: Rng,
}

impl CaseRun {
    fn new(case: &Case) -> anyhow::Result<CaseRun> {
        let device = Device::Cpu;
        let shape = ModelShape {
            input: case.input.clone(),
            output: case.outputs,
            task: case.task,
        };
        let trainer = Trainer::new(
            Model::build(&case.model, &shape, 0, &device)?,
            BackendChoice::Auto,
        );
        let train = DeviceData::new(&synthetic(case), &device)?;
        let optimizer = Optimizer::new(&case.optimizer, trainer.model().vars());
        let order = BatchOrder::new(train.rows, case.batch, 0);
        Ok(CaseRun {
            trainer,
            train,
            optimizer,
            order,
            dropout: Rng::new(0),
        })
    }

    /// One training step; its wall time in seconds.
    fn step(&mut self) -> anyhow::Result<f64> {
        let started = Instant::now();
        self.trainer.train_step(
            &mut self.optimizer,
            &self.train,
            self.order.next_batch(),
            0.01,
            0.9,
            &mut self.dropout,
        )?;
        Ok(started.elapsed().as_secs_f64())
    }
}

fn time_case(case: &Case, warmup: usize, steps: usize) -> anyhow::Result<Timing> {
    let mut run = CaseRun::new(case)?;
    let mut times = Vec::with_capacity(steps);
    for step in 0..warmup + steps {
        let seconds = run.step()?;
        if step >= warmup {
            times.push(seconds * 1000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: times[times.len() / 2],
        parameters: run.trainer.model().parameter_count(),
    })
}

/// `--profile`: one case's step, its spans' medians over `args.steps` steps as a tree, a
/// summary by kind of work, and PyTorch's profile of the same step.
fn profile_case(case: &Case, args: &BenchArgs) -> anyhow::Result<()> {
    let mut run = CaseRun::new(case)?;
    let mut steps: Vec<(f64, Vec<profile::Entry>)> = Vec::with_capacity(args.steps);
    for step in 0..args.warmup + args.steps.max(1) {
        profile::start();
        let wall = run.step();
        let entries = profile::finish();
        let wall = wall?;
        if step >= args.warmup {
            steps.push((wall, entries));
        }
    }
    let layout = |entries: &[profile::Entry]| -> Vec<(usize, String)> {
        entries
            .iter()
            .map(|entry| (entry.depth, entry.label.clone()))
            .collect()
    };
    let first = layout(&steps[0].1);
    anyhow::ensure!(
        steps.iter().all(|(_, entries)| layout(entries) == first),
        "the steps of {} did not all run the same spans",
        case.name
    );
    let median = |values: Vec<f64>| -> f64 {
        let mut values = values;
        values.sort_by(f64::total_cmp);
        values[values.len() / 2] * 1000.0
    };
    let wall = median(steps.iter().map(|(wall, _)| *wall).collect());
    println!();
    println!(
        "profile of {} ({}): median ms per step over {} steps, {} threads",
        case.name,
        case.batch,
        steps.len(),
        rayon::current_num_threads()
    );
    println!(
        "{:>8} {:>6}  step (wall time of train_step)",
        format!("{wall:.3}"),
        "100%"
    );
    for (index, (depth, label)) in first.iter().enumerate() {
        let ms = median(steps.iter().map(|(_, e)| e[index].seconds).collect());
        let rate = product_flops(label).map_or(String::new(), |flops| {
            format!("  {:.0} GFLOP/s", flops / (ms / 1000.0) / 1e9)
        });
        println!(
            "{:>8.3} {:>5.1}%  {}{label}{rate}",
            ms,
            100.0 * ms / wall,
            "  ".repeat(depth + 1)
        );
    }
    // By kind of work, each summed within a step, then the median over the steps. A kind
    // is the spans whose label starts with one of its prefixes, at the top of the step or
    // at any depth.
    let kind = |prefixes: &[&str], top_only: bool| -> f64 {
        median(
            steps
                .iter()
                .map(|(_, entries)| {
                    entries
                        .iter()
                        .filter(|entry| !top_only || entry.depth == 0)
                        .filter(|entry| prefixes.iter().any(|p| entry.label.starts_with(p)))
                        .map(|entry| entry.seconds)
                        .sum()
                })
                .collect(),
        )
    };
    let products = kind(&["product "], false);
    let copies = kind(&["transpose "], false);
    let passes = kind(&["forward ", "backward "], true);
    let top = median(
        steps
            .iter()
            .map(|(wall, e)| {
                wall - e
                    .iter()
                    .filter(|entry| entry.depth == 0)
                    .map(|entry| entry.seconds)
                    .sum::<f64>()
            })
            .collect(),
    );
    println!("by kind (ms per step):");
    println!("{products:>8.3}  matrix products");
    println!("{copies:>8.3}  transposes around the products");
    println!(
        "{:>8.3}  element-wise work in the layer passes (their time less their products and transposes)",
        passes - products - copies
    );
    for (name, prefix) in [
        ("gather the batch", "gather"),
        ("loss", "loss"),
        ("optimizer", "optimizer"),
    ] {
        println!("{:>8.3}  {name}", kind(&[prefix], true));
    }
    println!(
        "{top:>8.3}  outside every span (handing the step to the pool, the step's bookkeeping)"
    );
    if !args.no_pytorch {
        match pytorch_profile(args, case.name) {
            Ok(table) => println!("\n{table}"),
            Err(error) => eprintln!("PyTorch profile not run: {error:#}"),
        }
    }
    Ok(())
}

/// The FLOPs of a span labelled `product MxNxK`.
fn product_flops(label: &str) -> Option<f64> {
    let dims: Vec<f64> = label
        .strip_prefix("product ")?
        .split('x')
        .map(|dim| dim.parse().ok())
        .collect::<Option<_>>()?;
    (dims.len() == 3).then(|| 2.0 * dims.iter().product::<f64>())
}

/// bench_pytorch.py's profile of one case, as text.
fn pytorch_profile(args: &BenchArgs, case: &str) -> anyhow::Result<String> {
    let stdout = run_pytorch_script(args, "profile", &["--profile".into(), case.into()])?;
    Ok(String::from_utf8_lossy(&stdout).trim_end().to_string())
}

/// Runs bench_pytorch.py with `WARMUP STEPS` and then `extra`; its standard output when it
/// succeeds, else the last line of its standard error.
fn run_pytorch_script(
    args: &BenchArgs,
    purpose: &str,
    extra: &[OsString],
) -> anyhow::Result<Vec<u8>> {
    let dir = tempfile_dir(purpose)?;
    let script = dir.join("bench_pytorch.py");
    let output = std::fs::write(&script, PYTORCH_SCRIPT)
        .context("writing the PyTorch script")
        .and_then(|()| {
            Command::new(&args.python)
                .arg(&script)
                .arg(args.warmup.to_string())
                .arg(args.steps.to_string())
                .args(extra)
                .output()
                .with_context(|| format!("running {}", args.python))
        });
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    anyhow::ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .last()
            .unwrap_or("python failed")
    );
    Ok(output.stdout)
}

/// The cases also timed as a whole range-test job on mnist10k (loop included).
const JOB_CASES: [&str; 3] = [
    "mlp-784-512-512-10-sgd",
    "mlp-784-512-512-10-adamw",
    "cnn-16-32-sgd",
];
/// Steps of the range-test job, and its learning rates: low enough that no case diverges
/// and stops early, so both sides time every step.
const JOB_STEPS: usize = 150;
const JOB_START_LR: f64 = 1e-5;
const JOB_END_LR: f64 = 1e-2;
/// The matmul that measures the machine's rate for the floors.
const MATMUL_SIZE: usize = 512;

pub fn run(args: BenchArgs) -> anyhow::Result<Outcome> {
    let wanted = |case: &Case| {
        args.case
            .as_ref()
            .is_none_or(|name| case.name.contains(name.as_str()))
    };
    let cases: Vec<Case> = cases().into_iter().filter(wanted).collect();
    if args.profile {
        println!("cpu: {}", simd::cpu_model());
        for case in &cases {
            profile_case(case, &args)?;
        }
        return Ok(Outcome::Ok);
    }
    let rounds = args.rounds.max(1);
    let job_data = if args.no_job {
        None
    } else {
        Some(JobData::new(&args)?)
    };
    let job_cases = |case: &Case| job_data.is_some() && JOB_CASES.contains(&case.name);
    let mut ours = vec![f64::INFINITY; cases.len()];
    let mut ours_job = vec![f64::INFINITY; cases.len()];
    let mut theirs: Vec<Option<f64>> = vec![None; cases.len()];
    let mut theirs_job: Vec<Option<f64>> = vec![None; cases.len()];
    let mut parameters = vec![0; cases.len()];
    let mut reference_info = None;
    let mut job_steps = vec![0; cases.len()];
    for _ in 0..rounds {
        if !args.no_pytorch {
            if let Some(reference) = pytorch_reference(&args, job_data.as_ref()) {
                let best_of = |best: &mut Option<f64>, ms: Option<f64>| {
                    if let Some(ms) = ms {
                        *best = Some(best.map_or(ms, |b: f64| b.min(ms)));
                    }
                };
                for (index, case) in cases.iter().enumerate() {
                    best_of(&mut theirs[index], reference[case.name].as_f64());
                    best_of(&mut theirs_job[index], reference["job"][case.name].as_f64());
                }
                reference_info = Some(reference);
            }
        }
        for (index, case) in cases.iter().enumerate() {
            let timing = time_case(case, args.warmup, args.steps)?;
            ours[index] = ours[index].min(timing.median_ms);
            parameters[index] = timing.parameters;
            if job_cases(case) {
                let job = time_range_job(case)?;
                ours_job[index] = ours_job[index].min(job.ms_per_step);
                job_steps[index] = job.steps;
            }
        }
    }

    let matmul = kernels::gemm::matmul_flops(MATMUL_SIZE, 0.5);
    println!("cpu: {}", simd::cpu_model());
    println!(
        "lrtune: element-wise kernels {} ({}), matmul by gemm ({}), {} threads",
        simd::level().name(),
        match std::env::var(simd::LEVEL_VAR) {
            Ok(cap) => format!("{}={cap}", simd::LEVEL_VAR),
            Err(_) => "the best this CPU has".to_string(),
        },
        gemm_level(),
        rayon::current_num_threads(),
    );
    match &reference_info {
        Some(reference) => println!(
            "pytorch {}: cpu capability {}, {} threads",
            reference["version"].as_str().unwrap_or("?"),
            reference["capability"].as_str().unwrap_or("?"),
            reference["threads"]
        ),
        None => println!("pytorch: not run"),
    }
    let torch_matmul = reference_info
        .as_ref()
        .and_then(|reference| reference["matmul_gflops"].as_f64());
    println!(
        "f32 matmul {MATMUL_SIZE}^3, measured now: lrtune {:.0} GFLOP/s, pytorch {}",
        matmul / 1e9,
        torch_matmul.map_or("-".to_string(), |rate| format!("{rate:.0} GFLOP/s"))
    );
    println!();
    println!(
        "{:<32} {:>10} {:>10} {:>7} {:>9}",
        "case (batch)", "lrtune ms", "torch ms", "ratio", "floor ms"
    );
    for (index, case) in cases.iter().enumerate() {
        // The floor: the step's 6 x batch x parameters FLOPs of matrix products at the
        // faster of the two measured matmul rates.
        let rate = torch_matmul.map_or(matmul, |torch| matmul.max(torch * 1e9));
        let floor = case
            .dense
            .then(|| 6.0 * case.batch as f64 * parameters[index] as f64 / rate * 1000.0);
        println!(
            "{:<32} {:>10.2} {:>10} {:>7} {:>9}",
            format!("{} ({})", case.name, case.batch),
            ours[index],
            format_ms(theirs[index]),
            ratio(ours[index], theirs[index]),
            format_ms(floor),
        );
    }
    println!(
        "ms per step (forward, backward, optimizer): median of {} steps after {} warm-up, \
         fastest of {rounds} rounds",
        args.steps, args.warmup
    );
    if job_data.is_some() && cases.iter().any(job_cases) {
        println!();
        println!(
            "{:<32} {:>10} {:>10} {:>7} {:>9}",
            "range-test job on mnist10k", "lrtune ms", "torch ms", "ratio", "bare ms"
        );
        for (index, case) in cases.iter().enumerate().filter(|(_, case)| job_cases(case)) {
            println!(
                "{:<32} {:>10.2} {:>10} {:>7} {:>9.2}",
                format!("{} ({})", case.name, case.batch),
                ours_job[index],
                format_ms(theirs_job[index]),
                ratio(ours_job[index], theirs_job[index]),
                ours[index],
            );
        }
        println!(
            "ms per step in the loop: a {JOB_STEPS}-step range test ({JOB_START_LR:e} to \
             {JOB_END_LR:e}) run as a job, the median of the {} intervals between its \
             points; torch: the same loop written plainly (shuffled batches gathered from tensors, lr set and \
             loss read every step, smoothing); fastest of {rounds} rounds",
            job_steps
                .iter()
                .copied()
                .max()
                .unwrap_or(0)
                .saturating_sub(1)
        );
    }
    if !args.no_tune {
        let limits = Limits::default();
        let spec = ValidSpec::parse(include_str!("../../examples/mnist-mlp.json"), &limits)?;
        let loaded = engine::load_local_data(&spec)?;
        let started = Instant::now();
        let output = engine::run_job(&spec, loaded, &limits, &AtomicBool::new(false), &mut |_| {})?;
        println!(
            "tune examples/mnist-mlp.json: {:.2} s wall, {} steps ({:.0} steps/s)",
            started.elapsed().as_secs_f64(),
            output.result.timing.total_steps,
            output.result.timing.steps_per_second
        );
    }
    if let Some(peak) = peak_memory_mib() {
        println!("peak memory (VmHWM): {peak:.0} MiB");
    }
    Ok(Outcome::Ok)
}

fn format_ms(ms: Option<f64>) -> String {
    ms.map_or("-".to_string(), |ms| format!("{ms:.2}"))
}

fn ratio(ours: f64, theirs: Option<f64>) -> String {
    theirs.map_or("-".to_string(), |t| format!("{:.2}", ours / t))
}

/// The instruction set gemm's kernels use: it picks AVX-512 (built with its `x86-v4`
/// feature), else AVX2 + FMA, by its own run-time check of the same CPU flags.
fn gemm_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2";
        }
    }
    "scalar"
}

/// mnist10k for the job cases, and the same values written out for the PyTorch loop.
struct JobData {
    dir: std::path::PathBuf,
    rows: usize,
    train_rows: usize,
}

impl JobData {
    fn new(args: &BenchArgs) -> anyhow::Result<JobData> {
        let data = engine::data::mnist10k();
        let rows = data.rows();
        // The split a job on mnist10k makes by default (the spec's default fraction).
        let spec: engine::JobSpec = serde_json::from_str(r#"{"data": {"builtin": "mnist10k"}}"#)?;
        let train_rows = rows - (rows as f64 * spec.validation_fraction).round() as usize;
        let dir = tempfile_dir("data")?;
        if !args.no_pytorch {
            let (Features::Dense { values, .. }, Targets::Classes { labels, .. }) =
                (&data.features, &data.targets)
            else {
                anyhow::bail!("mnist10k is dense images with class labels");
            };
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(dir.join("x.f32"), bytes).context("writing mnist10k for PyTorch")?;
            let bytes: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(dir.join("y.u32"), bytes).context("writing mnist10k for PyTorch")?;
        }
        Ok(JobData {
            dir,
            rows,
            train_rows,
        })
    }
}

impl Drop for JobData {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct JobTiming {
    ms_per_step: f64,
    /// Points the job recorded (steps run).
    steps: usize,
}

/// A range test of the case's model and optimizer on mnist10k, run as a job through
/// `engine::run_job` with an observer that keeps every event (as a worker's does): the
/// median time from one curve point to the next.
fn time_range_job(case: &Case) -> anyhow::Result<JobTiming> {
    let spec = serde_json::json!({
        "kind": "range_test",
        "data": {"builtin": "mnist10k"},
        "model": case.model,
        "optimizer": case.optimizer,
        "batch_size": case.batch,
        "range_test": {"start_lr": JOB_START_LR, "end_lr": JOB_END_LR, "steps": JOB_STEPS},
    });
    let spec = ValidSpec::from_value(spec, &Limits::default())?;
    let loaded = engine::load_local_data(&spec)?;
    let mut events = Vec::with_capacity(4 * JOB_STEPS);
    let mut point_times = Vec::with_capacity(JOB_STEPS);
    engine::run_job(
        &spec,
        loaded,
        &Limits::default(),
        &AtomicBool::new(false),
        &mut |event| {
            if matches!(event, engine::Event::Point(_)) {
                point_times.push(Instant::now());
            }
            events.push(event);
        },
    )?;
    // The median interval between points, as the bare step is the median step: a mean would
    // let one step slowed by the rest of the machine move the figure.
    let mut intervals: Vec<f64> = point_times
        .windows(2)
        .map(|pair| (pair[1] - pair[0]).as_secs_f64() * 1000.0)
        .collect();
    anyhow::ensure!(
        !intervals.is_empty(),
        "the range test of {} recorded under two points",
        case.name
    );
    intervals.sort_by(f64::total_cmp);
    Ok(JobTiming {
        ms_per_step: intervals[intervals.len() / 2],
        steps: point_times.len(),
    })
}

fn pytorch_reference(args: &BenchArgs, job: Option<&JobData>) -> Option<Value> {
    let extra: Vec<OsString> = match job {
        Some(job) => vec![
            job.dir.clone().into(),
            job.rows.to_string().into(),
            job.train_rows.to_string().into(),
            JOB_STEPS.to_string().into(),
            JOB_START_LR.to_string().into(),
            JOB_END_LR.to_string().into(),
            JOB_CASES.join(",").into(),
        ],
        None => Vec::new(),
    };
    match run_pytorch_script(args, "script", &extra) {
        Ok(stdout) => serde_json::from_slice(&stdout).ok(),
        Err(error) => {
            eprintln!("PyTorch reference not run: {error:#}");
            None
        }
    }
}

/// A fresh folder of this process's own under the temporary directory.
fn tempfile_dir(purpose: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("lrtune-bench-{}-{purpose}", std::process::id()));
    std::fs::create_dir_all(&dir).context("creating a temporary folder")?;
    Ok(dir)
}

/// The process's peak resident memory, from /proc (Linux only).
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
