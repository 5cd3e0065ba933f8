"""Behavioural tests of the in-memory training/evaluation loops and the synthetic sampler."""

import math

import pytest
import torch
from PIL import Image
from torch import nn

from genfl_shared.models import CVAE, ExquisiteNetV1, cvae_loss
from genfl_shared.synthetic import balanced_labels, sample_synthetic, save_grid
from genfl_shared.training import (
    balanced_cross_entropy,
    evaluate_classifier,
    label_log_prior,
    evaluate_cvae,
    train_classifier,
    train_cvae,
)

CPU = torch.device("cpu")


def band_dataset(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A trivially separable 10-class problem: class k is a bright horizontal band at rows
    4+2k..5+2k over faint uniform noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.rand((n, 1, 28, 28), generator=g) * 0.2
    for k in range(10):
        images[labels == k, :, 4 + 2 * k : 6 + 2 * k, :] = 1.0
    return images, labels


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def fresh(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


# --------------------------------------------------------------------------- classifier


@pytest.mark.integration
def test_train_classifier_learns_separable_problem():
    images, labels = band_dataset(300)
    test_images, test_labels = band_dataset(200, seed=1)
    model = fresh(ExquisiteNetV1)
    before = evaluate_classifier(model, test_images, test_labels, device=CPU)
    # Eval-mode accuracy lags the training loss by a few epochs while BatchNorm's running
    # statistics catch up (the 1x1 last stage is sensitive to them), hence 8 epochs.
    result = train_classifier(
        model, images, labels, epochs=8, batch_size=32, optimizer="sgd", lr=0.02, momentum=0.9, seed=0,
        device=CPU,
    )
    after = evaluate_classifier(model, test_images, test_labels, device=CPU)
    assert result["samples"] == 300
    assert result["steps"] == 8 * math.ceil(300 / 32)
    assert result["last_epoch_loss"] < result["loss"]  # the last epoch is better than the average
    assert before["accuracy"] < 0.5
    assert after["accuracy"] >= 0.9
    assert after["loss"] < before["loss"]
    assert model.training  # train() mode of a fresh module is restored


@pytest.mark.integration
def test_train_classifier_adam_lowers_training_loss():
    images, labels = band_dataset(100)
    model = fresh(ExquisiteNetV1)
    result = train_classifier(
        model, images, labels, epochs=3, batch_size=25, optimizer="adam", lr=1e-3, seed=0, device="cpu"
    )
    assert result["last_epoch_loss"] < 0.5 * result["loss"]


@pytest.mark.integration
def test_train_classifier_is_deterministic_for_a_seed():
    images, labels = band_dataset(64)
    kwargs = dict(epochs=2, batch_size=16, optimizer="adam", lr=1e-3, device=CPU)
    a, b, c = fresh(ExquisiteNetV1), fresh(ExquisiteNetV1), fresh(ExquisiteNetV1)
    ra = train_classifier(a, images, labels, seed=5, **kwargs)
    rb = train_classifier(b, images, labels, seed=5, **kwargs)
    train_classifier(c, images, labels, seed=6, **kwargs)
    assert ra == rb
    assert state_equal(a, b)
    assert not state_equal(a, c)  # a different seed shuffles (and drops out) differently


@pytest.mark.integration
def test_train_classifier_merges_trailing_single_sample_batch():
    # 33 = 32 + 1: a 1-sample batch would crash BatchNorm at ExquisiteNetV1's 1x1 stage.
    images, labels = band_dataset(33)
    result = train_classifier(
        fresh(ExquisiteNetV1), images, labels, epochs=2, batch_size=32, optimizer="adam", lr=1e-3,
        seed=0, device=CPU,
    )
    assert result["steps"] == 2
    with pytest.raises(ValueError, match="at least 2 samples"):
        train_classifier(
            fresh(ExquisiteNetV1), images[:1], labels[:1], epochs=1, batch_size=32, optimizer="adam",
            lr=1e-3, seed=0, device=CPU,
        )


@pytest.mark.unit
def test_zero_epochs_trains_nothing():
    images, labels = band_dataset(20)
    model = fresh(ExquisiteNetV1)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_classifier(
        model, images, labels, epochs=0, batch_size=8, optimizer="sgd", lr=0.1, seed=0, device=CPU
    )
    assert math.isnan(result["loss"]) and result["steps"] == 0 and result["samples"] == 20
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    cvae_result = train_cvae(CVAE(), images, labels, epochs=0, batch_size=8, lr=1e-3, seed=0, device=CPU)
    assert math.isnan(cvae_result["loss"]) and cvae_result["steps"] == 0


@pytest.mark.unit
def test_invalid_arguments_raise():
    images, labels = band_dataset(10)
    empty_x, empty_y = images[:0], labels[:0]
    with pytest.raises(ValueError, match="N == 0"):
        train_classifier(ExquisiteNetV1(), empty_x, empty_y, epochs=1, batch_size=4, optimizer="sgd",
                         lr=0.1, seed=0, device=CPU)
    with pytest.raises(ValueError, match="N == 0"):
        train_cvae(CVAE(), empty_x, empty_y, epochs=1, batch_size=4, lr=1e-3, seed=0, device=CPU)
    with pytest.raises(ValueError, match="N == 0"):
        evaluate_classifier(ExquisiteNetV1(), empty_x, empty_y, device=CPU)
    with pytest.raises(ValueError, match="N == 0"):
        evaluate_cvae(CVAE(), empty_x, empty_y, seed=0, device=CPU)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train_classifier(ExquisiteNetV1(), images, labels, epochs=1, batch_size=4, optimizer="rmsprop",
                         lr=0.1, seed=0, device=CPU)
    with pytest.raises(ValueError, match="labels must be"):
        evaluate_classifier(ExquisiteNetV1(), images, labels[:5], device=CPU)


class FirstPixelsAsLogits(nn.Module):
    """A fixed 'classifier' whose logits are the first 10 pixels; records its mode when called."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return x.flatten(1)[:, :10]


@pytest.mark.unit
def test_evaluate_classifier_hand_made_case():
    images = torch.zeros(4, 1, 28, 28)
    predicted = [3, 1, 4, 1]
    for i, cls in enumerate(predicted):
        images[i, 0, 0, cls] = 1.0  # logit 1 for the predicted class, 0 elsewhere
    labels = torch.tensor([3, 1, 4, 5])  # the last one is wrong
    model = FirstPixelsAsLogits()
    model.train()
    result = evaluate_classifier(model, images, labels, batch_size=3, device=CPU)
    # CE with logit 1 on one class and 0 on nine: right -> log(e + 9) - 1, wrong -> log(e + 9).
    right, wrong = math.log(math.e + 9) - 1, math.log(math.e + 9)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["loss"] == pytest.approx((3 * right + wrong) / 4, rel=1e-6)
    assert result["samples"] == 4
    assert model.modes == [False, False]  # two batches (3 + 1), both in eval mode
    assert model.training  # previous mode restored


# --------------------------------------------------------------------------------- CVAE


@pytest.mark.integration
def test_train_cvae_lowers_loss_and_is_deterministic():
    images, labels = band_dataset(256)
    a, b = fresh(CVAE), fresh(CVAE)
    before = evaluate_cvae(a, images, labels, seed=0, device=CPU)
    # Batching does not change the result beyond float summation order (same noise).
    assert evaluate_cvae(a, images, labels, seed=0, device=CPU, batch_size=100)["loss"] == pytest.approx(
        before["loss"], rel=1e-5
    )
    ra = train_cvae(a, images, labels, epochs=3, batch_size=32, lr=1e-3, seed=3, device=CPU)
    rb = train_cvae(b, images, labels, epochs=3, batch_size=32, lr=1e-3, seed=3, device=CPU)
    after = evaluate_cvae(a, images, labels, seed=0, device=CPU)
    assert ra == rb and state_equal(a, b)
    assert ra["steps"] == 3 * 8 and ra["samples"] == 256
    assert ra["last_epoch_loss"] < ra["loss"]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["samples"] == 256


@pytest.mark.unit
def test_evaluate_cvae_is_the_mean_per_sample_loss():
    images, labels = band_dataset(5)
    model = fresh(CVAE)
    # Reproduce evaluate_cvae's noise: one draw of [N, latent_dim] from a seeded CPU generator.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        mu, sigma = model.encode(images)
        eps = torch.randn(sigma.shape, generator=g)
        expected = cvae_loss(model.decode(mu + sigma * eps, labels), images, mu, sigma).item() / 5
    result = evaluate_cvae(model, images, labels, seed=7, device=CPU, batch_size=2)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- synthetic


@pytest.mark.unit
@pytest.mark.parametrize(("n", "expected"), [(1000, [100] * 10), (1005, [101] * 5 + [100] * 5), (7, [1] * 7 + [0] * 3)])
def test_balanced_labels_counts(n, expected):
    labels = balanced_labels(n, 10)
    assert labels.dtype == torch.int64 and labels.shape == (n,)
    assert torch.bincount(labels, minlength=10).tolist() == expected


@pytest.mark.unit
def test_sample_synthetic_balanced_binary_and_deterministic():
    cvae = fresh(CVAE)
    with torch.no_grad():
        # An untrained decoder outputs ~0.5 everywhere, which rounds to all-ones after max
        # normalisation; spread the output biases so that both 0 and 1 appear.
        cvae.decoder[-2].bias.copy_(torch.linspace(-4.0, 4.0, 784))
    cvae.train()
    images, labels = sample_synthetic(cvae, 1005, seed=1, device=CPU, batch_size=300)
    assert images.shape == (1005, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert images.device.type == "cpu" and labels.device.type == "cpu"
    assert torch.bincount(labels, minlength=10).tolist() == [101] * 5 + [100] * 5
    assert set(images.unique().tolist()) == {0.0, 1.0}
    assert cvae.training  # mode restored

    # Same seed -> identical, whatever the batch size; another seed -> different images.
    again, again_labels = sample_synthetic(cvae, 1005, seed=1, device=CPU)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    other, _ = sample_synthetic(cvae, 1005, seed=2, device=CPU)
    assert not torch.equal(images, other)


@pytest.mark.integration
def test_sample_synthetic_output_is_trainable():
    # Tensors made under inference_mode cannot be saved for backward; the sampler must not
    # return such tensors because the server trains the classifier on them.
    images, labels = sample_synthetic(fresh(CVAE), 40, seed=0, device=CPU)
    assert not images.is_inference()
    result = train_classifier(
        fresh(ExquisiteNetV1), images, labels, epochs=1, batch_size=20, optimizer="sgd", lr=0.01, seed=0,
        device=CPU,
    )
    assert result["steps"] == 2 and math.isfinite(result["loss"])


@pytest.mark.unit
def test_sample_synthetic_rejects_class_mismatch():
    with pytest.raises(ValueError, match="num_classes"):
        sample_synthetic(CVAE(num_classes=10), 10, num_classes=5, seed=0, device=CPU)


@pytest.mark.unit
def test_save_grid_writes_png_with_one_row_per_class(tmp_path):
    images, labels = band_dataset(95)  # 9 or 10 per class: short rows are padded
    path = tmp_path / "sub" / "grid.png"
    save_grid(images, labels, path)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (10 * 30 + 2, 10 * 30 + 2)  # 28-px tiles with 2-px padding
        gray = png.convert("L")
        # Row of class k, first tile: its band sits at rows 4+2k..5+2k of the tile.
        for k in (0, 9):
            top = 2 + 30 * k
            assert gray.getpixel((2 + 14, top + 4 + 2 * k)) == 255
            assert gray.getpixel((2 + 14, top + 1)) < 255
        # Class 9 has only 9 images (95 = 9*10 + 5): its 10th tile stays black.
        assert gray.getpixel((2 + 30 * 9 + 14, 2 + 30 * 9 + 22)) == 0


@pytest.mark.integration
def test_fedprox_term_keeps_weights_near_their_start():
    from genfl_shared.models import build_model
    from genfl_shared.training import train_cvae

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(256, 1, 28, 28, generator=g) > 0.7).float()
    labels = torch.randint(0, 10, (256,), generator=g)

    def drift(mu):
        torch.manual_seed(0)
        model = build_model("cvae")
        start = [p.detach().clone() for p in model.parameters()]
        train_cvae(model, images, labels, epochs=2, batch_size=32, lr=1e-3, seed=1, device="cpu", prox_mu=mu)
        return sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(model.parameters(), start))

    assert drift(100.0) < 0.5 * drift(0.0)


# -- balanced softmax (--local-loss balanced) ---------------------------------------------------

@pytest.mark.unit
def test_balanced_loss_is_cross_entropy_of_the_logits_shifted_by_the_log_prior():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn((64, 10), generator=g) * 3
    labels = torch.tensor([0] * 40 + [1] * 20 + [7] * 4)  # a skewed shard: 3 of 10 classes
    log_prior = label_log_prior(labels, 10)
    prior = torch.tensor([40, 20, 0, 0, 0, 0, 0, 4, 0, 0]) / 64
    assert torch.allclose(log_prior[[0, 1, 7]], prior[[0, 1, 7]].log())
    assert torch.all(log_prior[prior == 0] < -25)  # absent classes: floored, finite
    by_hand = -torch.log_softmax(logits + prior.clamp_min(1e-12).log(), dim=1)[torch.arange(64), labels].mean()
    assert torch.allclose(balanced_cross_entropy(logits, labels, log_prior), by_hand)
    assert not torch.allclose(balanced_cross_entropy(logits, labels, log_prior),
                              nn.functional.cross_entropy(logits, labels))
    uniform = label_log_prior(torch.arange(50) % 10, 10)
    assert torch.allclose(balanced_cross_entropy(logits, labels, uniform), nn.functional.cross_entropy(logits, labels))


@pytest.mark.integration
def test_balanced_local_training_equals_plain_training_on_a_class_balanced_shard_only():
    images, labels = band_dataset(60)  # 6 of each class
    kwargs = dict(epochs=1, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.5, seed=4, device=CPU)

    def largest_difference(shard):
        plain, balanced = fresh(ExquisiteNetV1), fresh(ExquisiteNetV1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see below
        try:
            train_classifier(plain, images[shard], labels[shard], **kwargs)
            train_classifier(balanced, images[shard], labels[shard], loss="balanced", **kwargs)
        finally:
            torch.set_num_threads(threads)
        return max(float((a - b).abs().max()) for a, b in zip(plain.state_dict().values(), balanced.state_dict().values())
                   if a.is_floating_point())

    # A uniform prior shifts every logit by the same constant (log 0.1): in exact arithmetic the same
    # gradients and weights. In float32 the shifted logits round differently (1 ulp of 2.3 is 2.4e-7),
    # and 4 momentum steps carry that into the weights: measured up to 2.9e-6 on an AVX512-FP16 Xeon on
    # one thread. With two intra-op threads oneDNN's kernels amplify it to 3.1e-4 on a 2-core Xeon, so
    # the trainings run on one thread. 1e-5 bounds that rounding; a skewed prior moves the weights by about 0.6.
    assert largest_difference(labels >= 0) < 1e-5
    assert largest_difference(labels < 3) > 1e-2
    with pytest.raises(ValueError, match="unknown loss"):
        train_classifier(fresh(ExquisiteNetV1), images, labels, loss="focal", **kwargs)
