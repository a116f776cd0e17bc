//! A job's data as the training loops read it: the dataset on the training device, and the
//! seeded order of its batches. Both backends and every loop read batches through these, so
//! they sit below all of them.

use candle_core::{Device, Tensor};

use super::data::{epoch_order, Dataset, Features, Targets, Task};

/// A dataset as tensors on the training device; batches are gathered with `index_select`
/// so that no per-batch copy goes through host memory.
pub struct DeviceData {
    pub x: Tensor,
    pub y: Tensor,
    pub rows: usize,
    pub task: Task,
}

impl DeviceData {
    pub fn new(data: &Dataset, device: &Device) -> candle_core::Result<Self> {
        let rows = data.rows();
        let x = match &data.features {
            Features::Dense {
                values,
                sample_shape,
            } => {
                let mut shape = vec![rows];
                shape.extend(sample_shape);
                Tensor::from_slice(values, shape, device)?
            }
            Features::Tokens { ids, context } => Tensor::from_slice(ids, (rows, *context), device)?,
        };
        let y = match &data.targets {
            Targets::Classes { labels, .. } => Tensor::from_slice(labels, rows, device)?,
            Targets::Values { values, dims } => Tensor::from_slice(values, (rows, *dims), device)?,
            Targets::Tokens { ids, .. } => {
                Tensor::from_slice(ids, (rows, ids.len() / rows.max(1)), device)?
            }
        };
        Ok(Self {
            x,
            y,
            rows,
            task: data.task(),
        })
    }

    pub fn batch(&self, rows: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let index: Vec<u32> = rows.iter().map(|&row| row as u32).collect();
        let index = Tensor::from_vec(index, rows.len(), self.x.device())?;
        Ok((
            self.x.index_select(&index, 0)?,
            self.y.index_select(&index, 0)?,
        ))
    }
}

/// An endless stream of full batches over seeded, per-epoch shuffled orders (the last
/// partial batch of an epoch is dropped so every step sees the same batch size).
pub struct BatchOrder {
    rows: usize,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
    position: usize,
}

impl BatchOrder {
    pub fn new(rows: usize, batch_size: usize, seed: u64) -> Self {
        Self {
            rows,
            batch_size,
            seed,
            epoch: 0,
            order: epoch_order(rows, seed, 0),
            position: 0,
        }
    }

    pub fn steps_per_epoch(rows: usize, batch_size: usize) -> usize {
        rows / batch_size
    }

    pub fn next_batch(&mut self) -> &[usize] {
        if self.position + self.batch_size > self.rows {
            self.epoch += 1;
            self.order = epoch_order(self.rows, self.seed, self.epoch);
            self.position = 0;
        }
        let batch = &self.order[self.position..self.position + self.batch_size];
        self.position += self.batch_size;
        batch
    }
}
