"""MiT: the pyramid, U-like medical Transformer of UniMiSS with a switchable patch embedding.

Implements spec ``unimiss.md`` section (b). One network serves 2D and 3D inputs:

* **Switchable patch embedding (SPE).** Every convolution (stem, patch embeddings,
  spatial-reduction convs of the attention, decoder transposed convs), every conv-block
  normalisation and every position embedding exists twice, once for 2D and once for 3D, and
  the copy is chosen by the input's rank (4-D ``(B, C, H, W)`` -> 2D path, 5-D
  ``(B, C, D, H, W)`` -> 3D path). Linear layers, LayerNorms, attention, MLPs and the cls
  token are shared. Naming convention (relied on by ``set_3d_trainable`` and the tests):
  *all and only* the dimension-specific parameters contain ``2D`` or ``3D`` in their
  qualified name, and each ``...2D...`` parameter has a ``...3D...`` twin.
* **Encoder.** Stem conv k7 (2D stride 2, 3D stride (1, 2, 2), so depth is kept), then four
  stages, each: conv k3 s2 p1 + norm + LeakyReLU(0.01) -> tokens, a cls token in front
  (stage 1: learnable vector; later stages: Linear of the previous stage's cls output),
  learnable position embedding (resized bicubic/trilinear when the grid differs from the
  reference grid), pre-norm Transformer blocks with PVT spatial-reduction attention.
* **U-like decoder.** Three stages: transposed conv k=s=2 from the previous width, *add* the
  encoder map of matching resolution, cls via Linear, own position embedding, blocks. A final
  LayerNorm; the model output is the final cls token (width ``embed_dims[0]``).

Deviations (and why):

* Conv-block normalisation is ``AffineInstanceNorm`` (a ``GroupNorm(C, C)``), mathematically
  identical to the official ``InstanceNorm(affine=True)`` without running statistics, but it
  does not raise on maps with a single spatial element (the CPU config's 3D stage 4 is 1x1x1
  for 16x32x32 inputs; such a map normalises to the bias, i.e. carries no information, so
  prefer inputs whose stage-4 grid has more than one element, as the official sizes do).
* Spatial-reduction ratios are clamped per axis to the reference grid at construction (the
  2D and 3D copies may therefore have different kernels, e.g. a 3D depth of 2 under sr 4),
  and at run time the kernel is clamped again to the actual grid by using the leading
  kernel taps. The official code assumes sr never exceeds the grid; with the official
  sizes both clamps are no-ops.
* When a decoder upsampling overshoots an odd-sized encoder map, the upsampled map is
  cropped (or zero-padded) to the encoder map's size before the addition; with power-of-two
  sizes (all spec configs) this never happens.
* Choices where the spec is silent: the cls token has its own position-embedding slot
  (``pos_embed`` has ``1 + N`` rows; that row is never resized), and in the sr attention the
  LayerNorm is applied to the whole key/value sequence ``[cls ; reduced tokens]``.
* Stochastic depth is configurable but defaults to 0, which is what the official run
  effectively uses (the factory functions drop the requested 0.1; spec code quirk).
* Weight init: Linear trunc-normal(0.02) and zero bias, norms (1, 0), convs Kaiming normal
  (fan_out), position embeddings and the cls token trunc-normal(0.02).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Grid = tuple[int, ...]

STEM_STRIDE_2D: Grid = (2, 2)
STEM_STRIDE_3D: Grid = (1, 2, 2)
STAGE_STRIDE = 2


@dataclass(frozen=True)
class MiTConfig:
    """Hyper-parameters of the MiT backbone (spec section (b)).

    ``img_size_2d`` / ``img_size_3d`` are reference input sizes: they fix the position
    embedding grids and the spatial-reduction kernel clamps; other input sizes work through
    position-embedding resizing. The decoder widths are the encoder widths of stages 3, 2, 1
    (``decoder_dims``), because decoder maps are added to those encoder maps.
    """

    in_chans_2d: int = 3
    in_chans_3d: int = 1
    img_size_2d: tuple[int, int] = (224, 224)
    img_size_3d: tuple[int, int, int] = (16, 96, 96)
    stem_channels: int = 32
    stem_kernel: int = 7
    embed_dims: tuple[int, int, int, int] = (48, 128, 256, 512)
    num_heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    depths: tuple[int, int, int, int] = (2, 3, 4, 3)
    sr_ratios: tuple[int, int, int, int] = (6, 4, 2, 1)
    decoder_num_heads: tuple[int, int, int] = (8, 4, 2)
    decoder_depths: tuple[int, int, int] = (3, 4, 3)
    decoder_sr_ratios: tuple[int, int, int] = (2, 4, 6)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    leaky_relu_slope: float = 0.01
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        encoder_lengths = {len(self.embed_dims), len(self.num_heads), len(self.depths), len(self.sr_ratios)}
        decoder_lengths = {len(self.decoder_num_heads), len(self.decoder_depths), len(self.decoder_sr_ratios)}
        if encoder_lengths != {4} or decoder_lengths != {3}:
            raise ValueError("MiTConfig: encoder settings need 4 entries and decoder settings 3 entries")
        for width, heads in zip(self.embed_dims + self.decoder_dims, self.num_heads + self.decoder_num_heads):
            if width % heads:
                raise ValueError(f"MiTConfig: width {width} is not divisible by {heads} heads")
        if len(self.img_size_2d) != 2 or len(self.img_size_3d) != 3:
            raise ValueError("MiTConfig: img_size_2d needs 2 entries and img_size_3d 3 entries")

    @property
    def decoder_dims(self) -> tuple[int, int, int]:
        """Widths of decoder stages 1..3 = encoder widths of stages 3, 2, 1."""
        return (self.embed_dims[2], self.embed_dims[1], self.embed_dims[0])

    @property
    def out_dim(self) -> int:
        """Width of the output cls token (the last decoder stage's width)."""
        return self.embed_dims[0]

    @classmethod
    def official_small(cls) -> MiTConfig:
        """The official ``model_small``: encoder depths [2,3,4,3], decoder depths [3,4,3]."""
        return cls()

    @classmethod
    def official_tiny(cls) -> MiTConfig:
        """The official ``model_tiny``: encoder depths [1,1,1,1], decoder depths [1,1,1]."""
        return cls(depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1))

    @classmethod
    def cpu_small(cls) -> MiTConfig:
        """Spec "Small CPU config": same structure, tiny widths, for tests on a laptop CPU.

        Not given by the spec, chosen here: stem width 16 (shrunk with the stage widths) and
        decoder heads [2, 2, 1], the encoder heads of stages 4, 3, 2 as in the official
        pattern ([8, 4, 2] from [1, 2, 4, 8]).
        """
        return cls(
            img_size_2d=(64, 64),
            img_size_3d=(16, 32, 32),
            stem_channels=16,
            embed_dims=(16, 32, 48, 64),
            num_heads=(1, 1, 2, 2),
            depths=(1, 1, 1, 1),
            sr_ratios=(4, 2, 1, 1),
            decoder_num_heads=(2, 2, 1),
            decoder_depths=(1, 1, 1),
            decoder_sr_ratios=(1, 2, 4),
        )


# --------------------------------------------------------------------------- grid helpers
def _conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def pyramid_grids(img_size: Sequence[int], stem_stride: Sequence[int], stem_kernel: int = 7) -> list[Grid]:
    """Grid sizes of [stem, stage 1, ..., stage 4] for an input of spatial size ``img_size``."""
    stem = tuple(
        _conv_output_size(n, stem_kernel, s, stem_kernel // 2) for n, s in zip(img_size, stem_stride, strict=True)
    )
    grids: list[Grid] = [stem]
    for _ in range(4):
        grids.append(tuple(_conv_output_size(n, 3, STAGE_STRIDE, 1) for n in grids[-1]))
    return grids


def resize_pos_embed(pos_embed: Tensor, reference_grid: Grid, grid: Grid) -> Tensor:
    """Resize a ``(1, 1 + prod(reference_grid), C)`` position embedding to ``grid``.

    The cls slot is kept as is; the grid part is resized bicubically (2D) or trilinearly (3D),
    as in the official code. Identity when the grids agree.
    """
    if tuple(grid) == tuple(reference_grid):
        return pos_embed
    cls_slot, grid_part = pos_embed[:, :1], pos_embed[:, 1:]
    channels = grid_part.shape[-1]
    grid_map = grid_part.transpose(1, 2).reshape(1, channels, *reference_grid)
    mode = "bicubic" if len(grid) == 2 else "trilinear"
    resized = F.interpolate(grid_map, size=tuple(grid), mode=mode, align_corners=False)
    return torch.cat([cls_slot, resized.flatten(2).transpose(1, 2)], dim=1)


def match_spatial_size(x: Tensor, size: Sequence[int]) -> Tensor:
    """Crop (or zero-pad) the trailing spatial dims of ``x`` to ``size``, at the far end."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    padding: list[int] = []
    for current, target in zip(reversed(x.shape[2:]), reversed(tuple(size))):
        padding.extend([0, target - current])
    return F.pad(x, padding)


def _reduction_conv(conv: nn.Conv2d | nn.Conv3d, fmap: Tensor) -> Tensor:
    """Apply a k=s spatial-reduction conv, clamping its kernel to the grid at run time."""
    kernel = tuple(conv.kernel_size)
    clamped = tuple(min(k, n) for k, n in zip(kernel, fmap.shape[2:]))
    if clamped == kernel:
        return conv(fmap)
    weight = conv.weight[(slice(None), slice(None), *(slice(0, k) for k in clamped))]
    conv_fn = F.conv2d if fmap.dim() == 4 else F.conv3d
    return conv_fn(fmap, weight, conv.bias, stride=clamped)


def _spatial_rank(x: Tensor) -> int:
    if x.dim() == 4:
        return 2
    if x.dim() == 5:
        return 3
    raise ValueError(f"MiT expects a 4-D (B,C,H,W) or 5-D (B,C,D,H,W) input, got shape {tuple(x.shape)}")


def _tokens_to_map(tokens: Tensor, grid: Grid) -> Tensor:
    batch, _, channels = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, channels, *grid)


# --------------------------------------------------------------------------- building blocks
class AffineInstanceNorm(nn.GroupNorm):
    """Instance norm with a per-channel affine, for 2D and 3D maps alike.

    Equal to ``InstanceNorm{2,3}d(C, affine=True)`` (no running statistics) and to
    ``GroupNorm(C, C)``, but calls the kernel directly so that a map with a single spatial
    element (batch 1, 1x1 grid) normalises to the bias instead of raising, as it can for
    small CPU inputs at stage 4.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


class DualConvNormAct(nn.Module):
    """Conv -> per-channel norm -> LeakyReLU, with a 2D and a 3D copy chosen by input rank."""

    def __init__(
        self,
        in_chans_2d: int,
        in_chans_3d: int,
        out_chans: int,
        kernel: int,
        stride_2d: Grid,
        stride_3d: Grid,
        negative_slope: float,
    ) -> None:
        super().__init__()
        padding = kernel // 2
        self.conv2D = nn.Conv2d(in_chans_2d, out_chans, kernel, stride=stride_2d, padding=padding)
        self.norm2D = AffineInstanceNorm(out_chans)
        self.conv3D = nn.Conv3d(in_chans_3d, out_chans, kernel, stride=stride_3d, padding=padding)
        self.norm3D = AffineInstanceNorm(out_chans)
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        if _spatial_rank(x) == 2:
            x = self.norm2D(self.conv2D(x))
        else:
            x = self.norm3D(self.conv3D(x))
        return F.leaky_relu(x, self.negative_slope)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at rate 0 or in eval mode)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class SpatialReductionAttention(nn.Module):
    """PVT attention: queries from all tokens, keys/values from ``[cls ; Conv_sr(grid tokens)]``.

    The reduction conv (kernel = stride = sr) has a 2D and a 3D copy, each clamped per axis to
    its reference grid; the LayerNorm after it is shared. ``sr_ratio == 1`` is plain attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        grid_2d: Grid,
        grid_3d: Grid,
        qkv_bias: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            kernel_2d = tuple(min(sr_ratio, n) for n in grid_2d)
            kernel_3d = tuple(min(sr_ratio, n) for n in grid_3d)
            self.sr2D = nn.Conv2d(dim, dim, kernel_2d, stride=kernel_2d)
            self.sr3D = nn.Conv3d(dim, dim, kernel_3d, stride=kernel_3d)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        batch, n_tokens, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).reshape(batch, n_tokens, self.num_heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            grid_map = _tokens_to_map(x[:, 1:], grid)
            conv = self.sr2D if len(grid) == 2 else self.sr3D
            reduced = _reduction_conv(conv, grid_map).flatten(2).transpose(1, 2)
            kv_input = self.norm(torch.cat([x[:, :1], reduced], dim=1))
        else:
            kv_input = x
        kv = self.kv(kv_input).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(attended.transpose(1, 2).reshape(batch, n_tokens, dim))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + Attn(LN x)``, then ``x + MLP(LN x)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        grid_2d: Grid,
        grid_3d: Grid,
        config: MiTConfig,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = SpatialReductionAttention(
            dim, num_heads, sr_ratio, grid_2d, grid_3d, config.qkv_bias, config.layer_norm_eps
        )
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _TokenStage(nn.Module):
    """Shared part of encoder and decoder stages: cls + pos-embed + Transformer blocks."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int,
        sr_ratio: int,
        grid_2d: Grid,
        grid_3d: Grid,
        config: MiTConfig,
        drop_path_rates: Sequence[float],
    ) -> None:
        super().__init__()
        self.grid_2d = tuple(grid_2d)
        self.grid_3d = tuple(grid_3d)
        self.pos_embed2D = nn.Parameter(torch.zeros(1, 1 + math.prod(grid_2d), dim))
        self.pos_embed3D = nn.Parameter(torch.zeros(1, 1 + math.prod(grid_3d), dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, sr_ratio, grid_2d, grid_3d, config, drop_path_rates[i]) for i in range(depth)
        )

    def _run_blocks(self, fmap: Tensor, cls: Tensor, final_norm: nn.LayerNorm | None = None) -> tuple[Tensor, Tensor]:
        """Tokenise ``fmap`` with ``cls`` (B, C) in front, run the blocks; return (map, cls)."""
        grid = tuple(fmap.shape[2:])
        if len(grid) == 2:
            pos_embed = resize_pos_embed(self.pos_embed2D, self.grid_2d, grid)
        else:
            pos_embed = resize_pos_embed(self.pos_embed3D, self.grid_3d, grid)
        tokens = torch.cat([cls.unsqueeze(1), fmap.flatten(2).transpose(1, 2)], dim=1) + pos_embed
        for block in self.blocks:
            tokens = block(tokens, grid)
        if final_norm is not None:
            tokens = final_norm(tokens)
        return _tokens_to_map(tokens[:, 1:], grid), tokens[:, 0]


class EncoderStage(_TokenStage):
    """Patch embedding (conv k3 s2) -> tokens with cls -> blocks (spec (b), encoder)."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        num_heads: int,
        depth: int,
        sr_ratio: int,
        grid_2d: Grid,
        grid_3d: Grid,
        previous_cls_dim: int | None,
        config: MiTConfig,
        drop_path_rates: Sequence[float],
    ) -> None:
        super().__init__(dim, num_heads, depth, sr_ratio, grid_2d, grid_3d, config, drop_path_rates)
        stride_2d = (STAGE_STRIDE,) * 2
        stride_3d = (STAGE_STRIDE,) * 3
        self.patch_embed = DualConvNormAct(
            in_chans, in_chans, dim, 3, stride_2d, stride_3d, config.leaky_relu_slope
        )
        if previous_cls_dim is None:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.cls_proj = nn.Linear(previous_cls_dim, dim)

    def forward(self, fmap: Tensor, previous_cls: Tensor | None) -> tuple[Tensor, Tensor]:
        fmap = self.patch_embed(fmap)
        if previous_cls is None:
            cls = self.cls_token[:, 0].expand(fmap.shape[0], -1)
        else:
            cls = self.cls_proj(previous_cls)
        return self._run_blocks(fmap, cls)


class DecoderStage(_TokenStage):
    """Transposed conv k=s=2, add the encoder skip map, cls via Linear, blocks (spec (b))."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        num_heads: int,
        depth: int,
        sr_ratio: int,
        grid_2d: Grid,
        grid_3d: Grid,
        config: MiTConfig,
        drop_path_rates: Sequence[float],
    ) -> None:
        super().__init__(dim, num_heads, depth, sr_ratio, grid_2d, grid_3d, config, drop_path_rates)
        self.upsample2D = nn.ConvTranspose2d(in_dim, dim, kernel_size=2, stride=2)
        self.upsample3D = nn.ConvTranspose3d(in_dim, dim, kernel_size=2, stride=2)
        self.cls_proj = nn.Linear(in_dim, dim)

    def forward(
        self, fmap: Tensor, cls: Tensor, skip: Tensor, final_norm: nn.LayerNorm | None = None
    ) -> tuple[Tensor, Tensor]:
        upsample = self.upsample2D if fmap.dim() == 4 else self.upsample3D
        fused = match_spatial_size(upsample(fmap), skip.shape[2:]) + skip
        return self._run_blocks(fused, self.cls_proj(cls), final_norm)


# --------------------------------------------------------------------------- the network
class MiT(nn.Module):
    """The UniMiSS MiT backbone: stem + 4 encoder stages + 3 decoder stages, 2D/3D switchable.

    ``forward(x)`` returns the final cls token ``(B, config.out_dim)``;
    ``forward_features(x)`` returns every intermediate map (for segmentation);
    ``forward_encoder(x)`` stops after the encoder (for classification fine-tuning).
    """

    def __init__(self, config: MiTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MiTConfig()
        grids_2d = pyramid_grids(config.img_size_2d, STEM_STRIDE_2D, config.stem_kernel)
        grids_3d = pyramid_grids(config.img_size_3d, STEM_STRIDE_3D, config.stem_kernel)
        total_depth = sum(config.depths) + sum(config.decoder_depths)
        drop_path_rates = torch.linspace(0, config.drop_path_rate, total_depth).tolist()

        self.stem = DualConvNormAct(
            config.in_chans_2d,
            config.in_chans_3d,
            config.stem_channels,
            config.stem_kernel,
            STEM_STRIDE_2D,
            STEM_STRIDE_3D,
            config.leaky_relu_slope,
        )
        self.encoder_stages = nn.ModuleList()
        in_chans, previous_cls_dim, block_index = config.stem_channels, None, 0
        for i, (dim, heads, depth, sr) in enumerate(
            zip(config.embed_dims, config.num_heads, config.depths, config.sr_ratios)
        ):
            self.encoder_stages.append(
                EncoderStage(
                    in_chans, dim, heads, depth, sr, grids_2d[i + 1], grids_3d[i + 1], previous_cls_dim,
                    config, drop_path_rates[block_index : block_index + depth],
                )
            )
            in_chans, previous_cls_dim, block_index = dim, dim, block_index + depth

        self.decoder_stages = nn.ModuleList()
        in_dim = config.embed_dims[-1]
        for j, (dim, heads, depth, sr) in enumerate(
            zip(config.decoder_dims, config.decoder_num_heads, config.decoder_depths, config.decoder_sr_ratios)
        ):
            grid_index = 3 - j  # decoder stage j+1 works at the resolution of encoder stage 3-j
            self.decoder_stages.append(
                DecoderStage(
                    in_dim, dim, heads, depth, sr, grids_2d[grid_index], grids_3d[grid_index],
                    config, drop_path_rates[block_index : block_index + depth],
                )
            )
            in_dim, block_index = dim, block_index + depth
        self.decoder_norm = nn.LayerNorm(config.out_dim, eps=config.layer_norm_eps)
        self.apply(_init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("pos_embed2D", "pos_embed3D", "cls_token")):
                nn.init.trunc_normal_(param, std=0.02)

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def _check_channels(self, x: Tensor) -> None:
        expected = self.config.in_chans_2d if _spatial_rank(x) == 2 else self.config.in_chans_3d
        if x.shape[1] != expected:
            raise ValueError(
                f"MiT: a {x.dim()}-D input needs {expected} channels, got shape {tuple(x.shape)}"
            )

    def forward_encoder(self, x: Tensor) -> dict[str, Tensor]:
        """Stem and encoder: ``stem``, ``enc1``..``enc4`` maps ``(B, C, *grid)``, ``enc_cls`` ``(B, C4)``."""
        self._check_channels(x)
        fmap = self.stem(x)
        features = {"stem": fmap}
        cls: Tensor | None = None
        for i, stage in enumerate(self.encoder_stages, start=1):
            fmap, cls = stage(fmap, cls)
            features[f"enc{i}"] = fmap
        assert cls is not None
        features["enc_cls"] = cls
        return features

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Encoder features plus ``dec1``..``dec3`` maps and the final normalised ``cls``.

        ``dec3`` is taken after the final LayerNorm (at the resolution of ``enc1``).
        """
        features = self.forward_encoder(x)
        fmap, cls = features["enc4"], features["enc_cls"]
        last = len(self.decoder_stages)
        for j, stage in enumerate(self.decoder_stages, start=1):
            skip = features[f"enc{4 - j}"]
            fmap, cls = stage(fmap, cls, skip, self.decoder_norm if j == last else None)
            features[f"dec{j}"] = fmap
        features["cls"] = cls
        return features

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["cls"]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def dimension_specific_parameter_names(model: nn.Module, dim: str) -> list[str]:
    """Qualified names of the parameters specific to ``dim`` (``"2D"`` or ``"3D"``)."""
    if dim not in ("2D", "3D"):
        raise ValueError(f"dim must be '2D' or '3D', got {dim!r}")
    return [name for name, _ in model.named_parameters() if dim in name]
