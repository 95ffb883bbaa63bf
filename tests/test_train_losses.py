"""Each training loss is a finite scalar with gradients only where they should be (frozen nets get none)."""
from __future__ import annotations

import pytest
import torch

from tiny_models import make_tiny_clip, make_tiny_discriminator, make_tiny_generator, make_tiny_mapper

from clip2gan_cli.errors import WeightsNotFoundError
from clip2gan_cli.mapper import perturb_clip_features
from clip2gan_cli.train import losses as L


@pytest.fixture(scope="module")
def setup():
    """Frozen tiny G and CLIP, a trainable mapper, real images and their reconstructions' inputs."""
    generator = make_tiny_generator(seed=0)
    clip = make_tiny_clip(seed=0)
    mapper = make_tiny_mapper(generator).train().requires_grad_(True)
    with torch.no_grad():
        z = torch.randn(3, generator.z_dim, generator=torch.Generator().manual_seed(1))
        real = generator(z, truncation_psi=0.7).clamp(-1, 1)
        features = clip.encode_image(real)
    return generator, clip, mapper, real, features


def reconstruct(setup, features=None):
    generator, clip, mapper, real, clip_features = setup
    return generator.synthesis(mapper(clip_features if features is None else features), noise_mode="const")


def assert_only_mapper_has_gradients(setup, loss, *frozen_nets):
    generator, clip, mapper, _, _ = setup
    for param in mapper.parameters():
        param.grad = None
    loss.backward()
    assert torch.isfinite(loss) and loss.ndim == 0
    grads = [p.grad for p in mapper.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for net in (generator, clip, *frozen_nets):
        assert all(p.grad is None for p in net.parameters()), type(net).__name__


def test_reconstruction_loss_is_the_mean_squared_error(setup):
    real = setup[3]
    assert L.reconstruction_loss(real, real) == 0
    assert torch.isclose(L.reconstruction_loss(real, real + 0.5), torch.tensor(0.25))
    assert_only_mapper_has_gradients(setup, L.reconstruction_loss(real, reconstruct(setup)))


def test_lpips_with_a_random_trunk_trains_only_the_mapper(setup):
    perceptual = L.build_perceptual_loss("alex", "random", seed=0)
    real = setup[3]
    assert perceptual(real, real).abs() < 1e-6
    assert_only_mapper_has_gradients(setup, perceptual(real, reconstruct(setup)), perceptual)


def test_lpips_trunk_comes_from_the_registry_file_never_from_lpips(tmp_path, monkeypatch):
    # A torchvision-layout AlexNet state dict (features.<i>.*) stands in for the registry file.
    trunk = L.PerceptualLoss("alex").metric.net
    state = {}
    for slice_module in trunk.children():
        for index, layer in slice_module.named_children():
            for name, tensor in layer.state_dict().items():
                state[f"features.{index}.{name}"] = torch.randn_like(tensor)
    state["classifier.1.weight"] = torch.zeros(2, 2)  # the classifier head is ignored
    weights = tmp_path / "alexnet.pth"
    torch.save(state, weights)
    fetched = []
    monkeypatch.setattr("clip2gan_cli.weights.fetch", lambda name, **kw: fetched.append(name) or weights)
    perceptual = L.build_perceptual_loss("alex", "registry")
    assert fetched == ["torchvision-alexnet"]
    assert torch.equal(perceptual.metric.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(perceptual.metric.net.slice5._modules["10"].bias, state["features.10.bias"])
    with pytest.raises(WeightsNotFoundError, match="lack"):
        L.load_torchvision_trunk(perceptual.metric.net, {"features.0.weight": state["features.0.weight"]})


def test_lpips_off_is_none():
    assert L.build_perceptual_loss("none", "registry") is None


def test_critic_loss_trains_only_the_discriminator(setup):
    discriminator = make_tiny_discriminator(seed=1).requires_grad_(True)
    generator, clip, mapper, real, _ = setup
    fake = reconstruct(setup)
    loss, parts = L.critic_loss(discriminator, real, fake, gp_weight=10.0, mix_generator=torch.Generator().manual_seed(0))
    mapper.zero_grad(set_to_none=True)
    loss.backward()
    assert torch.isfinite(loss) and loss.ndim == 0
    assert parts["d_gp"] >= 0 and torch.isfinite(parts["d_wasserstein"])
    assert all(p.grad is not None for p in discriminator.parameters() if p.requires_grad)
    assert all(p.grad is None for p in mapper.parameters())  # fake is detached: the critic step never trains M
    assert all(p.grad is None for p in generator.parameters())


def test_gradient_penalty_is_zero_for_a_unit_slope_critic(setup):
    """A linear critic with a unit-norm weight has gradient norm 1 everywhere: penalty 0."""
    real = setup[3]
    weight = torch.randn(real[0].numel())
    weight /= weight.norm()
    critic = lambda images: (images.flatten(1) @ weight).unsqueeze(1)  # noqa: E731
    _, parts = L.critic_loss(critic, real, real.flip(0), gp_weight=10.0)
    assert parts["d_gp"] < 1e-10


def test_adversarial_loss_trains_only_the_mapper(setup):
    discriminator = make_tiny_discriminator(seed=1).requires_grad_(False)  # the trainer freezes D for L_G
    assert_only_mapper_has_gradients(setup, L.adversarial_loss(discriminator, reconstruct(setup)), discriminator)


def test_identity_loss_is_one_minus_cosine_and_trains_only_the_mapper(setup):
    torch.manual_seed(0)
    embedder = L.build_identity_net(None)  # random facenet InceptionResnetV1: no download
    identity = L.IdentityLoss(embedder)
    real = setup[3]
    assert identity(real, real).abs() < 1e-5
    loss = identity(real, reconstruct(setup))
    assert 0 <= loss <= 2
    assert_only_mapper_has_gradients(setup, loss, embedder)


def test_identity_weights_load_without_the_classifier_head(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(1)
    source = InceptionResnetV1(pretrained=None, classify=True, num_classes=7)
    path = tmp_path / "vggface2.pt"
    torch.save(source.state_dict(), path)
    loaded = L.build_identity_net(path)
    assert torch.equal(loaded.last_linear.weight, source.last_linear.weight)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("mode", ["multiplicative", "additive"])
def test_diversity_loss_is_feature_distance_over_image_distance(setup, mode):
    generator, clip, mapper, real, features = setup
    perturbed = perturb_clip_features(features, mode, 0.6, torch.Generator().manual_seed(0))
    images = reconstruct(setup, torch.cat([features, perturbed]))
    x, x1 = images[:3], images[3:]
    loss = L.diversity_loss(features, perturbed, x, x1, eps=1e-5)
    expected = ((features - perturbed).abs().mean(1) / ((x - x1).abs().flatten(1).mean(1) + 1e-5)).mean()
    assert torch.isclose(loss, expected)
    assert_only_mapper_has_gradients(setup, loss)


def test_diversity_loss_stays_finite_when_images_coincide(setup):
    features = setup[4]
    same = torch.zeros(3, 3, 16, 16)
    assert torch.isfinite(L.diversity_loss(features, features * 0.5, same, same, eps=1e-5))
