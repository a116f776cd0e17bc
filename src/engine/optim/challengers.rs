//! The learning-rate-free optimizers held to their reference libraries
//! (tests/golden/challengers.json, from tests/golden/make_challengers.py): Prodigy
//! (`prodigyopt`) and schedule-free AdamW and SGD (`schedulefree`), each on both steps (candle
//! tensor ops and the native fused kernels), over 20 steps of a small classifier, and the
//! schedule-free evaluation weights x. The batch-norm case, evaluated at x through the
//! trainer, is `engine::trainer`'s test, with the helpers here.

use candle_core::{Device, Tensor, Var};
use serde_json::Value;

use super::tests::step;
pub(crate) use super::tests::Path;
use super::Optimizer;
use crate::engine::spec::{defaults, OptimizerSpec};

const GOLDEN: &str = include_str!("../../../tests/golden/challengers.json");

/// f32 against the library's f32 (its own rounding, fused multiply-adds included): 1e-5
/// relative, from an absolute floor of 1e-3 for weights near zero after the last step. On
/// the way, a weight crossing zero carries the rounding of the weights around it (a unit in
/// the last place is 3e-8 at 0.3) and of its steps (Prodigy's d differs from the library's
/// by 2e-7 relative, from `p0 - p` of nearly equal numbers early on, in steps of 0.15 late
/// on), so the steps before the last are held from a floor of 2e-2.
pub(crate) const RELATIVE: f64 = 1e-5;
pub(crate) const FLOOR: f64 = 1e-3;
pub(crate) const FLOOR_ON_THE_WAY: f64 = 2e-2;

pub(crate) fn cases() -> Vec<Value> {
    let golden: Value = serde_json::from_str(GOLDEN).expect("golden file parses");
    golden["cases"].as_array().expect("cases").clone()
}

pub(crate) fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("a list of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

pub(crate) fn singles(value: &Value) -> Vec<f32> {
    floats(value).iter().map(|&x| x as f32).collect()
}

/// The case's optimizer with the library's constructor arguments, absent ones at the
/// library's defaults (which are lrtune's).
pub(crate) fn spec(case: &Value) -> OptimizerSpec {
    let options = &case["options"];
    let number = |name: &str, default: f64| options[name].as_f64().unwrap_or(default);
    let flag = |name: &str, default: bool| options[name].as_bool().unwrap_or(default);
    let betas = options["betas"].as_array().map_or(defaults::betas(), |b| {
        [b[0].as_f64().unwrap(), b[1].as_f64().unwrap()]
    });
    let warmup_steps = options["warmup_steps"].as_u64().unwrap_or(0) as usize;
    match case["optimizer"].as_str().unwrap() {
        "prodigy" => OptimizerSpec::Prodigy {
            betas,
            beta3: options["beta3"].as_f64(),
            eps: number("eps", defaults::eps()),
            weight_decay: number("weight_decay", 0.0),
            decouple: flag("decouple", true),
            d0: number("d0", defaults::prodigy_d0()),
            d_coef: number("d_coef", defaults::prodigy_d_coef()),
            growth_rate: options["growth_rate"].as_f64(),
            use_bias_correction: flag("use_bias_correction", false),
            safeguard_warmup: flag("safeguard_warmup", false),
        },
        "schedule_free_adamw" => OptimizerSpec::ScheduleFreeAdamw {
            betas,
            eps: number("eps", defaults::eps()),
            weight_decay: number("weight_decay", 0.0),
            warmup_steps,
            r: number("r", 0.0),
            weight_lr_power: number("weight_lr_power", defaults::weight_lr_power()),
        },
        "schedule_free_sgd" => OptimizerSpec::ScheduleFreeSgd {
            momentum: number("momentum", defaults::sgd_momentum()),
            weight_decay: number("weight_decay", 0.0),
            warmup_steps,
            r: number("r", 0.0),
            weight_lr_power: number("weight_lr_power", defaults::weight_lr_power()),
        },
        other => panic!("unknown optimizer {other} in the golden file"),
    }
}

/// The largest error of `got` against `want` in units of `max(|want|, FLOOR)`.
pub(crate) fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    relative_error_from(got, want, FLOOR)
}

fn relative_error_from(got: &[f32], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / w.abs().max(floor))
        .fold(0.0, f64::max)
}

/// The case's network, Linear(6, 5), tanh, Linear(5, 3), with its initial weights.
fn network(case: &Value, device: &Device) -> Vec<Var> {
    let shapes: [&[usize]; 4] = [&[5, 6], &[5], &[3, 5], &[3]];
    let names = case["parameter_names"].as_array().unwrap();
    names
        .iter()
        .zip(shapes)
        .map(|(name, shape)| {
            let values = singles(&case["initial"][name.as_str().unwrap()]);
            Var::from_tensor(&Tensor::from_vec(values, shape, device).unwrap()).unwrap()
        })
        .collect()
}

pub(crate) fn batch(case: &Value, x: &str, y: &str, device: &Device) -> (Tensor, Tensor) {
    let inputs = singles(&case[x]);
    let rows = inputs.len() / 6;
    let labels: Vec<u32> = floats(&case[y]).iter().map(|&v| v as u32).collect();
    (
        Tensor::from_vec(inputs, (rows, 6), device).unwrap(),
        Tensor::from_vec(labels, rows, device).unwrap(),
    )
}

fn loss(vars: &[Var], x: &Tensor, y: &Tensor) -> Tensor {
    let hidden = x
        .matmul(&vars[0].as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(vars[1].as_tensor())
        .unwrap()
        .tanh()
        .unwrap();
    let logits = hidden
        .matmul(&vars[2].as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(vars[3].as_tensor())
        .unwrap();
    candle_nn::loss::cross_entropy(&logits, y).unwrap()
}

pub(crate) fn flat(vars: &[Var]) -> Vec<f32> {
    vars.iter()
        .flat_map(|var| {
            var.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// Where a run's gradients come from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Gradients {
    /// The library's, recorded before each of its steps: the optimizer compared alone.
    Recorded,
    /// The network's own forward and backward pass on candle.
    Network,
}

/// The worst errors of one case on one path: the parameters over every step (from
/// `FLOOR_ON_THE_WAY`) and after the last, at x, Prodigy's d, and the losses.
#[derive(Debug, Default)]
struct Errors {
    params: f64,
    final_params: f64,
    eval_params: Option<f64>,
    prodigy_d: Option<f64>,
    losses: f64,
}

/// A step with the recorded gradients (all parameters' concatenated): as host slices, or
/// through candle's autograd from `sum(param * gradient)`, whose gradient is exactly
/// `gradient`.
pub(crate) fn recorded_step(
    optimizer: &mut Optimizer,
    path: Path,
    vars: &[Var],
    gradient: &[f32],
    lr: f64,
    momentum: f64,
) {
    let mut start = 0;
    let grads: Vec<Vec<f32>> = vars
        .iter()
        .map(|var| {
            let len = var.elem_count();
            start += len;
            gradient[start - len..start].to_vec()
        })
        .collect();
    assert_eq!(start, gradient.len());
    match path {
        Path::Host => optimizer.step_host(&grads, lr, momentum).unwrap(),
        Path::Candle => {
            let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
            for (var, grad) in vars.iter().zip(grads) {
                let grad = Tensor::from_vec(grad, var.shape(), var.device()).unwrap();
                let term = (var.as_tensor() * grad).unwrap().sum_all().unwrap();
                total = (total + term).unwrap();
            }
            optimizer
                .step(&total.backward().unwrap(), lr, momentum)
                .unwrap()
        }
    }
}

fn run(case: &Value, path: Path, gradients: Gradients) -> Errors {
    let device = Device::Cpu;
    let vars = network(case, &device);
    let (x, y) = batch(case, "x", "y", &device);
    let spec = spec(case);
    let mut optimizer = Optimizer::new(&spec, &vars);
    let (lrs, momenta) = (floats(&case["lr"]), floats(&case["momentum"]));
    let after = case["params_after_each_step"].as_array().unwrap();
    let recorded = case["grads_each_step"].as_array().unwrap();
    let golden_losses = floats(&case["losses"]);
    let mut errors = Errors::default();
    for index in 0..lrs.len() {
        let loss = loss(&vars, &x, &y);
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        let want = golden_losses[index];
        errors.losses = errors.losses.max((value - want).abs() / want.abs());
        match gradients {
            Gradients::Recorded => {
                let gradient = singles(&recorded[index]);
                recorded_step(
                    &mut optimizer,
                    path,
                    &vars,
                    &gradient,
                    lrs[index],
                    momenta[index],
                );
            }
            Gradients::Network => {
                step(
                    &mut optimizer,
                    path,
                    &vars,
                    &loss,
                    lrs[index],
                    momenta[index],
                );
            }
        }
        let (got, want) = (flat(&vars), floats(&after[index]));
        let on_the_way = relative_error_from(&got, &want, FLOOR_ON_THE_WAY);
        errors.params = errors.params.max(on_the_way);
        errors.final_params = relative_error(&got, &want);
        if let Some(d) = case["prodigy_d"].as_array() {
            let (got, want) = (optimizer.prodigy_d().unwrap(), d[index].as_f64().unwrap());
            let error = (got - want).abs() / want.abs();
            errors.prodigy_d = Some(errors.prodigy_d.unwrap_or(0.0).max(error));
        }
    }
    if !case["eval_params"].is_null() {
        let y_params = flat(&vars);
        assert!(optimizer.evaluates_elsewhere());
        optimizer.eval().unwrap();
        errors.eval_params = Some(relative_error(&flat(&vars), &floats(&case["eval_params"])));
        // Back at y to within the lerps' rounding.
        optimizer.train().unwrap();
        let back = relative_error(
            &flat(&vars),
            &y_params.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        assert!(
            back < 1e-5,
            "{}: y after eval() and train(): {back:e}",
            case["name"]
        );
    } else {
        assert!(!optimizer.evaluates_elsewhere());
    }
    errors
}

fn mlp_cases() -> Vec<Value> {
    let cases = cases();
    assert_eq!(cases.len(), 9);
    cases
        .into_iter()
        .filter(|case| case["layers"].as_array().unwrap().len() == 3)
        .collect()
}

#[test]
fn both_steps_match_the_reference_libraries_on_every_golden_case() {
    let mut all = Vec::new();
    for case in &mlp_cases() {
        for path in [Path::Candle, Path::Host] {
            let errors = run(case, path, Gradients::Recorded);
            let name = case["name"].as_str().unwrap().to_string();
            // The report's numbers: `cargo test --lib challengers -- --nocapture`.
            println!("{name} {path:?}: {errors:?}");
            all.push((name, path, errors));
        }
    }
    for (name, path, errors) in all {
        assert!(errors.params < RELATIVE, "{name} {path:?}: {errors:?}");
        assert!(
            errors.final_params < RELATIVE,
            "{name} {path:?}: {errors:?}"
        );
        assert!(
            errors.eval_params.unwrap_or(0.0) < RELATIVE,
            "{name} {path:?}: {errors:?}"
        );
        assert!(
            errors.prodigy_d.unwrap_or(0.0) < RELATIVE,
            "{name} {path:?}: {errors:?}"
        );
    }
}

#[test]
fn training_through_the_network_follows_the_libraries() {
    // Gradients from candle's forward and backward pass differ from PyTorch's in the last
    // bits, and the optimizers amplify that (see make_challengers.py): the losses stay
    // within 1e-4, the weights within 1e-3.
    let mut all = Vec::new();
    for case in &mlp_cases() {
        for path in [Path::Candle, Path::Host] {
            let errors = run(case, path, Gradients::Network);
            let name = case["name"].as_str().unwrap().to_string();
            println!("{name} {path:?} through the network: {errors:?}");
            all.push((name, path, errors));
        }
    }
    for (name, path, errors) in all {
        assert!(errors.losses < 1e-4, "{name} {path:?}: {errors:?}");
        assert!(errors.final_params < 1e-3, "{name} {path:?}: {errors:?}");
    }
}

#[test]
fn the_candle_step_and_the_native_step_agree_on_the_challengers() {
    // The same f32 operations in the same order: equal to far below the libraries'
    // tolerance (the sums of Prodigy's estimate are added in another order).
    for case in &mlp_cases() {
        let device = Device::Cpu;
        let (x, y) = batch(case, "x", "y", &device);
        let finals: Vec<Vec<f32>> = [Path::Candle, Path::Host]
            .into_iter()
            .map(|path| {
                let vars = network(case, &device);
                let mut optimizer = Optimizer::new(&spec(case), &vars);
                for (lr, momentum) in floats(&case["lr"])
                    .into_iter()
                    .zip(floats(&case["momentum"]))
                {
                    let loss = loss(&vars, &x, &y);
                    step(&mut optimizer, path, &vars, &loss, lr, momentum);
                }
                flat(&vars)
            })
            .collect();
        let error = relative_error(
            &finals[0],
            &finals[1].iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        assert!(error < 1e-6, "{}: {error:e}", case["name"]);
    }
}

#[test]
fn restoring_a_challengers_state_replays_the_same_steps() {
    for case in &mlp_cases() {
        for path in [Path::Candle, Path::Host] {
            let device = Device::Cpu;
            let (x, y) = batch(case, "x", "y", &device);
            let vars = network(case, &device);
            let mut optimizer = Optimizer::new(&spec(case), &vars);
            let train = |optimizer: &mut Optimizer, steps: usize| {
                for _ in 0..steps {
                    let loss = loss(&vars, &x, &y);
                    step(optimizer, path, &vars, &loss, 0.5 * lr_of(case), 0.9);
                }
            };
            train(&mut optimizer, 3);
            let saved_state = optimizer.state().clone();
            let saved_weights: Vec<Tensor> =
                vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
            train(&mut optimizer, 2);
            let first = flat(&vars);
            let d = optimizer.prodigy_d();
            assert_ne!(optimizer.state(), &saved_state, "{path:?}");
            optimizer.restore(&saved_state);
            for (var, saved) in vars.iter().zip(&saved_weights) {
                var.set(saved).unwrap();
            }
            train(&mut optimizer, 2);
            assert_eq!(flat(&vars), first, "{} {path:?}", case["name"]);
            assert_eq!(optimizer.prodigy_d(), d, "{} {path:?}", case["name"]);
        }
    }
}

fn lr_of(case: &Value) -> f64 {
    floats(&case["lr"])[0]
}

#[test]
fn a_step_at_x_is_refused() {
    let case = &cases()[4];
    assert_eq!(case["optimizer"], "schedule_free_adamw");
    let device = Device::Cpu;
    let (x, y) = batch(case, "x", "y", &device);
    let vars = network(case, &device);
    let mut optimizer = Optimizer::new(&spec(case), &vars);
    assert!(
        !optimizer.evaluates_elsewhere(),
        "x is y before the first step"
    );
    let loss = loss(&vars, &x, &y);
    step(&mut optimizer, Path::Host, &vars, &loss, 0.01, 0.9);
    optimizer.eval().unwrap();
    let grads = loss.backward().unwrap();
    assert!(optimizer.step(&grads, 0.01, 0.9).is_err());
}
