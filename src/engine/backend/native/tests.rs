//! The native step held to candle's autograd on every layer type, to PyTorch's golden
//! networks, and to itself at every SIMD level and for a preset and its layer list.

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};

use super::*;
use crate::engine::backend::candle::{self, Candle};
use crate::engine::data::{Dataset, Features, Targets};
use crate::engine::model::{golden, plan, ModelShape};
use crate::engine::simd::{with_level, Level};
use crate::engine::spec::{Activation, ModelSpec};

/// The native step's loss and gradients against candle's autograd on the same model,
/// batch and dropout draws.
fn assert_matches_autograd(model: &Model, train: &DeviceData, rows: &[usize]) {
    let mut workspace = None;
    let native_loss =
        forward_backward(model, &mut workspace, train, rows, &mut Rng::new(11)).unwrap();
    let native_grads = workspace.unwrap().grads;

    let (x, y) = train.batch(rows).unwrap();
    let forward = candle::forward(model, &x, &y, Some(&mut Rng::new(11))).unwrap();
    let loss = forward.loss.to_scalar::<f32>().unwrap() as f64;
    let grads = forward.loss.backward().unwrap();

    assert!(
        (native_loss - loss).abs() <= 1e-5 * loss.abs().max(1.0),
        "loss: native {native_loss}, autograd {loss}"
    );
    for (index, (var, native)) in model.vars().iter().zip(&native_grads).enumerate() {
        let want = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(native.len(), want.len(), "variable {index}");
        // Relative to the variable's largest gradient; one that is zero in exact arithmetic
        // (a bias before batch norm) is float noise on both sides, held to 1e-7.
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (position, (got, want)) in native.iter().zip(&want).enumerate() {
            assert!(
                (got - want).abs() <= 1e-4 * scale,
                "variable {index} [{position}]: native {got}, autograd {want} (largest {scale})"
            );
        }
    }
}

/// The native evaluation against candle's on a split whose size is not a multiple of
/// the batch (the last batch is padded), after a training step sized the workspace.
fn assert_evaluation_matches_candle(model: &Model, train: &DeviceData) {
    let rows: Vec<usize> = (0..train.rows / 2 + 1).collect();
    let mut workspace = None;
    forward_backward(model, &mut workspace, train, &rows, &mut Rng::new(1)).unwrap();
    assert!(!train.rows.is_multiple_of(rows.len()));
    let (loss, accuracy) =
        evaluate(model, &mut workspace, train, 256, &AtomicBool::new(false)).unwrap();
    let want = Candle
        .evaluate(model, train, &AtomicBool::new(false))
        .unwrap();
    assert!(
        (loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1.0),
        "loss: native {loss}, candle {}",
        want.loss
    );
    assert_eq!(accuracy, want.accuracy);
}

/// Random data for a model of `shape`: dense features or token ids.
fn random_data(shape: &ModelShape, rows: usize) -> DeviceData {
    let mut rng = Rng::new(21);
    let per_row: usize = shape.input.iter().product();
    let data = match shape.task {
        Task::LanguageModel => {
            let mut ids = || -> Vec<u32> {
                (0..rows * per_row)
                    .map(|_| rng.below(shape.output) as u32)
                    .collect()
            };
            Dataset {
                features: Features::Tokens {
                    ids: ids(),
                    context: per_row,
                },
                targets: Targets::Tokens {
                    ids: ids(),
                    vocab: shape.output,
                },
            }
        }
        task => Dataset {
            features: Features::Dense {
                values: (0..rows * per_row).map(|_| rng.normal() as f32).collect(),
                sample_shape: shape.input.clone(),
            },
            targets: match task {
                Task::Regression => Targets::Values {
                    values: (0..rows * shape.output)
                        .map(|_| rng.normal() as f32)
                        .collect(),
                    dims: shape.output,
                },
                _ => Targets::Classes {
                    labels: (0..rows).map(|_| rng.below(shape.output) as u32).collect(),
                    classes: shape.output,
                },
            },
        },
    };
    DeviceData::new(&data, &candle_core::Device::Cpu).unwrap()
}

/// One training step's loss and gradients and the evaluation of a fresh model, with every
/// kernel on every thread at `level` (gemm picks its own, the same at every level).
fn step_at(level: Level, spec: &ModelSpec, shape: &ModelShape) -> (f64, Vec<Vec<f32>>, f64) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .start_handler(move |_| crate::engine::simd::set_thread_level(level))
        .build()
        .unwrap();
    pool.install(|| {
        with_level(level, || {
            let model = Model::build(spec, shape, 4, &candle_core::Device::Cpu).unwrap();
            let data = random_data(shape, 48);
            let rows: Vec<usize> = (0..32).map(|i| (i * 5 + 1) % 48).collect();
            let mut workspace = None;
            let loss =
                forward_backward(&model, &mut workspace, &data, &rows, &mut Rng::new(3)).unwrap();
            let (eval_loss, _) =
                evaluate(&model, &mut workspace, &data, 32, &AtomicBool::new(false)).unwrap();
            (loss, workspace.unwrap().grads, eval_loss)
        })
    })
}

/// The element-wise kernels compute the same IEEE operations at every instruction-set
/// level (no fused multiply-adds, reductions in the same order), so a whole step at each
/// level this machine supports equals the scalar step bit for bit.
#[test]
fn every_simd_level_gives_the_scalar_step_bit_for_bit() {
    let dense = |input: Vec<usize>, output, task| ModelShape {
        input,
        output,
        task,
    };
    let mlp = |activation, dropout| ModelSpec::Mlp {
        hidden: vec![67, 33],
        activation,
        dropout,
    };
    let cases = [
        (
            mlp(Activation::Relu, 0.2),
            dense(vec![29], 10, Task::Classification),
        ),
        (
            mlp(Activation::Gelu, 0.0),
            dense(vec![29], 10, Task::Classification),
        ),
        (
            mlp(Activation::Tanh, 0.0),
            dense(vec![29], 3, Task::Regression),
        ),
        (
            mlp(Activation::Silu, 0.0),
            dense(vec![29], 10, Task::Classification),
        ),
        (
            ModelSpec::Cnn {
                channels: vec![8, 19],
                hidden: 24,
            },
            dense(vec![3, 9, 11], 10, Task::Classification),
        ),
        (
            ModelSpec::Transformer {
                d_model: 48,
                heads: 4,
                layers: 2,
                context: 21,
            },
            dense(vec![21], 13, Task::LanguageModel),
        ),
        (
            ModelSpec::Sequential {
                layers: serde_json::from_str(
                    r#"[{"type": "conv2d", "out": 6, "kernel": 3, "stride": 2, "padding": 1},
                        {"type": "batch_norm"}, {"type": "gelu"},
                        {"type": "max_pool2d", "size": 2}, {"type": "dropout", "p": 0.2},
                        {"type": "flatten"}, {"type": "linear", "out": 19},
                        {"type": "residual", "layers": [
                            {"type": "layer_norm"}, {"type": "linear", "out": 19},
                            {"type": "sigmoid"}]},
                        {"type": "linear", "out": 10}]"#,
                )
                .unwrap(),
                context: None,
            },
            dense(vec![3, 13, 11], 10, Task::Classification),
        ),
        (
            ModelSpec::Sequential {
                layers: serde_json::from_str(
                    r#"[{"type": "embedding", "dim": 48, "init_std": 0.02},
                        {"type": "position_embedding"},
                        {"type": "transformer_block", "heads": 4},
                        {"type": "layer_norm"}, {"type": "linear", "out": 13}]"#,
                )
                .unwrap(),
                context: Some(21),
            },
            dense(vec![21], 13, Task::LanguageModel),
        ),
    ];
    let levels = Level::supported_levels();
    eprintln!("levels on this machine: {levels:?}");
    for (spec, shape) in &cases {
        let (loss, grads, eval) = step_at(Level::Scalar, spec, shape);
        assert!(loss.is_finite() && eval.is_finite(), "{spec:?}");
        for &level in &levels[1..] {
            let (level_loss, level_grads, level_eval) = step_at(level, spec, shape);
            assert_eq!(level_loss.to_bits(), loss.to_bits(), "{level:?} {spec:?}");
            assert_eq!(level_eval.to_bits(), eval.to_bits(), "{level:?} {spec:?}");
            for (index, (got, want)) in level_grads.iter().zip(&grads).enumerate() {
                let same = got
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{level:?} {spec:?}: gradient {index} differs");
            }
        }
    }
}

/// The native step on PyTorch's golden networks: the eval-mode loss of the saved
/// weights, then the training loss, every gradient and batch norm's running statistics.
#[test]
fn the_native_step_matches_pytorch_on_the_golden_networks() {
    for case in golden::cases() {
        let model = case.model();
        model.load_state_dict(&case.weights()).unwrap();
        let data = case.device_data();
        let rows: Vec<usize> = (0..data.rows).collect();
        let mut workspace = None;
        let (eval_loss, _) = evaluate(
            &model,
            &mut workspace,
            &data,
            data.rows,
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(
            (eval_loss - case.eval_loss).abs() <= 1e-4 * case.eval_loss,
            "{}: eval loss {eval_loss} vs PyTorch's {}",
            case.name,
            case.eval_loss
        );
        let loss =
            forward_backward(&model, &mut workspace, &data, &rows, &mut Rng::new(1)).unwrap();
        assert!(
            (loss - case.train_loss).abs() <= 1e-4 * case.train_loss,
            "{}: train loss {loss} vs PyTorch's {}",
            case.name,
            case.train_loss
        );
        let grads = &workspace.as_ref().unwrap().grads;
        assert_eq!(grads.len(), case.param_order.len(), "{}", case.name);
        for (name, grad) in case.param_order.iter().zip(grads) {
            golden::assert_close(
                grad,
                &case.grads[name],
                &format!("{} grad {name}", case.name),
            );
        }
        assert_eq!(
            case.running_after.len(),
            model.buffers().len(),
            "{}",
            case.name
        );
        for (name, var) in model.buffer_names().zip(model.buffers()) {
            let values = var.as_tensor().to_vec1::<f32>().unwrap();
            golden::assert_close(
                &values,
                &case.running_after[name],
                &format!("{} {name}", case.name),
            );
        }
    }
}

fn random_tensors(shape: &ModelShape, rows: usize) -> DeviceData {
    let mut rng = Rng::new(17);
    let per_row: usize = shape.input.iter().product();
    let device = Device::Cpu;
    let mut dims = vec![rows];
    dims.extend(&shape.input);
    let (x, y) = match shape.task {
        Task::LanguageModel => {
            let mut ids = |count| -> Vec<u32> {
                (0..count).map(|_| rng.below(shape.output) as u32).collect()
            };
            (
                Tensor::from_vec(ids(rows * per_row), dims, &device),
                Tensor::from_vec(ids(rows * per_row), (rows, per_row), &device),
            )
        }
        Task::Classification => (
            Tensor::from_vec(
                (0..rows * per_row).map(|_| rng.normal() as f32).collect(),
                dims,
                &device,
            ),
            Tensor::from_vec(
                (0..rows).map(|_| rng.below(shape.output) as u32).collect(),
                rows,
                &device,
            ),
        ),
        Task::Regression => (
            Tensor::from_vec(
                (0..rows * per_row).map(|_| rng.normal() as f32).collect(),
                dims,
                &device,
            ),
            Tensor::from_vec(
                (0..rows * shape.output)
                    .map(|_| rng.normal() as f32)
                    .collect(),
                (rows, shape.output),
                &device,
            ),
        ),
    };
    DeviceData {
        x: x.unwrap(),
        y: y.unwrap(),
        rows,
        task: shape.task,
    }
}

/// Layer lists with what the golden networks leave out (dropout, several channels into
/// a strided and padded convolution, residual convolutions, every activation): the
/// native step's loss, gradients and evaluation against candle's autograd.
#[test]
fn the_native_step_matches_candle_on_every_layer_type() {
    let cases = [
        (
            r#"[{"type": "conv2d", "out": 5, "kernel": 3, "stride": 2, "padding": 2},
                {"type": "batch_norm"}, {"type": "silu"},
                {"type": "residual", "layers": [
                    {"type": "conv2d", "out": 5, "kernel": 3, "padding": 1},
                    {"type": "tanh"}]},
                {"type": "max_pool2d", "size": 2}, {"type": "dropout", "p": 0.3},
                {"type": "avg_pool2d", "size": 2}, {"type": "flatten"},
                {"type": "linear", "out": 9}, {"type": "sigmoid"},
                {"type": "dropout", "p": 0.2}, {"type": "linear", "out": 4}]"#,
            vec![3, 11, 10],
            Task::Classification,
            4,
        ),
        (
            r#"[{"type": "linear", "out": 12}, {"type": "gelu"},
                {"type": "residual", "layers": [
                    {"type": "layer_norm"}, {"type": "linear", "out": 12},
                    {"type": "gelu", "approximate": "tanh"}, {"type": "dropout", "p": 0.1}]},
                {"type": "batch_norm"}, {"type": "relu"}, {"type": "linear", "out": 2}]"#,
            vec![7],
            Task::Regression,
            2,
        ),
        (
            r#"[{"type": "embedding", "dim": 6}, {"type": "layer_norm"},
                {"type": "residual", "layers": [{"type": "linear", "out": 6}, {"type": "relu"}]},
                {"type": "linear", "out": 5}]"#,
            vec![8],
            Task::LanguageModel,
            5,
        ),
        (
            r#"[{"type": "conv2d", "out": 3, "kernel": 3, "padding": 1},
                {"type": "leaky_relu", "negative_slope": 0.3}, {"type": "max_pool2d", "size": 2},
                {"type": "flatten"}, {"type": "linear", "out": 6}, {"type": "leaky_relu"},
                {"type": "linear", "out": 3}]"#,
            vec![2, 6, 6],
            Task::Classification,
            3,
        ),
        (
            r#"[{"type": "conv2d", "out": 4, "kernel": 2}, {"type": "adaptive_avg_pool2d"},
                {"type": "flatten"}, {"type": "linear", "out": 3}]"#,
            vec![2, 5, 5],
            Task::Classification,
            3,
        ),
        (
            r#"[{"type": "embedding", "dim": 8, "init_std": 0.3}, {"type": "position_embedding"},
                {"type": "transformer_block", "heads": 2}, {"type": "dropout", "p": 0.1},
                {"type": "residual", "layers": [{"type": "transformer_block", "heads": 4}]},
                {"type": "layer_norm"}, {"type": "linear", "out": 5}]"#,
            vec![7],
            Task::LanguageModel,
            5,
        ),
    ];
    for (layers, input, task, output) in cases {
        let spec = ModelSpec::Sequential {
            layers: serde_json::from_str(layers).unwrap(),
            context: None,
        };
        let shape = ModelShape {
            input,
            output,
            task,
        };
        let model = Model::build(&spec, &shape, 5, &Device::Cpu).unwrap();
        let train = random_tensors(&shape, 24);
        let rows: Vec<usize> = (0..12).map(|i| (i * 5 + 2) % 24).collect();
        assert_matches_autograd(&model, &train, &rows);
        assert_evaluation_matches_candle(&model, &train);
    }
}

fn values(model: &Model) -> Vec<Vec<f32>> {
    model
        .vars()
        .iter()
        .map(|var| var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

/// The `transformer` preset and the layer list it expands to (embedding with std 0.02,
/// position embedding, blocks, layer norm, head) are one model: the same parameters in
/// the same order and shapes, and with the same weights the same native loss, gradients
/// and evaluation, bit for bit.
///
/// A seed does not give both the same random weights: the preset draws its blocks'
/// weights before the embeddings (`model::build_layers`), a layer list draws layer by
/// layer as `torch.nn.Sequential` does. The same distributions, so expanding the preset
/// changes a seed's weights, not what a run finds; here the list takes the preset's.
#[test]
fn the_transformer_preset_is_a_layer_list() {
    let (d, heads, layers, time, vocab) = (16, 4, 2, 9, 11);
    let shape = ModelShape {
        input: vec![time],
        output: vocab,
        task: Task::LanguageModel,
    };
    let preset_spec = ModelSpec::Transformer {
        d_model: d,
        heads,
        layers,
        context: time,
    };
    let block = format!(r#"{{"type": "transformer_block", "heads": {heads}}}, "#);
    let list_spec = ModelSpec::Sequential {
        layers: serde_json::from_str(&format!(
            r#"[{{"type": "embedding", "dim": {d}, "init_std": 0.02}},
                {{"type": "position_embedding"}}, {}
                {{"type": "layer_norm"}}, {{"type": "linear", "out": {vocab}}}]"#,
            block.repeat(layers)
        ))
        .unwrap(),
        context: Some(time),
    };
    let device = Device::Cpu;
    let preset = Model::build(&preset_spec, &shape, 3, &device).unwrap();
    let list = Model::build(&list_spec, &shape, 3, &device).unwrap();
    assert_eq!(
        plan(&preset_spec, &shape).unwrap().parameters,
        plan(&list_spec, &shape).unwrap().parameters
    );
    assert_eq!(preset.parameter_count(), list.parameter_count());
    let dims = |model: &Model| -> Vec<Vec<usize>> {
        model.vars().iter().map(|v| v.dims().to_vec()).collect()
    };
    assert_eq!(dims(&preset), dims(&list));
    let (preset_values, list_values) = (values(&preset), values(&list));
    for index in [2, 3, 4, 5, 14, 15, 16, 17, 26, 27] {
        assert_eq!(list_values[index], preset_values[index], "norm {index}");
    }
    for (list_var, preset_var) in list.vars().iter().zip(preset.vars()) {
        list_var.set(preset_var.as_tensor()).unwrap();
    }

    let mut rng = Rng::new(5);
    let rows = 12;
    let mut ids = || -> Vec<u32> { (0..rows * time).map(|_| rng.below(vocab) as u32).collect() };
    let data = Dataset {
        features: Features::Tokens {
            ids: ids(),
            context: time,
        },
        targets: Targets::Tokens { ids: ids(), vocab },
    };
    let train = DeviceData::new(&data, &device).unwrap();
    let batch = [3, 0, 7, 11, 5];
    let step = |model: &Model| {
        let mut workspace = None;
        let loss =
            forward_backward(model, &mut workspace, &train, &batch, &mut Rng::new(1)).unwrap();
        let (eval, accuracy) =
            evaluate(model, &mut workspace, &train, 4, &AtomicBool::new(false)).unwrap();
        (loss, workspace.unwrap().grads, eval, accuracy)
    };
    let (preset_loss, preset_grads, preset_eval, preset_accuracy) = step(&preset);
    let (list_loss, list_grads, list_eval, list_accuracy) = step(&list);
    assert_eq!(list_loss.to_bits(), preset_loss.to_bits());
    assert_eq!(list_eval.to_bits(), preset_eval.to_bits());
    assert_eq!(list_accuracy, preset_accuracy);
    for (index, (list, preset)) in list_grads.iter().zip(&preset_grads).enumerate() {
        assert_eq!(list, preset, "gradient {index}");
    }
}
