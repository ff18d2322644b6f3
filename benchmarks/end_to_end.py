"""End-to-end training throughput: the modified VGG16 with fused heads against eager heads.

One UDAT-AS training step: a batch of B source and B target images through G_f, the label loss on
the source half, the angular domain loss over both halves (GRL into the feature extractor),
one backward and one SGD step. The two variants share the model, its initial weights, the seed
and the batch; only the heads differ:
  fused   the model's own heads: `linear_cross_entropy` (label head, bias) and the
          DomainClassifier (GRL fused into its first layer, the fused angular head);
  eager   nn.Linear + F.cross_entropy for the label head; a Python GRL, F.linear layers and the
          eager angular loss of `udat_kernels.reference` for the domain classifier.

    python -m benchmarks.end_to_end                          # compact VGG16 on the CPU
    python -m benchmarks.end_to_end --device cuda --preset vgg16 --amp bf16 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torch.nn.functional as F

NUM_CLASSES = 7  # the paper's expression classes


class Unavailable(Exception):
    pass


def _model(preset: str, device: str, seed: int):
    try:
        from udat_kernels.udat.models import build_model
    except Exception as e:  # noqa: BLE001 - the training engineer's module may not be there
        raise Unavailable(f"udat_kernels.udat.models is not importable ({e})") from e
    torch.manual_seed(seed)
    model = build_model(NUM_CLASSES, preset=preset, domain_head="angular", lambda_=1.0)
    return model.to(device)


def _eager_losses(model, feats, labels, domains):
    """L_y and L_r of the same parameters with eager PyTorch heads."""
    from udat_kernels import reference

    n_src = labels.shape[0]
    hidden = model.label_hidden(feats[:n_src])
    label_loss = F.cross_entropy(model.head(hidden), labels)
    dc = model.domain_classifier
    h = reference.grad_reverse(feats, 1.0)
    h = torch.relu(F.linear(h, dc.fc1.weight, dc.fc1.bias))
    h = torch.relu(dc.fc2(h))
    domain_loss = reference.angular_margin_cross_entropy(h, dc.weight, domains, scale=dc.scale,
                                                         margin=dc.margin)
    return label_loss, domain_loss


def _fused_losses(model, feats, labels, domains):
    return model.label_loss(feats[: labels.shape[0]], labels), model.domain_loss(feats, domains)


HEADS = {"eager": _eager_losses, "fused": _fused_losses}


def training_step(heads: str, preset: str = "vgg16-compact", device: str = "cpu",
                  batch: int = 64, amp: str = "off", seed: int = 0):
    """A closure running one training step of the model with `heads` ("eager" or "fused")."""
    losses = HEADS[heads]
    model = _model(preset, device, seed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    size = model.config.input_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    domains = torch.cat([torch.zeros(batch, dtype=torch.long),
                         torch.ones(batch, dtype=torch.long)]).to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(enabled=amp == "fp16")

    def step():
        opt.zero_grad(set_to_none=True)
        with (torch.autocast(device.split(":")[0], dtype=amp_dtype) if amp_dtype
              else contextlib.nullcontext()):
            feats = model.extract(images)
            label_loss, domain_loss = losses(model, feats, labels, domains)
            loss = label_loss + domain_loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


def measure(preset: str = "vgg16-compact", device: str = "cpu", batch: int = 64, steps: int = 20,
            warmup: int = 3, amp: str = "off", seed: int = 0) -> dict:
    """Steps/s and images/s of both variants; images = 2·batch (source + target) per step.

    The variants' steps are timed alternately, so that a load on the machine slows both alike.
    """
    runs = {f"{h} heads": training_step(h, preset, device, batch, amp, seed) for h in HEADS}
    first = {}
    for name, run in runs.items():
        torch.manual_seed(seed)  # the same dropout masks: the first losses must agree
        first[name] = float(run().detach().float())
    for _ in range(warmup - 1):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    results = {}
    for name, ts in times.items():
        ts.sort()
        med = ts[len(ts) // 2]
        results[name] = {"median_step_s": med, "min_step_s": ts[0], "max_step_s": ts[-1],
                         "steps_per_s": 1.0 / med, "images_per_s": 2 * batch / med,
                         "first_loss": first[name]}
    return results


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def table(results: dict, preset: str, batch: int, amp: str) -> str:
    lines = [f"End to end, {preset}, {batch} source + {batch} target images a step, AMP {amp}:",
             "",
             "| heads | median step | spread (min–max) | steps/s | images/s | first loss |",
             "|---|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_step_s'] * 1e3:.1f} ms | "
                     f"{r['min_step_s'] * 1e3:.1f} – {r['max_step_s'] * 1e3:.1f} ms | "
                     f"{r['steps_per_s']:.2f} | {r['images_per_s']:.0f} | "
                     f"{r['first_loss']:.4f} |")
    if len(results) == 2:
        e, f = results["eager heads"], results["fused heads"]
        lines += ["", f"fused ÷ eager throughput: {f['steps_per_s'] / e['steps_per_s']:.2f}×"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None,
                    help="model preset (default vgg16-compact on the CPU, vgg16 on CUDA)")
    ap.add_argument("--batch", type=int, default=64, help="images per domain per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--amp", default=None, choices=("off", "bf16", "fp16"),
                    help="autocast dtype (default off on the CPU, bf16 on CUDA)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    preset = args.preset or ("vgg16" if cuda else "vgg16-compact")
    amp = args.amp or ("bf16" if cuda else "off")
    if cuda and not torch.cuda.is_available():
        print("end to end: skipped, no CUDA device")
        return 3
    try:
        results = measure(preset, args.device, args.batch, args.steps, amp=amp)
    except Unavailable as e:
        print(f"end to end: skipped, {e}")
        return 0
    print(table(results, preset, args.batch, amp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
