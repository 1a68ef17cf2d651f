"""Downstream networks on the MiT backbone: segmentation (2D/3D) and classification (2D/3D).

Spec ``unimiss.md`` section (f): BCV multi-organ CT segmentation fine-tunes the MiT
encoder-decoder with a segmentation head (IN + LeakyReLU conv blocks); RICORD classification
fine-tunes the encoder. The official BCV head lives inside an nnU-Net fork and is not
reproduced exactly; what is built here, and why:

* :class:`MiTSegmenter` - the decoder's last map (``dec3``, stride 4 in 2D, (2, 4, 4) in 3D,
  after the final LayerNorm) is upsampled by a transposed conv k=s=2 to the stem's
  resolution, concatenated with the stem features (the only full-detail, stride-2 skip the
  backbone has), fused by conv3 + instance norm + LeakyReLU, upsampled by a transposed conv
  with the stem's stride (2D (2, 2), 3D (1, 2, 2)) to input resolution and classified by a
  1x1 conv. Every conv exists in a 2D and a 3D copy chosen by input rank, with the same
  ``2D``/``3D`` naming convention as the backbone. Outputs are cropped/padded to the input's
  spatial size, so odd sizes work. No deep supervision (nnU-Net's is optional).
* :class:`SegmentationLoss` - soft Dice + cross-entropy (nnU-Net's default), via
  ``monai.losses.DiceCELoss`` when MONAI is importable, else an equivalent pure-torch
  implementation with the same formula and smoothing.
* :class:`MiTClassifier` - LayerNorm + Linear on the encoder's final cls token (RICORD uses
  the encoder only; the encoder output has no norm of its own), or on the decoder cls token.
  ``linear_probe=True`` freezes the backbone and keeps it in eval mode.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.mit import STEM_STRIDE_2D, STEM_STRIDE_3D, DualConvNormAct, MiT, match_spatial_size


class MiTSegmenter(nn.Module):
    """MiT encoder-decoder + a small 2D/3D conv head giving per-pixel/voxel class logits.

    ``forward(x)`` maps ``(B, C, *S)`` to ``(B, num_classes, *S)`` for 2D and 3D inputs.
    """

    def __init__(self, backbone: MiT, num_classes: int, head_channels: int | None = None) -> None:
        super().__init__()
        config = backbone.config
        head_channels = head_channels or config.stem_channels
        decoder_width = config.out_dim
        self.backbone = backbone
        self.num_classes = num_classes
        self.decoder_to_stem2D = nn.ConvTranspose2d(decoder_width, decoder_width, kernel_size=2, stride=2)
        self.decoder_to_stem3D = nn.ConvTranspose3d(decoder_width, decoder_width, kernel_size=2, stride=2)
        fused_width = decoder_width + config.stem_channels
        self.fuse = DualConvNormAct(
            fused_width, fused_width, head_channels, 3, (1, 1), (1, 1, 1), config.leaky_relu_slope
        )
        self.stem_to_input2D = nn.ConvTranspose2d(
            head_channels, head_channels, kernel_size=STEM_STRIDE_2D, stride=STEM_STRIDE_2D
        )
        self.stem_to_input3D = nn.ConvTranspose3d(
            head_channels, head_channels, kernel_size=STEM_STRIDE_3D, stride=STEM_STRIDE_3D
        )
        self.classifier2D = nn.Conv2d(head_channels, num_classes, kernel_size=1)
        self.classifier3D = nn.Conv3d(head_channels, num_classes, kernel_size=1)
        for module in (
            self.decoder_to_stem2D, self.decoder_to_stem3D, self.stem_to_input2D, self.stem_to_input3D,
            self.classifier2D, self.classifier3D,
        ):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone.forward_features(x)
        stem = features["stem"]
        if x.dim() == 4:
            decoder_to_stem, stem_to_input, classifier = self.decoder_to_stem2D, self.stem_to_input2D, self.classifier2D
        else:
            decoder_to_stem, stem_to_input, classifier = self.decoder_to_stem3D, self.stem_to_input3D, self.classifier3D
        upsampled = match_spatial_size(decoder_to_stem(features["dec3"]), stem.shape[2:])
        fused = self.fuse(torch.cat([upsampled, stem], dim=1))
        full_resolution = match_spatial_size(stem_to_input(fused), x.shape[2:])
        return classifier(full_resolution)


class SegmentationLoss(nn.Module):
    """Soft Dice + cross-entropy on logits ``(B, K, *S)`` and integer labels ``(B, *S)`` or ``(B, 1, *S)``.

    Dice is computed per sample and class with softmax probabilities and one-hot labels,
    ``1 - (2 |P.G| + 1e-5) / (|P| + |G| + 1e-5)``, averaged; cross-entropy is the mean over
    voxels. MONAI is imported lazily (only when the loss is built), to keep
    ``import models.segmentation`` cheap; ``use_monai=False`` forces the pure-torch path.
    """

    def __init__(
        self,
        include_background: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth: float = 1e-5,
        use_monai: bool = True,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.smooth = smooth
        self._monai_loss: nn.Module | None = None
        if use_monai:
            try:
                from monai.losses import DiceCELoss
            except ImportError:
                DiceCELoss = None
            if DiceCELoss is not None:
                self._monai_loss = DiceCELoss(
                    include_background=include_background,
                    to_onehot_y=True,
                    softmax=True,
                    smooth_nr=smooth,
                    smooth_dr=smooth,
                    lambda_dice=lambda_dice,
                    lambda_ce=lambda_ce,
                )

    @property
    def uses_monai(self) -> bool:
        return self._monai_loss is not None

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.dim() == logits.dim() - 1:
            target = target.unsqueeze(1)
        target = target.long()
        if self._monai_loss is not None:
            return self._monai_loss(logits, target)
        return self._torch_dice_ce(logits, target)

    def _torch_dice_ce(self, logits: Tensor, target: Tensor) -> Tensor:
        num_classes = logits.shape[1]
        cross_entropy = F.cross_entropy(logits, target[:, 0])
        probabilities = logits.softmax(dim=1)
        one_hot = F.one_hot(target[:, 0], num_classes).movedim(-1, 1).to(probabilities.dtype)
        if not self.include_background:
            probabilities, one_hot = probabilities[:, 1:], one_hot[:, 1:]
        reduce_dims = tuple(range(2, logits.dim()))
        intersection = (probabilities * one_hot).sum(reduce_dims)
        denominator = probabilities.sum(reduce_dims) + one_hot.sum(reduce_dims)
        dice = 1.0 - (2.0 * intersection + self.smooth) / (denominator + self.smooth)
        return self.lambda_dice * dice.mean() + self.lambda_ce * cross_entropy


class ClassificationHead(nn.Module):
    """LayerNorm + Linear on a feature vector."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.norm(features))


class MiTClassifier(nn.Module):
    """Image/volume classifier on the MiT backbone (2D or 3D by input rank).

    ``features="encoder"`` (default, as the RICORD fine-tuning) uses the encoder's stage-4 cls
    token (width ``embed_dims[-1]``); ``"decoder"`` uses the pre-training output (width
    ``embed_dims[0]``). With ``linear_probe=True`` only the head is trainable, the backbone
    runs without autograd and stays in eval mode.
    """

    def __init__(
        self,
        backbone: MiT,
        num_classes: int,
        linear_probe: bool = False,
        features: Literal["encoder", "decoder"] = "encoder",
    ) -> None:
        super().__init__()
        if features not in ("encoder", "decoder"):
            raise ValueError(f"features must be 'encoder' or 'decoder', got {features!r}")
        self.backbone = backbone
        self.linear_probe = linear_probe
        self.features = features
        feature_dim = backbone.config.embed_dims[-1] if features == "encoder" else backbone.out_dim
        self.head = ClassificationHead(feature_dim, num_classes)
        if linear_probe:
            for param in self.backbone.parameters():
                param.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> MiTClassifier:
        super().train(mode)
        if self.linear_probe:
            self.backbone.eval()
        return self

    def extract(self, x: Tensor) -> Tensor:
        """The feature vector the head sees, ``(B, feature_dim)``."""
        if self.features == "encoder":
            return self.backbone.forward_encoder(x)["enc_cls"]
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.linear_probe:
            with torch.no_grad():
                features = self.extract(x)
        else:
            features = self.extract(x)
        return self.head(features)
