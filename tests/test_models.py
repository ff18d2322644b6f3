"""The modified VGG16 and its pre-trained initialisation."""

import pytest
import torch
from torch import nn

from udat_kernels.udat.models import UDATVGG, VGGConfig, build_model, load_pretrained
from udat_kernels.nn import DomainClassifier

TINY = dict(width=1 / 16, input_size=32, fc=(32, 32, 16), domain_hidden=(16, 16))


def test_full_vgg16_forward_at_224():
    torch.manual_seed(0)
    model = build_model(7, "vgg16", domain_head="angular").eval()
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and [c.out_channels for c in convs][-1] == 512
    assert (model.fc1.in_features, model.fc1.out_features) == (512 * 7 * 7, 4096)
    assert (model.fc3.out_features, model.head.out_features) == (1024, 7)
    assert model.domain_classifier.fc1.in_features == 4096
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        logits = model(x)
        features = model.extract(x)
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    assert features.shape == (1, 4096)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_torchvision_module_layout(batch_norm):
    model = UDATVGG(10, VGGConfig(batch_norm=batch_norm, **TINY))
    conv_index = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    # torchvision's vgg16 / vgg16_bn feature indices
    expected = ([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28] if not batch_norm else
                [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40])
    assert conv_index == expected


@pytest.mark.parametrize("head", ["angular", "softmax"])
def test_compact_model_losses(head):
    torch.manual_seed(0)
    model = build_model(10, "vgg16-compact", domain_head=head, width=1 / 16, lambda_=0.5)
    assert isinstance(model.domain_classifier, DomainClassifier)
    assert model.domain_classifier.head == head
    x, y, d = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 1, 1])
    f = model.extract(x)
    loss = model.label_loss(f[:2], y[:2]) + model.domain_loss(f, d)
    loss.backward()
    assert torch.isfinite(loss) and model.features[0].weight.grad is not None
    model.eval()  # no dropout: both losses see the same hidden features
    expected = nn.functional.cross_entropy(model.head(model.label_hidden(f[:2])), y[:2])
    assert torch.allclose(model.label_loss(f[:2], y[:2]), expected, atol=1e-5)


def test_no_domain_classifier():
    model = build_model(3, "vgg16-compact", width=1 / 16)
    assert model.domain_classifier is None
    with pytest.raises(RuntimeError, match="no domain classifier"):
        model.domain_loss(torch.randn(2, 256), torch.tensor([0, 1]))


@pytest.mark.parametrize("kwargs,match", [({"input_size": 100}, "input_size"),
                                          ({"width": 0}, "width"), ({"dropout": 1.0}, "dropout"),
                                          ({"fc": (8, 8)}, "fc")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VGGConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown model"):
        build_model(3, "resnet")


def _torchvision_state(config: VGGConfig, classes=1000) -> dict:
    """A state dict in torchvision's vgg16(_bn) layout for `config`'s widths."""
    donor = UDATVGG(classes, config)
    state = {f"features.{k}": v for k, v in donor.features.state_dict().items()}
    state |= {f"classifier.0.{k}": v for k, v in donor.fc1.state_dict().items()}
    state |= {f"classifier.3.{k}": v for k, v in donor.fc2.state_dict().items()}
    state |= {"classifier.6.weight": torch.randn(classes, config.fc[1]),
              "classifier.6.bias": torch.randn(classes)}
    return state


def test_load_torchvision_layout(tmp_path):
    config = VGGConfig(**TINY)
    state = _torchvision_state(config)
    torch.save(state, tmp_path / "vgg16.pth")
    model = UDATVGG(7, config)
    report = load_pretrained(model, tmp_path / "vgg16.pth")
    assert torch.equal(model.features[28].weight, state["features.28.weight"])
    assert torch.equal(model.fc2.bias, state["classifier.3.bias"])
    assert len(report.loaded) == 13 * 2 + 4 and not report.reshaped
    assert {k for k, _ in report.skipped} == {"classifier.6.weight", "classifier.6.bias"}
    assert "class layer" in report.format()


def test_load_plain_weights_into_batchnorm_model(tmp_path):
    torch.save({"state_dict": _torchvision_state(VGGConfig(**TINY))}, tmp_path / "w.pth")
    model = UDATVGG(7, VGGConfig(batch_norm=True, **TINY))
    report = load_pretrained(model, tmp_path / "w.pth")
    assert len(report.loaded) == 13 * 2 + 4


def test_load_vggface_naming_with_reshape(tmp_path):
    config = VGGConfig(**TINY)
    donor = UDATVGG(7, config)
    convs = [m for m in donor.features if isinstance(m, nn.Conv2d)]
    names = [f"conv{b}_{i}" for b, n in zip(range(1, 6), (2, 2, 3, 3, 3)) for i in range(1, n + 1)]
    state = {}
    for name, conv in zip(names, convs):
        state[f"{name}.weight"], state[f"{name}.bias"] = conv.weight, conv.bias
    fc6 = torch.randn(config.fc[0], convs[-1].out_channels, 1, 1)  # a Caffe-style conv FC
    state |= {"fc6.weight": fc6, "fc6.bias": torch.randn(config.fc[0]),
              "fc7.weight": torch.randn(config.fc[1], config.fc[0]),
              "fc7.bias": torch.randn(config.fc[1]),
              "fc8.weight": torch.randn(2622, config.fc[1]), "fc8.bias": torch.randn(2622)}
    torch.save(state, tmp_path / "vgg_face.pth")
    model = UDATVGG(7, config)
    report = load_pretrained(model, tmp_path / "vgg_face.pth")
    assert torch.equal(model.features[0].weight, convs[0].weight)
    assert torch.equal(model.fc1.weight, fc6.flatten(1))
    assert len(report.reshaped) == 1 and report.reshaped[0].startswith("fc6.weight")
    assert {k for k, _ in report.skipped} == {"fc8.weight", "fc8.bias"}


def test_load_mismatched_width_is_skipped(tmp_path):
    torch.save(_torchvision_state(VGGConfig(**TINY)), tmp_path / "w.pth")
    model = UDATVGG(7, VGGConfig(**{**TINY, "width": 1 / 8}))
    report = load_pretrained(model, tmp_path / "w.pth")
    assert any("does not fit" in why for _, why in report.skipped)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no VGG16 conv layers"):
        load_pretrained(model, tmp_path / "bad.pth")
