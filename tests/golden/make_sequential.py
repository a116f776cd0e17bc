"""Golden reference data for lrtune's sequential-network forward/backward.

This script builds a handful of small PyTorch ``nn.Sequential`` networks from
lrtune's JSON layer-list format, and writes:

  * tests/golden/sequential/<case>.safetensors  - each model's state_dict
    (BatchNorm running stats and num_batches_tracked included), and
  * tests/golden/sequential.json                - per case: the layer list, the
    input batch and targets, the eval-mode loss, the train-mode loss, the
    gradient of every parameter from that train-mode loss, the BatchNorm
    running statistics after that one train-mode forward, and the parameter
    order of ``model.named_parameters()``.

All float lists are flattened in row-major order. Everything is float32 and
seeded, so rerunning gives the same files. To regenerate, from the repo root:

    python3 tests/golden/make_sequential.py

or, to add a case without touching the others' records (PyTorch on another machine rounds
their losses and gradients differently in the last bits; their weights are the same):

    python3 tests/golden/make_sequential.py --only NAME [NAME ...]

Needs torch, safetensors and numpy (``pip install safetensors numpy``;
safetensors.torch uses numpy when saving).
"""

import json
import math
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.join(HERE, "sequential")
JSON_PATH = os.path.join(HERE, "sequential.json")
BATCH = 10


class Residual(nn.Sequential):
    """x + inner(x); being an nn.Sequential keeps state_dict names like "2.0.weight"."""

    def forward(self, x):
        return x + super().forward(x)


class PositionEmbedding(nn.Module):
    """lrtune's position_embedding: a learned [time, dim] weight added to every sample."""

    def __init__(self, time, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(time, dim) * 0.02)

    def forward(self, x):
        return x + self.weight


class TransformerBlock(nn.Module):
    """lrtune's transformer_block: x + projection(causal attention(norm_attention(x))), then
    x + contract(gelu_tanh(expand(norm_mlp(x)))). The submodules are registered in lrtune's
    parameter order (both norms first), which is also the order nn.Linear draws in."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm_attention = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)
        self.expand = nn.Linear(dim, 4 * dim)
        self.contract = nn.Linear(4 * dim, dim)

    def forward(self, x):
        batch, time, dim = x.shape
        head_dim = dim // self.heads
        qkv = self.qkv(self.norm_attention(x)).view(batch, time, 3, self.heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        scores = query @ key.transpose(-2, -1) / math.sqrt(head_dim)
        hidden = torch.ones(time, time, dtype=torch.bool).triu(1)
        weights = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        mixed = (weights @ value).transpose(1, 2).reshape(batch, time, dim)
        x = x + self.projection(mixed)
        expanded = nn.functional.gelu(self.expand(self.norm_mlp(x)), approximate="tanh")
        return x + self.contract(expanded)


def conv_out(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def build_layer(layer, shape, vocab):
    """Return (module, output per-sample shape) for one layer given the input shape."""
    kind = layer["type"]
    shape = list(shape)
    if kind == "linear":
        return nn.Linear(shape[-1], layer["out"]), shape[:-1] + [layer["out"]]
    if kind == "conv2d":
        c, h, w = shape
        k = layer["kernel"]
        s = layer.get("stride", 1)
        p = layer.get("padding", 0)
        module = nn.Conv2d(c, layer["out"], k, stride=s, padding=p)
        return module, [layer["out"], conv_out(h, k, s, p), conv_out(w, k, s, p)]
    if kind in ("max_pool2d", "avg_pool2d"):
        c, h, w = shape
        k = layer["size"]
        s = layer.get("stride", k)
        cls = nn.MaxPool2d if kind == "max_pool2d" else nn.AvgPool2d
        return cls(k, s), [c, conv_out(h, k, s, 0), conv_out(w, k, s, 0)]
    if kind == "adaptive_avg_pool2d":
        return nn.AdaptiveAvgPool2d(1), [shape[0], 1, 1]
    if kind == "batch_norm":
        if len(shape) == 1:
            return nn.BatchNorm1d(shape[0], eps=1e-5, momentum=0.1), shape
        if len(shape) == 3:
            return nn.BatchNorm2d(shape[0], eps=1e-5, momentum=0.1), shape
        raise ValueError(f"batch_norm needs a 2-D or 4-D input, got per-sample {shape}")
    if kind == "layer_norm":
        return nn.LayerNorm(shape[-1]), shape
    if kind == "dropout":
        return nn.Dropout(layer["p"]), shape
    if kind == "flatten":
        size = 1
        for d in shape:
            size *= d
        return nn.Flatten(), [size]
    if kind == "embedding":
        module = nn.Embedding(vocab, layer["dim"])
        if "init_std" in layer:
            nn.init.normal_(module.weight, std=layer["init_std"])
        return module, shape + [layer["dim"]]
    if kind == "position_embedding":
        return PositionEmbedding(*shape), shape
    if kind == "transformer_block":
        return TransformerBlock(shape[-1], layer["heads"]), shape
    if kind == "relu":
        return nn.ReLU(), shape
    if kind == "tanh":
        return nn.Tanh(), shape
    if kind == "sigmoid":
        return nn.Sigmoid(), shape
    if kind == "silu":
        return nn.SiLU(), shape
    if kind == "leaky_relu":
        return nn.LeakyReLU(layer.get("negative_slope", 0.01)), shape
    if kind == "gelu":
        return nn.GELU(approximate=layer.get("approximate", "none")), shape
    if kind == "residual":
        inner, out_shape = build_modules(layer["layers"], shape, vocab)
        if out_shape != shape:
            raise ValueError(f"residual changes shape {shape} -> {out_shape}")
        return Residual(*inner), shape
    raise ValueError(f"unknown layer type {kind!r}")


def build_modules(layers, shape, vocab):
    modules = []
    for layer in layers:
        module, shape = build_layer(layer, shape, vocab)
        modules.append(module)
    return modules, shape


def build_sequential(layers, input_shape, vocab=None):
    """Build an nn.Sequential from an lrtune layer list and the per-sample input shape."""
    modules, out_shape = build_modules(layers, input_shape, vocab)
    return nn.Sequential(*modules), out_shape


CASES = [
    {
        "name": "cnn_bn",
        "seed": 101,
        "input_shape": [1, 9, 9],
        "task": "classification",
        "outputs": 4,
        "layers": [
            {"type": "conv2d", "out": 4, "kernel": 3, "padding": 1},
            {"type": "batch_norm"},
            {"type": "relu"},
            {"type": "max_pool2d", "size": 2},
            {"type": "dropout", "p": 0.0},
            {"type": "flatten"},
            {"type": "linear", "out": 8},
            {"type": "gelu", "approximate": "none"},
            {"type": "layer_norm"},
            {"type": "linear", "out": 4},
        ],
    },
    {
        "name": "cnn_strided_pools",
        "seed": 102,
        "input_shape": [2, 8, 8],
        "task": "classification",
        "outputs": 3,
        "layers": [
            {"type": "conv2d", "out": 3, "kernel": 3, "stride": 2, "padding": 1},
            {"type": "relu"},
            {"type": "avg_pool2d", "size": 2},
            {"type": "conv2d", "out": 5, "kernel": 1},
            {"type": "silu"},
            {"type": "adaptive_avg_pool2d"},
            {"type": "flatten"},
            {"type": "linear", "out": 3},
        ],
    },
    {
        "name": "residual_mlp",
        "seed": 103,
        "input_shape": [6],
        "task": "classification",
        "outputs": 3,
        "layers": [
            {"type": "linear", "out": 8},
            {
                "type": "residual",
                "layers": [
                    {"type": "layer_norm"},
                    {"type": "linear", "out": 8},
                    {"type": "gelu", "approximate": "tanh"},
                ],
            },
            {"type": "silu"},
            {"type": "residual", "layers": [{"type": "linear", "out": 8}, {"type": "tanh"}]},
            {"type": "batch_norm"},
            {"type": "sigmoid"},
            {"type": "linear", "out": 3},
        ],
    },
    {
        "name": "tabular_bn",
        "seed": 104,
        "input_shape": [5],
        "task": "regression",
        "outputs": 2,
        "layers": [
            {"type": "linear", "out": 7},
            {"type": "batch_norm"},
            {"type": "relu"},
            {"type": "linear", "out": 2},
        ],
    },
    {
        "name": "char_lm",
        "seed": 105,
        "input_shape": [6],
        "task": "language_model",
        "outputs": 7,
        "layers": [
            {"type": "embedding", "dim": 8},
            {"type": "layer_norm"},
            {"type": "linear", "out": 16},
            {"type": "gelu"},
            {"type": "linear", "out": 7},
        ],
    },
    {
        "name": "char_transformer",
        "seed": 106,
        "perturb_norms": True,
        "input_shape": [6],
        "task": "language_model",
        "outputs": 7,
        "layers": [
            {"type": "embedding", "dim": 8, "init_std": 0.5},
            {"type": "position_embedding"},
            {"type": "transformer_block", "heads": 2},
            {"type": "transformer_block", "heads": 4},
            {"type": "layer_norm"},
            {"type": "linear", "out": 7},
        ],
    },
    {
        "name": "leaky_mlp",
        "seed": 107,
        "input_shape": [6],
        "task": "classification",
        "outputs": 3,
        "layers": [
            {"type": "linear", "out": 8},
            {"type": "leaky_relu"},
            {
                "type": "residual",
                "layers": [
                    {"type": "linear", "out": 8},
                    {"type": "leaky_relu", "negative_slope": 0.2},
                ],
            },
            {"type": "linear", "out": 8},
            {"type": "leaky_relu", "negative_slope": -0.5},
            {"type": "linear", "out": 3},
        ],
    },
]


def batch_norms(model):
    """(state_dict prefix, module) for every BatchNorm in the model."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
    ]


def make_data(case):
    shape = [BATCH] + case["input_shape"]
    if case["task"] == "language_model":
        vocab = case["outputs"]
        x = torch.randint(0, vocab, shape)
        y = torch.randint(0, vocab, shape)
    elif case["task"] == "classification":
        x = torch.randn(shape, dtype=torch.float32)
        y = torch.randint(0, case["outputs"], (BATCH,))
    else:
        x = torch.randn(shape, dtype=torch.float32)
        y = torch.randn(BATCH, case["outputs"], dtype=torch.float32)
    return x, y


def loss_fn(case, out, y):
    if case["task"] == "classification":
        return nn.functional.cross_entropy(out, y)
    if case["task"] == "regression":
        return nn.functional.mse_loss(out, y)
    # language model: cross-entropy over every (batch, time) position
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def flat(t):
    return t.detach().reshape(-1).tolist()


def run_case(case):
    torch.manual_seed(case["seed"])
    vocab = case["outputs"] if case["task"] == "language_model" else None
    model, out_shape = build_sequential(case["layers"], case["input_shape"], vocab)

    # Non-trivial BatchNorm state, so eval mode and train mode differ.
    with torch.no_grad():
        for _, bn in batch_norms(model):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n) * 0.1)
            bn.running_var.copy_(1 + torch.rand(n) * 0.5)
            bn.weight.copy_(1 + torch.randn(n) * 0.1)
            bn.bias.copy_(torch.randn(n) * 0.1)
        # Layer norms off their ones and zeros, and a position embedding as large as the
        # tokens', so that both count in the gradients (new cases only: the older ones keep
        # their numbers).
        for module in model.modules() if case.get("perturb_norms") else []:
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + torch.randn_like(module.weight) * 0.1)
                module.bias.copy_(torch.randn_like(module.bias) * 0.1)
            if isinstance(module, PositionEmbedding):
                module.weight.copy_(torch.randn_like(module.weight) * 0.5)

    x, y = make_data(case)

    weights_name = case["name"] + ".safetensors"
    weights_path = os.path.join(WEIGHTS_DIR, weights_name)
    save_file(model.state_dict(), weights_path)

    model.eval()
    with torch.no_grad():
        eval_loss = loss_fn(case, model(x), y).item()

    model.train()
    model.zero_grad()
    train_loss_t = loss_fn(case, model(x), y)
    train_loss_t.backward()
    train_loss = train_loss_t.item()

    grads = {name: flat(p.grad) for name, p in model.named_parameters()}
    running_after = {}
    for prefix, bn in batch_norms(model):
        running_after[prefix + ".running_mean"] = flat(bn.running_mean)
        running_after[prefix + ".running_var"] = flat(bn.running_var)

    record = {
        "name": case["name"],
        "input_shape": case["input_shape"],
        "task": case["task"],
        "outputs": case["outputs"],
        "layers": case["layers"],
        "weights": weights_name,
        "x": flat(x),
        "y": flat(y),
        "eval_loss": eval_loss,
        "train_loss": train_loss,
        "grads": grads,
        "running_after": running_after,
        "param_order": [name for name, _ in model.named_parameters()],
    }
    return record, x, y


def check_reload(case, record, x, y):
    """Rebuild the model, load the saved weights, and recompute eval_loss."""
    vocab = case["outputs"] if case["task"] == "language_model" else None
    model, _ = build_sequential(case["layers"], case["input_shape"], vocab)
    state = load_file(os.path.join(WEIGHTS_DIR, record["weights"]))
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        loss = loss_fn(case, model(x), y).item()
    assert loss == record["eval_loss"], (case["name"], loss, record["eval_loss"])


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(WEIGHTS_DIR, exist_ok=True)

    only = set(sys.argv[sys.argv.index("--only") + 1 :]) if "--only" in sys.argv else None
    kept = {}
    if only is not None:
        with open(JSON_PATH) as f:
            kept = {record["name"]: record for record in json.load(f)["cases"]}

    records = []
    for case in CASES:
        if only is not None and case["name"] not in only:
            records.append(kept[case["name"]])
            continue
        record, x, y = run_case(case)
        check_reload(case, record, x, y)
        records.append(record)

    doc = {
        "meta": {
            "source": f"PyTorch {torch.__version__.split('+')[0]}",
            "generator": "tests/golden/make_sequential.py",
            "note": (
                "float32 models; lists flattened row-major; eval_loss = eval mode, no_grad; "
                "train_loss/grads/running_after = one train-mode forward+backward on the same batch "
                "(starting from the saved weights)"
            ),
            "batch": BATCH,
        },
        "cases": records,
    }
    with open(JSON_PATH, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    total = os.path.getsize(JSON_PATH)
    print(f"{os.path.relpath(JSON_PATH)}: {os.path.getsize(JSON_PATH)} bytes")
    for r in records:
        path = os.path.join(WEIGHTS_DIR, r["weights"])
        size = os.path.getsize(path)
        total += size
        print(
            f"  {r['name']:<18} {size:>6} bytes  eval_loss={r['eval_loss']!r}  "
            f"train_loss={r['train_loss']!r}"
        )
    print(f"total: {total} bytes (reload check passed for every case)")


if __name__ == "__main__":
    main()
