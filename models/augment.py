"""UniMiSS view augmentations as pure tensor functions (spec unimiss.md, section d.2–d.3).

Each function takes one sample and a ``torch.Generator`` so that views are reproducible
from the recipe's seed. Deviations from the official pipeline, kept small and deliberate:
- 3D: the official loader first crops (1.4–1.8)x the target in-plane size and then takes two
  (0.8–1.2)x crops resized back; we crop the two views directly at (0.8–1.2)x the target
  from the stored patch (which the sampler already draws larger than the view), which gives
  the same scale range without a second resampling pass.
- 2D: torchvision is unavailable beside this torch build, so RandomResizedCrop, flips,
  brightness/contrast jitter and Gaussian blur are re-implemented for grayscale radiographs
  replicated to 3 channels; hue/saturation jitter is a no-op on grayscale and is omitted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=gen))


def _chance(gen: torch.Generator, p: float) -> bool:
    return bool(torch.rand((), generator=gen) < p)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over every spatial axis of a (C, *spatial) tensor."""
    radius = max(1, int(math.ceil(2 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = x[None]
    dims = x.dim() - 1
    conv = F.conv3d if dims == 3 else F.conv2d
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = kernel.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = radius
        pad[2 * (dims - 1 - axis) + 1] = radius
        channels = out.shape[1]
        weight = kernel.reshape(shape).repeat(channels, 1, *([1] * dims))
        out = conv(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out[0]


def intensity_augment(x: torch.Tensor, gen: torch.Generator, strong: bool) -> torch.Tensor:
    """Noise, blur, brightness, contrast and gamma on intensities in ~[0, 1]."""
    p = 0.8 if strong else 0.5
    if _chance(gen, 0.1 if strong else 0.2):
        x = x + torch.randn(x.shape, generator=gen, dtype=x.dtype) * _uniform(gen, 0.0, 0.1)
    if _chance(gen, 0.2 if strong else 0.1):
        x = gaussian_blur(x, _uniform(gen, 0.1, 2.0))
    if _chance(gen, p):
        x = x * _uniform(gen, 0.75, 1.25)
    if _chance(gen, p * 0.5):
        x = x + _uniform(gen, -0.1, 0.1)
    if _chance(gen, p):
        mean = x.mean()
        x = (x - mean) * _uniform(gen, 0.75, 1.25) + mean
    if _chance(gen, p * 0.5):
        low, high = x.min(), x.max()
        span = (high - low).clamp_min(1e-6)
        x = ((x - low) / span).clamp(0, 1) ** _uniform(gen, 0.7, 1.5) * span + low
    return x


def volume_view(volume: torch.Tensor, size: tuple[int, int, int], gen: torch.Generator, strong: bool = True) -> torch.Tensor:
    """One augmented 3D view (1, D, H, W) of a (1, D', H', W') patch: crop, resize, flip, intensity."""
    _, depth, height, width = volume.shape
    scale = _uniform(gen, 0.8, 1.2)
    crop = [min(depth, size[0]), min(height, max(4, int(round(size[1] * scale)))), min(width, max(4, int(round(size[2] * scale))))]
    starts = [int(torch.randint(0, dim - c + 1, (), generator=gen)) for dim, c in zip((depth, height, width), crop)]
    view = volume[:, starts[0]:starts[0] + crop[0], starts[1]:starts[1] + crop[1], starts[2]:starts[2] + crop[2]]
    view = F.interpolate(view[None].float(), size=size, mode="trilinear", align_corners=False)[0]
    for axis in (1, 2, 3):
        if _chance(gen, 0.5):
            view = view.flip(axis)
    return intensity_augment(view, gen, strong)


def image_view(image: torch.Tensor, size: int, gen: torch.Generator, strong: bool = True) -> torch.Tensor:
    """One augmented 2D view (3, size, size) of a (1|3, H, W) image: RandomResizedCrop, flip, jitter, blur."""
    _, height, width = image.shape
    area = height * width
    crop_h, crop_w = height, width
    for _ in range(10):
        target = area * _uniform(gen, 0.14, 1.0)
        ratio = math.exp(_uniform(gen, math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            crop_h, crop_w = h, w
            break
    top = int(torch.randint(0, height - crop_h + 1, (), generator=gen))
    left = int(torch.randint(0, width - crop_w + 1, (), generator=gen))
    view = image[:, top:top + crop_h, left:left + crop_w].float()
    view = F.interpolate(view[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    if _chance(gen, 0.5):
        view = view.flip(2)
    if _chance(gen, 0.8):
        view = view * _uniform(gen, 0.6, 1.4)
        mean = view.mean()
        view = (view - mean) * _uniform(gen, 0.6, 1.4) + mean
    if _chance(gen, 1.0 if strong else 0.5):
        view = gaussian_blur(view, _uniform(gen, 0.1, 2.0))
    view = view.clamp(0, 1)
    return view.expand(3, -1, -1) if view.shape[0] == 1 else view
