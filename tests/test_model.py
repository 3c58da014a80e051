"""The paper's network: sizes, switches, the two placements, LRN against the paper's formula, initialisation."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from alexrepro.core.errors import ConfigError
from alexrepro.model.config import ONE_GPU_BASELINE_WIDTHS, ModelConfig, min_crop
from alexrepro.model.network import AlexNet, Dropout, count_parameters, local_response_norm

SMALL = dict(num_classes=10, width=0.25, crop=99)  # fast; exact sizes are not the point where this is used
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return AlexNet(ModelConfig())


def layer_outputs(model: AlexNet, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape of every named layer and of each max-pool, in call order."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(module, inputs, output):  # returns None: the output is left alone
            shapes.setdefault(name or f"pool{len(shapes)}", tuple(output.shape))

        return hook

    hooks = [getattr(model, name).register_forward_hook(record(name)) for name in LAYERS]
    hooks.append(model.pool.register_forward_hook(record(None)))
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def test_paper_network_has_the_papers_parameter_count_and_shapes(paper_model):
    assert count_parameters(paper_model) == 60_965_224  # REFERENCE.md §1
    params = dict(paper_model.named_parameters())
    assert params["conv1.towers.0.weight"].shape == (48, 3, 11, 11)
    assert params["conv2.towers.1.weight"].shape == (128, 48, 5, 5)  # within tower
    assert params["conv3.towers.0.weight"].shape == (192, 256, 3, 3)  # sees both towers
    assert params["conv4.towers.0.weight"].shape == (192, 192, 3, 3)
    assert params["conv5.towers.1.weight"].shape == (128, 192, 3, 3)
    assert params["fc6.towers.0.weight"].shape == (2048, 9216)
    assert params["fc7.towers.1.weight"].shape == (2048, 4096)
    assert params["fc8.weight"].shape == (1000, 4096)

    paper_model.eval()
    with torch.no_grad():
        shapes = layer_outputs(paper_model, torch.randn(1, 3, 227, 227))
    assert shapes == {
        "conv1": (1, 96, 55, 55),
        "pool1": (1, 96, 27, 27),
        "conv2": (1, 256, 27, 27),
        "pool3": (1, 256, 13, 13),
        "conv3": (1, 384, 13, 13),
        "conv4": (1, 384, 13, 13),
        "conv5": (1, 256, 13, 13),
        "pool7": (1, 256, 6, 6),
        "fc6": (1, 4096),
        "fc7": (1, 4096),
        "fc8": (1, 1000),
    }


def test_fc7_features_and_conv1_kernels(paper_model):
    paper_model.eval()
    with torch.no_grad():
        features = paper_model.fc7_features(torch.randn(2, 3, 227, 227))
    assert features.shape == (2, 4096) and features.min() >= 0  # after ReLU
    kernels = paper_model.conv1_kernels()
    assert kernels.shape == (96, 3, 11, 11)
    assert torch.equal(kernels[48:], paper_model.conv1.towers[1].weight.detach())


def test_paper_init_statistics(paper_model):
    params = dict(paper_model.named_parameters())
    for name in ("conv1.towers.0.weight", "conv3.towers.1.weight", "fc6.towers.0.weight", "fc8.weight"):
        assert params[name].std().item() == pytest.approx(0.01, rel=0.05), name
        assert abs(params[name].mean().item()) < 1e-3, name
    for layer in LAYERS[:-1]:
        for tower in getattr(paper_model, layer).towers:
            expected = 1.0 if layer in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0  # §5
            assert torch.all(tower.bias == expected), layer
    assert torch.all(paper_model.fc8.bias == 0)


def test_he_init_statistics():
    torch.manual_seed(0)
    model = AlexNet(ModelConfig(init="he", width=0.5, num_classes=100))
    conv2 = model.conv2.towers[0].weight  # fan_in = 24 input maps in its tower × 5×5
    assert conv2.std().item() == pytest.approx(math.sqrt(2 / (24 * 25)), rel=0.05)
    fc7 = model.fc7.towers[1].weight
    assert fc7.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.05)
    assert model.fc8.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert all(torch.all(p == 0) for n, p in model.named_parameters() if n.endswith("bias"))


def test_widths_scale_and_stay_even():
    assert ModelConfig().widths == (96, 256, 384, 384, 256, 4096, 4096)
    assert ModelConfig(width=0.25).widths == (24, 64, 96, 96, 64, 1024, 1024)
    assert all(c % 2 == 0 for c in ModelConfig(width=0.1).widths)


def test_one_tower_has_the_same_width_without_grouping():
    config = ModelConfig(towers=1)
    model = AlexNet(config)
    # conv2, conv4, conv5 see all input maps: 96, 384, 384 instead of 48, 192, 192.
    extra = 256 * 48 * 25 + 384 * 192 * 9 + 256 * 192 * 9
    assert count_parameters(model) == 60_965_224 + extra
    assert len(model.conv2.towers) == 1 and model.conv2.towers[0].weight.shape == (256, 96, 5, 5)
    assert model.fc6.towers[0].weight.shape == (4096, 9216)


def test_lrn_runs_per_tower_and_switches_off(monkeypatch):
    calls = []

    def spy(x, groups=1):
        calls.append((x.shape[1], groups))
        return x

    monkeypatch.setattr("alexrepro.model.network.local_response_norm", spy)
    x = torch.randn(2, 3, 99, 99)
    AlexNet(ModelConfig(**SMALL))(x)
    assert calls == [(24, 2), (64, 2)]  # after conv1 and conv2, within each of the two towers
    calls.clear()
    AlexNet(ModelConfig(**SMALL, towers=1))(x)
    assert calls == [(24, 1), (64, 1)]  # one tower: over all channels
    calls.clear()
    AlexNet(ModelConfig(**SMALL, lrn=False))(x)
    assert calls == []


def test_one_gpu_baseline_has_half_the_kernels_in_conv1_to_conv4():
    """§3.2 and its footnote: the one-GPU net halves conv1–conv4 but keeps conv5 and the fully-connected layers.
    Parameters by hand (weights + biases, one tower, so conv2/4/5 see all their input maps):"""
    conv1 = 48 * 3 * 11 * 11 + 48  # 17,472
    conv2 = 128 * 48 * 5 * 5 + 128  # 153,728
    conv3 = 192 * 128 * 3 * 3 + 192  # 221,376
    conv4 = 192 * 192 * 3 * 3 + 192  # 331,968
    conv5 = 256 * 192 * 3 * 3 + 256  # 442,624
    fc6 = 256 * 6 * 6 * 4096 + 4096  # 37,752,832
    fc7 = 4096 * 4096 + 4096  # 16,781,312
    fc8 = 4096 * 1000 + 1000  # 4,097,000
    assert conv1 + conv2 + conv3 + conv4 + conv5 + fc6 + fc7 + fc8 == 59_798_312
    config = ModelConfig(towers=1, layer_widths=ONE_GPU_BASELINE_WIDTHS)
    assert config.widths == (48, 128, 192, 192, 256, 4096, 4096)
    model = AlexNet(config)
    assert count_parameters(model) == 59_798_312  # "approximately the same number" as the two-tower 60,965,224
    assert model(torch.randn(1, 3, 227, 227)).shape == (1, 1000)


def test_layer_widths_multiply_width():
    assert ModelConfig(width=0.25, layer_widths=ONE_GPU_BASELINE_WIDTHS).widths == (12, 32, 48, 48, 64, 1024, 1024)


def test_paper_dropout_keeps_training_units_and_halves_at_test_time():
    """§4.2 by hand: training zeroes units with probability 0.5 and leaves the kept ones as they are; at test time
    every unit is multiplied by 0.5. nn.Dropout ("inverted") doubles the kept units and is the identity at test."""
    x = torch.arange(1.0, 2001.0).reshape(4, 500)
    paper, inverted = Dropout(0.5, "paper"), Dropout(0.5, "inverted")
    torch.manual_seed(0)
    out = paper.train()(x)
    kept = out != 0
    assert torch.equal(out[kept], x[kept])  # kept units unchanged
    assert 0.4 < kept.float().mean().item() < 0.6
    torch.manual_seed(0)
    out_inverted = inverted.train()(x)
    assert torch.equal(out_inverted != 0, kept)  # the same mask from the same seed
    assert torch.equal(out_inverted[kept], x[kept] * 2)
    assert torch.equal(paper.eval()(x), x * 0.5)  # test time: ×0.5
    assert torch.equal(inverted.eval()(x), x)
    assert torch.equal(Dropout(0.0, "paper").eval()(x), x)  # no dropout, no scaling


def test_paper_dropout_scales_the_networks_test_output():
    """In eval mode the paper's net multiplies fc6's and fc7's outputs by 0.5: fc8's input is half the inverted
    net's, so logits − fc8.bias halve too (fc6's halving reaches fc7 through the ReLU: checked on fc7 features)."""
    torch.manual_seed(0)
    paper = AlexNet(ModelConfig(**SMALL, init="he")).eval()
    inverted = AlexNet(ModelConfig(**SMALL, init="he", dropout_scaling="inverted")).eval()
    inverted.load_state_dict(paper.state_dict())
    x = torch.randn(2, 3, 99, 99) * 50
    with torch.no_grad():
        h_paper, h_inverted = paper._hidden(x)[0], inverted._hidden(x)[0]
        assert not torch.allclose(h_paper, h_inverted)
        fc7_of_halved = F.relu(
            inverted.fc7(
                0.5
                * F.relu(
                    inverted.fc6(torch.flatten(inverted._conv3_5(inverted._conv1_2(x, (0, 1)), (0, 1)), 1), (0, 1))
                ),
                (0, 1),
            )
        )
        torch.testing.assert_close(h_paper, fc7_of_halved)
        torch.testing.assert_close(paper(x) - paper.fc8.bias, 0.5 * (inverted.fc8(h_paper) - inverted.fc8.bias))


def test_tanh_activation_switch():
    torch.manual_seed(0)
    model = AlexNet(ModelConfig(**SMALL, init="he", activation="tanh")).eval()
    with torch.no_grad():
        features = model.fc7_features(torch.randn(2, 3, 99, 99) * 50)
    assert features.min() < 0 and features.abs().max() <= 1  # tanh's range; a ReLU's output is never negative
    relu = AlexNet(ModelConfig(**SMALL, init="he")).eval()
    with torch.no_grad():
        assert relu.fc7_features(torch.randn(2, 3, 99, 99) * 50).min() >= 0


@pytest.mark.parametrize(
    ("crop", "overlap_pool", "side"),
    [(227, True, 6), (224, True, 5), (224, False, 6), (67, True, 1), (99, False, 2), (39, False, 1)],
)
def test_fc6_input_follows_crop_and_pooling(crop, overlap_pool, side):
    config = ModelConfig(num_classes=10, width=0.25, crop=crop, overlap_pool=overlap_pool)
    model = AlexNet(config)
    assert model.fc6.towers[0].in_features == 64 * side * side == config.fc6_inputs
    assert model(torch.randn(1, 3, crop, crop)).shape == (1, 10)


def test_pooling_switch_changes_the_pool():
    assert AlexNet(ModelConfig(**SMALL)).pool.kernel_size == 3
    assert AlexNet(ModelConfig(**SMALL, overlap_pool=False)).pool.kernel_size == 2


def test_dropout_switch():
    x = torch.randn(4, 3, 99, 99)
    torch.manual_seed(0)
    model = AlexNet(ModelConfig(**SMALL, dropout=0.0)).train()
    assert torch.equal(model(x), model(x))
    model = AlexNet(ModelConfig(**SMALL, dropout=0.5)).train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("crop", 66, "key 'crop' must be at least 67"),
        ("towers", 3, "key 'towers' must be 1 or 2"),
        ("width", 0.0, "key 'width'"),
        ("dropout", 1.0, "key 'dropout'"),
        ("init", "xavier", "key 'init' must be one of paper, he"),
        ("num_classes", 0, "key 'num_classes'"),
        ("dropout_scaling", "scaled", "key 'dropout_scaling' must be one of paper, inverted"),
        ("activation", "sigmoid", "key 'activation' must be one of relu, tanh"),
        ("layer_widths", (1.0, 1.0), "key 'layer_widths' must be 7 numbers"),
        ("layer_widths", (1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0), "key 'layer_widths' must be 7 numbers above 0"),
    ],
)
def test_config_validation_names_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{key: value})


def test_min_crop():
    assert min_crop(True) == 67 and min_crop(False) == 39
    ModelConfig(crop=39, overlap_pool=False)
    with pytest.raises(ValueError, match="at least 39"):
        ModelConfig(crop=38, overlap_pool=False)


def test_two_devices_need_two_towers():
    with pytest.raises(ConfigError, match="devices"):
        AlexNet(ModelConfig(**SMALL, towers=1), devices=["cpu", "cpu"])
    with pytest.raises(ConfigError, match="devices"):
        AlexNet(ModelConfig(**SMALL), devices=["cpu", "cpu", "cpu"])


# --- The two placements: one device (grouped) and one tower per device ---------------------------------------------


class MaskStream:
    """A dropout stand-in that hands out the columns of one fixed random mask in call order, so that both placements
    drop the same units: on one device fc6's dropout takes its 4096 columns in one call, on two devices each tower
    takes 2048 in turn, tower 0 first (real dropout would draw its random numbers in a different order)."""

    def __init__(self, seed: int = 0, rows: int = 4, columns: int = 4 * 1024):
        generator = torch.Generator().manual_seed(seed)
        self.keep = torch.rand(rows, columns, generator=generator) >= 0.5
        self.used = 0

    def __call__(self, x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        keep = self.keep[: x.shape[0], self.used : self.used + x.shape[1]].to(x.device)
        self.used += x.shape[1]
        return x * keep / (1 - p)


def run(model: AlexNet, x: torch.Tensor, target: torch.Tensor, monkeypatch):
    monkeypatch.setattr(F, "dropout", MaskStream())
    model.zero_grad()
    logits = model(x)
    F.cross_entropy(logits, target).backward()
    return logits.detach(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def assert_close(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    """Equal up to float32 summation order (grouped vs separate convolutions), relative to the tensor's scale."""
    a, b = a.detach().cpu(), b.detach().cpu()
    scale = a.abs().max().item() + 1e-12
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, msg=name or None)


def assert_same_run(a, b):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert_close(logits_a, logits_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert_close(grads_a[name], grads_b[name], name)


@pytest.mark.parametrize(
    ("mode", "memory_format"),
    [("eval", torch.contiguous_format), ("train", torch.contiguous_format), ("train", torch.channels_last)],
)
def test_placements_give_equal_outputs_and_gradients(mode, memory_format, monkeypatch):
    torch.manual_seed(0)
    config = ModelConfig(**SMALL, init="he")  # He init: activations large enough that a wiring error would show
    one = AlexNet(config).to(memory_format=memory_format)
    two = AlexNet(config, devices=["cpu", "cpu"]).to(memory_format=memory_format)
    two.load_state_dict(one.state_dict())
    assert two._device_towers == [(0,), (1,)] and one._device_towers == [(0, 1)]
    getattr(one, mode)(), getattr(two, mode)()
    x = (torch.randn(4, 3, 99, 99) * 50).contiguous(memory_format=memory_format)
    target = torch.tensor([1, 2, 3, 4])
    assert_same_run(run(one, x, target, monkeypatch), run(two, x, target, monkeypatch))
    if mode == "train":  # the stand-in dropout really dropped units
        assert not torch.equal(run(one, x, target, monkeypatch)[0], one.eval()(x).detach())
    with torch.no_grad():
        assert_close(one.eval().fc7_features(x), two.eval().fc7_features(x))


def test_state_dict_round_trip_between_placements():
    torch.manual_seed(0)
    config = ModelConfig(**SMALL)
    two = AlexNet(config, devices=["cpu", "cpu"])
    buffer = io.BytesIO()
    torch.save(two.state_dict(), buffer)
    buffer.seek(0)
    one = AlexNet(config)
    one.load_state_dict(torch.load(buffer, weights_only=True))  # strict: same keys, same shapes
    back = AlexNet(config, devices=["cpu", "cpu"])
    back.load_state_dict(one.state_dict())
    for (name_a, a), (name_b, b) in zip(two.state_dict().items(), back.state_dict().items(), strict=True):
        assert name_a == name_b and torch.equal(a, b)
    # Same parameters in the same order, so an optimizer's state also carries over between placements.
    assert [(n, p.shape) for n, p in one.named_parameters()] == [(n, p.shape) for n, p in two.named_parameters()]


# --- LRN against the paper's formula ------------------------------------------------------------------------------


def paper_lrn(a: torch.Tensor, towers: int, k=2.0, n=5, alpha=1e-4, beta=0.75) -> torch.Tensor:
    """§3.3 written out literally, one tower at a time:
    b_i = a_i / (k + α Σ_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j²)^β, N = channels in the tower."""
    out = torch.empty_like(a)
    size = a.shape[1] // towers
    for t in range(towers):
        for i in range(size):
            lo, hi = max(0, i - n // 2), min(size - 1, i + n // 2)
            total = sum(a[:, t * size + j] ** 2 for j in range(lo, hi + 1))
            out[:, t * size + i] = a[:, t * size + i] / (k + alpha * total) ** beta
    return out


@pytest.mark.parametrize("towers", [1, 2])
def test_lrn_matches_the_papers_formula(towers):
    torch.manual_seed(0)
    a = torch.relu(torch.randn(3, 12, 5, 4, dtype=torch.float64)) * 100  # large enough that the sum matters
    expected = paper_lrn(a, towers)
    torch.testing.assert_close(local_response_norm(a.float(), towers).double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, a / 2.0**0.75)  # the normalisation term is not negligible here


def test_lrn_gradient_matches_finite_differences():
    """vᵀ J u from the hand-written backward pass against central differences, for random directions (gradcheck's
    repeated backward passes through one graph are refused: the backward pass reuses its saved buffers)."""
    torch.manual_seed(0)
    a = torch.randn(2, 8, 3, 3, dtype=torch.float64) * 60
    for _ in range(3):
        u, v = torch.randn_like(a), torch.randn_like(a)
        x = a.clone().requires_grad_()
        local_response_norm(x, 2).backward(v)
        eps = 1e-4
        numeric = ((local_response_norm(a + eps * u, 2) - local_response_norm(a - eps * u, 2)) * v).sum() / (2 * eps)
        assert (x.grad * u).sum().item() == pytest.approx(numeric.item(), rel=1e-6)


def test_lrn_refuses_a_second_backward_pass():
    x = (torch.rand(2, 8, 3, 3) * 50).requires_grad_()
    y = local_response_norm(x, 2).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        y.backward()


def test_lrn_on_one_tower_is_torchs_with_the_papers_constants():
    x = torch.relu(torch.randn(2, 16, 6, 6)) * 100
    reference = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)  # torch divides alpha by n
    torch.testing.assert_close(local_response_norm(x, 1), reference(x))


def test_plain_lrn_over_96_channels_mixes_the_towers():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 96, 5, 5)) * 100
    ours = local_response_norm(x, 2)
    plain = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(x)
    differs = (ours - plain).abs().amax(dim=(0, 2, 3)) > 1e-4
    assert differs[47] and differs[48]  # the window crosses the tower boundary only in a plain LRN
    assert differs.nonzero().flatten().tolist() == [46, 47, 48, 49]


def test_lrn_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x = (torch.relu(torch.randn(2, 16, 4, 4)) * 100).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = local_response_norm(x, 2)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, local_response_norm(x.float(), 2).bfloat16())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("by", ["shifts", "pooling"])
def test_lrn_window_sums_are_the_papers_in_float64(channels_last, by):
    """Both formulations (shifted adds on a CPU, a pooled window on a GPU; each runs on the CPU here) are §3.3's sum,
    term for term: exact in float64 up to rounding, cut at each tower's edge, in x's layout."""
    from alexrepro.model import network

    _window_sums = getattr(network, f"_window_sums_by_{by}")
    torch.manual_seed(0)
    x = torch.rand(3, 12, 5, 4, dtype=torch.float64) * 100
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sums = _window_sums(x * x, 2, scale=1e-4, offset=2.0)
    assert sums.is_contiguous(memory_format=torch.channels_last) == channels_last
    towers = x.view(3, 2, 6, 5, 4)  # the window of channel i is i-2…i+2 within its tower of 6
    window = [range(max(0, i - 2), min(6, i + 3)) for i in range(6)]
    expected = torch.stack([2.0 + 1e-4 * sum(towers[:, :, j] ** 2 for j in window[i]) for i in range(6)], 2)
    torch.testing.assert_close(sums, expected.reshape(3, 12, 5, 4), rtol=1e-12, atol=0)  # float64 rounding
    assert window[5] == range(3, 6)  # channels 5 and 6 are neighbours across the tower boundary, not in a window
    torch.testing.assert_close(x * sums**-0.75, paper_lrn(x, 2), rtol=1e-12, atol=0)  # b = a (k + α Σ a²)^-β


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("by", ["shifts", "pooling"])
def test_lrn_matches_torch_per_tower_in_both_memory_formats(channels_last, by, monkeypatch):
    """Forward and backward against autograd through torch's LocalResponseNorm applied to each tower separately,
    with each device's window sums (the GPU's pooled window run on the CPU)."""
    from alexrepro.model import network

    monkeypatch.setattr(network, "_window_sums", getattr(network, f"_window_sums_by_{by}"))
    torch.manual_seed(0)
    x = torch.relu(torch.randn(9, 96, 13, 13)) * 100
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(9, 96, 13, 13)
    ours, ref = x.clone().requires_grad_(), x.clone().contiguous().requires_grad_()
    out = local_response_norm(ours, 2)
    out.backward(grad)
    torch_lrn = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    expected = torch_lrn(ref.view(18, 48, 13, 13)).view(9, 96, 13, 13)
    expected.backward(grad)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.compile
@pytest.mark.parametrize("by", ["shifts", "pooling"])
def test_compiled_lrn_is_eager_lrn_with_either_window_sums(by, monkeypatch):
    """torch.compile traces LRN's hand-written forward and backward with each device's window sums (the GPU's
    pooled window here on the CPU): the same outputs and input gradients as eager, in channels_last."""
    from alexrepro.model import network

    monkeypatch.setattr(network, "_window_sums", getattr(network, f"_window_sums_by_{by}"))
    torch._dynamo.reset()  # a graph traced with the other window sums must not be reused
    torch.manual_seed(0)
    x = (torch.relu(torch.randn(2, 16, 5, 5)) * 100).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 5, 5)
    runs = []
    for lrn in (local_response_norm, torch.compile(local_response_norm, dynamic=False)):
        a = x.clone().requires_grad_()
        out = lrn(a, 2)
        out.backward(grad)
        runs.append((out.detach(), a.grad))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-6)


# --- CUDA ---------------------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.usefixtures("no_tf32")
def test_cuda_and_cpu_towers_match_one_device(mode, monkeypatch):
    torch.manual_seed(0)
    config = ModelConfig(**SMALL, init="he")
    one = AlexNet(config, devices=["cuda"])
    two = AlexNet(config, devices=["cuda", "cpu"])
    two.load_state_dict(one.state_dict())
    assert [d.type for d in two.tower_devices] == ["cuda", "cpu"]
    getattr(one, mode)(), getattr(two, mode)()
    x, target = torch.randn(4, 3, 99, 99, device="cuda") * 50, torch.tensor([1, 2, 3, 4], device="cuda")
    a, b = run(one, x, target, monkeypatch), run(two, x, target, monkeypatch)
    assert b[0].device.type == "cuda"
    assert_same_run(a, b)


def test_bench_train_runs_and_reports_a_ratio():
    from alexrepro.bench.model import bench_train

    report = bench_train(batch_size=2, steps=1, warmup=0)
    assert [row["name"] for row in report.rows] == ["paper AlexNet (2 towers, LRN)", "torchvision alexnet"]
    assert all(row["img_s"] > 0 for row in report.rows)
    assert report.ratios["paper / torchvision img/s"] > 0


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_bench_train_sets_the_arithmetic_it_names_and_restores_it(precision, monkeypatch):
    """`bench train --precision fp32` is the paper's arithmetic: TF32 off for cuDNN as well as matmuls (cuDNN's is
    on by default); tf32 is a row of its own; the process's flags are as before afterwards."""
    from alexrepro.bench import model as bench

    seen = []
    monkeypatch.setattr(bench, "_bench_train", lambda *args: seen.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))  # fmt: skip
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    bench.bench_train(device="cpu", precision=precision)
    assert seen == [(precision == "tf32", precision == "tf32")]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
