"""Architecture tests: the models must match the paper's code exactly (parameter counts)."""

import math

import pytest
import torch
from torch import nn

from genfl_shared.models import (
    CVAE,
    MODEL_KINDS,
    ExquisiteNetV1,
    build_model,
    count_parameters,
    cvae_loss,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("kind", "cls", "expected"),
    [("cvae", CVAE, 1_072_150), ("classifier", ExquisiteNetV1, 927_254)],
)
def test_build_model_has_paper_parameter_count(kind, cls, expected):
    model = build_model(kind)
    assert isinstance(model, cls)
    assert count_parameters(model) == expected


def test_model_kinds_are_all_buildable():
    assert MODEL_KINDS == ("cvae", "classifier")
    for kind in MODEL_KINDS:
        assert isinstance(build_model(kind), nn.Module)


def test_build_model_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown model kind 'resnet'"):
        build_model("resnet")


def test_count_parameters_ignores_buffers():
    bn = nn.BatchNorm2d(4)  # 8 parameters, plus running_mean/var/num_batches_tracked buffers
    assert count_parameters(bn) == 8


def test_cvae_shapes_and_ranges():
    torch.manual_seed(0)
    model = CVAE()
    x = torch.rand(5, 1, 28, 28)
    labels = torch.tensor([0, 3, 9, 1, 1])
    recon, mu, sigma = model(x, labels)
    assert recon.shape == (5, 1, 28, 28)
    assert mu.shape == sigma.shape == (5, 3)
    assert recon.min() >= 0 and recon.max() <= 1  # sigmoid output


def test_cvae_sigma_strictly_positive_even_for_very_negative_preactivations():
    model = CVAE()
    with torch.no_grad():
        model.encoder[-1].bias[3:] = -1e4  # softplus underflows to 0; the 1e-6 floor remains
    _, sigma = model.encode(torch.rand(2, 1, 28, 28))
    assert torch.all(sigma > 0)
    assert torch.isfinite(torch.log(sigma)).all()


def test_cvae_decoder_is_conditioned_on_label():
    model = CVAE()
    z = torch.zeros(2, 3)
    out = model.decode(z, torch.tensor([0, 7]))
    assert out.shape == (2, 1, 28, 28)
    assert not torch.allclose(out[0], out[1])


def test_cvae_forward_uses_reparameterisation_noise():
    model = CVAE()
    x, labels = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
    torch.manual_seed(1)
    a, _, _ = model(x, labels)
    torch.manual_seed(1)
    b, _, _ = model(x, labels)
    torch.manual_seed(2)
    c, _, _ = model(x, labels)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cvae_loss_matches_hand_computation():
    recon = torch.tensor([0.5, 0.2]).view(1, 1, 1, 2)
    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    mu = torch.tensor([[1.0, 0.0]])
    sigma = torch.tensor([[1.0, 0.5]])
    mse = (0.5 - 1.0) ** 2 + (0.2 - 0.0) ** 2
    # KL per dimension: 0.5 * (mu^2 + sigma^2 - 1 - ln sigma^2)
    kl = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 0.25 - 1 - math.log(0.25))
    assert cvae_loss(recon, x, mu, sigma).item() == pytest.approx(mse + kl, rel=1e-6)


def test_cvae_loss_sums_over_batch_and_agrees_with_torch_kl():
    torch.manual_seed(0)
    recon, x = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    mu, sigma = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    ).sum()
    expected = ((recon - x) ** 2).sum() + kl
    assert cvae_loss(recon, x, mu, sigma).item() == pytest.approx(expected.item(), rel=1e-5)
    # The prior itself has zero KL: only the reconstruction term remains.
    assert cvae_loss(x, x, torch.zeros(4, 3), torch.ones(4, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_exquisitenet_output_shape_train_and_eval():
    model = ExquisiteNetV1(classes=10, channels=1)
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    model.eval()
    assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)  # batch of 1 is fine in eval mode


def test_exquisitenet_structure():
    model = ExquisiteNetV1()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    # 5 DFSEBs x 2 sub-blocks, each with one depthwise 3x3 conv; 5 ME convs, 10 pointwise, 1 head.
    assert len(depthwise) == 10
    assert all(m.kernel_size == (3, 3) and m.groups == m.in_channels for m in depthwise)
    assert len(convs) == 5 + 10 + 10 + 1
    assert [m.out_channels for m in convs if m.bias is None and m.in_channels != m.out_channels] == [
        12, 50, 100, 200, 350,
    ]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.ceil_mode for p in pools)
    assert isinstance(model.head[-1], nn.Linear) and model.head[-1].in_features == 640


def test_dfseb_sub_blocks_are_residual():
    model = ExquisiteNetV1()
    dfseb = model.features[1]  # the DFSEB after the first ME stage (12 channels)
    with torch.no_grad():
        for sub in dfseb:
            depthwise = sub.body[3]
            depthwise.weight.zero_()
            depthwise.bias.zero_()  # body output becomes hardswish(0) * gate == 0
    dfseb.eval()
    x = torch.randn(2, 12, 14, 14)
    assert torch.equal(dfseb(x), x)
