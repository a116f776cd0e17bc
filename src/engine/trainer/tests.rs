//! The trainer's evaluation where the optimizer says the model is evaluated: a
//! schedule-free optimizer's x, batch norm's statistics recomputed there, held to
//! `schedulefree` (tests/golden/challengers.json's batch-norm case); every other optimizer's
//! exactly as before.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::{Trainer, STATISTICS_BATCHES};
use crate::engine::backend::DeviceData;
use crate::engine::data::Task;
use crate::engine::model::{Model, ModelShape};
use crate::engine::optim::challengers::{
    batch, cases, flat, floats, recorded_step, relative_error, singles, spec, Path, RELATIVE,
};
use crate::engine::optim::Optimizer;
use crate::engine::rng::Rng;
use crate::engine::spec::{defaults, BackendChoice, LayerSpec, ModelSpec, OptimizerSpec};

/// The BN case's model as lrtune builds it, with the golden initial weights and batch norm's
/// statistics at PyTorch's start (mean 0, variance 1).
fn bn_trainer(case: &Value, backend: BackendChoice) -> Trainer {
    let layers: Vec<LayerSpec> = serde_json::from_value(case["layers"].clone()).unwrap();
    let shape = ModelShape {
        input: vec![6],
        output: 3,
        task: Task::Classification,
    };
    let device = Device::Cpu;
    let model = Model::build(
        &ModelSpec::Sequential {
            layers,
            context: None,
        },
        &shape,
        0,
        &device,
    )
    .unwrap();
    let mut tensors = HashMap::new();
    let initial = case["initial"].as_object().unwrap();
    for (name, var) in model.parameter_names().zip(model.vars()) {
        let values = singles(&initial[name]);
        tensors.insert(
            name.clone(),
            Tensor::from_vec(values, var.shape(), &device).unwrap(),
        );
    }
    for (name, var) in model.buffer_names().zip(model.buffers()) {
        let start = if name.ends_with("running_var") {
            var.as_tensor().ones_like()
        } else {
            var.as_tensor().zeros_like()
        };
        tensors.insert(name.clone(), start.unwrap());
    }
    model.load_state_dict(&tensors).unwrap();
    Trainer::new(model, backend)
}

fn device_data(case: &Value, x: &str, y: &str) -> DeviceData {
    let (x, y) = batch(case, x, y, &Device::Cpu);
    DeviceData {
        rows: x.dim(0).unwrap(),
        x,
        y,
        task: Task::Classification,
    }
}

fn batch_norm_case() -> Value {
    let case = cases()
        .into_iter()
        .find(|case| case["name"] == "schedule_free_adamw_batch_norm")
        .unwrap();
    assert_eq!(case["bn_passes"].as_u64(), Some(STATISTICS_BATCHES as u64));
    case
}

fn buffers(trainer: &Trainer) -> Vec<Vec<f32>> {
    trainer
        .model()
        .buffers()
        .iter()
        .map(|var| var.as_tensor().to_vec1::<f32>().unwrap())
        .collect()
}

/// The BN case's evaluation through `evaluate_with` after its 20 steps: the loss at x (the
/// statistics recomputed there), and then the weights back at y and the statistics as
/// training left them. Returns the loss's error.
fn evaluate_at_x(case: &Value, trainer: &Trainer, optimizer: &mut Optimizer) -> f64 {
    let train = device_data(case, "x", "y");
    let validation = device_data(case, "eval_x", "eval_y");
    let trained = buffers(trainer);
    let y_params = flat(trainer.model().vars());
    let evaluation = trainer
        .evaluate_with(
            optimizer,
            &validation,
            &train,
            train.rows,
            &AtomicBool::new(false),
        )
        .unwrap();
    let want = case["eval_loss"].as_f64().unwrap();
    assert_eq!(buffers(trainer), trained);
    let back = relative_error(
        trainer
            .model()
            .vars()
            .iter()
            .flat_map(|var| {
                var.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
            .as_slice(),
        &y_params.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    assert!(back < 1e-5, "y after the evaluation: {back:e}");
    // At y with the training statistics the loss differs: x and the recompute mattered.
    let at_y = trainer
        .evaluate(&validation, &AtomicBool::new(false))
        .unwrap();
    assert!((at_y.loss - want).abs() > 1e-3, "{} at y", at_y.loss);
    (evaluation.loss - want).abs() / want
}

#[test]
fn a_batch_norm_network_is_evaluated_at_x_with_statistics_recomputed_there() {
    // The library's gradients, as in the other cases; each optimizer step with the backend
    // whose step uses it (host slices: native; candle's: candle).
    let case = batch_norm_case();
    for (backend, path) in [
        (BackendChoice::Native, Path::Host),
        (BackendChoice::Candle, Path::Candle),
    ] {
        let trainer = bn_trainer(&case, backend);
        let vars = trainer.model().vars().to_vec();
        let mut optimizer = Optimizer::new(&spec(&case), &vars);
        let (lrs, momenta) = (floats(&case["lr"]), floats(&case["momentum"]));
        let recorded = case["grads_each_step"].as_array().unwrap();
        for index in 0..lrs.len() {
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
        let after = floats(
            case["params_after_each_step"]
                .as_array()
                .unwrap()
                .last()
                .unwrap(),
        );
        let params = relative_error(&flat(&vars), &after);
        // The statistics training left (from the library: recorded steps take no forward
        // pass).
        for (name, var) in trainer
            .model()
            .buffer_names()
            .zip(trainer.model().buffers())
        {
            let values = singles(&case["running_before_recompute"][name]);
            var.set(&Tensor::new(values.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let x_params = {
            optimizer.eval().unwrap();
            let x = flat(&vars);
            optimizer.train().unwrap();
            relative_error(&x, &floats(&case["eval_params"]))
        };
        let loss = evaluate_at_x(&case, &trainer, &mut optimizer);
        println!(
            "schedule_free_adamw_batch_norm {path:?}/{backend:?}: params {params:e}, x {x_params:e}, eval loss at x {loss:e}"
        );
        assert!(params < RELATIVE && x_params < RELATIVE, "{backend:?}");
        assert!(loss < RELATIVE, "{backend:?}: eval loss error {loss:e}");
    }
}

#[test]
fn a_batch_norm_network_trained_by_the_engine_follows_the_library() {
    // Through the backends' own forward and backward passes (see
    // `training_through_the_network_follows_the_libraries` for the looser bounds).
    let case = batch_norm_case();
    let train = device_data(&case, "x", "y");
    let rows: Vec<usize> = (0..train.rows).collect();
    for backend in [BackendChoice::Native, BackendChoice::Candle] {
        let trainer = bn_trainer(&case, backend);
        let vars = trainer.model().vars().to_vec();
        let mut optimizer = Optimizer::new(&spec(&case), &vars);
        let mut dropout_rng = Rng::new(0);
        let (lrs, momenta) = (floats(&case["lr"]), floats(&case["momentum"]));
        let golden_losses = floats(&case["losses"]);
        for index in 0..lrs.len() {
            let loss = trainer
                .train_step(
                    &mut optimizer,
                    &train,
                    &rows,
                    lrs[index],
                    momenta[index],
                    &mut dropout_rng,
                )
                .unwrap();
            let want = golden_losses[index];
            assert!(
                (loss - want).abs() < 1e-4 * want,
                "{backend:?} step {index}: loss {loss}, PyTorch {want}"
            );
        }
        let after = floats(
            case["params_after_each_step"]
                .as_array()
                .unwrap()
                .last()
                .unwrap(),
        );
        let params = relative_error(&flat(&vars), &after);
        let trained = buffers(&trainer);
        let mut statistics = 0f64;
        for (name, values) in trainer.model().buffer_names().zip(&trained) {
            let want = floats(&case["running_before_recompute"][name]);
            statistics = statistics.max(relative_error(values, &want));
        }
        let loss = evaluate_at_x(&case, &trainer, &mut optimizer);
        println!(
            "schedule_free_adamw_batch_norm {backend:?} trained by the engine: params {params:e}, statistics {statistics:e}, eval loss at x {loss:e}"
        );
        assert!(params < 1e-3 && statistics < 1e-3, "{backend:?}");
        assert!(loss < 1e-4, "{backend:?}: eval loss error {loss:e}");
    }
}

#[test]
fn other_optimizers_evaluate_exactly_as_before() {
    let case = cases()
        .into_iter()
        .find(|case| case["name"] == "schedule_free_adamw_batch_norm")
        .unwrap();
    let train = device_data(&case, "x", "y");
    let rows: Vec<usize> = (0..train.rows).collect();
    let trainer = bn_trainer(&case, BackendChoice::Native);
    let adam = OptimizerSpec::Adam {
        betas: defaults::betas(),
        eps: defaults::eps(),
        weight_decay: 0.0,
    };
    let mut optimizer = Optimizer::new(&adam, trainer.model().vars());
    trainer
        .train_step(&mut optimizer, &train, &rows, 0.01, 0.9, &mut Rng::new(0))
        .unwrap();
    let cancel = AtomicBool::new(false);
    let plain = trainer.evaluate(&train, &cancel).unwrap();
    let with = trainer
        .evaluate_with(&mut optimizer, &train, &train, 16, &cancel)
        .unwrap();
    assert_eq!(plain, with);
}
