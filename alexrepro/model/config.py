"""The network's settings and shape arithmetic (§3), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

INITS = ("paper", "he")

ACTIVATIONS = ("relu", "tanh")

DROPOUT_SCALINGS = ("paper", "inverted")

PAPER_WIDTHS = (96, 256, 384, 384, 256, 4096, 4096)  # conv1…conv5, fc6, fc7, both towers together (§3.5)

# §3.2's one-GPU baseline: "half as many kernels in each convolutional layer", except conv5 (footnote 2: most
# parameters are in fc6, which takes conv5 as input, so conv5 and the fully-connected layers keep their size).
ONE_GPU_BASELINE_WIDTHS = (0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = 1000  # ILSVRC-2012 (§2)
    crop: int = 227  # input side; the paper says 224, its arithmetic (55×55 after conv1) needs 227, as Caffe uses
    width: float = 1.0  # channel multiplier for conv1…fc7: 1.0 = 96-256-384-384-256 and 4096 (§3.5)
    towers: int = 2  # 2 = the paper's two GPU towers (§3.2); 1 = one tower (no grouping) of the widths below
    # Per-layer multipliers (conv1…conv5, fc6, fc7) on top of `width`. All 1 = the paper's net. §3.2's one-GPU
    # baseline is towers=1 with ONE_GPU_BASELINE_WIDTHS (half the kernels in conv1–conv4, full conv5 and fc).
    layer_widths: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    lrn: bool = True  # local response normalisation after conv1 and conv2 (§3.3)
    overlap_pool: bool = True  # max-pool 3×3 stride 2 (§3.4); False = 2×2 stride 2
    dropout: float = 0.5  # on the outputs of fc6 and fc7 (§4.2); 0 disables
    # §4.2: "setting to zero the output of each hidden neuron with probability 0.5" in training; "at test time, we
    # use all the neurons but multiply their outputs by 0.5". "inverted" is nn.Dropout: ×1/(1−p) on the kept units
    # in training, the identity at test time (same expectation, other training dynamics at the paper's lr and init).
    dropout_scaling: str = "paper"
    activation: str = "relu"  # §3.1: ReLU; "tanh" is the saturating unit it is compared with (Figure 1)
    init: str = "paper"  # "paper": N(0, 0.01), biases 1 in conv2/4/5, fc6/7 (§5); "he": Kaiming normal, biases 0

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"key 'num_classes' must be at least 1, got {self.num_classes}")
        if self.towers not in (1, 2):
            raise ValueError(f"key 'towers' must be 1 or 2, got {self.towers}")
        if not self.width > 0:
            raise ValueError(f"key 'width' must be a number above 0 (1.0 = the paper's widths), got {self.width}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"key 'dropout' must be in [0, 1) (0 disables dropout), got {self.dropout}")
        if self.dropout_scaling not in DROPOUT_SCALINGS:
            raise ValueError(
                f"key 'dropout_scaling' must be one of {', '.join(DROPOUT_SCALINGS)}, got {self.dropout_scaling!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"key 'activation' must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if len(self.layer_widths) != 7 or not all(w > 0 for w in self.layer_widths):
            raise ValueError(
                "key 'layer_widths' must be 7 numbers above 0 (conv1…conv5, fc6, fc7; "
                f"[0.5, 0.5, 0.5, 0.5, 1, 1, 1] with towers 1 = §3.2's one-GPU baseline), got {list(self.layer_widths)}"
            )
        if self.init not in INITS:
            raise ValueError(f"key 'init' must be one of {', '.join(INITS)}, got {self.init!r}")
        smallest = min_crop(self.overlap_pool)
        if self.crop < smallest:
            pools = "3/2" if self.overlap_pool else "2/2"
            raise ValueError(
                f"key 'crop' must be at least {smallest} for conv1 and three {pools} max-pools, got {self.crop}"
            )

    @property
    def widths(self) -> tuple[int, int, int, int, int, int, int]:
        """Units in conv1…conv5, fc6, fc7, both towers together; always even, so the towers are equal halves."""
        return tuple(
            max(2, 2 * round(c * self.width * k / 2)) for c, k in zip(PAPER_WIDTHS, self.layer_widths, strict=True)
        )  # type: ignore[return-value]

    @property
    def pool(self) -> tuple[int, int]:
        """Max-pooling (kernel, stride): 3/2 overlapping as in §3.4, or the traditional 2/2."""
        return (3, 2) if self.overlap_pool else (2, 2)

    @property
    def fc6_inputs(self) -> int:
        """Units entering fc6: conv5's maps after the last pool (256×6×6 = 9216 at 227)."""
        side = spatial_sizes(self.crop, self.overlap_pool)[-1]
        return self.widths[4] * side * side


def spatial_sizes(crop: int, overlap_pool: bool = True) -> tuple[int, int, int, int]:
    """Side of the maps after conv1, pool1, pool2 and pool5 (55, 27, 13, 6 at 227 with 3/2 pooling).

    conv1 has no padding and stride 4; conv2…conv5 keep the size (padding 2, 1, 1, 1).
    """
    kernel, stride = (3, 2) if overlap_pool else (2, 2)
    conv1 = (crop - 11) // 4 + 1
    pool1 = (conv1 - kernel) // stride + 1
    pool2 = (pool1 - kernel) // stride + 1
    pool5 = (pool2 - kernel) // stride + 1
    return conv1, pool1, pool2, pool5


def min_crop(overlap_pool: bool = True) -> int:
    """The smallest input side for which every max-pool has a full window (67 for 3/2 pooling)."""
    kernel = 3 if overlap_pool else 2
    crop = 11
    while min(spatial_sizes(crop, overlap_pool)[:3]) < kernel:
        crop += 1
    return crop
