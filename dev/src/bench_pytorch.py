"""PyTorch reference for `lrtune-dev bench`: the same models, batch sizes and optimizers, timed the
same way (median milliseconds per forward + backward + optimizer step); a 512^3 f32 matmul rate;
and, when given mnist10k as raw files, a range-test loop written plainly in PyTorch for the job
cases. Prints one JSON object. Run by `lrtune-dev bench` when torch is importable; not part of the
build.

Arguments: WARMUP STEPS [DATA_DIR ROWS TRAIN_ROWS JOB_STEPS START_LR END_LR JOB_CASES], or
WARMUP STEPS --profile CASE for PyTorch's profiler on one case's step (`bench --profile`)."""
import json
import statistics
import sys
import time

import torch
from torch import nn

WARMUP, STEPS = int(sys.argv[1]), int(sys.argv[2])
JOB = sys.argv[3:]
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


def layers_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.1), nn.Flatten(), nn.Linear(32 * 14 * 14, 128), nn.GELU(),
        nn.LayerNorm(128), nn.Linear(128, 10))


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


def range_loop(model, optimizer, x, y, steps, start_lr, end_lr, batch=128, beta=0.98):
    """A range test as one would write it in PyTorch: per epoch a shuffled order, each batch
    gathered from the data tensors by index, the learning rate set every step, the loss read
    every step and smoothed. The median milliseconds between the ends of consecutive steps."""
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    rows = x.shape[0]
    order, position = torch.randperm(rows, generator=generator), 0
    average, ends, points = 0.0, [], []
    for step in range(steps):
        if position + batch > rows:
            order, position = torch.randperm(rows, generator=generator), 0
        index = order[position:position + batch]
        position += batch
        xb, yb = x[index], y[index]
        lr = start_lr * (end_lr / start_lr) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        value = loss.item()
        average = beta * average + (1 - beta) * value
        points.append((step, lr, value, average / (1 - beta ** (step + 1))))
        ends.append(time.perf_counter())
    return statistics.median((b - a) * 1000 for a, b in zip(ends, ends[1:]))


def matmul_gflops(size=512, seconds=0.5):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size ** 3 / best / 1e9


def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)


def case_mlp(sizes, optimizer):
    m = mlp(sizes)
    return m, torch.randn(128, sizes[0]), torch.randint(0, 10, (128,)), optimizer(m)


def case_image(model):
    return model, torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)), sgd(model)


def case_transformer():
    m = CharModel(65, 64, 4, 2, 64)
    return m, torch.randint(0, 65, (32, 64)), torch.randint(0, 65, (32, 64)), adamw(m)


def adamw(m):
    return torch.optim.AdamW(m.parameters(), lr=1e-3)


CASES = {
    "mlp-784-512-512-10-sgd": lambda: case_mlp([784, 512, 512, 10], sgd),
    "mlp-784-512-512-10-adamw": lambda: case_mlp([784, 512, 512, 10], adamw),
    "mlp-64-128-128-10-sgd": lambda: case_mlp([64, 128, 128, 10], sgd),
    "cnn-16-32-sgd": lambda: case_image(cnn()),
    "layers-cnn-bn-sgd": lambda: case_image(layers_cnn()),
    "transformer-64x2-adamw": case_transformer,
}


def profile(name):
    """PyTorch's profiler over STEPS steps of one case (after WARMUP): each op's own CPU time
    per step, largest first, as a table of text."""
    model, x, y, optimizer = CASES[name]()
    loss_fn = nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y.flatten()).backward()
        optimizer.step()

    for _ in range(WARMUP):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(STEPS):
            step()
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / STEPS / 1000
    lines = [f"pytorch profile of {name}: own CPU time per step, ms (sum {total:.2f}; mean of {STEPS} "
             f"steps under the profiler, which slows small ops)"]
    for e in ops[:25]:
        shapes = " ".join("x".join(map(str, s)) for s in e.input_shapes if s)
        lines.append(f"{e.self_cpu_time_total / STEPS / 1000:8.3f}  {e.count // STEPS:>3}x  {e.key}  {shapes}")
    return "\n".join(lines)


if JOB and JOB[0] == "--profile":
    print(profile(JOB[1]))
    sys.exit(0)

results = {name: time_case(*build()) for name, build in CASES.items()}
if JOB:
    data_dir, rows, train_rows, job_steps = JOB[0], int(JOB[1]), int(JOB[2]), int(JOB[3])
    start_lr, end_lr, job_cases = float(JOB[4]), float(JOB[5]), JOB[6].split(",")
    with open(f"{data_dir}/x.f32", "rb") as f:
        x = torch.frombuffer(bytearray(f.read()), dtype=torch.float32).reshape(rows, 1, 28, 28)
    with open(f"{data_dir}/y.u32", "rb") as f:
        y = torch.frombuffer(bytearray(f.read()), dtype=torch.int32).long()
    x, y = x[:train_rows].clone(), y[:train_rows].clone()
    builders = {
        "mlp-784-512-512-10-sgd": lambda: (lambda m: (m, sgd(m)))(
            nn.Sequential(nn.Flatten(), mlp([784, 512, 512, 10]))),
        "mlp-784-512-512-10-adamw": lambda: (lambda m: (m, adamw(m)))(
            nn.Sequential(nn.Flatten(), mlp([784, 512, 512, 10]))),
        "cnn-16-32-sgd": lambda: (lambda m: (m, sgd(m)))(cnn()),
    }
    results["job"] = {
        name: range_loop(*builders[name](), x, y, job_steps, start_lr, end_lr)
        for name in job_cases if name in builders
    }
results["matmul_gflops"] = matmul_gflops()
results["capability"] = torch.backends.cpu.get_cpu_capability()
results["threads"] = torch.get_num_threads()
results["version"] = torch.__version__
print(json.dumps(results))
