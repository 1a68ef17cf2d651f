"""UniMiSS self-distillation: DINO head, student/teacher, losses, schedules, training helpers.

Implements spec ``unimiss.md`` sections (c) and (d) on top of :class:`models.mit.MiT`:

* :class:`DINOHead` - MLP in->2048->2048->256 (GELU), L2 normalisation, weight-normalised
  Linear 256->out_dim without bias whose weight-norm gain is fixed to 1 (not trainable).
* :class:`BackboneWithHead`, :func:`build_student`, :func:`build_teacher`,
  :class:`UniMiSSStudentTeacher` - the student is backbone + head; the teacher is an exact
  deep copy with ``requires_grad=False``, updated only by :func:`ema_update`.
* :class:`DINOLoss` - cross-entropy between centred/sharpened teacher softmax and student
  log-softmax over the two global views, same-view pairs skipped; the centre is updated after
  every call (all-reduced across workers when distributed).
* :func:`slice_forward` and :func:`unimiss_3d_loss` - the cross-dimension consistency of 3D
  batches: L(vol,vol) + L(sl,vol) + L(sl,sl) + L(vol,sl).
* Training helpers: :func:`cosine_schedule`, :func:`set_3d_trainable`,
  :func:`cancel_last_layer_grads`, :func:`clip_gradients`, :func:`param_groups`,
  :func:`apply_schedule_values` and :class:`UniMiSSConfig` with the spec's hyper-parameters.

Deviations (and why):

* :func:`cosine_schedule` is indexed by true iterations and its cosine part uses ``n - 1`` as
  denominator, so the last value is exactly ``final`` (DINO's ``n`` never reaches it; spec
  (g)3 requires the momentum to reach 1.0). The official code also built schedules with the
  3D dataset length as "iterations per epoch" (spec (d) code quirk); :class:`UniMiSSConfig`
  takes the true per-epoch iteration counts instead.
* :func:`ema_update` uses ``lerp`` (``xi + (1-m)(theta - xi)``), mathematically the same as
  ``m xi + (1-m) theta`` but exact when student and teacher agree (the frozen gains stay 1)
  and when ``m = 1``. Only parameters are averaged, as in DINO (the backbone has no buffers).
* :func:`clip_gradients` scales with ``min(1, clip / (norm + 1e-6))`` computed on device, the
  same result as DINO's per-parameter clipping without a host sync per parameter.
* :func:`set_3d_trainable` also drops stale ``.grad`` tensors of the frozen parameters so that
  no optimiser can move them in a 2D epoch (spec (g)7), whatever ``zero_grad`` mode is used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from models.mit import MiT

ReduceFn = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class UniMiSSConfig:
    """Pre-training hyper-parameters of spec (c)/(d); ``official()`` and ``cpu_small()`` presets.

    Learning rate: ``base_lr * global_batch / 256`` (official 8e-4 x 192/256 = 6e-4), linear
    warm-up over ``warmup_epochs``, cosine to ``min_lr``. Weight decay cosine 0.04 -> 0.4.
    Teacher momentum cosine 0.996 -> 1.0. Epochs alternate in blocks of ``interval``: 2D
    first, then 3D (:meth:`is_2d_epoch`).
    """

    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    norm_last_layer: bool = True
    n_global_views: int = 2
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    final_momentum_teacher: float = 1.0
    base_lr: float = 8e-4
    lr_reference_batch: int = 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    epochs: int = 200
    interval: int = 2
    freeze_last_layer: int = 1
    clip_grad: float = 0.3
    batch_size_per_gpu: int = 24
    use_fp16: bool = False

    @classmethod
    def official(cls) -> UniMiSSConfig:
        """Official pre-training run (24 per GPU x 8 GPUs, out_dim 65536)."""
        return cls()

    @classmethod
    def cpu_small(cls) -> UniMiSSConfig:
        """Spec "Small CPU config": head 128/64/512, batch 4; schedules as official."""
        return cls(out_dim=512, head_hidden_dim=128, head_bottleneck_dim=64, batch_size_per_gpu=4)

    def scaled_lr(self, global_batch: int) -> float:
        """Peak learning rate, linearly scaled by ``global_batch / 256``."""
        return self.base_lr * global_batch / self.lr_reference_batch

    def is_2d_epoch(self, epoch: int) -> bool:
        """True for the 2D epochs: blocks of ``interval`` epochs, 2D block first."""
        return (epoch // self.interval) % 2 == 0

    def _iteration_counts(self, iters_per_epoch: int | Sequence[int]) -> tuple[int, int]:
        if isinstance(iters_per_epoch, int):
            counts = [iters_per_epoch] * self.epochs
        else:
            counts = list(iters_per_epoch)
            if len(counts) != self.epochs:
                raise ValueError(f"need {self.epochs} per-epoch iteration counts, got {len(counts)}")
        return sum(counts), sum(counts[: self.warmup_epochs])

    def lr_schedule(self, iters_per_epoch: int | Sequence[int], global_batch: int) -> np.ndarray:
        """Per-iteration learning rate; ``iters_per_epoch`` may list each epoch's true length."""
        total, warmup = self._iteration_counts(iters_per_epoch)
        return cosine_schedule(self.scaled_lr(global_batch), self.min_lr, total, warmup_iters=warmup)

    def weight_decay_schedule(self, iters_per_epoch: int | Sequence[int]) -> np.ndarray:
        total, _ = self._iteration_counts(iters_per_epoch)
        return cosine_schedule(self.weight_decay, self.weight_decay_end, total)

    def momentum_schedule(self, iters_per_epoch: int | Sequence[int]) -> np.ndarray:
        total, _ = self._iteration_counts(iters_per_epoch)
        return cosine_schedule(self.momentum_teacher, self.final_momentum_teacher, total)


def cosine_schedule(
    base: float, final: float, total_iters: int, warmup_iters: int = 0, start_warmup: float = 0.0
) -> np.ndarray:
    """Per-iteration values: linear warm-up ``start_warmup -> base``, then cosine ``base -> final``.

    The result has ``total_iters`` entries; the last one is exactly ``final`` and the cosine
    part is monotone (non-decreasing when ``final >= base``).
    """
    if total_iters <= 0 or not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"need 0 <= warmup_iters ({warmup_iters}) <= total_iters ({total_iters}), total > 0")
    warmup = np.linspace(start_warmup, base, warmup_iters)
    n_cosine = total_iters - warmup_iters
    if n_cosine == 0:
        return warmup.astype(np.float64)
    if n_cosine == 1:
        cosine = np.array([final], dtype=np.float64)
    else:
        steps = np.arange(n_cosine)
        cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * steps / (n_cosine - 1)))
        cosine[-1] = final
    return np.concatenate([warmup, cosine])


# --------------------------------------------------------------------------- head and wrappers
class DINOHead(nn.Module):
    """DINO projection head (spec (b)): MLP, L2-normalise, weight-normalised last Linear.

    The last layer's weight-norm gain (``last_layer.parametrizations.weight.original0``) is
    initialised to 1 and, with ``norm_last_layer=True`` (the official setting), frozen, so the
    last layer's rows are unit vectors.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("DINOHead needs at least one MLP layer")
        if n_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(n_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last_layer.weight, std=0.02)
        self.last_layer = weight_norm(last_layer)
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class BackboneWithHead(nn.Module):
    """``head(backbone(x))`` with DINO's attribute names (``backbone.``, ``head.``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def build_student(backbone: MiT, config: UniMiSSConfig) -> BackboneWithHead:
    """Backbone + a DINO head sized by ``config`` (input width = the backbone's cls width)."""
    head = DINOHead(
        backbone.out_dim,
        config.out_dim,
        hidden_dim=config.head_hidden_dim,
        bottleneck_dim=config.head_bottleneck_dim,
        norm_last_layer=config.norm_last_layer,
    )
    return BackboneWithHead(backbone, head)


def build_teacher(student: nn.Module) -> nn.Module:
    """Exact deep copy of the student with every parameter frozen (spec (g)1)."""
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def ema_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The teacher's and the student's parameters, matched by name (raises if the names differ)."""
    teacher_named = list(teacher.named_parameters())
    student_named = list(student.named_parameters())
    if [n for n, _ in teacher_named] != [n for n, _ in student_named]:
        raise ValueError("ema_update: teacher and student parameter names differ")
    return [p for _, p in teacher_named], [p for _, p in student_named]


@torch.no_grad()
def ema_step(teacher_params: list[nn.Parameter], student_params: list[nn.Parameter], momentum: float) -> None:
    """Teacher <- m * teacher + (1 - m) * student over matched parameter lists (spec (c))."""
    torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1.0 - momentum)


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Teacher <- m * teacher + (1 - m) * student for every parameter (spec (c))."""
    ema_step(*ema_pairs(teacher, student), momentum)


# --------------------------------------------------------------------------- loss
class DINOLoss(nn.Module):
    """Self-distillation cross-entropy with centring and sharpening (spec (c)).

    ``forward(student_output, teacher_output, epoch)`` takes the views concatenated along the
    batch (``n_views`` equal chunks, view-major as ``torch.cat(views)``), averages
    ``H(t_a, s_b) = mean_batch sum_k -P_t(a)_k log P_s(b)_k`` over all pairs ``a != b`` and then
    updates the centre ``c <- m c + (1 - m) mean_batch(t)``. The batch mean is averaged across
    workers with ``reduce_fn`` when given, else with ``all_reduce`` when ``torch.distributed``
    is initialised. ``reduce_fn`` maps the local mean to the global mean.
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        n_epochs: int,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        n_views: int = 2,
        reduce_fn: ReduceFn | None = None,
    ) -> None:
        super().__init__()
        if n_views < 2:
            raise ValueError("DINOLoss needs at least two views")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.n_views = n_views
        self.reduce_fn = reduce_fn
        self.register_buffer("center", torch.zeros(1, out_dim))
        warmup_epochs = min(warmup_teacher_temp_epochs, n_epochs)
        self.teacher_temp_schedule = np.concatenate(
            [
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                np.full(max(n_epochs - warmup_epochs, 1), teacher_temp),
            ]
        )

    @staticmethod
    def view_pairs(n_views: int) -> list[tuple[int, int]]:
        """(teacher view, student view) pairs that enter the loss: all pairs of distinct views."""
        return [(t, s) for t in range(n_views) for s in range(n_views) if t != s]

    def teacher_temp_at(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        if student_output.shape != teacher_output.shape or student_output.shape[0] % self.n_views:
            raise ValueError(
                f"DINOLoss: student {tuple(student_output.shape)} and teacher {tuple(teacher_output.shape)} "
                f"must match and split into {self.n_views} views"
            )
        student_log_probs = F.log_softmax(student_output / self.student_temp, dim=-1).chunk(self.n_views)
        teacher_temp = self.teacher_temp_at(epoch)
        teacher_probs = F.softmax((teacher_output.detach() - self.center) / teacher_temp, dim=-1).chunk(self.n_views)
        pairs = self.view_pairs(self.n_views)
        total = student_output.new_zeros(())
        for teacher_view, student_view in pairs:
            cross_entropy = torch.sum(-teacher_probs[teacher_view] * student_log_probs[student_view], dim=-1)
            total = total + cross_entropy.mean()
        self.update_center(teacher_output)
        return total / len(pairs)

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        batch_center = teacher_output.detach().mean(dim=0, keepdim=True)
        if self.reduce_fn is not None:
            batch_center = self.reduce_fn(batch_center)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center = batch_center / torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def slice_forward(model: nn.Module, volume: Tensor, in_chans_2d: int = 3, chunk_size: int | None = None) -> Tensor:
    """Run every depth slice of ``volume`` (B, 1, D, H, W) through the 2D path; average over D.

    The slices form a batch of ``B*D`` images with the single channel repeated to
    ``in_chans_2d``; the model's outputs (logits, before any softmax) are averaged over the
    ``D`` slices of each volume, giving ``(B, out)`` (spec (c), 3D batch). ``chunk_size``
    bounds how many slices go through the model at once.
    """
    if volume.dim() != 5 or volume.shape[1] != 1:
        raise ValueError(f"slice_forward expects (B, 1, D, H, W), got {tuple(volume.shape)}")
    batch, _, depth, height, width = volume.shape
    slices = volume.transpose(1, 2).reshape(batch * depth, 1, height, width).repeat(1, in_chans_2d, 1, 1)
    if chunk_size is None or chunk_size >= slices.shape[0]:
        outputs = model(slices)
    else:
        outputs = torch.cat([model(chunk) for chunk in slices.split(chunk_size)])
    return outputs.reshape(batch, depth, -1).mean(dim=1)


def unimiss_3d_loss(
    criterion: DINOLoss,
    student_volume: Tensor,
    teacher_volume: Tensor,
    student_slices: Tensor,
    teacher_slices: Tensor,
    epoch: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Spec (c) 3D loss: L(vol,vol) + L(sl,vol) + L(sl,sl) + L(vol,sl), unweighted.

    Each argument holds both views concatenated (``(2B, out)``); ``L(a, b)`` is
    ``criterion(student_a, teacher_b)``. Four criterion calls, in that order, so the centre
    is updated four times, as every loss call updates it. Returns the sum and the terms.
    """
    terms = {
        "vol_vol": criterion(student_volume, teacher_volume, epoch),
        "sl_vol": criterion(student_slices, teacher_volume, epoch),
        "sl_sl": criterion(student_slices, teacher_slices, epoch),
        "vol_sl": criterion(student_volume, teacher_slices, epoch),
    }
    total = terms["vol_vol"] + terms["sl_vol"] + terms["sl_sl"] + terms["vol_sl"]
    return total, terms


class UniMiSSStudentTeacher(nn.Module):
    """Student (backbone + DINO head), EMA teacher and loss in one module.

    ``forward(views, epoch)`` dispatches on the views' rank: 2D views give ``L(s, t)``, 3D
    views give the four-term cross-dimension loss. ``state_dict()`` holds ``student.*``,
    ``teacher.*`` and the loss centre ``criterion.center``, i.e. what a checkpoint needs
    besides the optimiser (spec (d)6). Give only ``self.student`` to the optimiser.
    """

    def __init__(self, backbone: MiT, config: UniMiSSConfig | None = None, reduce_fn: ReduceFn | None = None) -> None:
        super().__init__()
        self.config = config = config or UniMiSSConfig()
        self.student = build_student(backbone, config)
        self.teacher = build_teacher(self.student)
        self._ema_pairs: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None
        self.criterion = DINOLoss(
            config.out_dim,
            n_epochs=config.epochs,
            teacher_temp=config.teacher_temp,
            warmup_teacher_temp=config.warmup_teacher_temp,
            warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
            student_temp=config.student_temp,
            center_momentum=config.center_momentum,
            n_views=config.n_global_views,
            reduce_fn=reduce_fn,
        )

    def forward(self, views: Sequence[Tensor], epoch: int) -> Tensor:
        if len(views) != self.config.n_global_views:
            raise ValueError(f"expected {self.config.n_global_views} views, got {len(views)}")
        batch = torch.cat(list(views))
        if batch.dim() == 4:
            return self.loss_2d(batch, epoch)
        return self.loss_3d(batch, epoch)[0]

    def loss_2d(self, batch: Tensor, epoch: int) -> Tensor:
        """L(s, t) for view-major concatenated 2D views ``(n_views*B, 3, H, W)``."""
        with torch.no_grad():
            teacher_output = self.teacher(batch)
        return self.criterion(self.student(batch), teacher_output, epoch)

    def loss_3d(self, batch: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Four-term loss for view-major concatenated volumes ``(n_views*B, 1, D, H, W)``."""
        in_chans_2d = self.student.backbone.config.in_chans_2d
        with torch.no_grad():
            teacher_volume = self.teacher(batch)
            teacher_slices = slice_forward(self.teacher, batch, in_chans_2d)
        student_volume = self.student(batch)
        student_slices = slice_forward(self.student, batch, in_chans_2d)
        return unimiss_3d_loss(
            self.criterion, student_volume, teacher_volume, student_slices, teacher_slices, epoch
        )

    def update_teacher(self, momentum: float) -> None:
        """EMA step of the teacher; the parameter pairs are matched by name once, on first use
        (``.to()``, ``load_state_dict`` and DDP keep the same Parameter objects)."""
        if self._ema_pairs is None:
            self._ema_pairs = ema_pairs(self.teacher, self.student)
        ema_step(*self._ema_pairs, momentum)


# --------------------------------------------------------------------------- training helpers
def set_3d_trainable(model: nn.Module, trainable: bool) -> int:
    """Freeze (False) or unfreeze (True) every parameter whose name contains ``3D``.

    Used for the 2D epochs of spec (d)4. Freezing also clears the parameters' ``.grad`` so an
    optimiser step cannot move them. Returns the number of parameters touched.
    """
    touched = 0
    for name, param in model.named_parameters():
        if "3D" in name:
            param.requires_grad_(trainable)
            if not trainable:
                param.grad = None
            touched += 1
    return touched


def cancel_last_layer_grads(model: nn.Module, epoch: int, freeze_last_layer: int = 1) -> None:
    """Drop the gradients of the head's ``last_layer`` during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float = 0.3) -> Tensor:
    """DINO's per-parameter clipping: each gradient's L2 norm is scaled down to at most ``clip``.

    Returns the pre-clipping norms (one per parameter with a gradient). Done with the
    ``_foreach`` kernels: a Python loop launched four kernels per parameter, which on a GPU
    cost more than the model's own step for MiT-small.
    """
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads, 2))
    scales = torch.clamp(clip / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))
    return norms


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases / norm weights / other 1-D params without decay.

    Parameters that do not require gradients at call time (e.g. the frozen head gain) are
    left out, so build the groups while the 3D parameters are trainable. Each group carries
    ``apply_weight_decay`` for :func:`apply_schedule_values`.
    """
    decayed: list[nn.Parameter] = []
    not_decayed: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            not_decayed.append(param)
        else:
            decayed.append(param)
    return [
        {"params": decayed, "weight_decay": weight_decay, "apply_weight_decay": True},
        {"params": not_decayed, "weight_decay": 0.0, "apply_weight_decay": False},
    ]


def apply_schedule_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this iteration's learning rate on every group and weight decay on the decayed group(s)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", False):
            group["weight_decay"] = weight_decay
