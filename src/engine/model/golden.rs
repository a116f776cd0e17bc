//! PyTorch's golden layer-list networks (`tests/golden/make_sequential.py`), for the tests of
//! both backends.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::{read_safetensors, Model, ModelShape};
use crate::engine::batch::DeviceData;
use crate::engine::spec::{LayerSpec, ModelSpec, Task};

const GOLDEN: &str = include_str!("../../../tests/golden/sequential.json");

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) input_shape: Vec<usize>,
    pub(crate) task: String,
    pub(crate) outputs: usize,
    pub(crate) layers: Vec<LayerSpec>,
    pub(crate) weights: String,
    pub(crate) x: Vec<f64>,
    pub(crate) y: Vec<f64>,
    pub(crate) eval_loss: f64,
    pub(crate) train_loss: f64,
    pub(crate) grads: HashMap<String, Vec<f64>>,
    pub(crate) running_after: HashMap<String, Vec<f64>>,
    pub(crate) param_order: Vec<String>,
}

impl Case {
    /// The batch as a split the native step reads.
    pub(crate) fn device_data(&self) -> DeviceData {
        let (x, y) = self.batch();
        let rows = x.dim(0).unwrap();
        DeviceData {
            x,
            y,
            rows,
            task: self.task(),
        }
    }

    pub(crate) fn task(&self) -> Task {
        match self.task.as_str() {
            "classification" => Task::Classification,
            "regression" => Task::Regression,
            _ => Task::LanguageModel,
        }
    }

    pub(crate) fn model(&self) -> Model {
        let spec = ModelSpec::Sequential {
            layers: self.layers.clone(),
            context: None,
        };
        let shape = ModelShape {
            input: self.input_shape.clone(),
            output: self.outputs,
            task: self.task(),
        };
        Model::build(&spec, &shape, 0, &Device::Cpu).unwrap()
    }

    pub(crate) fn weights(&self) -> HashMap<String, Tensor> {
        let path = format!(
            "{}/tests/golden/sequential/{}",
            env!("CARGO_MANIFEST_DIR"),
            self.weights
        );
        read_safetensors(&std::fs::read(path).unwrap()).unwrap()
    }

    /// The batch as the data pipeline hands it over: f32 samples or u32 token ids, u32
    /// labels or f32 targets.
    pub(crate) fn batch(&self) -> (Tensor, Tensor) {
        let rows = match self.task() {
            Task::LanguageModel => self.x.len() / self.input_shape[0],
            _ => self.x.len() / self.input_shape.iter().product::<usize>(),
        };
        let mut x_shape = vec![rows];
        x_shape.extend(&self.input_shape);
        let x = match self.task() {
            Task::LanguageModel => {
                let ids: Vec<u32> = self.x.iter().map(|&v| v as u32).collect();
                Tensor::from_vec(ids, x_shape, &Device::Cpu)
            }
            _ => {
                let values: Vec<f32> = self.x.iter().map(|&v| v as f32).collect();
                Tensor::from_vec(values, x_shape, &Device::Cpu)
            }
        }
        .unwrap();
        let y = match self.task() {
            Task::Regression => {
                let values: Vec<f32> = self.y.iter().map(|&v| v as f32).collect();
                Tensor::from_vec(values, (rows, self.outputs), &Device::Cpu)
            }
            Task::Classification => {
                let labels: Vec<u32> = self.y.iter().map(|&v| v as u32).collect();
                Tensor::from_vec(labels, rows, &Device::Cpu)
            }
            Task::LanguageModel => {
                let ids: Vec<u32> = self.y.iter().map(|&v| v as u32).collect();
                Tensor::from_vec(ids, (rows, self.input_shape[0]), &Device::Cpu)
            }
        }
        .unwrap();
        (x, y)
    }
}

pub(crate) fn cases() -> Vec<Case> {
    let golden: Golden = serde_json::from_str(GOLDEN).unwrap();
    assert_eq!(golden.cases.len(), 7);
    golden.cases
}

pub(crate) fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    // Relative to the largest value; a gradient that is zero in exact arithmetic (a bias
    // before batch norm) is float noise on both sides, held to 1e-6 absolute.
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-2);
    for (index, (&got, &want)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(got) - want).abs() <= 1e-4 * scale,
            "{what}[{index}]: {got} vs PyTorch's {want} (largest {scale})"
        );
    }
}
