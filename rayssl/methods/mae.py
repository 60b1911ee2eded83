"""MAE: masked-image modelling on a CNN U-Net, random-block masking (He et al. 2022; nnssl's ResEnc-L MAE, Wald et al. 2025)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from rayssl.methods.base import (
    ExportedBackbone,
    Method,
    MethodConfig,
    PreviewFigure,
    PreviewImage,
    PreviewScene,
    ReadRequest,
    VolumeInfo,
    StepInfo,
    box_centre,
    cpu_state_dict,
    mid_slice,
    request_box,
    with_intensity,
)
from rayssl.nn.backbones import BasicUNetBackbone

# MAE's normalised-pixel target: (x - mean) / sqrt(var + 1e-6) (He et al. 2022, `norm_pix_loss`).
_NORM_EPS = 1e-6


class MAEConfig(MethodConfig):
    """MAE settings. Defaults are nnssl's BaseMAETrainer (MIC-DKFZ/nnssl) unless a field says otherwise."""

    # ---- views -------------------------------------------------------------------------------
    input_size: tuple[int, int, int] = (160, 160, 160)  # crop edge in voxels (nnssl patch_size)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)  # fraction of blocks masked (nnssl mask_percentage; MAE 0.75)
    block_size: int = Field(16, ge=1)  # masking block edge in voxels (nnssl create_blocky_mask block_size)
    # Where the crop's centre is drawn: the foreground box (VolumeInfo.bbox) or the whole volume.
    sample_from: Literal["foreground", "volume"] = "foreground"
    # Stored units -> [0, 1] before the per-crop z-score, by the intensity contract
    # (rayssl/data/intensity.py via `Method.intensity_rule`): auto = the HU window for CT stored in
    # HU, unchanged for CT scaled at conversion, percentiles otherwise.
    intensity: Literal["auto", "ct_window", "percentile", "none"] = "auto"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU; wide, the z-score does the rest
    percentiles: tuple[float, float] = (0.5, 99.5)

    # ---- model ---------------------------------------------------------------------------------
    features: tuple[int, int, int, int, int, int] = (32, 64, 128, 256, 512, 32)  # BasicUNet features
    norm: Literal["instance", "group"] = "instance"  # nnssl's ResEnc-L uses InstanceNorm
    num_groups: int = Field(4, ge=1)  # GroupNorm groups (norm=group)

    @model_validator(mode="after")
    def _check(self) -> "MAEConfig":
        if any(n < 16 or n % 16 for n in self.input_size):
            raise ValueError(f"mae.input_size must be multiples of 16 (BasicUNet pools 4 times), got {self.input_size}")
        if any(n % self.block_size for n in self.input_size):
            raise ValueError(f"mae.block_size={self.block_size} must divide every edge of mae.input_size="
                             f"{self.input_size}: the mask is a grid of whole blocks")
        blocks = int(np.prod([n // self.block_size for n in self.input_size]))
        if int(self.mask_ratio * blocks) < 1 or int(self.mask_ratio * blocks) == blocks:
            raise ValueError(f"mae.mask_ratio={self.mask_ratio} of {blocks} blocks masks "
                             f"{int(self.mask_ratio * blocks)}: at least one block must be masked and one visible; "
                             f"change mask_ratio or block_size")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError(f"mae.ct_window must be (low, high) HU with low < high, got {self.ct_window}")
        if not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError(f"mae.percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.norm == "group" and any(f % self.num_groups for f in self.features):
            raise ValueError(f"mae.num_groups={self.num_groups} must divide every width of mae.features={self.features} "
                             f"(norm=group)")
        return self

    def norm_spec(self) -> tuple:
        """BasicUNet's `norm` argument."""
        if self.norm == "group":
            return ("group", {"num_groups": self.num_groups})
        return ("instance", {"affine": True})


# ---- masking and normalisation (CPU side) ----------------------------------------------------------


def block_mask(shape: Sequence[int], block_size: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 mask of `shape`, 1 = visible, 0 = masked: exactly int(ratio x blocks) whole blocks of
    block_size^3 voxels masked, drawn without replacement (nnssl `create_blocky_mask`)."""
    grid = tuple(int(n) // block_size for n in shape)
    flat = np.ones(int(np.prod(grid)), dtype=np.uint8)
    flat[rng.permutation(flat.size)[:int(ratio * flat.size)]] = 0
    mask = flat.reshape(grid)
    for axis in range(3):
        mask = np.repeat(mask, block_size, axis=axis)
    return mask


def normalise_crop(crop: np.ndarray) -> np.ndarray:
    """Zero mean, unit std over the crop: MAE's normalised-pixel target, per crop."""
    crop = crop.astype(np.float32, copy=False)
    return ((crop - crop.mean()) / np.sqrt(crop.var() + _NORM_EPS)).astype(np.float32)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked voxels (mask == 0) of the whole batch (nnssl `MAEMSELoss`)."""
    hidden = 1.0 - mask.to(prediction.dtype)
    return ((prediction - target) ** 2 * hidden).sum() / hidden.sum().clamp_min(1.0)


# ---- model --------------------------------------------------------------------------------------


class MAEUNet(nn.Module):
    """MONAI BasicUNet reconstructing the image from its masked copy; also returns the bottleneck.

    The input is `target * mask`: masked voxels are 0, which after the per-crop z-score is the crop's
    mean (nnssl multiplies its z-scored patch by the mask the same way), so they carry no intensity cue
    beyond "unknown".
    """

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.network_kwargs: dict[str, Any] = dict(
            spatial_dims=3, in_channels=1, out_channels=1, features=tuple(config.features), norm=config.norm_spec())
        self.unet = BasicUNetBackbone(**self.network_kwargs)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["target"] * batch["mask"].to(batch["target"].dtype)
        levels = self.unet.feature_levels(x)  # encoder levels, then the last decoder level
        # Detached: representation-health metrics only.
        return {"reconstruction": self.unet.final_conv(levels[5]), "embedding": levels[4].detach().mean(dim=(2, 3, 4))}


# ---- method ---------------------------------------------------------------------------------------


class MAE(Method):
    """Masked-image modelling (MAE, He et al. 2022) as nnssl trains it on a CNN U-Net (Wald et al. 2025).

    Views: a crop of `input_size`, mapped to [0, 1] by the intensity rule, then z-scored over the
    crop (the target), and a random-block mask (1 visible, 0 masked). Model: BasicUNet on
    target x mask. Loss: MSE between reconstruction and target over the masked voxels only.
    """

    name: ClassVar[str] = "mae"
    config_cls: ClassVar[type[MethodConfig]] = MAEConfig
    # docs/methods/mae.md has the table of sources that tests/test_mae.py holds against `rayssl recipe`.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # 2 cores: 32^3 crops, a narrow BasicUNet, 4-voxel blocks (8 per edge, close to nnssl's 10
        # blocks of 16 per 160-voxel edge). GroupNorm: at the 2^3 bottleneck InstanceNorm would
        # normalise over 8 voxels. nnssl's optimizer (SGD 1e-2, Nesterov 0.99, wd 3e-5): it meets the
        # learning check in docs/methods/mae.md in every seed and keeps the bottleneck's spread, which
        # Adam 1e-3 collapsed (0.16 -> 0.003) for a slightly lower loss.
        "cpu": {"input_size": (32, 32, 32), "block_size": 4, "mask_ratio": 0.75,
                "features": (8, 16, 32, 64, 128, 16), "norm": "group", "num_groups": 4,
                "train": {"optimizer": "sgd", "lr": 1e-2, "momentum": 0.99, "nesterov": True,
                          "weight_decay": 3e-5, "schedule": "cosine", "warmup_steps": 5,
                          "final_lr_fraction": 0.0, "batch_size": 2, "accumulate": 1,
                          "steps": 40, "grad_clip": 1.0, "amp": True}},
        # nnssl BaseMAETrainer_BS8 (the readme's ResEnc-L MAE call): patch 160^3, mask 0.75 of 16^3
        # blocks, SGD lr 1e-2 momentum 0.99 Nesterov, weight decay 3e-5, 1000 epochs x 250 iterations,
        # total batch 8, grad-norm clip 12, autocast on CUDA. Its PolyLR (exponent 0.9) is not a
        # rayssl schedule: cosine to 0 stands in (docs/methods/mae.md).
        "paper": {"input_size": (160, 160, 160), "block_size": 16, "mask_ratio": 0.75,
                  "features": (32, 64, 128, 256, 512, 32), "norm": "instance",
                  "train": {"optimizer": "sgd", "lr": 1e-2, "momentum": 0.99, "nesterov": True,
                            "weight_decay": 3e-5, "schedule": "cosine", "warmup_steps": 0,
                            "final_lr_fraction": 0.0, "batch_size": 8, "accumulate": 1,
                            "steps": 250_000, "grad_clip": 12.0, "amp": True}},
    }
    missing_profiles: ClassVar[dict[str, str]] = {
        "official": "MAE has no 3D CNN code of its own (He et al. 2022 is a 2D ViT); the `paper` profile is "
                    "nnssl's BaseMAETrainer"}

    def __init__(self, config: MAEConfig) -> None:
        super().__init__(config)
        self.config: MAEConfig = config

    # ---- CPU side -------------------------------------------------------------------------
    def plan(self, volumes: Sequence[VolumeInfo], index: int, rng: np.random.Generator,
             step: StepInfo | None = None) -> list[ReadRequest]:
        """One box of `input_size` voxels centred on a uniform point of the foreground box (or the
        volume), kept inside the volume where the volume is large enough (else background-padded),
        carrying the volume's intensity mapping."""
        volume = volumes[index]
        shape = np.array(volume.shape, dtype=np.int64)
        size = np.array(self.config.input_size, dtype=np.int64)
        lo, hi = np.zeros(3, np.int64), shape
        if self.config.sample_from == "foreground":
            box = np.array(volume.bbox, dtype=np.int64)
            if (box[3:] > box[:3]).all():
                lo, hi = box[:3], box[3:]
        centre = lo + np.floor(rng.random(3) * (hi - lo)).astype(np.int64)
        start = centre - size // 2
        start = np.where(shape >= size, np.clip(start, 0, shape - size), (shape - size) // 2)
        request = ReadRequest(volume=volume.index, start=tuple(int(v) for v in start), size=tuple(int(v) for v in size))
        return with_intensity([request], volumes, self.intensity_rule())

    def input_intensity(self, image: np.ndarray, volume: VolumeInfo) -> np.ndarray:
        """The intensity rule resolved for `volume`, then z-scored over `image` (views z-score over the crop)."""
        return normalise_crop(self.intensity_rule().resolve(volume).apply(image))

    def views(self, crops: list[np.ndarray], requests: list[ReadRequest],
              rng: np.random.Generator) -> dict[str, np.ndarray]:
        """target: the crop z-scored [1, *input_size] float32; mask: [1, *input_size] uint8, 1 visible, 0 masked."""
        cfg = self.config
        if len(crops) != 1:
            raise ValueError(f"MAE views need 1 crop, got {len(crops)}")
        target = normalise_crop(self.request_intensity(requests[0]).apply(crops[0]))
        mask = block_mask(target.shape, cfg.block_size, cfg.mask_ratio, rng)
        return {"target": target[None], "mask": mask[None]}

    def preview_geometry(self, volumes: Sequence[VolumeInfo], requests: list[ReadRequest],
                         views: dict[str, np.ndarray], model: nn.Module | None = None) -> PreviewFigure:
        """The crop's box; the target, the mask, the masked input and the reconstruction of `model`
        (a freshly initialised one when none is given), with the masked-voxel MSE and its reference."""
        cfg = self.config
        request = requests[0]
        scene = PreviewScene(request.volume, f"volume {volumes[request.volume].id}: the crop",
                             box_centre(request.start, request.size), [request_box(request, "crop")])
        trained = model is not None
        if model is None:
            torch.manual_seed(0)
            model = self.build_model()
        model.eval()
        # Copies: streamed views are read-only arrays, which torch.from_numpy warns about.
        batch = {"target": torch.from_numpy(np.array(views["target"], np.float32))[None],
                 "mask": torch.from_numpy(np.array(views["mask"]))[None]}
        with torch.no_grad():
            reconstruction = model(batch)["reconstruction"].float()
        loss = float(masked_mse(reconstruction, batch["target"], batch["mask"]))
        reference = float(masked_mse(batch["target"] * batch["mask"], batch["target"], batch["mask"]))
        target, mask = views["target"], views["mask"].astype(np.float32)
        masked_input = target * mask
        shown = np.where(mask > 0, target, reconstruction[0].numpy())
        lo, hi = (float(v) for v in np.percentile(target, (1, 99)))
        who = "the given model" if trained else "a freshly initialised model"
        images = [PreviewImage("target: the crop, z-scored", mid_slice(target), (lo, hi)),
                  PreviewImage(f"mask: {1 - mask.mean():.0%} masked in {cfg.block_size}^3 blocks\n(white visible)",
                               mid_slice(mask), (0.0, 1.0)),
                  PreviewImage("network input: masked voxels = 0\n(the crop mean)", mid_slice(masked_input), (lo, hi)),
                  PreviewImage(f"reconstruction by {who}\nmasked-voxel MSE {loss:.3f} "
                               f"(crop-mean prediction {reference:.3f})", mid_slice(reconstruction[0].numpy()), (lo, hi)),
                  PreviewImage("visible voxels + reconstruction\nof the masked ones", mid_slice(shown), (lo, hi))]
        notes = [f"Images: middle axial slice of the {'x'.join(map(str, cfg.input_size))} crop. The loss is the MSE of "
                 "the reconstruction against the z-scored crop over the masked voxels only."]
        facts = {"box": {"start": list(request.start), "size": list(request.size)},
                 "masked_fraction": float(1 - mask.mean()), "block_size": cfg.block_size,
                 "model": "given" if trained else "fresh", "masked_mse": loss, "mean_prediction_mse": reference}
        return PreviewFigure("MAE: the crop, its random-block mask and the reconstruction", [scene], images, notes, facts)

    # ---- model side -----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return MAEUNet(self.config)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L = mean over the masked voxels of (reconstruction - z-scored crop)^2 (fp32)."""
        mse = masked_mse(outputs["reconstruction"].float(), batch["target"].float(), batch["mask"])
        return {"loss": mse, "masked_mse": mse.detach()}

    def embeddings(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Spatially averaged bottleneck features (down_4 output)."""
        return outputs["embedding"]

    def heldout_reference(self, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                          outputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The loss of predicting each crop's mean (0 after the z-score) on its masked voxels: what a
        network that learned nothing reaches (about 1: the masked voxels' variance about the crop mean).
        It is also the identity prediction, as the masked input holds 0 there, hence the "identity"
        line. Constant across steps (the held-out samples and their masks are fixed); no forward."""
        batches = batches[:len(outputs)]
        if not batches:
            return {}
        values = [float(masked_mse(torch.zeros_like(b["target"], dtype=torch.float32), b["target"].float(), b["mask"]))
                  for b in batches]
        mean = sum(values) / len(values)
        return {"identity": mean, "identity_masked_mse": mean}

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.unet

    def export(self, model: nn.Module) -> ExportedBackbone:
        unet: BasicUNetBackbone = self.backbone(model)  # type: ignore[assignment]
        # final_conv maps to the 1-channel reconstruction: a pretext head, left to the task (initialized).
        state = {k: v for k, v in cpu_state_dict(unet).items() if not k.startswith("final_conv.")}
        return ExportedBackbone.of(
            unet, state_dict=state,
            notes=("Whole BasicUNet except final_conv (MAE pretrains encoder and decoder; final_conv is the "
                   "1-channel reconstruction). Inputs were crops mapped by `intensity` to [0, 1], then z-scored per crop."),
        )

    def recipe(self) -> dict[str, str]:
        c = self.config
        norm = f"GroupNorm {c.num_groups}" if c.norm == "group" else "InstanceNorm"
        return {
            "network": f"BasicUNet {tuple(c.features)}, {norm}",
            "input size": "x".join(str(v) for v in c.input_size),
            "intensity": f"{c.intensity}, then z-score per crop",
            "masking": f"{c.mask_ratio:g} of {c.block_size}^3 blocks, masked voxels = 0 (crop mean)",
            "loss form": "MSE on masked voxels",
        }

    def card(self) -> dict[str, Any]:
        c = self.config
        return {
            "paper": "He et al. Masked Autoencoders Are Scalable Vision Learners, CVPR 2022; as trained in nnssl "
                     "(Wald et al. An OpenMind for 3D medical vision self-supervised learning, 2025)",
            "pretraining_input_size": list(c.input_size),
            "recommended_downstream_input_size": list(c.input_size),
            "intensity": f"{c.intensity} to [0, 1] (ct_window {list(c.ct_window)} HU, percentiles "
                         f"{list(c.percentiles)}), then zero mean and unit std per crop",
            "masking": {"mask_ratio": c.mask_ratio, "block_size": c.block_size},
            "network": "monai.networks.nets.BasicUNet",
            "features": list(c.features),
            "norm": f"group ({c.num_groups} groups)" if c.norm == "group" else "instance",
        }


METHOD = MAE
