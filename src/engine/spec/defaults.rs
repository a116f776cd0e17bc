//! Every default of a spec and of the schedules, as functions because serde's `default =
//! "..."` needs a path: one set, so that the sweep's OneCycle shape and `POST /v1/schedules`'s
//! OneCycleLR cannot drift apart. PyTorch's values wherever PyTorch has one.

pub fn validation_fraction() -> f64 {
    0.2
}
pub fn batch_size() -> usize {
    64
}
pub fn plan_epochs() -> usize {
    10
}
pub fn mlp_hidden() -> Vec<usize> {
    vec![128, 128]
}
pub fn cnn_channels() -> Vec<usize> {
    vec![16, 32]
}
pub fn cnn_hidden() -> usize {
    128
}
pub fn d_model() -> usize {
    64
}
pub fn heads() -> usize {
    4
}
pub fn layers() -> usize {
    2
}
pub fn context() -> usize {
    64
}
pub fn sgd_momentum() -> f64 {
    0.9
}
pub fn betas() -> [f64; 2] {
    [0.9, 0.999]
}
pub fn eps() -> f64 {
    1e-8
}
pub fn adamw_weight_decay() -> f64 {
    0.01
}
/// Prodigy's first estimate of `d` (prodigyopt's).
pub fn prodigy_d0() -> f64 {
    1e-6
}
pub fn prodigy_d_coef() -> f64 {
    1.0
}
/// The schedule-free optimizers' weighting of the average by the learning rate (schedulefree's).
pub fn weight_lr_power() -> f64 {
    2.0
}
pub fn recipe_plateau_factor() -> f64 {
    0.1
}
/// Evaluation points (about 25 a run), not PyTorch's 10 epochs.
pub fn recipe_plateau_patience() -> usize {
    2
}
pub fn recipe_plateau_threshold() -> f64 {
    1e-4
}
pub fn recipe_plateau_eps() -> f64 {
    1e-8
}
pub fn one() -> usize {
    1
}
pub fn two() -> usize {
    2
}
pub fn warmup_fraction() -> f64 {
    0.05
}
pub fn recipe_step_gamma() -> f64 {
    0.1
}
pub fn start_lr() -> f64 {
    1e-7
}
pub fn end_lr() -> f64 {
    10.0
}
pub fn range_steps() -> usize {
    100
}
pub fn smoothing() -> f64 {
    0.98
}
pub fn diverge_factor() -> f64 {
    4.0
}
pub fn sweep_count() -> usize {
    5
}
pub fn sweep_seeds() -> usize {
    1
}
pub fn pct_start() -> f64 {
    0.3
}
pub fn div_factor() -> f64 {
    25.0
}
pub fn final_div_factor() -> f64 {
    1e4
}
pub fn enabled() -> bool {
    true
}
pub fn one_cycle_base_momentum() -> f64 {
    0.85
}
pub fn one_cycle_max_momentum() -> f64 {
    0.95
}

// The schedules' own (`POST /v1/schedules`, `lrtune schedule`): PyTorch's.

pub fn step_size_up() -> usize {
    2000
}
pub fn gamma() -> f64 {
    1.0
}
pub fn cyclic_base_momentum() -> f64 {
    0.8
}
pub fn cyclic_max_momentum() -> f64 {
    0.9
}
pub fn t_mult() -> usize {
    1
}
pub fn start_factor() -> f64 {
    1.0 / 3.0
}
pub fn step_gamma() -> f64 {
    0.1
}
/// ReduceLROnPlateau's own (a race's recipes use the `recipe_plateau_` ones).
pub fn plateau_factor() -> f64 {
    0.1
}
pub fn plateau_patience() -> usize {
    10
}
pub fn plateau_threshold() -> f64 {
    1e-4
}
pub fn plateau_eps() -> f64 {
    1e-8
}
