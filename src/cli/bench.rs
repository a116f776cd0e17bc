//! `lrtune bench`: milliseconds per training step (forward + backward + optimizer) for the
//! reference cases, the wall time of a `tune` job on mnist10k, and peak memory; and, when
//! `torch` is importable, the same cases in PyTorch run side by side (bench_pytorch.py).

use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use serde_json::Value;

use super::Outcome;
use crate::engine::data::{Dataset, Features, Targets, Task};
use crate::engine::model::{Model, ModelShape};
use crate::engine::optim::Optimizer;
use crate::engine::rng::Rng;
use crate::engine::spec::{Activation, ModelSpec, OptimizerSpec};
use crate::engine::train::{train_step, BatchOrder, DeviceData};
use crate::engine::{self, JobSpec, Limits};

const PYTORCH_SCRIPT: &str = include_str!("bench_pytorch.py");
/// The f32 matmul rate measured on this machine (2 threads), for the FLOP floor.
const MATMUL_FLOPS: f64 = 210e9;

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
    /// Only the cases whose name contains this (e.g. `cnn`); the tune job still runs unless
    /// --no-tune.
    #[arg(long)]
    pub case: Option<String>,
    /// Python interpreter for the reference.
    #[arg(long, default_value = "python3")]
    pub python: String,
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

fn time_case(case: &Case, warmup: usize, steps: usize) -> anyhow::Result<Timing> {
    let device = Device::Cpu;
    let data = synthetic(case);
    let shape = ModelShape {
        input: case.input.clone(),
        output: case.outputs,
        task: case.task,
    };
    let model = Model::build(&case.model, &shape, 0, &device)?;
    let train = DeviceData::new(&data, &device)?;
    let mut optimizer = Optimizer::new(&case.optimizer, model.vars());
    let mut order = BatchOrder::new(train.rows, case.batch, 0);
    let mut dropout = Rng::new(0);
    let mut times = Vec::with_capacity(steps);
    for step in 0..warmup + steps {
        let started = Instant::now();
        train_step(
            &model,
            &mut optimizer,
            &train,
            order.next_batch(),
            0.01,
            0.9,
            &mut dropout,
        )?;
        if step >= warmup {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: times[times.len() / 2],
        parameters: model.parameter_count(),
    })
}

pub fn run(args: BenchArgs) -> anyhow::Result<Outcome> {
    let wanted = |case: &Case| {
        args.case
            .as_ref()
            .is_none_or(|name| case.name.contains(name.as_str()))
    };
    let cases: Vec<Case> = cases().into_iter().filter(wanted).collect();
    let rounds = args.rounds.max(1);
    let mut ours = vec![f64::INFINITY; cases.len()];
    let mut theirs: Vec<Option<f64>> = vec![None; cases.len()];
    let mut parameters = vec![0; cases.len()];
    let mut reference_info = None;
    for _ in 0..rounds {
        if !args.no_pytorch {
            if let Some(reference) = pytorch_reference(&args) {
                for (best, case) in theirs.iter_mut().zip(&cases) {
                    if let Some(ms) = reference.get(case.name).and_then(Value::as_f64) {
                        *best = Some(best.map_or(ms, |b: f64| b.min(ms)));
                    }
                }
                reference_info = Some(reference);
            }
        }
        for (index, case) in cases.iter().enumerate() {
            let timing = time_case(case, args.warmup, args.steps)?;
            ours[index] = ours[index].min(timing.median_ms);
            parameters[index] = timing.parameters;
        }
    }
    println!(
        "{:<32} {:>10} {:>10} {:>7} {:>9}",
        "case (batch)", "lrtune ms", "torch ms", "ratio", "floor ms"
    );
    for (index, case) in cases.iter().enumerate() {
        let floor = case
            .dense
            .then(|| 6.0 * case.batch as f64 * parameters[index] as f64 / MATMUL_FLOPS * 1000.0);
        let torch = theirs[index];
        println!(
            "{:<32} {:>10.2} {:>10} {:>7} {:>9}",
            format!("{} ({})", case.name, case.batch),
            ours[index],
            torch.map_or("-".to_string(), |t| format!("{t:.2}")),
            torch.map_or("-".to_string(), |t| format!("{:.2}", ours[index] / t)),
            floor.map_or("-".to_string(), |f| format!("{f:.2}")),
        );
    }
    println!(
        "ms per step: median of {} steps after {} warm-up, fastest of {rounds} rounds",
        args.steps, args.warmup
    );
    if let Some(reference) = &reference_info {
        println!(
            "pytorch {} on {} threads",
            reference["version"].as_str().unwrap_or("?"),
            reference["threads"]
        );
    }
    if !args.no_tune {
        let spec = JobSpec::from_json(include_str!("../../examples/mnist-mlp.json"))?;
        let limits = Limits::default();
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

fn pytorch_reference(args: &BenchArgs) -> Option<Value> {
    let dir = tempfile_dir().ok()?;
    let script = dir.join("bench_pytorch.py");
    std::fs::write(&script, PYTORCH_SCRIPT).ok()?;
    let output = Command::new(&args.python)
        .arg(&script)
        .arg(args.warmup.to_string())
        .arg(args.steps.to_string())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    match output {
        Ok(output) if output.status.success() => serde_json::from_slice(&output.stdout).ok(),
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            eprintln!(
                "PyTorch reference not run: {}",
                stderr.lines().last().unwrap_or("python failed")
            );
            None
        }
        Err(error) => {
            eprintln!("PyTorch reference not run: {error}");
            None
        }
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("lrtune-bench-{}", std::process::id()));
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
