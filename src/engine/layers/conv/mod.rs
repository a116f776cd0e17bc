//! `nn.Conv2d(in, out, kernel, stride, padding)` on `[channels, height, width]`. The native
//! pass is im2col and one product over the whole batch; a 3x3 convolution with stride and
//! padding 1, followed by a ReLU and a 2x2 max pool, runs as one fused node (`conv_block`),
//! the preset CNN's stage.

use std::any::Any;

use candle_core::Tensor;

use super::native::{NodeBuild, NodeParts};
use super::plan::{element_count, PlanStep, Planned, Sample};
use super::weights::{Init, Tensors, Weights};
use super::Layer;
use crate::engine::rng::Rng;
use crate::engine::spec::SpecError;

mod candle;
mod conv_block;
mod native;

#[derive(Debug)]
pub struct Conv2d {
    pub inputs: usize,
    pub outputs: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// `{"type": "conv2d", ...}`: the output's size, with every product checked (a padding or
/// a channel count that overflows names its field).
pub fn plan(
    out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    step: &mut PlanStep<'_>,
) -> Result<Planned, SpecError> {
    let (out, kernel, stride, padding) = (&out, &kernel, &stride, &padding);
    let dims = step.values()?;
    let &[channels, height, width] = dims else {
        return Err(step.mismatch("[channels, height, width]"));
    };
    let padded = |side: usize| padding.checked_mul(2).and_then(|p| p.checked_add(side));
    let (Some(padded_h), Some(padded_w)) = (padded(height), padded(width)) else {
        return Err(SpecError::new(
            step.field("padding"),
            format!(
                "conv2d's output size overflows: padding {padding} on both sides of its \
                 input {dims:?} is more than a 64-bit size holds"
            ),
        ));
    };
    // `validate` checked stride >= 1; the quotient is at most the padded side.
    let size = |padded: usize| padded.checked_sub(*kernel).map(|s| s / stride + 1);
    let (Some(out_h), Some(out_w)) = (size(padded_h), size(padded_w)) else {
        return Err(SpecError::new(
            step.at,
            format!(
                "conv2d's kernel {kernel} with padding {padding} does not fit its input \
                 {dims:?}"
            ),
        ));
    };
    let next = vec![*out, out_h, out_w];
    let Some(pixels) = out_h.checked_mul(out_w) else {
        return Err(step.too_large(
            step.field("padding"),
            &next,
            &format!("padding {padding} makes its output"),
        ));
    };
    if pixels.checked_mul(*out).is_none() {
        // Blame the padding when the output would fit without it.
        let unpadded = |side: usize| side.checked_sub(*kernel).map_or(1, |s| s / stride + 1);
        let fits_unpadded = unpadded(height)
            .checked_mul(unpadded(width))
            .and_then(|p| p.checked_mul(*out))
            .is_some();
        return Err(if *padding > 0 && fits_unpadded {
            step.too_large(
                step.field("padding"),
                &next,
                &format!("padding {padding} makes its output"),
            )
        } else {
            step.too_large(step.field("out"), &next, "its output is")
        });
    }
    let Some(fan_in) = element_count(&[channels, *kernel, *kernel]) else {
        return Err(SpecError::new(
            step.field("kernel"),
            format!(
                "conv2d's parameter count overflows: a {kernel}x{kernel} kernel over \
                 {channels} channels is more than a 64-bit count holds"
            ),
        ));
    };
    step.add_parameters(
        (fan_in as u64)
            .checked_add(1)
            .and_then(|per_output| per_output.checked_mul(*out as u64)),
        &step.field("out"),
        || format!("{out} filters of {fan_in} weights and a bias"),
    )?;
    // The native step's patches, their gradient and the channel-major output.
    let at = step.at;
    step.add_activations(
        (fan_in as u64)
            .checked_mul(2)
            .and_then(|patches| patches.checked_add(*out as u64))
            .and_then(|per_pixel| per_pixel.checked_mul(pixels as u64)),
        at,
        || format!("{pixels} patches of {fan_in} values"),
    )?;
    let conv = Conv2d {
        inputs: channels,
        outputs: *out,
        kernel: *kernel,
        stride: *stride,
        padding: *padding,
    };
    Ok((Box::new(conv), Sample::Values(next)))
}

impl Layer for Conv2d {
    fn tensors(&self, tensors: &mut Tensors) {
        // nn.Conv2d: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for
        // the weight, and the same bound for the bias.
        let fan_in = self.inputs * self.kernel * self.kernel;
        let init = Init::Uniform {
            bound: 1.0 / (fan_in as f64).sqrt(),
        };
        let shape = vec![self.outputs, self.inputs, self.kernel, self.kernel];
        tensors.parameter("weight", shape, init);
        tensors.parameter("bias", vec![self.outputs], init);
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let [weight, bias] = weights.parameters();
        candle::conv2d(x, weight, bias, self.stride, self.padding)
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        native::node(self, input, build, following)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
