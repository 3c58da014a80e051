"""Settings of `alexrepro train`, importable without torch: defaults are the paper's recipe, section cited."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from alexrepro.data.augmentations import PER_SAMPLE, Added
from alexrepro.data.config import Augmentation
from alexrepro.model.config import ModelConfig

# Settings that may change when a run is resumed: they decide how fast it runs, not what it computes.
RESUMABLE_CHANGES = (
    "epochs",
    "workers",
    "devices",
    "precision",
    "tf32",
    "channels_last",
    "compile",
    "compile_mode",
    "log_every",
    "decoder",
    "decode_on",
    "live",
    "loader_timeout",
)


@dataclass(frozen=True)
class TrainConfig:
    """Parameters of `alexrepro train`. Defaults are the paper's (Krizhevsky et al. 2012), section cited."""

    # Learning (§5)
    epochs: int = 90  # "roughly 90 cycles through the training set"
    batch_size: int = 128  # global batch, split evenly across torch.distributed ranks
    lr: float = 0.01  # ε at the start
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # §5's rule decays the weights w only, and cuda-convnet (the paper's code) gives biases a weight cost of 0;
    # true = PyTorch's habit of decaying every parameter (which pulls the bias-1 init of §5 towards 0).
    decay_biases: bool = False
    update_rule: Literal["paper", "pytorch"] = "paper"  # see `apply_lr`: how momentum carries over an lr change
    lr_schedule: Literal["plateau", "step"] = "plateau"  # §5: ÷10 "when the validation error rate stopped improving"
    lr_patience: int = 3  # epochs without improvement before ÷10 (not given in the paper)
    lr_min_improvement: float = 0.001  # top-1 error (fraction) an epoch must gain to count as improving (not given)
    max_lr_drops: int = 3  # §5: "reduced three times prior to termination"
    lr_milestones: tuple[int, ...] = (
        30,
        60,
        80,
    )  # "step": ÷10 after these epochs (not in the paper: a fixed stand-in for plateaus)
    # The network (§3); see alexrepro.model.network.ModelConfig
    crop: int = 227  # §4.1 says 224; 227 makes conv1's arithmetic give 55×55, as in Caffe
    width: float = 1.0
    towers: int = 2  # §3.2
    layer_widths: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # §3.2's baseline: towers 1, [.5 ×4, 1 ×3]
    init: Literal["paper", "he"] = "paper"  # §5
    activation: Literal["relu", "tanh"] = "relu"  # §3.1
    lrn: bool = True  # §3.3
    overlap_pool: bool = True  # §3.4
    dropout: float = 0.5  # §4.2
    dropout_scaling: Literal["paper", "inverted"] = "paper"  # §4.2: ×0.5 at test time; "inverted" = nn.Dropout
    # Augmentation and input (§2, §4.1)
    random_crop: bool = True  # random crop of the 256×256 image (False: the centre crop)
    flip: bool = True  # horizontal reflections
    pca_lighting: bool = True
    lighting_std: float = 0.1  # std of α
    lighting_scale: Literal["eigval", "sqrt_eigval"] = (
        "eigval"  # λ as a variance (§4.1 text) or its sqrt (cuda-convnet2)
    )
    input_scale: float = 1.0  # §2: raw mean-subtracted 0–255 values; smaller is a deviation for quick demos
    shuffle_buffer: int = 2000  # samples in the per-epoch shuffle buffer (not in the paper; shards are shuffled once)
    # The paper's epoch is a pass over every training image (§5). true: leave out each epoch's partial last batch
    # (1,281,167 mod 128 = 15 images, different ones each epoch), so that a compiled model sees one batch shape.
    drop_last: bool = False
    # Machinery (not from the paper)
    devices: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", or "cuda:0,cuda:1" for one tower per GPU
    workers: int = 4  # loader worker processes per rank (0: load in the training process)
    seed: int = 0
    # The paper trained in fp32 on GTX 580s (§3.2), which have no TF32 or bf16: "fp32" with tf32 false is its
    # arithmetic. "bf16" (autocast; LRN and the loss stay fp32) and tf32 are speed choices that differ from it;
    # "auto" = bf16 on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    tf32: bool = False  # CUDA only: TF32 tensor cores for fp32 matmuls and convolutions (10-bit mantissa)
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the model (CUDA)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    log_every: int = 20  # steps between loss read-outs (each one waits for the device) and NaN checks
    decoder: Literal["torchvision", "pil"] = "torchvision"  # the workers' JPEG decoder (decode_on: workers)
    decode_on: Literal["workers", "device"] = (
        "workers"  # device: workers read bytes, the GPU decodes (alexrepro.data.feed)
    )
    live: Literal["auto", "dvclive", "tensorboard", "none"] = "auto"  # metrics per epoch, live (auto: dvclive)
    loader_timeout: float = 600.0  # seconds without a batch from a loader worker before the run stops (0: never)

    def __post_init__(self):
        positive = ("epochs", "batch_size", "log_every", "max_lr_drops", "lr_patience")
        for key in positive:
            if getattr(self, key) < (0 if key == "max_lr_drops" else 1):
                raise ValueError(f"key '{key}' must be a positive integer, got {getattr(self, key)}")
        for key in ("lr", "input_scale"):
            if not getattr(self, key) > 0:
                raise ValueError(f"key '{key}' must be a number above 0, got {getattr(self, key)}")
        for key in ("weight_decay", "lighting_std", "lr_min_improvement", "loader_timeout"):
            if getattr(self, key) < 0:
                raise ValueError(f"key '{key}' must be 0 or more, got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"key 'momentum' must be in [0, 1), got {self.momentum}")
        for key in ("workers", "shuffle_buffer"):
            if getattr(self, key) < 0:
                raise ValueError(f"key '{key}' must be 0 or more, got {getattr(self, key)}")
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)) or any(m < 1 for m in self.lr_milestones):
            raise ValueError(f"key 'lr_milestones' must be increasing positive epochs, got {list(self.lr_milestones)}")
        if self.lr_schedule == "step" and any(m > self.epochs for m in self.lr_milestones):
            raise ValueError(
                f"key 'lr_milestones' {list(self.lr_milestones)} goes beyond key 'epochs' ({self.epochs}): give "
                f"epochs of at least {max(self.lr_milestones)}, or milestones at most epochs"
            )
        self.model_config(num_classes=1)  # the network's keys (width, towers, crop, dropout…), before any data is read

    def model_config(self, num_classes: int):
        return ModelConfig(
            num_classes=num_classes, crop=self.crop, width=self.width, towers=self.towers, lrn=self.lrn,
            overlap_pool=self.overlap_pool, dropout=self.dropout, init=self.init, layer_widths=self.layer_widths,
            dropout_scaling=self.dropout_scaling, activation=self.activation,
        )  # fmt: skip

    def augmentation(self) -> Augmentation:
        added = tuple((a.name, a.from_config(self)) for a in PER_SAMPLE if isinstance(a, Added))
        return Augmentation(
            self.crop, self.random_crop, self.flip, self.lighting_std if self.pca_lighting else 0.0, added
        )

    def switches(self) -> dict[str, Any]:
        """Every ablation switch and its value, as recorded in checkpoints and reports."""
        keys: tuple[str, ...] = ("towers", "layer_widths", "activation", "lrn", "overlap_pool", "dropout", "dropout_scaling", "init",
                "width", "crop", "random_crop", "flip", "pca_lighting", "lighting_scale", "input_scale", "update_rule",
                "decay_biases", "lr_schedule", "drop_last", "precision", "tf32")  # fmt: skip
        keys += tuple(a.name for a in PER_SAMPLE if a.name not in keys)  # an added augmentation is a switch too
        return {k: getattr(self, k) for k in keys}
