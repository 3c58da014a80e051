"""The network of Krizhevsky, Sutskever & Hinton (NIPS 2012): §3 and Figure 2, with its two towers.

This is the paper's grouped network (60,965,224 parameters at 1000 classes and a 227 input), not torchvision's
`alexnet`, which is the single-tower "one weird trick" variant (64-192-384-256-256 channels, no LRN, 61,100,840
parameters). Read it top to bottom like Figure 2:

    input 3×227×227
    conv1  96 kernels 11×11×3 / 4   each tower sees the whole image   ReLU, LRN, max-pool 3/2   96×27×27
    conv2 256 kernels  5×5×48       within each tower (groups=2)      ReLU, LRN, max-pool 3/2  256×13×13
    conv3 384 kernels  3×3×256      sees both towers                  ReLU                     384×13×13
    conv4 384 kernels  3×3×192      within each tower                 ReLU                     384×13×13
    conv5 256 kernels  3×3×192      within each tower                 ReLU, max-pool 3/2       256×6×6
    fc6  4096                       sees both towers                  ReLU, dropout 0.5
    fc7  4096                       sees both towers                  ReLU, dropout 0.5
    fc8  1000                       sees both towers                  (softmax lives in the loss)

Every layer but fc8 is split into towers: its parameters are stored per tower (`conv2.towers.1.weight` is tower 1's
half of conv2), so one state_dict loads into either placement:

- one device: both towers run together; a layer's towers are concatenated on the fly into one grouped convolution
  (conv1…conv5) or run side by side (fc6, fc7). Concatenating the small conv weights costs far less than the
  convolution; the fc weights are never concatenated.
- two devices (the paper's two GPUs, §3.2): tower k's parameters live on devices[k]; activations cross between
  devices only at the inputs of conv3, fc6, fc7 and fc8, as in Figure 2. fc8 is not split and lives on devices[0].

Both placements run the same `forward`: activations travel as a list with one tensor per device, each holding its
towers' channels side by side, and `_both` is the cross-tower connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexrepro.core.errors import ConfigError
from alexrepro.model.config import ModelConfig

# §3.3: b = a / (k + α Σ a²)^β over n adjacent kernel maps, the sum NOT divided by n.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def local_response_norm(x: Tensor, groups: int = 1) -> Tensor:
    """§3.3's response normalisation across channels, within each of `groups` equal channel groups (the towers).

    b_i = a_i / (k + α Σ_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j²)^β with k=2, n=5, α=1e-4, β=0.75, where N is the
    number of channels in a tower: the window never crosses a tower boundary, as on the paper's two GPUs.
    (torch.nn.LocalResponseNorm divides α by n: over one group this is LocalResponseNorm(5, 5e-4, 0.75, 2).)
    Computed in float32 (float64 stays float64) whatever the input dtype or autocast state; returns the input's dtype.
    """
    with torch.autocast(x.device.type, enabled=False):
        a = x.to(torch.promote_types(x.dtype, torch.float32)).contiguous(memory_format=_memory_format(x))
        out = _LocalResponseNorm.apply(a, groups)
    return out.to(x.dtype)


class _LocalResponseNorm(torch.autograd.Function):
    """LRN with a hand-written backward pass, in whole-tensor operations that reuse their buffers.

    Autograd through the obvious formulation (torch's own LocalResponseNorm: pad, avg_pool3d, pow, div) made LRN a
    third of a CPU training step: each of a dozen elementwise passes wrote a new full-size tensor (on Linux every
    tensor over 32 MB is fresh memory from the kernel, paid for again in page faults). Here the window sums are a
    few in-place adds, and the forward and backward passes together allocate four full-size tensors. Measured on
    2 CPU cores at batch 64: 4.9× faster than torch.nn.LocalResponseNorm per tower, forward and backward.
    """

    @staticmethod
    def forward(ctx, a: Tensor, groups: int) -> Tensor:
        squares = a * a
        d = _window_sums(squares, groups, scale=LRN_ALPHA, offset=LRN_K)  # k + α Σ_j a_j²
        r = torch.pow(d, -LRN_BETA, out=squares)  # d^-β, in the squares' buffer
        ctx.groups = groups
        ctx.save_for_backward(a, d, r)
        return a * r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # The saved d and r are overwritten as scratch space; a second backward pass through the same graph
        # (retain_graph=True) is refused by autograd's version check rather than computed wrong.
        a, d, r = ctx.saved_tensors
        # b_i = a_i r_i, r_i = d_i^-β, so ∂L/∂a_j = g_j r_j − 2αβ a_j Σ_{i: j in window(i)} g_i a_i r_i / d_i,
        # and j is in window(i) exactly when i is in window(j): the forward window sum serves here too.
        gr = r.mul_(grad.contiguous(memory_format=_memory_format(a)))  # g r
        t = torch.div(gr, d, out=d).mul_(a)  # g a r / d
        back = _window_sums(t, ctx.groups, scale=-2 * LRN_ALPHA * LRN_BETA)
        return torch.addcmul(gr, a, back, out=back), None


def _window_sums(x: Tensor, groups: int, scale: float, offset: float = 0.0) -> Tensor:
    """offset + scale · Σ of x over each channel's LRN window (n=5, cut at the edges of its tower), in x's memory
    format. Two exact formulations, each chosen for where it runs (docs/benchmarks.md, "LRN: exact window sums, a
    formulation for each device"): on a CPU five shifted adds, measured fastest there; on a GPU a pooled window over
    the channels, chosen by its counts of FLOPs and bytes (no GPU has timed it yet).

    Neither is the band-matrix product used on CUDA before: 48 (conv1) or 128 (conv2) multiply-adds per value, over
    90% of them with zeros (19 GFLOP a step at batch 128, in fp32), in a matmul call that torch.compile cannot fuse.
    Nor a cumulative sum over channels, which would subtract two large running totals in float32: each sum here has
    at most five terms (all positive in the forward pass), so nothing cancels.
    """
    sums = _window_sums_by_pooling if x.is_cuda else _window_sums_by_shifts
    return sums(x, groups, scale, offset)


def _window_sums_by_shifts(x: Tensor, groups: int, scale: float, offset: float = 0.0) -> Tensor:
    """Five shifted in-place adds into one output: 5 multiply-adds per value and five passes through memory. On a
    2-core CPU (AVX-512) the band product was 0.77-0.93× of its time and a pooled window 2.7-3.1×; compiled there,
    LRN is slower than eager (2.1× at conv1's shape, 8× at conv2's), so the CPU keeps this eager form."""
    out = torch.empty_like(x)
    maps, total = _channels_view(x, groups), _channels_view(out, groups)
    size = maps.shape[2]
    torch.mul(maps, scale, out=total)
    for shift in range(1, LRN_SIZE // 2 + 1):  # the neighbours `shift` channels away, within the tower
        total.narrow(2, shift, size - shift).add_(maps.narrow(2, 0, size - shift), alpha=scale)
        total.narrow(2, 0, size - shift).add_(maps.narrow(2, shift, size - shift), alpha=scale)
    return out.add_(offset) if offset else out


def _window_sums_by_pooling(x: Tensor, groups: int, scale: float, offset: float = 0.0) -> Tensor:
    """A pooled sum over a window of 5 channels, zero-padded at each tower's edges (average pooling with divisor 1:
    the plain sum of the window's terms), then offset + scale · sum in one pass. Two kernels that each read and
    write once, where the shifted adds pass through memory about five times: about 2 GB a step at batch 128 against
    their 7, and 0.7 GFLOP against the band product's 19 (docs/benchmarks.md)."""
    n, c, h, w = x.shape
    size, pad = c // groups, LRN_SIZE // 2
    if _memory_format(x) == torch.channels_last:  # each pixel's tower: a row of `size` channels
        rows = _channels_view(x, groups).reshape(n * h * w * groups, 1, 1, size)
        sums = F.avg_pool2d(rows, (1, LRN_SIZE), stride=1, padding=(0, pad), divisor_override=1)
        out = sums.view(n, h, w, c).permute(0, 3, 1, 2)
    else:  # each image's tower: a volume of `size` maps
        maps = x.view(n * groups, 1, size, h, w)
        sums = F.avg_pool3d(maps, (LRN_SIZE, 1, 1), stride=1, padding=(pad, 0, 0), divisor_override=1)
        out = sums.view(n, c, h, w)
    if not offset:
        return out.mul_(scale)
    # offset + scale · sums in place, in one pass (a CPU scalar tensor needs no copy to the device)
    return torch.add(torch.tensor(offset, dtype=torch.float64), out, alpha=scale, out=out)


def _channels_view(x: Tensor, groups: int) -> Tensor:
    """x viewed with each tower's channels along dim 2: pixels × towers × channels (channels_last) or
    images × towers × channels × pixels (NCHW)."""
    n, c, h, w = x.shape
    if _memory_format(x) == torch.channels_last:
        return x.permute(0, 2, 3, 1).view(n * h * w, groups, c // groups)
    return x.view(n, groups, c // groups, h * w)


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class LocalResponseNorm(nn.Module):
    """§3.3, applied per tower. `enabled=False` makes it the identity (the `lrn` switch)."""

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled

    def forward(self, x: Tensor, groups: int) -> Tensor:
        return local_response_norm(x, groups) if self.enabled else x

    def extra_repr(self) -> str:
        return f"size={LRN_SIZE}, alpha={LRN_ALPHA}, beta={LRN_BETA}, k={LRN_K}, enabled={self.enabled}"


class Dropout(nn.Module):
    """§4.2's dropout, p = `p`. "paper": training zeroes each unit with probability p and leaves the others as
    they are; evaluation multiplies every unit by 1 − p. "inverted" (nn.Dropout): training multiplies the kept units
    by 1/(1 − p); evaluation is the identity. Both have the same expected output; the paper's keeps training
    activations (and so gradients, and the balance against weight decay) at the scale the paper's lr was tuned for.
    """

    def __init__(self, p: float = 0.5, scaling: str = "paper"):
        super().__init__()
        self.p, self.scaling = p, scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0:
            return x
        if self.scaling == "inverted":
            return F.dropout(x, self.p, self.training)
        if (
            self.training
        ):  # F.dropout draws the mask (the same random stream as "inverted"); kept units stay as they are
            kept = F.dropout(torch.ones_like(x), self.p, training=True) != 0
            return x * kept
        return x * (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, scaling={self.scaling}"


class TowerConv(nn.Module):
    """A convolution whose kernels are split evenly between the towers.

    `within_tower`: each tower sees only its own tower's input channels (conv2, conv4, conv5); otherwise each tower
    sees all input channels (conv1, conv3). `forward(x, towers)` runs the towers listed, which must all live on x's
    device, as one convolution: x holds those towers' input channels side by side (within_tower) or all of them.
    """

    def __init__(self, towers, in_channels, out_channels, kernel_size, stride=1, padding=0, within_tower=False):
        super().__init__()
        self.stride, self.padding, self.within_tower = stride, padding, within_tower
        tower_in = in_channels // towers if within_tower else in_channels
        self.towers = nn.ModuleList(
            nn.Conv2d(tower_in, out_channels // towers, kernel_size, stride, padding) for _ in range(towers)
        )

    def forward(self, x: Tensor, towers: Sequence[int]) -> Tensor:
        weight = _cat([_weight(self.towers[k]) for k in towers], dim=0)
        bias = _cat([_bias(self.towers[k]) for k in towers], dim=0)
        groups = len(towers) if self.within_tower else 1
        return F.conv2d(x, weight, bias, self.stride, self.padding, groups=groups)


class TowerLinear(nn.Module):
    """A fully-connected layer whose units are split evenly between the towers; every tower sees all inputs."""

    def __init__(self, towers: int, in_features: int, out_features: int):
        super().__init__()
        self.towers = nn.ModuleList(nn.Linear(in_features, out_features // towers) for _ in range(towers))

    def forward(self, x: Tensor, towers: Sequence[int]) -> Tensor:
        # One matmul per tower, outputs side by side: concatenating the (large) weights would cost a copy per step.
        return _cat([self.towers[k](x) for k in towers], dim=1)


class AlexNet(nn.Module):
    """The paper's network (§3.5, Figure 2) for `config`, placed on one device or with one tower per device.

    devices: None or one device → both towers together on it (default cpu). Two devices → tower k on devices[k]
    (needs towers=2). Input: float N×3×crop×crop on the first device; logits N×num_classes on the first device.
    Do not `.to()` a two-device model: its placement is made here.
    """

    def __init__(self, config: ModelConfig | None = None, devices: Sequence[torch.device | str] | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        c1, c2, c3, c4, c5, f6, f7 = config.widths
        towers = config.towers
        self.conv1 = TowerConv(towers, 3, c1, 11, stride=4)  # each tower sees the whole image
        self.conv2 = TowerConv(towers, c1, c2, 5, padding=2, within_tower=True)
        self.conv3 = TowerConv(towers, c2, c3, 3, padding=1)  # sees both towers
        self.conv4 = TowerConv(towers, c3, c4, 3, padding=1, within_tower=True)
        self.conv5 = TowerConv(towers, c4, c5, 3, padding=1, within_tower=True)
        self.fc6 = TowerLinear(towers, config.fc6_inputs, f6)
        self.fc7 = TowerLinear(towers, f6, f7)
        self.fc8 = nn.Linear(f7, config.num_classes)
        self.norm = LocalResponseNorm(config.lrn)  # after conv1 and conv2 (§3.3)
        self.pool = nn.MaxPool2d(*config.pool)  # after norm1, norm2 and conv5 (§3.4)
        self.dropout = Dropout(config.dropout, config.dropout_scaling)  # after fc6 and fc7 (§4.2)
        self.act = torch.tanh if config.activation == "tanh" else partial(F.relu, inplace=True)  # §3.1
        self._init_weights(config.init)
        self._place(devices)

    def _init_weights(self, scheme: str) -> None:
        """ "paper" (§5): every weight ~ N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7 ("accelerates the
        early stages of learning by providing the ReLUs with positive inputs"), 0 elsewhere.
        "he": Kaiming normal (He et al. 2015, fan_in, gain √2) for conv1…fc7, whose outputs go through ReLUs
        (gain 5/3 with tanh units); fc8 ~ N(0, 0.01) (it feeds the softmax, not a ReLU; as torchvision's VGG
        does); all biases 0.
        """
        nonlinearity = cast(Literal["relu", "tanh"], self.config.activation)  # ModelConfig checked it
        ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
            for tower in getattr(self, name).towers:
                if scheme == "paper":
                    nn.init.normal_(tower.weight, 0.0, 0.01)
                    nn.init.constant_(tower.bias, 1.0 if name in ones else 0.0)
                else:
                    nn.init.kaiming_normal_(tower.weight, mode="fan_in", nonlinearity=nonlinearity)
                    nn.init.zeros_(tower.bias)
        nn.init.normal_(self.fc8.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc8.bias)

    def _place(self, devices: Sequence[torch.device | str] | None) -> None:
        """Put tower k's parameters on its device; remember which towers run together on which device."""
        devices = [torch.device(d) for d in (devices or ["cpu"])]
        towers = self.config.towers
        if len(devices) == 1:
            self._device_towers = [tuple(range(towers))]  # all towers together: grouped convolutions
            tower_devices = devices * towers
        elif len(devices) == 2 and towers == 2:
            self._device_towers = [(0,), (1,)]  # the paper's placement: one tower per GPU
            tower_devices = devices
        else:
            raise ConfigError(
                f"devices: got {len(devices)} devices for {towers} tower(s); give one device, or two with towers=2"
            )
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.fc6, self.fc7):
            for tower, device in zip(layer.towers, tower_devices, strict=True):
                tower.to(device)
        self.fc8.to(devices[0])

    @property
    def tower_devices(self) -> list[torch.device]:
        """The device of each tower, in tower order (the same device twice when both towers share one)."""
        return [_weight(tower).device for tower in self.conv1.towers]

    def _placement(self) -> list[tuple[torch.device, tuple[int, ...]]]:
        """(device, towers on it) for each device in use; tower devices are read from the parameters, so a
        one-device model moved with `.to()` follows."""
        return [(_weight(self.conv1.towers[ts[0]]).device, ts) for ts in self._device_towers]

    def forward(self, x: Tensor) -> Tensor:
        """Logits N×num_classes on the first device for images N×3×crop×crop."""
        h = [self.dropout(t) for t in self._hidden(x)]  # fc7's dropout (§4.2)
        return self.fc8(_both(h, self.fc8.weight.device))  # N×1000: fc8 sees both towers

    def fc7_features(self, x: Tensor) -> Tensor:
        """fc7's activations after ReLU (fc6's dropout scaled as in evaluation, §4.2), N×4096 on the first device: the paper's image representation for the
        nearest-neighbour retrieval of Figure 4 (§6.1). Call in eval mode (fc6's dropout runs in train mode)."""
        return _both(self._hidden(x), self.fc8.weight.device)

    def _hidden(self, x: Tensor) -> list[Tensor]:
        """conv1 … fc7 after ReLU; one tensor per device, its towers' units side by side.

        Shape comments are both towers together at the defaults (each device holds its towers' share).
        """
        placement = self._placement()
        h = [self._conv1_2(x.to(device), towers) for device, towers in placement]  # N×256×13×13
        h = [self._conv3_5(_both(h, device), towers) for device, towers in placement]  # N×256×6×6
        h = [torch.flatten(t, 1) for t in h]  # N×9216, tower 0's maps first
        h = [self.dropout(self.act(self.fc6(_both(h, device), towers))) for device, towers in placement]
        return [self.act(self.fc7(_both(h, device), towers)) for device, towers in placement]  # N×4096

    def _conv1_2(self, x: Tensor, towers: Sequence[int]) -> Tensor:
        """conv1 and conv2 of the given towers; x is the whole image (N×3×227×227), seen by every tower."""
        groups = len(towers)
        x = self.act(self.conv1(x, towers))  # N×96×55×55
        x = self.pool(self.norm(x, groups))  # N×96×27×27
        x = self.act(self.conv2(x, towers))  # N×256×27×27, within each tower
        return self.pool(self.norm(x, groups))  # N×256×13×13

    def _conv3_5(self, x: Tensor, towers: Sequence[int]) -> Tensor:
        """conv3 (x = both towers' maps, N×256×13×13), then conv4 and conv5 within each tower."""
        x = self.act(self.conv3(x, towers))  # N×384×13×13
        x = self.act(self.conv4(x, towers))  # N×384×13×13
        x = self.act(self.conv5(x, towers))  # N×256×13×13
        return self.pool(x)  # N×256×6×6

    def conv1_kernels(self) -> Tensor:
        """conv1's weights, 96×3×11×11 on the CPU, tower 0's kernels first (for the paper's Figure 3)."""
        return torch.cat([_weight(tower).detach().cpu() for tower in self.conv1.towers])


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions, on or off (cuDNN's default is on: fp32 must switch it off).
    Training sets it from its `tf32` key; evaluation and predict as the checkpoint was trained."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (60,965,224 for the paper's network at 1000 classes, REFERENCE.md §1)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _both(h: list[Tensor], device: torch.device) -> Tensor:
    """Every device's activations side by side on `device`: the cross-tower connection of Figure 2."""
    return _cat([t.to(device) for t in h], dim=1)


def _weight(tower: nn.Module) -> Tensor:
    """A tower's weight (nn.Module's attribute lookup is typed Tensor | Module)."""
    return cast(Tensor, tower.weight)


def _bias(tower: nn.Module) -> Tensor:
    return cast(Tensor, tower.bias)


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    """torch.cat that does not copy a lone tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)
