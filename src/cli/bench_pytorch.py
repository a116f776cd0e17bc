"""PyTorch reference for `lrtune bench`: the same models, batch sizes and optimizers, timed the
same way (median milliseconds per forward + backward + optimizer step). Prints one JSON object.
Run by `lrtune bench` when torch is importable; not part of the build."""
import json
import statistics
import sys
import time

import torch
from torch import nn

WARMUP, STEPS = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)


def mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        # PyTorch's fused attention, the fastest path it offers on this CPU.
        mixed = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(mixed.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class CharModel(nn.Module):
    def __init__(self, vocab, d, heads, layers, context):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(self.ln(self.blocks(h))).flatten(0, 1)


def time_case(model, x, y, optimizer):
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for step in range(WARMUP + STEPS):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y.flatten())
        loss.backward()
        optimizer.step()
        if step >= WARMUP:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)


results = {}
m = mlp([784, 512, 512, 10])
results["mlp-784-512-512-10-sgd"] = time_case(m, torch.randn(128, 784), torch.randint(0, 10, (128,)), sgd(m))
m = mlp([784, 512, 512, 10])
results["mlp-784-512-512-10-adamw"] = time_case(
    m, torch.randn(128, 784), torch.randint(0, 10, (128,)), torch.optim.AdamW(m.parameters(), lr=1e-3))
m = mlp([64, 128, 128, 10])
results["mlp-64-128-128-10-sgd"] = time_case(m, torch.randn(128, 64), torch.randint(0, 10, (128,)), sgd(m))
m = cnn()
results["cnn-16-32-sgd"] = time_case(m, torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)), sgd(m))
m = CharModel(65, 64, 4, 2, 64)
results["transformer-64x2-adamw"] = time_case(
    m, torch.randint(0, 65, (32, 64)), torch.randint(0, 65, (32, 64)), torch.optim.AdamW(m.parameters(), lr=1e-3))
results["threads"] = torch.get_num_threads()
results["version"] = torch.__version__
print(json.dumps(results))
