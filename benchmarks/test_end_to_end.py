"""pytest-benchmark suite: one training step of the modified VGG16, fused heads against eager."""

import pytest

from benchmarks import end_to_end
from benchmarks.suite import DEVICE


@pytest.mark.parametrize("heads", ["eager", "fused"])
def test_training_step(benchmark, heads):
    cuda = DEVICE.startswith("cuda")
    preset = "vgg16" if cuda else "vgg16-compact"
    try:
        step = end_to_end.training_step(heads, preset, DEVICE, 64, "bf16" if cuda else "off")
    except end_to_end.Unavailable as e:
        pytest.skip(str(e))
    step()
    benchmark.extra_info.update({"preset": preset, "heads": heads, "images_per_step": 128})
    benchmark(lambda: (step(), end_to_end.sync(DEVICE)))
