//! NumPy `.npy` arrays (format versions 1 to 3, little-endian numeric dtypes, C order): an x
//! array of samples and a y array of targets. `npyz` reads the values. The file is checked
//! before it is handed over: the header's length and the data its shape promises against the
//! bytes there are (npyz allocates whatever length a header states), and the header's fields
//! one by one (read with `py_literal`, the Python-literal parser npyz uses), so that a refusal
//! names the array, the field and the reason.

use npyz::{Endianness, NpyFile, TypeChar, TypeStr};
use py_literal::Value as PyValue;

use super::{number_label, targets_from_values, DataError, Dataset, Features, Targets, Task};
use crate::engine::quote::quoted;

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Reads x of shape (n, ...) as dense features (sample shape = the rest; a 1-D x is one
/// feature per row) and y of shape (n,) or (n, d). A 1-D y is classified as for CSV (`task`
/// None detects); a 2-D y is regression with d dims, except that (n, 1) may be read as
/// classes when `task` asks for classification.
pub fn read_npy(x: &[u8], y: &[u8], task: Option<Task>) -> Result<Dataset, DataError> {
    let x = NpyArray::parse("x", x)?;
    let y = NpyArray::parse("y", y)?;
    let Some((&rows, sample_shape)) = x.shape.split_first() else {
        return Err(DataError::invalid("x", "a 0-dimensional array has no rows"));
    };
    let sample_shape = if sample_shape.is_empty() {
        vec![1]
    } else {
        sample_shape.to_vec()
    };
    if sample_shape.contains(&0) {
        return Err(DataError::invalid(
            "x",
            format!("shape {} has no features", shape_label(&x.shape)),
        ));
    }
    if rows < 2 {
        return Err(DataError::invalid(
            "x",
            format!("found {rows} rows; at least 2 are needed"),
        ));
    }
    if y.shape.first() != Some(&rows) {
        return Err(DataError::invalid(
            "y",
            format!(
                "shape {} does not match the {rows} rows of x (shape {})",
                shape_label(&y.shape),
                shape_label(&x.shape)
            ),
        ));
    }

    let x_values = x.values_f64()?;
    let mut features = Vec::with_capacity(x_values.len());
    for (index, value) in x_values.into_iter().enumerate() {
        let narrowed = value as f32;
        if !narrowed.is_finite() {
            let what = if value.is_finite() {
                "is too large for a 32-bit float"
            } else {
                "is not a finite number"
            };
            return Err(DataError::invalid(
                "x",
                format!(
                    "x{} = {} {what}",
                    index_label(index, &x.shape),
                    number_label(value)
                ),
            ));
        }
        features.push(narrowed);
    }

    let y_values = y.values_f64()?;
    if let Some(index) = y_values.iter().position(|v| !(*v as f32).is_finite()) {
        return Err(DataError::invalid(
            "y",
            format!(
                "y{} = {} is not a finite 32-bit number",
                index_label(index, &y.shape),
                number_label(y_values[index])
            ),
        ));
    }
    // (n, 1) is a column of labels when classification is asked for; otherwise 2-D is
    // multi-output regression.
    let one_target_per_row = y.shape.len() == 1
        || (y.shape.len() == 2 && y.shape[1] == 1 && task == Some(Task::Classification));
    let targets = if one_target_per_row {
        targets_from_values(&y_values, task, "y", |index| {
            DataError::invalid(
                "y",
                format!(
                    "y{} = {} is not a class label (an integer)",
                    index_label(index, &y.shape),
                    number_label(y_values[index])
                ),
            )
        })?
    } else if y.shape.len() == 2 {
        match task {
            None | Some(Task::Regression) => Targets::Values {
                values: y_values.iter().map(|&v| v as f32).collect(),
                dims: y.shape[1],
            },
            Some(task) => {
                return Err(DataError::invalid(
                    "y",
                    format!(
                        "a y of shape {} is regression data, not {task:?}",
                        shape_label(&y.shape)
                    ),
                ))
            }
        }
    } else {
        return Err(DataError::invalid(
            "y",
            format!("shape {}; expected (n,) or (n, d)", shape_label(&y.shape)),
        ));
    };
    if let Targets::Values { dims: 0, .. } = targets {
        return Err(DataError::invalid(
            "y",
            "a y of shape (n, 0) has no targets",
        ));
    }
    Ok(Dataset {
        features: Features::Dense {
            values: features,
            sample_shape,
        },
        targets,
    })
}

/// "(3, 1, 2)" or "(2,)": a shape as NumPy prints it.
fn shape_label(shape: &[usize]) -> String {
    match shape {
        [single] => format!("({single},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("({})", parts.join(", "))
        }
    }
}

/// "[3, 1]" for flat index 7 of shape (4, 2): the index a NumPy user would type.
fn index_label(flat: usize, shape: &[usize]) -> String {
    let mut remaining = flat;
    let mut parts = vec![0; shape.len()];
    for (part, &dim) in parts.iter_mut().zip(shape).rev() {
        *part = remaining % dim.max(1);
        remaining /= dim.max(1);
    }
    let parts: Vec<String> = parts.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(", "))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    F4,
    F8,
    I1,
    I2,
    I4,
    I8,
    U1,
    U2,
    U4,
    U8,
    Bool,
}

impl Dtype {
    fn parse(part: &str, descr: &str) -> Result<Dtype, DataError> {
        let unsupported = || {
            DataError::invalid(
                part,
                format!(
                    "unsupported dtype {}; use float32/64, (u)int8-64 or bool",
                    quoted(descr)
                ),
            )
        };
        let type_str: TypeStr = descr.parse().map_err(|_| unsupported())?;
        let dtype = match (type_str.type_char(), type_str.size_field()) {
            (TypeChar::Float, 4) => Dtype::F4,
            (TypeChar::Float, 8) => Dtype::F8,
            (TypeChar::Int, 1) => Dtype::I1,
            (TypeChar::Int, 2) => Dtype::I2,
            (TypeChar::Int, 4) => Dtype::I4,
            (TypeChar::Int, 8) => Dtype::I8,
            (TypeChar::Uint, 1) => Dtype::U1,
            (TypeChar::Uint, 2) => Dtype::U2,
            (TypeChar::Uint, 4) => Dtype::U4,
            (TypeChar::Uint, 8) => Dtype::U8,
            (TypeChar::Bool, 1) => Dtype::Bool,
            _ => return Err(unsupported()),
        };
        // Single bytes have no byte order, which NumPy writes as '|' (npyz allows it only there).
        if type_str.endianness() == Endianness::Big {
            return Err(DataError::invalid(
                part,
                format!(
                    "dtype {} is not little-endian; save with a '<' dtype",
                    quoted(descr)
                ),
            ));
        }
        Ok(dtype)
    }

    fn size(self) -> usize {
        match self {
            Dtype::I1 | Dtype::U1 | Dtype::Bool => 1,
            Dtype::I2 | Dtype::U2 => 2,
            Dtype::F4 | Dtype::I4 | Dtype::U4 => 4,
            Dtype::F8 | Dtype::I8 | Dtype::U8 => 8,
        }
    }
}

/// An array whose header has been checked against its bytes; `values_f64` reads it.
struct NpyArray<'a> {
    part: &'a str,
    dtype: Dtype,
    shape: Vec<usize>,
    file: &'a [u8],
}

impl<'a> NpyArray<'a> {
    fn parse(part: &'a str, bytes: &'a [u8]) -> Result<NpyArray<'a>, DataError> {
        let invalid = |message: String| DataError::invalid(part, message);
        if !bytes.starts_with(NPY_MAGIC) {
            return Err(invalid("not an .npy file (no \\x93NUMPY magic)".into()));
        }
        let major = bytes.get(6).copied().unwrap_or(0);
        // Version 1 stores the header length in 2 bytes; versions 2 and 3 in 4.
        let (length_bytes, header_start) = match major {
            1 => (2, 10),
            2 | 3 => (4, 12),
            _ => return Err(invalid(format!("unsupported .npy format version {major}"))),
        };
        let length_field = bytes
            .get(8..8 + length_bytes)
            .ok_or_else(|| invalid("truncated before the header length".into()))?;
        let header_len = length_field
            .iter()
            .rev()
            .fold(0usize, |total, &byte| (total << 8) | usize::from(byte));
        let header = bytes
            .get(header_start..header_start + header_len)
            .ok_or_else(|| invalid(format!("truncated inside the {header_len}-byte header")))?;
        let header = std::str::from_utf8(header)
            .map_err(|_| invalid("the header is not ASCII text".into()))?;
        let dict = match header.trim_end().parse::<PyValue>() {
            Ok(PyValue::Dict(entries)) => entries,
            Ok(_) => return Err(invalid("the header is not a dict".into())),
            Err(error) => return Err(invalid(format!("unreadable header: {error}"))),
        };
        let field = |name: &str| {
            dict.iter()
                .find(|(key, _)| key.as_string().is_some_and(|key| key == name))
                .map(|(_, value)| value)
                .ok_or_else(|| invalid(format!("the header has no '{name}'")))
        };
        let dtype = match field("descr")? {
            PyValue::String(descr) => Dtype::parse(part, descr)?,
            _ => return Err(invalid("structured dtypes are not supported".into())),
        };
        match field("fortran_order")? {
            PyValue::Boolean(false) => {}
            PyValue::Boolean(true) => {
                return Err(invalid(
                    "Fortran order is not supported; save with np.ascontiguousarray".into(),
                ))
            }
            _ => return Err(invalid("'fortran_order' is not True or False".into())),
        }
        let shape = match field("shape")? {
            PyValue::Tuple(items) | PyValue::List(items) => items
                .iter()
                .map(|item| match item {
                    PyValue::Integer(dim) => usize::try_from(dim).map_err(|_| {
                        invalid(format!("'shape' holds {dim}, which is not a length"))
                    }),
                    _ => Err(invalid(
                        "'shape' holds something other than integers".into(),
                    )),
                })
                .collect::<Result<Vec<usize>, DataError>>()?,
            _ => return Err(invalid("'shape' is not a tuple".into())),
        };
        let promised = shape
            .iter()
            .try_fold(dtype.size(), |total, &dim| total.checked_mul(dim))
            .ok_or_else(|| invalid(format!("shape {} overflows", shape_label(&shape))))?;
        let data = &bytes[header_start + header_len..];
        if data.len() != promised {
            return Err(invalid(format!(
                "shape {} of {} promises {promised} bytes of data, found {}",
                shape_label(&shape),
                dtype_name(dtype),
                data.len()
            )));
        }
        Ok(NpyArray {
            part,
            dtype,
            shape,
            file: bytes,
        })
    }

    /// Every element as an f64, in C order.
    fn values_f64(&self) -> Result<Vec<f64>, DataError> {
        let values = match self.dtype {
            Dtype::F4 => self.read(|value: f32| f64::from(value)),
            Dtype::F8 => self.read(|value: f64| value),
            Dtype::I1 => self.read(|value: i8| f64::from(value)),
            Dtype::I2 => self.read(|value: i16| f64::from(value)),
            Dtype::I4 => self.read(|value: i32| f64::from(value)),
            Dtype::I8 => self.read(|value: i64| value as f64),
            Dtype::U1 => self.read(|value: u8| f64::from(value)),
            Dtype::U2 => self.read(|value: u16| f64::from(value)),
            Dtype::U4 => self.read(|value: u32| f64::from(value)),
            Dtype::U8 => self.read(|value: u64| value as f64),
            Dtype::Bool => self.read(|value: bool| f64::from(u8::from(value))),
        };
        values.map_err(|error| DataError::invalid(self.part, format!("unreadable data: {error}")))
    }

    fn read<T: npyz::Deserialize>(
        &self,
        convert: impl Fn(T) -> f64,
    ) -> Result<Vec<f64>, std::io::Error> {
        let file = NpyFile::new(self.file)?;
        let reader = file.data::<T>().map_err(std::io::Error::other)?;
        let mut values = Vec::with_capacity(self.shape.iter().product());
        for value in reader {
            values.push(convert(value?));
        }
        Ok(values)
    }
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F4 => "float32",
        Dtype::F8 => "float64",
        Dtype::I1 => "int8",
        Dtype::I2 => "int16",
        Dtype::I4 => "int32",
        Dtype::I8 => "int64",
        Dtype::U1 => "uint8",
        Dtype::U2 => "uint16",
        Dtype::U4 => "uint32",
        Dtype::U8 => "uint64",
        Dtype::Bool => "bool",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An .npy file as NumPy writes it: the header padded with spaces to a multiple of 64
    /// bytes and ended by a newline.
    fn npy(version: u8, descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let prefix = if version == 1 { 10 } else { 12 };
        while (prefix + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = NPY_MAGIC.to_vec();
        bytes.extend([version, 0]);
        if version == 1 {
            bytes.extend((header.len() as u16).to_le_bytes());
        } else {
            bytes.extend((header.len() as u32).to_le_bytes());
        }
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        bytes
    }

    fn le_bytes<const N: usize, T>(values: &[T], to_bytes: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(to_bytes).collect()
    }

    #[test]
    fn float32_images_and_int64_labels_are_read() {
        let x = npy(
            1,
            "<f4",
            "(3, 1, 2)",
            &le_bytes(&[0.5f32, -1.0, 2.0, 3.0, 4.25, 5.0], |v| v.to_le_bytes()),
        );
        let y = npy(
            1,
            "<i8",
            "(3,)",
            &le_bytes(&[7i64, -2, 7], |v| v.to_le_bytes()),
        );
        let data = read_npy(&x, &y, None).expect("valid npy");
        assert_eq!(
            data.features,
            Features::Dense {
                values: vec![0.5, -1.0, 2.0, 3.0, 4.25, 5.0],
                sample_shape: vec![1, 2],
            }
        );
        assert_eq!(
            data.targets,
            Targets::Classes {
                labels: vec![1, 0, 1],
                classes: 2,
            }
        );
    }

    #[test]
    fn float64_features_with_a_2d_target_are_regression() {
        let x = npy(
            2,
            "<f8",
            "(2,)",
            &le_bytes(&[1.5f64, -2.5], |v| v.to_le_bytes()),
        );
        let y = npy(
            3,
            "<f8",
            "(2, 2)",
            &le_bytes(&[0.0f64, 1.0, 2.0, 3.0], |v| v.to_le_bytes()),
        );
        let data = read_npy(&x, &y, None).expect("valid npy");
        assert_eq!(
            data.features,
            Features::Dense {
                values: vec![1.5, -2.5],
                sample_shape: vec![1],
            }
        );
        assert_eq!(
            data.targets,
            Targets::Values {
                values: vec![0.0, 1.0, 2.0, 3.0],
                dims: 2,
            }
        );
    }

    #[test]
    fn uint8_and_the_smaller_integer_types_decode_exactly() {
        let x = npy(1, "|u1", "(2, 2)", &[0, 255, 17, 3]);
        let y = npy(1, "|u1", "(2,)", &[4, 9]);
        let data = read_npy(&x, &y, Some(Task::Regression)).expect("valid npy");
        assert_eq!(
            data.features,
            Features::Dense {
                values: vec![0.0, 255.0, 17.0, 3.0],
                sample_shape: vec![2],
            }
        );
        assert_eq!(
            data.targets,
            Targets::Values {
                values: vec![4.0, 9.0],
                dims: 1,
            }
        );
        let cases: [(&str, Vec<u8>, f64); 8] = [
            ("|i1", vec![0xfe], -2.0),
            ("<i2", (-300i16).to_le_bytes().to_vec(), -300.0),
            ("<i4", (-70_000i32).to_le_bytes().to_vec(), -70_000.0),
            ("<u2", 60_000u16.to_le_bytes().to_vec(), 60_000.0),
            ("<u4", 4_000_000_000u32.to_le_bytes().to_vec(), 4e9),
            ("<u8", (1u64 << 40).to_le_bytes().to_vec(), 2f64.powi(40)),
            ("|b1", vec![1], 1.0),
            ("<i1", vec![0x7f], 127.0),
        ];
        for (descr, bytes, expected) in cases {
            let file = npy(1, descr, "(1,)", &bytes);
            let array = NpyArray::parse("x", &file).expect(descr);
            assert_eq!(array.values_f64().expect(descr), vec![expected], "{descr}");
        }
    }

    #[test]
    fn a_2d_single_column_target_can_be_read_as_classes() {
        let x = npy(1, "|u1", "(2,)", &[1, 2]);
        let y = npy(1, "|u1", "(2, 1)", &[1, 0]);
        let data = read_npy(&x, &y, Some(Task::Classification)).expect("valid npy");
        assert_eq!(data.output_dim(), 2);
        assert_eq!(
            read_npy(&x, &y, None).expect("valid npy").task(),
            Task::Regression
        );
    }

    fn error_text(x: &[u8], y: &[u8], task: Option<Task>) -> String {
        read_npy(x, y, task).expect_err("invalid").to_string()
    }

    #[test]
    fn bad_values_and_shapes_are_named() {
        let y = npy(1, "|u1", "(2,)", &[0, 1]);
        let x_nan = npy(
            1,
            "<f4",
            "(2, 2)",
            &le_bytes(&[1.0f32, 2.0, 3.0, f32::NAN], |v| v.to_le_bytes()),
        );
        assert_eq!(
            error_text(&x_nan, &y, None),
            "x: x[1, 1] = NaN is not a finite number"
        );
        let x_huge = npy(
            1,
            "<f8",
            "(2,)",
            &le_bytes(&[1.0f64, 1e300], |v| v.to_le_bytes()),
        );
        assert_eq!(
            error_text(&x_huge, &y, None),
            "x: x[1] = 1e300 is too large for a 32-bit float"
        );
        let x = npy(1, "|u1", "(3,)", &[1, 2, 3]);
        assert_eq!(
            error_text(&x, &y, None),
            "y: shape (2,) does not match the 3 rows of x (shape (3,))"
        );
        let x = npy(1, "|u1", "(2,)", &[1, 2]);
        let y_fraction = npy(
            1,
            "<f4",
            "(2,)",
            &le_bytes(&[0.0f32, 0.5], |v| v.to_le_bytes()),
        );
        assert_eq!(
            error_text(&x, &y_fraction, Some(Task::Classification)),
            "y: y[1] = 0.5 is not a class label (an integer)"
        );
        assert!(error_text(&x, &y, Some(Task::LanguageModel)).starts_with("y:"));
        let y_3d = npy(1, "|u1", "(2, 1, 1)", &[0, 1]);
        assert!(error_text(&x, &y_3d, None).contains("expected (n,) or (n, d)"));
    }

    #[test]
    fn unsupported_files_are_rejected_with_the_reason() {
        let y = npy(1, "|u1", "(2,)", &[0, 1]);
        let fortran_bytes = {
            let good = npy(1, "|u1", "(2,)", &[1, 2]);
            // "True " keeps the header length and so the 64-byte alignment.
            let text = String::from_utf8_lossy(&good[10..]).replace("False", "True ");
            let mut bytes = good[..10].to_vec();
            bytes.extend(text.as_bytes());
            bytes
        };
        assert!(error_text(&fortran_bytes, &y, None).contains("Fortran order is not supported"));
        let big_endian = npy(1, ">f4", "(2,)", &[0; 8]);
        assert!(error_text(&big_endian, &y, None).contains("not little-endian"));
        let accented = npy(1, "é4", "(2,)", &[0; 8]);
        assert!(error_text(&accented, &y, None).contains("unsupported dtype \"é4\""));
        let complex = npy(1, "<c8", "(2,)", &[0; 16]);
        assert!(error_text(&complex, &y, None).contains("unsupported dtype \"<c8\""));
        let short = npy(1, "<f4", "(2,)", &[0; 7]);
        assert_eq!(
            error_text(&short, &y, None),
            "x: shape (2,) of float32 promises 8 bytes of data, found 7"
        );
        assert!(error_text(b"PK\x03\x04", &y, None).contains("not an .npy file"));
        let good = npy(1, "|u1", "(2,)", &[1, 2]);
        assert!(error_text(&good[..20], &y, None).contains("truncated inside"));
        let one_row = npy(1, "|u1", "(1,)", &[1]);
        assert_eq!(
            error_text(&one_row, &y, None),
            "x: found 1 rows; at least 2 are needed"
        );
    }

    #[test]
    fn a_header_whose_shape_overflows_is_refused_before_any_allocation() {
        let y = npy(1, "|u1", "(2,)", &[0, 1]);
        let huge = npy(1, "<f8", "(4294967296, 4294967296, 4294967296)", &[]);
        assert_eq!(
            error_text(&huge, &y, None),
            "x: shape (4294967296, 4294967296, 4294967296) overflows"
        );
        let mut lying = npy(2, "<f8", "(2,)", &[0; 16]);
        // A version-2 header claiming 4 GiB: refused as truncated, nothing read.
        lying[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            error_text(&lying, &y, None).contains("truncated inside the 4294967295-byte header")
        );
    }
}
