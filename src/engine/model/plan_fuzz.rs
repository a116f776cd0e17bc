//! The shape planner against big integers. Random layer lists with extreme fields (0, 1,
//! small values, powers of two and their neighbours, the 32-bit square-root boundary, up to
//! `usize::MAX`) are either refused with an error naming a layer (and its field, for a size
//! that overflows), or planned with every size equal to the same sizes computed here again in
//! u128, where nothing a 64-bit field holds can overflow unnoticed. The generator is seeded:
//! a failure prints the case, which replays with its seed.

use std::sync::mpsc;
use std::time::Duration;

use super::{plan_layers as plan, ModelShape};
use crate::engine::layers::plan::element_count;
use crate::engine::rng::Rng;
use crate::engine::spec::{GeluApproximation, LayerSpec, Task};

/// The largest size a plan may hold (`usize`, 64 bits on the targets lrtune builds for).
const LIMIT: u128 = usize::MAX as u128;

/// Cases per run: planning is microseconds, so this is a second or two in a debug build.
const CASES: u64 = 30_000;

/// What the plan of a case must be, computed independently.
#[derive(Debug, PartialEq)]
enum Expected {
    Plan {
        outputs: Vec<Vec<u128>>,
        parameters: u128,
        activations: u128,
    },
    /// A shape that a layer cannot take (`Some(index)` of the top-level layer), or the last
    /// layer's output not being what the task needs (`None`).
    Shape(Option<usize>),
    /// A size past 64 bits, in this top-level layer.
    Overflow(usize),
}

enum Stop {
    Shape,
    Overflow,
}

#[derive(Debug, Clone, PartialEq)]
enum Reaching {
    Tokens { time: u128, vocab: u128 },
    Values(Vec<u128>),
}

#[derive(Default)]
struct Totals {
    parameters: u128,
    activations: u128,
}

impl Totals {
    fn add_parameters(&mut self, added: u128) -> Result<(), Stop> {
        self.parameters = self.parameters.saturating_add(added);
        within(self.parameters)
    }

    fn add_activations(&mut self, added: u128) -> Result<(), Stop> {
        self.activations = self.activations.saturating_add(added);
        within(self.activations)
    }
}

/// u128 saturates only far past `LIMIT`, so a saturated value is still judged right.
fn within(value: u128) -> Result<(), Stop> {
    if value <= LIMIT {
        Ok(())
    } else {
        Err(Stop::Overflow)
    }
}

fn product(dims: &[u128]) -> u128 {
    dims.iter()
        .fold(1u128, |total, &dim| total.saturating_mul(dim))
}

fn wide(value: usize) -> u128 {
    value as u128
}

/// PyTorch's shapes and the plan's counts for `layers`, in u128.
fn expected(layers: &[LayerSpec], input: &[usize], task: Task, outputs: usize) -> Expected {
    let reaching = match task {
        Task::LanguageModel => Reaching::Tokens {
            time: wide(input[0]),
            vocab: wide(outputs),
        },
        _ => Reaching::Values(input.iter().copied().map(wide).collect()),
    };
    let mut totals = Totals::default();
    let mut shapes = Vec::new();
    let mut sample = reaching;
    for (index, layer) in layers.iter().enumerate() {
        match expected_layer(layer, &sample, &mut totals) {
            Ok(next) => {
                if let Reaching::Values(dims) = &next {
                    shapes.push(dims.clone());
                }
                sample = next;
            }
            Err(Stop::Shape) => return Expected::Shape(Some(index)),
            Err(Stop::Overflow) => return Expected::Overflow(index),
        }
    }
    let wanted = match task {
        Task::LanguageModel => vec![wide(input[0]), wide(outputs)],
        _ => vec![wide(outputs)],
    };
    if sample != Reaching::Values(wanted) {
        return Expected::Shape(None);
    }
    Expected::Plan {
        outputs: shapes,
        parameters: totals.parameters,
        activations: totals.activations,
    }
}

fn expected_list(
    layers: &[LayerSpec],
    mut sample: Reaching,
    totals: &mut Totals,
) -> Result<Reaching, Stop> {
    for layer in layers {
        sample = expected_layer(layer, &sample, totals)?;
    }
    Ok(sample)
}

/// One layer: its output, with its parameters and kept values added to `totals`, checking
/// in the order the planner does where the order decides between a shape and an overflow.
fn expected_layer(
    layer: &LayerSpec,
    sample: &Reaching,
    totals: &mut Totals,
) -> Result<Reaching, Stop> {
    let dims = match (layer, sample) {
        (LayerSpec::Embedding { dim, .. }, Reaching::Tokens { time, vocab }) => {
            let dim = wide(*dim);
            totals.add_parameters(vocab * dim)?;
            within(time * dim)?;
            let output = time * dim;
            // An embedding keeps its output and its gradient.
            totals.add_activations(2 * output)?;
            return Ok(Reaching::Values(vec![*time, dim]));
        }
        (_, Reaching::Tokens { .. }) | (LayerSpec::Embedding { .. }, _) => return Err(Stop::Shape),
        (_, Reaching::Values(dims)) => dims.clone(),
    };
    let (next, kept_beyond_output) = match layer {
        LayerSpec::Linear { out } => {
            let inputs = *dims.last().ok_or(Stop::Shape)?;
            let mut next = dims.clone();
            *next.last_mut().expect("checked") = wide(*out);
            within(product(&next))?;
            totals.add_parameters((inputs + 1) * wide(*out))?;
            // The output again, transposed (the forward product's own buffer).
            let kept = product(&next);
            (next, kept)
        }
        LayerSpec::Conv2d {
            out,
            kernel,
            stride,
            padding,
        } => {
            let [channels, height, width] = dims[..] else {
                return Err(Stop::Shape);
            };
            let (out, kernel, stride, padding) =
                (wide(*out), wide(*kernel), wide(*stride), wide(*padding));
            let (padded_h, padded_w) = (height + 2 * padding, width + 2 * padding);
            within(padded_h.max(padded_w))?;
            if padded_h < kernel || padded_w < kernel {
                return Err(Stop::Shape);
            }
            let (out_h, out_w) = (
                (padded_h - kernel) / stride + 1,
                (padded_w - kernel) / stride + 1,
            );
            let next = vec![out, out_h, out_w];
            within(product(&next))?;
            let fan_in = channels.saturating_mul(kernel).saturating_mul(kernel);
            within(fan_in)?;
            totals.add_parameters((fan_in + 1) * out)?;
            totals.add_activations((out_h * out_w).saturating_mul(2 * fan_in + out))?;
            (next, 0)
        }
        LayerSpec::MaxPool2d { size, .. } | LayerSpec::AvgPool2d { size, .. } => {
            let [channels, height, width] = dims[..] else {
                return Err(Stop::Shape);
            };
            let size = wide(*size);
            if height < size || width < size {
                return Err(Stop::Shape);
            }
            let next = vec![channels, height / size, width / size];
            let kept = match layer {
                LayerSpec::MaxPool2d { .. } => product(&next),
                _ => 0,
            };
            (next, kept)
        }
        LayerSpec::AdaptiveAvgPool2d => {
            let [channels, _, _] = dims[..] else {
                return Err(Stop::Shape);
            };
            (vec![channels, 1, 1], 0)
        }
        LayerSpec::BatchNorm => {
            let features = match dims[..] {
                [features] | [features, _, _] => features,
                _ => return Err(Stop::Shape),
            };
            totals.add_parameters(2 * features)?;
            (dims.clone(), product(&dims) + features)
        }
        LayerSpec::LayerNorm => {
            let size = *dims.last().ok_or(Stop::Shape)?;
            totals.add_parameters(2 * size)?;
            let output = product(&dims);
            (dims.clone(), output + output / size)
        }
        LayerSpec::Dropout { .. } => (dims.clone(), product(&dims)),
        LayerSpec::Flatten => (vec![product(&dims)], 0),
        LayerSpec::PositionEmbedding => {
            let [time, dim] = dims[..] else {
                return Err(Stop::Shape);
            };
            totals.add_parameters(time * dim)?;
            (dims.clone(), 0)
        }
        LayerSpec::TransformerBlock { heads } => {
            let [time, dim] = dims[..] else {
                return Err(Stop::Shape);
            };
            let heads = wide(*heads);
            if dim % heads != 0 {
                return Err(Stop::Shape);
            }
            totals.add_parameters((dim * dim).saturating_mul(12).saturating_add(13 * dim))?;
            let attention = heads.saturating_mul(time * time).saturating_mul(2);
            totals.add_activations((time * dim * 30 + 2 * time).saturating_add(attention))?;
            (dims.clone(), 0)
        }
        LayerSpec::Relu
        | LayerSpec::Gelu { .. }
        | LayerSpec::Tanh
        | LayerSpec::Sigmoid
        | LayerSpec::Silu
        | LayerSpec::LeakyRelu { .. } => (dims.clone(), 0),
        LayerSpec::Residual { layers } => {
            let same = Reaching::Values(dims.clone());
            if expected_list(layers, same.clone(), totals)? != same {
                return Err(Stop::Shape);
            }
            (dims.clone(), product(&dims))
        }
        LayerSpec::Embedding { .. } => unreachable!("handled above"),
    };
    let output = product(&next);
    within(output)?;
    // Every layer keeps its output and its gradient, and some what backward needs.
    totals.add_activations((2 * output).saturating_add(kept_beyond_output))?;
    Ok(Reaching::Values(next))
}

/// A field value drawn toward the edges: 0 (rarely), 1, small, powers of two and their
/// neighbours, the 32-bit boundary where a square overflows, near `usize::MAX`, or anything.
fn extreme(rng: &mut Rng) -> usize {
    let power = |rng: &mut Rng| 1usize << rng.below(64);
    match rng.below(20) {
        0 => 0,
        1..=3 => 1,
        4..=7 => 2 + rng.below(7),
        8..=9 => 1 + rng.below(64),
        10..=11 => power(rng),
        12..=13 => power(rng).wrapping_add(rng.below(3)).wrapping_sub(1).max(1),
        14 => usize::MAX - rng.below(3),
        15 => usize::MAX / (2 + rng.below(3)),
        16..=17 => (1usize << 32) + rng.below(3) - 1,
        _ => rng.next_u64() as usize,
    }
}

fn small(rng: &mut Rng) -> usize {
    1 + rng.below(8)
}

/// A layer with extreme fields; `depth` bounds residual nesting.
fn layer(rng: &mut Rng, language: bool, depth: usize) -> LayerSpec {
    let choices = if language { 9 } else { 12 };
    match rng.below(choices + usize::from(depth < 2)) {
        0 => LayerSpec::Linear { out: extreme(rng) },
        1 => LayerSpec::LayerNorm,
        2 => LayerSpec::Relu,
        3 => LayerSpec::Dropout { p: 0.25 },
        4 => LayerSpec::Flatten,
        5 => LayerSpec::Gelu {
            approximate: GeluApproximation::Tanh,
        },
        6 if language => LayerSpec::Embedding {
            dim: extreme(rng),
            init_std: 0.02,
        },
        7 if language => LayerSpec::PositionEmbedding,
        8 if language => LayerSpec::TransformerBlock {
            heads: extreme(rng),
        },
        6 => LayerSpec::Conv2d {
            out: if rng.below(2) == 0 {
                small(rng)
            } else {
                extreme(rng)
            },
            kernel: if rng.below(2) == 0 {
                small(rng)
            } else {
                extreme(rng)
            },
            stride: if rng.below(2) == 0 { 1 } else { extreme(rng) },
            padding: if rng.below(3) == 0 { 0 } else { extreme(rng) },
        },
        7 => LayerSpec::MaxPool2d {
            size: if rng.below(2) == 0 {
                small(rng)
            } else {
                extreme(rng)
            },
            stride: None,
        },
        8 => LayerSpec::AvgPool2d {
            size: extreme(rng),
            stride: None,
        },
        9 => LayerSpec::AdaptiveAvgPool2d,
        10 => LayerSpec::BatchNorm,
        11 => LayerSpec::Sigmoid,
        _ => LayerSpec::Residual {
            layers: (0..1 + rng.below(3))
                .map(|_| layer(rng, language, depth + 1))
                .collect(),
        },
    }
}

/// A case: the layers, the per-sample input, the task and its outputs.
fn case(rng: &mut Rng) -> (Vec<LayerSpec>, Vec<usize>, Task, usize) {
    let language = rng.below(4) == 0;
    let outputs = if rng.below(4) == 0 {
        extreme(rng).max(1)
    } else {
        small(rng)
    };
    let (task, input) = if language {
        let time = if rng.below(2) == 0 {
            small(rng)
        } else {
            extreme(rng).max(1)
        };
        (Task::LanguageModel, vec![time])
    } else {
        let side = |rng: &mut Rng| {
            if rng.below(4) == 0 {
                extreme(rng).max(1)
            } else {
                4 + rng.below(29)
            }
        };
        let mut input: Vec<usize> = match rng.below(3) {
            0 => vec![side(rng)],
            1 => vec![small(rng), side(rng)],
            _ => vec![small(rng), side(rng), side(rng)],
        };
        // Samples whose own size overflows are the data's error, tested apart.
        while element_count(&input).is_none() {
            let largest = (0..input.len())
                .max_by_key(|&index| input[index])
                .expect("a dimension");
            input[largest] = 1 + rng.below(64);
        }
        (Task::Classification, input)
    };
    let mut layers = Vec::new();
    if language && rng.below(5) != 0 {
        layers.push(LayerSpec::Embedding {
            dim: if rng.below(2) == 0 {
                small(rng) * 4
            } else {
                extreme(rng)
            },
            init_std: 0.02,
        });
    }
    layers.extend((0..1 + rng.below(5)).map(|_| layer(rng, language, 0)));
    if rng.below(2) == 0 {
        if !language {
            layers.push(LayerSpec::Flatten);
        }
        layers.push(LayerSpec::Linear { out: outputs });
    }
    (layers, input, task, outputs)
}

/// Whether `validate` (which `plan` runs first) must refuse the list: a size field of 0.
fn has_zero_field(layers: &[LayerSpec]) -> bool {
    layers.iter().any(|layer| match layer {
        LayerSpec::Linear { out } => *out == 0,
        LayerSpec::Conv2d {
            out,
            kernel,
            stride,
            ..
        } => [*out, *kernel, *stride].contains(&0),
        LayerSpec::MaxPool2d { size, .. } | LayerSpec::AvgPool2d { size, .. } => *size == 0,
        LayerSpec::Embedding { dim, .. } => *dim == 0,
        LayerSpec::TransformerBlock { heads } => *heads == 0,
        LayerSpec::Residual { layers } => has_zero_field(layers),
        _ => false,
    })
}

/// Whether `field` is the top-level layer `index` or one of its fields, and, after the
/// layer's index, names only fields a layer has.
fn names_layer(field: &str, index: usize) -> bool {
    let prefix = format!("model.layers[{index}]");
    let Some(rest) = field.strip_prefix(&prefix) else {
        return false;
    };
    rest.is_empty()
        || rest.strip_prefix('.').is_some_and(|rest| {
            rest.split(['.', '[', ']'])
                .filter(|part| !part.is_empty() && part.parse::<usize>().is_err())
                .all(|part| {
                    [
                        "out", "kernel", "stride", "padding", "size", "dim", "heads", "layers",
                    ]
                    .contains(&part)
                })
        })
}

/// Plans one case and checks it against [`expected`]; the error describes the mismatch.
fn check_case(seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let (layers, input, task, outputs) = case(&mut rng);
    let describe = || {
        format!(
            "seed {seed}: {} on input {input:?}, {task:?} into {outputs}",
            serde_json::to_string(&layers).expect("layers serialize")
        )
    };
    let planned = plan(&layers, &input, task, outputs);
    if has_zero_field(&layers) {
        return match planned {
            Err(error) if error.message.contains("of at least 1") => Ok(()),
            other => Err(format!(
                "{}: a zero size planned as {:?}",
                describe(),
                other.map(|plan| plan.layer_outputs().to_vec())
            )),
        };
    }
    match (expected(&layers, &input, task, outputs), planned) {
        (
            Expected::Plan {
                outputs: shapes,
                parameters,
                activations,
            },
            Ok(plan),
        ) => {
            let planned_shapes: Vec<Vec<u128>> = plan
                .layer_outputs()
                .iter()
                .map(|dims| dims.iter().copied().map(wide).collect())
                .collect();
            if planned_shapes != shapes
                || u128::from(plan.parameters) != parameters
                || u128::from(plan.activations_per_sample) != activations
            {
                return Err(format!(
                    "{}: planned {planned_shapes:?}, {} parameters, {} kept values; expected \
                     {shapes:?}, {parameters}, {activations}",
                    describe(),
                    plan.parameters,
                    plan.activations_per_sample
                ));
            }
            // The step memory admission sizes from the plan, at a random batch.
            let rows = extreme(&mut rng).max(1);
            let shape = ModelShape {
                input: input.clone(),
                output: outputs,
                task,
            };
            let want = (activations
                + product(&input.iter().copied().map(wide).collect::<Vec<_>>())
                + wide(outputs))
            .saturating_mul(wide(rows))
            .saturating_mul(4);
            let got = plan.buffer_bytes(&shape, rows).map(u128::from);
            if got != (want <= LIMIT).then_some(want) {
                return Err(format!(
                    "{}: step memory at {rows} rows {got:?}, expected {want}",
                    describe()
                ));
            }
            Ok(())
        }
        (Expected::Shape(None), Err(error))
            if error.field == "model.layers" && !error.message.contains("overflows") =>
        {
            Ok(())
        }
        (Expected::Shape(Some(index)), Err(error))
            if names_layer(&error.field, index) && !error.message.contains("overflows") =>
        {
            Ok(())
        }
        (Expected::Overflow(index), Err(error))
            if names_layer(&error.field, index) && error.message.contains("overflows") =>
        {
            Ok(())
        }
        (want, got) => Err(format!(
            "{}: expected {want:?}, planned {:?}",
            describe(),
            got.map(|plan| (plan.layer_outputs().to_vec(), plan.parameters))
        )),
    }
}

#[test]
fn random_layer_lists_with_extreme_fields_plan_as_big_integers_do_or_name_the_field() {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut outcomes = [0usize; 3];
        for seed in 0..CASES {
            let outcome = std::panic::catch_unwind(|| check_case(seed))
                .unwrap_or_else(|_| Err(format!("seed {seed}: the planner panicked")));
            if let Err(message) = outcome {
                sender.send(Err(message)).expect("the test waits");
                return;
            }
            // Tally what was exercised (a generator that only made refusals proves little).
            let mut rng = Rng::new(seed);
            let (layers, input, task, outputs) = case(&mut rng);
            let kind = match plan(&layers, &input, task, outputs) {
                Ok(_) => 0,
                Err(error) if error.message.contains("overflows") => 1,
                Err(_) => 2,
            };
            if !has_zero_field(&layers) {
                outcomes[kind] += 1;
            }
        }
        sender.send(Ok(outcomes)).expect("the test waits");
    });
    // Planning never loops over a size, so even a loaded machine is far inside this.
    let outcome = receiver
        .recv_timeout(Duration::from_secs(120))
        .expect("the planner finished every case within 120 s (a hang otherwise)");
    let [planned, overflowed, refused] = outcome.unwrap_or_else(|message| panic!("{message}"));
    assert!(
        planned > 1_000 && overflowed > 1_000 && refused > 1_000,
        "plans {planned}, overflows {overflowed}, other refusals {refused}"
    );
}
