//! The candle path against PyTorch's golden networks.

use candle_core::Tensor;

use super::forward;
use crate::engine::model::golden::{assert_close, cases as golden};
use crate::engine::rng::Rng;

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// PyTorch's own network with its saved weights: the eval-mode loss (lrtune's
/// `initial_val_loss`), the train-mode loss, every parameter's gradient and batch norm's
/// updated running statistics.
#[test]
fn layer_lists_match_pytorch_golden_losses_gradients_and_running_statistics() {
    for case in golden() {
        let model = case.model();
        model.load_state_dict(&case.weights()).unwrap();
        let names: Vec<&str> = model.parameter_names().map(String::as_str).collect();
        assert_eq!(names, case.param_order, "{}: parameter order", case.name);

        let (x, y) = case.batch();
        let eval = forward(&model, &x, &y, None).unwrap();
        let eval_loss = f64::from(eval.loss.to_scalar::<f32>().unwrap());
        assert!(
            (eval_loss - case.eval_loss).abs() <= 1e-4 * case.eval_loss.abs(),
            "{}: eval loss {eval_loss} vs PyTorch's {}",
            case.name,
            case.eval_loss
        );

        let train = forward(&model, &x, &y, Some(&mut Rng::new(1))).unwrap();
        let train_loss = f64::from(train.loss.to_scalar::<f32>().unwrap());
        assert!(
            (train_loss - case.train_loss).abs() <= 1e-4 * case.train_loss.abs(),
            "{}: train loss {train_loss} vs PyTorch's {}",
            case.name,
            case.train_loss
        );
        let grads = train.loss.backward().unwrap();
        for (name, var) in model.parameter_names().zip(model.vars()) {
            let grad = grads.get(var.as_tensor()).unwrap();
            assert_close(
                &values(grad),
                &case.grads[name],
                &format!("{} grad {name}", case.name),
            );
        }
        for (name, var) in model.buffer_names().zip(model.buffers()) {
            assert_close(
                &values(var.as_tensor()),
                &case.running_after[name],
                &format!("{} {name} after a training step", case.name),
            );
        }
    }
}
