"""Golden reference data for lrtune's learning-rate-free optimizers.

Trains a small classifier with the reference libraries' own optimizers and writes
tests/golden/challengers.json, which src/engine/optim/challengers.rs (both optimizer paths:
candle tensor ops and the native fused kernels) and the batch-norm case's trainer test
(src/engine/trainer/tests.rs) read:

  * Prodigy (``prodigyopt.Prodigy``) with its defaults; decoupled weight decay with bias
    correction under a cosine learning rate; safeguard_warmup with growth_rate; coupled (L2)
    weight decay with beta3, d_coef and a cosine learning rate;
  * schedule-free AdamW and SGD (``schedulefree.AdamWScheduleFree``, ``SGDScheduleFree``)
    with their defaults, and with weight decay, warmup_steps 5 and other r /
    weight_lr_power, each with the evaluation weights x (``optimizer.eval()``) after the
    last step;
  * a batch-norm network (Linear, tanh, BatchNorm1d, Linear) under schedule-free AdamW
    whose evaluation loss is taken at x after recomputing the running statistics there,
    as lrtune does it: the statistics reset (``reset_running_stats()``; the library's README
    does not reset, lrtune does so that the statistics depend on x alone), then
    ``BN_PASSES`` forward passes over the training batch in train mode under
    ``torch.no_grad()``, then ``model.eval()``.

Each case has the network's initial parameters (``named_parameters()`` order, each
flattened row-major), the learning rate and beta1 / momentum of every step (the library's
``lr`` is set on the group before each step, as lrtune passes a schedule's value), the loss
and the gradients (all parameters' concatenated) before every step, and the parameters after
every step.

The Rust tests step with the recorded gradients, so that the optimizer is compared alone,
and hold that to 1e-5. Through a network's own forward and backward pass (also tested, more
loosely), candle's and PyTorch's last-bit differences in the gradients are amplified by the
Adam-style normalisation of gradients near zero and by Prodigy's estimate (``p0 - p`` early
on is a difference of nearly equal numbers): on ``prodigy_defaults`` the library's own
float32 and float64 runs end 2e-2 apart.

Everything is float32 and seeded; values are written as the shortest decimals that read
back as the same float32. To regenerate, from the repo root:

    python3 tests/golden/make_challengers.py

Needs torch, numpy, prodigyopt and schedulefree (``pip install torch numpy prodigyopt
schedulefree``); written with torch 2.15, prodigyopt 1.1.2 and schedulefree 1.4.1.
"""

import json
import math
import os

import numpy
import torch
import torch.nn as nn
import torch.nn.functional as F

import prodigyopt
import schedulefree

HERE = os.path.dirname(os.path.abspath(__file__))
JSON_PATH = os.path.join(HERE, "challengers.json")
STEPS = 20
ROWS = 16
# lrtune recomputes batch norm's statistics at x over 50 training batches.
BN_PASSES = 50


def cosine(start, end, steps):
    """A cosine from start to end over the steps (the last step's lr is above end)."""
    return [end + (start - end) * (1 + math.cos(math.pi * k / steps)) / 2 for k in range(steps)]


def data(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, 6, generator=generator)
    y = torch.randint(0, 3, (ROWS,), generator=generator)
    return x, y


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def bn_net(seed):
    torch.manual_seed(seed)
    # Batch norm after the activation: right after a linear layer it would cancel that
    # layer's bias, whose gradient would then be rounding noise that Adam's normalisation
    # turns into full steps of either sign (no two implementations agree on it). tanh, not
    # ReLU: a unit alive on one row of the batch has a near-zero batch variance, and its
    # gradients are as ill-conditioned.
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 3))


def short(values):
    """float32 values as the shortest decimals that read back as the same float32."""
    return [float(str(numpy.float32(v))) for v in values]


def flat(model):
    return short(v for _, p in model.named_parameters() for v in p.detach().flatten().tolist())


def layer_list(model):
    """The network as lrtune's layer list."""
    layers = []
    for module in model:
        if isinstance(module, nn.Linear):
            layers.append({"type": "linear", "out": module.out_features})
        elif isinstance(module, nn.BatchNorm1d):
            layers.append({"type": "batch_norm"})
        elif isinstance(module, nn.Tanh):
            layers.append({"type": "tanh"})
        elif isinstance(module, nn.ReLU):
            layers.append({"type": "relu"})
        else:
            raise ValueError(module)
    return layers


def make_optimizer(name, options, params):
    if name == "prodigy":
        return prodigyopt.Prodigy(params, **options)
    if name == "schedule_free_adamw":
        return schedulefree.AdamWScheduleFree(params, **options)
    if name == "schedule_free_sgd":
        return schedulefree.SGDScheduleFree(params, **options)
    raise ValueError(name)


def momentum_key(name):
    return "momentum" if name == "schedule_free_sgd" else "betas"


def run_case(case):
    name, options, lrs = case["optimizer"], case["options"], case["lr"]
    model = (bn_net if case.get("batch_norm") else mlp)(case["seed"])
    x, y = data(case["seed"] + 100)
    initial = {n: short(p.detach().flatten().tolist()) for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    optimizer = make_optimizer(name, dict(options, lr=lrs[0]), model.parameters())
    schedule_free = name.startswith("schedule_free")
    if schedule_free:
        optimizer.train()
    model.train()
    group = optimizer.param_groups[0]
    momenta = [group["momentum"] if name == "schedule_free_sgd" else group["betas"][0]] * STEPS
    losses, grads, after_each_step, prodigy_d = [], [], [], []
    for step in range(STEPS):
        group["lr"] = lrs[step]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        # Before the step: Prodigy's L2 decay adds to p.grad in place.
        grads.append(short(v for p in model.parameters() for v in p.grad.flatten().tolist()))
        optimizer.step()
        losses.append(loss.item())
        after_each_step.append(flat(model))
        if name == "prodigy":
            prodigy_d.append(group["d"])
    record = {
        "name": case["name"],
        "optimizer": name,
        "options": options,
        "layers": layer_list(model),
        "parameter_names": names,
        "initial": initial,
        "x": short(x.flatten().tolist()),
        "y": y.tolist(),
        "lr": lrs,
        "momentum": momenta,
        "losses": losses,
        "grads_each_step": grads,
        "params_after_each_step": after_each_step,
    }
    if prodigy_d:
        record["prodigy_d"] = prodigy_d
    if schedule_free:
        optimizer.eval()
        record["eval_params"] = flat(model)
    if case.get("batch_norm"):
        eval_x, eval_y = data(case["seed"] + 200)
        bn = model[2]
        record["running_before_recompute"] = {
            "2.running_mean": short(bn.running_mean.tolist()),
            "2.running_var": short(bn.running_var.tolist()),
        }
        bn.reset_running_stats()
        model.train()
        with torch.no_grad():
            for _ in range(BN_PASSES):
                model(x)
        model.eval()
        with torch.no_grad():
            record["eval_loss"] = F.cross_entropy(model(eval_x), eval_y).item()
        record["eval_x"] = short(eval_x.flatten().tolist())
        record["eval_y"] = eval_y.tolist()
        record["running_at_x"] = {
            "2.running_mean": short(bn.running_mean.tolist()),
            "2.running_var": short(bn.running_var.tolist()),
        }
        record["bn_passes"] = BN_PASSES
    return record


CASES = [
    {"name": "prodigy_defaults", "optimizer": "prodigy", "options": {}, "lr": [1.0] * STEPS},
    {
        "name": "prodigy_decoupled_decay_bias_correction_cosine",
        "optimizer": "prodigy",
        "options": {
            "weight_decay": 0.1,
            "decouple": True,
            "use_bias_correction": True,
            "d0": 1e-3,
        },
        "lr": cosine(1.0, 0.1, STEPS),
    },
    {
        "name": "prodigy_safeguard_warmup_growth_rate",
        "optimizer": "prodigy",
        "options": {"safeguard_warmup": True, "growth_rate": 1.02, "d0": 1e-2},
        "lr": [1.0] * STEPS,
    },
    {
        "name": "prodigy_l2_decay_beta3_d_coef",
        "optimizer": "prodigy",
        "options": {
            "weight_decay": 0.05,
            "decouple": False,
            "beta3": 0.9,
            "d_coef": 2.0,
            "betas": [0.95, 0.99],
            "d0": 1e-3,
        },
        "lr": cosine(0.5, 0.05, STEPS),
    },
    {
        "name": "schedule_free_adamw_defaults",
        "optimizer": "schedule_free_adamw",
        "options": {},
        "lr": [0.0025] * STEPS,
    },
    {
        "name": "schedule_free_adamw_decay_warmup",
        "optimizer": "schedule_free_adamw",
        "options": {"weight_decay": 0.1, "warmup_steps": 5, "r": 0.5},
        "lr": [0.02] * STEPS,
    },
    {
        "name": "schedule_free_sgd_defaults",
        "optimizer": "schedule_free_sgd",
        "options": {},
        "lr": [1.0] * STEPS,
    },
    {
        "name": "schedule_free_sgd_decay_warmup",
        "optimizer": "schedule_free_sgd",
        "options": {"weight_decay": 0.01, "warmup_steps": 5, "r": 1.0, "weight_lr_power": 1.0},
        "lr": [0.5] * STEPS,
    },
    {
        "name": "schedule_free_adamw_batch_norm",
        "optimizer": "schedule_free_adamw",
        "options": {"warmup_steps": 5},
        "lr": [0.02] * STEPS,
        "batch_norm": True,
    },
]


def main():
    torch.set_num_threads(1)
    cases = []
    for index, case in enumerate(CASES):
        cases.append(run_case(dict(case, seed=11 + index)))
    meta = {
        "torch": torch.__version__,
        "prodigyopt": getattr(prodigyopt, "__version__", "1.1.2"),
        "schedulefree": getattr(schedulefree, "__version__", "1.4.1"),
        "steps": STEPS,
        "rows": ROWS,
        "loss": "cross_entropy (mean)",
    }
    # One case a line: small enough to commit, and a changed case is a changed line.
    with open(JSON_PATH, "w") as f:
        f.write('{"meta": ' + json.dumps(meta) + ',\n "cases": [\n')
        f.write(",\n".join(json.dumps(case) for case in cases))
        f.write("\n]}\n")
    print(f"wrote {len(cases)} cases to {JSON_PATH}")


if __name__ == "__main__":
    main()
