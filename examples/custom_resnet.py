"""A network no zoo knows, trained by its own loop, to a verified W8A8 ONNX file in five calls.

    python examples/custom_resnet.py --out /tmp/custom_resnet      # ~1 min on 2 CPU cores
    python examples/custom_resnet.py --out /tmp/x --steps 4 --image-size 16   # seconds (tests/test_api.py)

The five wnconvert calls: prepare, calibrate, freeze_bn, export, verify (docs/api.md). Everything
else is ordinary PyTorch: the model class, the data, the optimizer and the loop are the user's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import wnconvert


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (a strided 1x1 conv-bn where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def quadrant_batch(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with a bright square in one of the four quadrants; the label is the quadrant."""
    x = torch.randn(n, 3, size, size, generator=generator) * 0.5
    y = torch.randint(0, 4, (n,), generator=generator)
    h = size // 2
    for i, q in enumerate(y.tolist()):
        r, c = (q // 2) * h, (q % 2) * h
        x[i, :, r + h // 4:r + 3 * h // 4, c + h // 4:c + 3 * h // 4] += 2.0
    return x, y


def main(out: Path, steps: int = 300, image_size: int = 32, batch: int = 32, width: int = 16, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyResNet(width=width)                         # the user's network (float, untrained here)

    cfg = wnconvert.QATConfig(scheme="channel-max", weight_bits=8, act_bits=8)
    qmodel = wnconvert.prepare(model, cfg)                   # 1: reparametrized copy + activation fake-quant
    wnconvert.calibrate(qmodel, [quadrant_batch(batch, image_size, g) for _ in range(4)])  # 2: ranges

    opt = torch.optim.AdamW(qmodel.parameters(), lr=3e-3)    # the user's own loop
    qmodel.train()
    for step in range(steps):
        if step == steps - steps // 4:
            wnconvert.freeze_bn(qmodel)                      # 3: BatchNorm as deployed for the last quarter
        x, y = quadrant_batch(batch, image_size, g)
        loss = F.cross_entropy(qmodel(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    qmodel.eval()

    test_x, test_y = quadrant_batch(64, image_size, torch.Generator().manual_seed(seed + 1))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tiny_resnet.int8.onnx"
    exported = wnconvert.export(qmodel, path, example_input=test_x[:1])   # 4: the deployed W8A8 file
    report = wnconvert.verify(qmodel, path, inputs=test_x)                # 5: it computes what was trained
    with torch.no_grad():
        top1 = (qmodel(test_x).argmax(1) == test_y).float().mean().item()
    return {"file": str(path), "precision": exported.precision, "contract": report.contract,
            "passed": report.passed, "failures": report.failures, "qat_top1": top1, "loss": loss.item()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/custom_resnet"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--image-size", type=int, default=32)
    a = p.parse_args()
    result = main(a.out, a.steps, a.image_size)
    print(result)
    raise SystemExit(0 if result["passed"] else 3)
