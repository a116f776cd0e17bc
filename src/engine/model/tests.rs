//! The plan's checks and counts, the built model against PyTorch's golden networks on
//! candle, and checkpoints.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::golden::cases as golden;
use super::*;
use crate::engine::spec::layers::validate;
use crate::engine::spec::{InitSpec, LayerSpec, WeightsSource};

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn layers(json: &str) -> Vec<LayerSpec> {
    serde_json::from_str(json).unwrap()
}

fn plan_error(json: &str, input: &[usize], task: Task, outputs: usize) -> SpecError {
    plan_layers(&layers(json), input, task, outputs).unwrap_err()
}

#[test]
fn a_shape_error_names_the_layer_and_both_shapes() {
    let error = plan_error(
        r#"[{"type": "linear", "out": 8}, {"type": "conv2d", "out": 4, "kernel": 3}]"#,
        &[6],
        Task::Classification,
        3,
    );
    assert_eq!(error.field, "model.layers[1]");
    assert_eq!(
        error.message,
        "conv2d needs [channels, height, width], but its input is [8]"
    );

    let error = plan_error(
        r#"[{"type": "linear", "out": 8},
            {"type": "residual", "layers": [{"type": "linear", "out": 5}]},
            {"type": "linear", "out": 3}]"#,
        &[6],
        Task::Classification,
        3,
    );
    assert_eq!(error.field, "model.layers[1]");
    assert_eq!(
        error.message,
        "a residual block adds its output to its input, but it turns [8] into [5]"
    );

    let error = plan_error(
        r#"[{"type": "conv2d", "out": 4, "kernel": 5}]"#,
        &[1, 3, 3],
        Task::Classification,
        3,
    );
    assert_eq!(error.field, "model.layers[0]");
    assert!(error.message.contains("[1, 3, 3]"), "{}", error.message);

    let error = plan_error(
        r#"[{"type": "flatten"}, {"type": "linear", "out": 7}]"#,
        &[1, 4, 4],
        Task::Classification,
        10,
    );
    assert_eq!(error.field, "model.layers");
    assert!(
        error.message.starts_with(
            "the last layer gives [7] per sample, but classification into 10 classes needs [10]"
        ),
        "{}",
        error.message
    );

    let error = plan_error(
        r#"[{"type": "linear", "out": 7}]"#,
        &[12],
        Task::LanguageModel,
        7,
    );
    assert_eq!(error.field, "model.layers[0]");
    assert!(
        error.message.contains("[12] token ids"),
        "{}",
        error.message
    );

    let error = validate(
        &layers(r#"[{"type": "residual", "layers": [{"type": "dropout", "p": 1.5}]}]"#),
        "model.layers",
    )
    .unwrap_err();
    assert_eq!(error.field, "model.layers[0].layers[0].p");
}

#[test]
fn transformer_layers_name_their_field_and_shapes() {
    let error = plan_error(
        r#"[{"type": "embedding", "dim": 6}, {"type": "transformer_block", "heads": 4},
            {"type": "linear", "out": 7}]"#,
        &[5],
        Task::LanguageModel,
        7,
    );
    assert_eq!(error.field, "model.layers[1].heads");
    assert_eq!(
        error.message,
        "transformer_block's 4 heads do not divide the 6 values per position of its input \
         [5, 6]"
    );

    let error = plan_error(
        r#"[{"type": "transformer_block", "heads": 2}, {"type": "flatten"},
            {"type": "linear", "out": 3}]"#,
        &[3, 4, 4],
        Task::Classification,
        3,
    );
    assert_eq!(error.field, "model.layers[0]");
    assert_eq!(
        error.message,
        "transformer_block needs [time, dim], but its input is [3, 4, 4]"
    );

    let error = plan_error(
        r#"[{"type": "linear", "out": 4}, {"type": "position_embedding"}]"#,
        &[6],
        Task::Regression,
        4,
    );
    assert_eq!(error.field, "model.layers[1]");
    assert_eq!(
        error.message,
        "position_embedding needs [time, dim], but its input is [4]"
    );

    let error = plan_error(
        r#"[{"type": "position_embedding"}, {"type": "linear", "out": 7}]"#,
        &[5],
        Task::LanguageModel,
        7,
    );
    assert_eq!(error.field, "model.layers[0]");
    assert_eq!(
        error.message,
        "position_embedding needs values: the token ids must go through an embedding \
         first, but its input is [5] token ids"
    );

    let error = validate(
        &layers(r#"[{"type": "transformer_block", "heads": 0}]"#),
        "model.layers",
    )
    .unwrap_err();
    assert_eq!(error.field, "model.layers[0].heads");
    assert_eq!(error.message, "transformer_block needs heads of at least 1");

    let error = validate(
        &layers(r#"[{"type": "embedding", "dim": 4, "init_std": -0.5}]"#),
        "model.layers",
    )
    .unwrap_err();
    assert_eq!(error.field, "model.layers[0].init_std");
    assert_eq!(
        error.message,
        "must be a finite number of at least 0, got -0.5"
    );

    let error = serde_json::from_str::<Vec<LayerSpec>>(
        r#"[{"type": "transformer_block", "heads": 2, "dim": 8}]"#,
    )
    .unwrap_err();
    assert!(error.to_string().contains("unknown field `dim`"), "{error}");
}

/// Embedding, position embedding and two blocks: PyTorch's sizes (a block has 12 d^2 +
/// 13 d parameters), and the `state_dict()` names of the block's submodules, which load
/// back into a model built from another seed.
#[test]
fn a_transformer_layer_lists_state_dict_round_trips() {
    let layers = layers(
        r#"[{"type": "embedding", "dim": 8, "init_std": 0.02}, {"type": "position_embedding"},
            {"type": "transformer_block", "heads": 2},
            {"type": "residual", "layers": [{"type": "transformer_block", "heads": 4}]},
            {"type": "layer_norm"}, {"type": "linear", "out": 5}]"#,
    );
    let plan = plan_layers(&layers, &[6], Task::LanguageModel, 5).unwrap();
    let block = 12 * 8 * 8 + 13 * 8;
    assert_eq!(plan.parameters, 5 * 8 + 6 * 8 + 2 * block + 16 + 9 * 5);
    let build = |seed| {
        Model::build(
            &ModelSpec::Sequential {
                layers: layers.clone(),
                context: Some(6),
            },
            &ModelShape {
                input: vec![6],
                output: 5,
                task: Task::LanguageModel,
            },
            seed,
            &Device::Cpu,
        )
        .unwrap()
    };
    let source = build(1);
    let names: Vec<&str> = source.parameter_names().map(String::as_str).collect();
    let block_names = |prefix: &str| {
        [
            "norm_attention.weight",
            "norm_attention.bias",
            "norm_mlp.weight",
            "norm_mlp.bias",
            "qkv.weight",
            "qkv.bias",
            "projection.weight",
            "projection.bias",
            "expand.weight",
            "expand.bias",
            "contract.weight",
            "contract.bias",
        ]
        .map(|suffix| format!("{prefix}.{suffix}"))
    };
    let mut want = vec!["0.weight".to_string(), "1.weight".to_string()];
    want.extend(block_names("2"));
    want.extend(block_names("3.0"));
    want.extend(["4.weight", "4.bias", "5.weight", "5.bias"].map(String::from));
    assert_eq!(names, want);
    let shapes: Vec<Vec<usize>> = source
        .vars()
        .iter()
        .map(|var| var.dims().to_vec())
        .collect();
    assert_eq!(shapes[1], [6, 8]);
    assert_eq!(
        &shapes[2..14],
        &[
            vec![8],
            vec![8],
            vec![8],
            vec![8],
            vec![24, 8],
            vec![24],
            vec![8, 8],
            vec![8],
            vec![32, 8],
            vec![32],
            vec![8, 32],
            vec![8],
        ]
    );

    let state: HashMap<String, Tensor> = source
        .parameter_names()
        .zip(source.vars())
        .map(|(name, var)| (name.clone(), var.as_tensor().copy().unwrap()))
        .collect();
    let target = build(2);
    assert_ne!(
        values(target.vars()[6].as_tensor()),
        values(&state["2.qkv.weight"])
    );
    target.load_state_dict(&state).unwrap();
    for (name, var) in target.parameter_names().zip(target.vars()) {
        assert_eq!(values(var.as_tensor()), values(&state[name]), "{name}");
    }
}

#[test]
fn a_plan_counts_parameters_as_pytorch_does() {
    // conv 1->4 k3: 40; bn: 8; linear 4*4*4 -> 8: 520; layer_norm: 16; linear 8->4: 36.
    let plan = plan_layers(
        &layers(
            r#"[{"type": "conv2d", "out": 4, "kernel": 3, "padding": 1},
                {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool2d", "size": 2},
                {"type": "flatten"}, {"type": "linear", "out": 8}, {"type": "layer_norm"},
                {"type": "linear", "out": 4}]"#,
        ),
        &[1, 9, 9],
        Task::Classification,
        4,
    )
    .unwrap();
    assert_eq!(plan.parameters, 40 + 8 + 520 + 16 + 36);
    assert_eq!(plan.output(), &[4]);
}

/// Issue 29's specs: `side + 2 * padding` and `out_h * out_w` wrapped in release builds,
/// so (2^63 + 28)^2 planned as 784 values and the job hung a worker. Each is refused,
/// naming the layer's field, before anything is built.
#[test]
fn sizes_that_overflow_64_bits_are_refused_naming_the_layer_and_field() {
    let mnist = |first: &str, more: &str| {
        plan_error(
            &format!(r#"[{first}, {more} {{"type": "flatten"}}, {{"type": "linear", "out": 10}}]"#),
            &[1, 28, 28],
            Task::Classification,
            10,
        )
    };
    let conv = |padding: &str| {
        format!(r#"{{"type": "conv2d", "out": 1, "kernel": 1, "padding": {padding}}}"#)
    };
    let error = mnist(&conv("4611686018427387904"), "");
    assert_eq!(error.field, "model.layers[0].padding");
    assert_eq!(
        error.message,
        "conv2d's output size overflows: padding 4611686018427387904 makes its output [1, \
         9223372036854775836, 9223372036854775836], more values than a 64-bit size holds"
    );
    let error = mnist(
        &conv("4611686018427387904"),
        r#"{"type": "adaptive_avg_pool2d"},"#,
    );
    assert_eq!(error.field, "model.layers[0].padding");
    let error = mnist(&conv("9223372036854775808"), "");
    assert_eq!(error.field, "model.layers[0].padding");
    assert_eq!(
        error.message,
        "conv2d's output size overflows: padding 9223372036854775808 on both sides of its \
         input [1, 28, 28] is more than a 64-bit size holds"
    );
    // A padding that fits, with channels that do not.
    let error = mnist(
        r#"{"type": "conv2d", "out": 4611686018427387904, "kernel": 3, "padding": 1}"#,
        "",
    );
    assert_eq!(error.field, "model.layers[0].out");
    let error = mnist(
        r#"{"type": "conv2d", "out": 2, "kernel": 4294967296, "padding": 2147483648}"#,
        "",
    );
    assert_eq!(error.field, "model.layers[0].kernel");
    assert_eq!(
        error.message,
        "conv2d's parameter count overflows: a 4294967296x4294967296 kernel over 1 \
         channels is more than a 64-bit count holds"
    );
    let error = plan_error(
        r#"[{"type": "linear", "out": 8},
            {"type": "residual", "layers": [{"type": "linear", "out": 1152921504606846976},
                {"type": "linear", "out": 8}]},
            {"type": "linear", "out": 3}]"#,
        &[6],
        Task::Classification,
        3,
    );
    assert_eq!(error.field, "model.layers[1].layers[1].out");
    assert_eq!(
        error.message,
        "linear's parameter count overflows: its weight of 8 x 1152921504606846976 and bias \
         of 8 on top of the 10376293541461622840 of the layers before it is more than a \
         64-bit count holds"
    );
    let error = plan_error(
        r#"[{"type": "embedding", "dim": 4294967296}, {"type": "transformer_block", "heads": 1},
            {"type": "linear", "out": 5}]"#,
        &[4],
        Task::LanguageModel,
        5,
    );
    assert_eq!(error.field, "model.layers[1]");
    assert!(
        error
            .message
            .starts_with("transformer_block's parameter count overflows"),
        "{}",
        error.message
    );
}

/// What the plan says the model's `state_dict()` is (checked at submit, before anything
/// is built) is what building it makes, on every golden network and a transformer.
#[test]
fn the_planned_state_dict_is_the_built_models() {
    let mut cases: Vec<(Vec<LayerSpec>, Vec<usize>, Task, usize)> = golden()
        .into_iter()
        .map(|case| {
            let task = case.task();
            (case.layers, case.input_shape, task, case.outputs)
        })
        .collect();
    cases.push((
        layers(
            r#"[{"type": "embedding", "dim": 8}, {"type": "position_embedding"},
                {"type": "residual", "layers": [{"type": "transformer_block", "heads": 2}]},
                {"type": "layer_norm"}, {"type": "linear", "out": 5}]"#,
        ),
        vec![6],
        Task::LanguageModel,
        5,
    ));
    for (layers, input, task, outputs) in cases {
        let plan = plan_layers(&layers, &input, task, outputs).unwrap();
        let spec = ModelSpec::Sequential {
            layers: layers.clone(),
            context: None,
        };
        let shape = ModelShape {
            input,
            output: outputs,
            task,
        };
        let built = Model::build(&spec, &shape, 0, &Device::Cpu).unwrap();
        let made: Vec<(String, Vec<usize>)> = built
            .parameter_names()
            .zip(built.vars())
            .chain(built.buffer_names().zip(built.buffers()))
            .map(|(name, var)| (name.clone(), var.dims().to_vec()))
            .collect();
        assert_eq!(plan.state_dict(), made, "{layers:?}");
    }
}

/// Stored shapes are checked at submit with the messages loading gives.
#[test]
fn stored_tensor_shapes_are_checked_against_the_planned_model() {
    let plan = plan_layers(
        &layers(r#"[{"type": "linear", "out": 4}, {"type": "batch_norm"}, {"type": "linear", "out": 2}]"#),
        &[3],
        Task::Classification,
        2,
    )
    .unwrap();
    let shapes = |entries: &[(&str, &[u64])]| -> HashMap<String, Vec<u64>> {
        entries
            .iter()
            .map(|(name, shape)| (name.to_string(), shape.to_vec()))
            .collect()
    };
    let mut good = shapes(&[
        ("0.weight", &[4, 3]),
        ("0.bias", &[4]),
        ("1.weight", &[4]),
        ("1.bias", &[4]),
        ("1.running_mean", &[4]),
        ("1.running_var", &[4]),
        ("1.num_batches_tracked", &[]),
        ("2.weight", &[2, 4]),
        ("2.bias", &[2]),
    ]);
    check_state_dict(&plan.state_dict(), &good).unwrap();

    good.insert("0.weight".into(), vec![4, 18446744073709551615]);
    let error = check_state_dict(&plan.state_dict(), &good).unwrap_err();
    assert_eq!(error.field, "init.weights");
    assert_eq!(
        error.message,
        "tensor \"0.weight\" has shape [4, 18446744073709551615], but the model's is [4, 3]"
    );
    good.insert("0.weight".into(), vec![4, 3]);
    good.remove("2.bias");
    let error = check_state_dict(&plan.state_dict(), &good).unwrap_err();
    assert_eq!(
        error.message,
        "the weights have no tensor \"2.bias\" (shape [2]); they must be the state_dict() \
         of the equivalent torch.nn.Sequential"
    );
    good.insert("2.bias".into(), vec![2]);
    good.insert("3.weight".into(), vec![7]);
    let error = check_state_dict(&plan.state_dict(), &good).unwrap_err();
    assert_eq!(
        error.message,
        "the weights have 1 tensor(s) the model does not, first \"3.weight\" (shape [7]): \
         is the layer list the same as the PyTorch model's?"
    );
}

/// A safetensors file written out by hand: the header's length, the header, the data.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

#[test]
fn non_finite_weights_and_tensors_named_twice_are_refused_naming_the_tensor() {
    let header = r#"{"0.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "0.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}"#;
    let file = |values: &[f32]| safetensors(header, &f32_bytes(values));
    let tensors = read_safetensors(&file(&[0.5, -1.0, 1.0, 2.0, 3.0, 4.0])).unwrap();
    assert_eq!(tensors["0.weight"].dims(), [2, 2]);

    let error = read_safetensors(&file(&[0.5, -1.0, 1.0, 2.0, 3.0, f32::NAN])).unwrap_err();
    assert_eq!(error.field, "init.weights");
    assert_eq!(
        error.message,
        "tensor \"0.weight\" holds NaN at [1, 1]: weights must be finite 32-bit floats"
    );
    let error =
        read_safetensors(&file(&[f32::NEG_INFINITY, -1.0, 1.0, 2.0, 3.0, 4.0])).unwrap_err();
    assert_eq!(
        error.message,
        "tensor \"0.bias\" holds -inf at [0]: weights must be finite 32-bit floats"
    );
    // A finite f64 that no f32 holds would load as an infinity.
    let wide = safetensors(
        r#"{"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}"#,
        &1e300f64.to_le_bytes(),
    );
    let error = read_safetensors(&wide).unwrap_err();
    assert_eq!(
        error.message,
        "tensor \"w\" holds inf at [0]: weights must be finite 32-bit floats"
    );

    let twice = safetensors(
        r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#,
        &f32_bytes(&[1.0]),
    );
    let error = read_safetensors(&twice).unwrap_err();
    assert_eq!(error.field, "init.weights");
    assert_eq!(
        error.message,
        "the safetensors header names tensor \"w\" twice"
    );
    let key_twice = safetensors(
        r#"{"w": {"dtype": "F32", "dtype": "F64", "shape": [1], "data_offsets": [0, 4]}}"#,
        &f32_bytes(&[1.0]),
    );
    assert_eq!(
        read_safetensors(&key_twice).unwrap_err().message,
        "the safetensors header gives the key \"dtype\" twice in \"w\""
    );
}

#[test]
fn half_precision_weights_are_checked_in_place_as_the_loader_reads_them() {
    // 1.0, NaN (f16); 2.0, -inf (bf16): the f16's NaN at [1], the bf16's infinity at [1].
    let f16 = [0x3c00u16, 0x7e00];
    let bf16 = [0x4000u16, 0xff80];
    let bytes: Vec<u8> = f16
        .iter()
        .chain(&bf16)
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let header = |a: &str, b: &str| {
        format!(
            r#"{{"a": {{"dtype": "{a}", "shape": [2], "data_offsets": [0, 4]}},
                "b": {{"dtype": "{b}", "shape": [2], "data_offsets": [4, 8]}}}}"#
        )
    };
    let error = inspect_safetensors(&safetensors(&header("F16", "BF16"), &bytes)).unwrap_err();
    assert_eq!(
        error.message,
        "tensor \"a\" holds NaN at [1]: weights must be finite 32-bit floats"
    );
    let error = inspect_safetensors(&safetensors(&header("BF16", "BF16"), &bytes)).unwrap_err();
    // As bf16, 0x7e00 is a finite 1.3e38: the first non-finite value is b's.
    assert_eq!(
        error.message,
        "tensor \"b\" holds -inf at [1]: weights must be finite 32-bit floats"
    );
    let finite: Vec<u8> = [0x3c00u16, 0xbc00, 0x4000, 0xc000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let file = safetensors(&header("F16", "BF16"), &finite);
    assert_eq!(
        inspect_safetensors(&file).unwrap(),
        [("a".to_string(), vec![2]), ("b".to_string(), vec![2])]
    );
    // The loader agrees: the same file loads, and the values are the ones checked.
    let loaded = read_safetensors(&file).unwrap();
    assert_eq!(
        loaded["a"]
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        [1.0, -1.0]
    );
}

#[test]
fn missing_extra_and_misshaped_tensors_are_named() {
    let case = golden().into_iter().find(|c| c.name == "cnn_bn").unwrap();
    let model = case.model();
    let mut weights = case.weights();
    assert!(weights.contains_key("1.num_batches_tracked"));
    model.load_state_dict(&weights).unwrap();

    let mut missing = weights.clone();
    missing.remove("1.running_var");
    let error = model.load_state_dict(&missing).unwrap_err();
    assert_eq!(error.field, "init.weights");
    assert!(
        error.message.contains("no tensor \"1.running_var\""),
        "{}",
        error.message
    );

    let mut extra = weights.clone();
    extra.insert(
        "12.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let error = model.load_state_dict(&extra).unwrap_err();
    assert!(
        error.message.contains("first \"12.weight\""),
        "{}",
        error.message
    );

    weights.insert(
        "6.weight".into(),
        Tensor::zeros((8, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let error = model.load_state_dict(&weights).unwrap_err();
    assert!(
        error
            .message
            .contains("\"6.weight\" has shape [8, 3], but the model's is [8, 64]"),
        "{}",
        error.message
    );
}

#[test]
fn initial_weights_come_from_the_path_or_the_fetched_bytes_of_an_id() {
    let case = golden().into_iter().find(|c| c.name == "cnn_bn").unwrap();
    let path = format!(
        "{}/tests/golden/sequential/{}",
        env!("CARGO_MANIFEST_DIR"),
        case.weights
    );
    let init = |weights: WeightsSource| InitSpec { weights };
    let from_path = load_initial_weights(Some(&init(WeightsSource::Path(path.clone()))), None)
        .unwrap()
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let uploaded = init(WeightsSource::Id("weights_1".into()));
    let from_bytes = load_initial_weights(Some(&uploaded), Some(&bytes))
        .unwrap()
        .unwrap();
    let mut names: Vec<_> = from_bytes.keys().collect();
    names.sort();
    let mut want: Vec<_> = from_path.keys().collect();
    want.sort();
    assert_eq!(names, want);
    case.model().load_state_dict(&from_bytes).unwrap();

    // An id without its bytes is the server's to fetch; `lrtune run` cannot.
    let error = load_initial_weights(Some(&uploaded), None).unwrap_err();
    assert_eq!(error.field, "init.weights.id");
    let error = load_initial_weights(Some(&uploaded), Some(b"garbage")).unwrap_err();
    assert_eq!(error.field, "init.weights");
    assert!(load_initial_weights(None, Some(&bytes)).unwrap().is_none());
}
