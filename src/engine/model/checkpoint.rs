//! PyTorch checkpoints: the tensors of `safetensors.torch.save_file(model.state_dict(),
//! path)` for the equivalent `torch.nn.Sequential`, read, checked by name and shape against
//! the model's `state_dict()`, and loaded.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::engine::spec::{InitSpec, SpecError, WeightsSource};

/// The field every initial-weights error names.
const WEIGHTS_FIELD: &str = "init.weights";

fn dims_u64(dims: &[usize]) -> Vec<u64> {
    dims.iter().map(|&dim| dim as u64).collect()
}

/// Checks tensors' names and shapes (`given`, as a safetensors file stores them) against the
/// `state_dict()` a model expects, in its order: a missing or mis-shaped tensor, or one the
/// model does not have, is an error naming it. Batch norm's `num_batches_tracked` is allowed
/// wherever the model has a batch norm. The server runs it at submit on the shapes stored at
/// upload; loading the weights runs it again.
pub fn check_state_dict(
    expected: &[(String, Vec<usize>)],
    given: &HashMap<String, Vec<u64>>,
) -> Result<(), SpecError> {
    for (name, dims) in expected {
        let Some(shape) = given.get(name) else {
            return Err(SpecError::new(
                WEIGHTS_FIELD,
                format!(
                    "the weights have no tensor \"{name}\" (shape {dims:?}); they must be the \
                     state_dict() of the equivalent torch.nn.Sequential"
                ),
            ));
        };
        if *shape != dims_u64(dims) {
            return Err(SpecError::new(
                WEIGHTS_FIELD,
                format!("tensor \"{name}\" has shape {shape:?}, but the model's is {dims:?}"),
            ));
        }
    }
    let expects = |name: &str| expected.iter().any(|(expected, _)| expected == name);
    let mut extra: Vec<&String> = given
        .keys()
        .filter(|name| !expects(name))
        .filter(|name| {
            // Batch norm's counter, wherever the model has a batch norm.
            !name
                .strip_suffix("num_batches_tracked")
                .is_some_and(|prefix| expects(&format!("{prefix}running_mean")))
        })
        .collect();
    extra.sort();
    if let Some(first) = extra.first() {
        return Err(SpecError::new(
            WEIGHTS_FIELD,
            format!(
                "the weights have {} tensor(s) the model does not, first \"{first}\" (shape \
                 {:?}): is the layer list the same as the PyTorch model's?",
                extra.len(),
                given[*first]
            ),
        ));
    }
    Ok(())
}

/// The tensors of a spec's `init.weights`, if any: a local file is read here, uploaded
/// weights are the `fetched` bytes the service read from its store.
pub fn load_initial_weights(
    init: Option<&InitSpec>,
    fetched: Option<&[u8]>,
) -> Result<Option<HashMap<String, Tensor>>, SpecError> {
    let Some(init) = init else {
        return Ok(None);
    };
    match (&init.weights, fetched) {
        (WeightsSource::Path(path), _) => {
            let bytes = std::fs::read(path).map_err(|error| {
                SpecError::new("init.weights.path", format!("cannot read {path}: {error}"))
            })?;
            read_safetensors(&bytes).map(Some)
        }
        (WeightsSource::Id(_), Some(bytes)) => read_safetensors(bytes).map(Some),
        (WeightsSource::Id(id), None) => Err(SpecError::new(
            "init.weights.id",
            format!(
                "weights {id} are stored on a server: submit the job there, or give \
                 init.weights.path to run it here"
            ),
        )),
    }
}

/// Reads a safetensors file's tensors (any float dtype; converted when loaded), after the
/// checks of [`inspect_safetensors`].
pub fn read_safetensors(bytes: &[u8]) -> Result<HashMap<String, Tensor>, SpecError> {
    inspect_safetensors(bytes)?;
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(unreadable)
}

/// Every tensor's name and shape, sorted by name, from a file checked as [`read_safetensors`]
/// loads it, without copying a tensor: an upload is checked in place, so checking it holds
/// nothing but the upload itself. A tensor named twice in the header, or a float tensor holding
/// NaN or an infinity (as the model's 32-bit floats), is an error naming it: either would
/// otherwise load as something else.
pub fn inspect_safetensors(bytes: &[u8]) -> Result<Vec<(String, Vec<usize>)>, SpecError> {
    check_header_names(bytes)?;
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|error| unreadable(candle_core::Error::from(error)))?;
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in &tensors {
        let found = first_non_finite(name, view)?;
        if let Some((index, value)) = found {
            return Err(SpecError::new(
                WEIGHTS_FIELD,
                format!(
                    "tensor \"{name}\" holds {value} at {}: weights must be finite 32-bit \
                     floats",
                    index_label(index, view.shape())
                ),
            ));
        }
    }
    Ok(tensors
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect())
}

fn unreadable(error: candle_core::Error) -> SpecError {
    SpecError::new(
        WEIGHTS_FIELD,
        format!("not a readable safetensors file: {error}"),
    )
}

/// Refuses a safetensors header (`u64` length, then a JSON object of tensors) that names a
/// tensor twice: the reader keeps one of them silently. A header that cannot be read is
/// left to the reader's own errors.
fn check_header_names(bytes: &[u8]) -> Result<(), SpecError> {
    let Some((length, rest)) = bytes.split_first_chunk::<8>() else {
        return Ok(());
    };
    let header = usize::try_from(u64::from_le_bytes(*length))
        .ok()
        .and_then(|length| rest.get(..length));
    match header.map(crate::engine::json::parse) {
        Some(Err(crate::engine::json::JsonError::DuplicateKey { field, key })) => {
            Err(SpecError::new(
                WEIGHTS_FIELD,
                if field == key {
                    format!(
                        "the safetensors header names tensor \"{}\" twice",
                        key.escape_debug()
                    )
                } else {
                    format!(
                        "the safetensors header gives the key \"{}\" twice in \"{}\"",
                        key.escape_debug(),
                        field.strip_suffix(&format!(".{key}")).unwrap_or(&field)
                    )
                },
            ))
        }
        _ => Ok(()),
    }
}

/// The first value of a float tensor that is NaN or infinite as a 32-bit float (wider floats
/// are narrowed as the model will), read from the file's bytes; float types other than the
/// common four are loaded, that tensor alone, to be read.
fn first_non_finite(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Option<(usize, f32)>, SpecError> {
    use safetensors::Dtype;
    let data = view.data();
    let found = match view.dtype() {
        Dtype::F32 => first_in(data, |b: [u8; 4]| f32::from_le_bytes(b)),
        Dtype::F64 => first_in(data, |b: [u8; 8]| f64::from_le_bytes(b) as f32),
        Dtype::F16 => first_in(data, |b: [u8; 2]| {
            half_float(u16::from_le_bytes(b), 0x7c00, 0x03ff, 0x8000)
        }),
        Dtype::BF16 => first_in(data, |b: [u8; 2]| {
            half_float(u16::from_le_bytes(b), 0x7f80, 0x007f, 0x8000)
        }),
        _ => {
            let tensor =
                candle_core::safetensors::Load::load(view, &Device::Cpu).map_err(unreadable)?;
            if !tensor.dtype().is_float() {
                return Ok(None);
            }
            let values = tensor
                .flatten_all()
                .and_then(|flat| flat.to_dtype(DType::F32))
                .and_then(|flat| flat.to_vec1::<f32>())
                .map_err(|error| {
                    SpecError::new(
                        WEIGHTS_FIELD,
                        format!("tensor \"{name}\" could not be read: {error}"),
                    )
                })?;
            values
                .iter()
                .position(|value| !value.is_finite())
                .map(|index| (index, values[index]))
        }
    };
    Ok(found)
}

/// The first of the little-endian values in `data` that `value` reads as non-finite.
fn first_in<const N: usize>(data: &[u8], value: impl Fn([u8; N]) -> f32) -> Option<(usize, f32)> {
    data.chunks_exact(N)
        .map(|chunk| value(chunk.try_into().expect("chunks of N bytes")))
        .enumerate()
        .find(|(_, value)| !value.is_finite())
}

/// A 16-bit float's value as far as finiteness goes: NaN or a signed infinity when its
/// exponent bits are all set, else any finite number (0).
fn half_float(bits: u16, exponent: u16, mantissa: u16, sign: u16) -> f32 {
    if bits & exponent != exponent {
        0.0
    } else if bits & mantissa != 0 {
        f32::NAN
    } else if bits & sign != 0 {
        f32::NEG_INFINITY
    } else {
        f32::INFINITY
    }
}

/// `[1, 2]` for flat index 5 of shape `[2, 3]`: the index a PyTorch user would type.
fn index_label(flat: usize, dims: &[usize]) -> String {
    let mut remaining = flat;
    let mut parts = vec![0; dims.len()];
    for (part, &dim) in parts.iter_mut().zip(dims).rev() {
        *part = remaining % dim.max(1);
        remaining /= dim.max(1);
    }
    format!("{parts:?}")
}

/// Sets every variable of `named` (parameters, then buffers, by `state_dict()` name) from
/// `tensors`. A missing, extra or mis-shaped tensor is an error naming it (the check
/// [`check_state_dict`] makes at submit); `num_batches_tracked` is accepted and ignored (no
/// momentum of `None` here).
pub(super) fn load(
    named: &[&(String, candle_core::Var)],
    tensors: &HashMap<String, Tensor>,
) -> Result<(), SpecError> {
    let expected: Vec<(String, Vec<usize>)> = named
        .iter()
        .map(|(name, var)| (name.clone(), var.dims().to_vec()))
        .collect();
    let given: HashMap<String, Vec<u64>> = tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), dims_u64(tensor.dims())))
        .collect();
    check_state_dict(&expected, &given)?;
    for (name, var) in named {
        let converted = tensors[name]
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(var.device()))
            .and_then(|t| var.set(&t));
        if let Err(error) = converted {
            return Err(SpecError::new(
                WEIGHTS_FIELD,
                format!("tensor \"{name}\" could not be loaded: {error}"),
            ));
        }
    }
    Ok(())
}
