"""UniMiSS self-distillation: spec (g) invariants 1-5, 7, 9, 10 and a short learning check."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.mit import MiT, MiTConfig, dimension_specific_parameter_names
from models.unimiss import (
    DINOHead,
    DINOLoss,
    UniMiSSConfig,
    UniMiSSStudentTeacher,
    apply_schedule_values,
    cancel_last_layer_grads,
    clip_gradients,
    cosine_schedule,
    ema_update,
    param_groups,
    set_3d_trainable,
    slice_forward,
    unimiss_3d_loss,
)

OUT_DIM = UniMiSSConfig.cpu_small().out_dim


def make_pair(seed: int = 0, mit_config: MiTConfig | None = None) -> UniMiSSStudentTeacher:
    torch.manual_seed(seed)
    return UniMiSSStudentTeacher(MiT(mit_config or MiTConfig.cpu_small()), UniMiSSConfig.cpu_small())


def views_2d(batch: int = 2, size: int = 64) -> list[Tensor]:
    return [torch.randn(batch, 3, size, size) for _ in range(2)]


def views_3d(batch: int = 2) -> list[Tensor]:
    return [torch.randn(batch, 1, 16, 32, 32) for _ in range(2)]


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


# --------------------------------------------------------------------------- (g)1, (g)2 teacher
def test_teacher_starts_as_an_exact_frozen_copy() -> None:
    pair = make_pair()
    student_state, teacher_state = pair.student.state_dict(), pair.teacher.state_dict()
    assert student_state.keys() == teacher_state.keys()
    assert all(torch.equal(student_state[k], teacher_state[k]) for k in student_state)
    assert all(not p.requires_grad for p in pair.teacher.parameters())
    assert all(s is not t for s, t in zip(pair.student.parameters(), pair.teacher.parameters()))


def test_ema_after_an_optimizer_step_matches_the_formula() -> None:
    pair = make_pair()
    optimizer = torch.optim.AdamW(param_groups(pair.student, 0.04), lr=1e-3)
    loss = pair(views_2d(), epoch=1)
    loss.backward()
    optimizer.step()
    teacher_before = snapshot(pair.teacher)
    student_after = snapshot(pair.student)
    assert any(not torch.equal(teacher_before[k], student_after[k]) for k in student_after)

    momentum = 0.9
    ema_update(pair.teacher, pair.student, momentum)
    worst_error = max(
        float((param - (momentum * teacher_before[name] + (1 - momentum) * student_after[name])).abs().max())
        for name, param in pair.teacher.named_parameters()
    )
    assert worst_error <= 1e-6

    unchanged = snapshot(pair.teacher)
    ema_update(pair.teacher, pair.student, 1.0)
    assert all(torch.equal(unchanged[k], p) for k, p in pair.teacher.named_parameters())


# --------------------------------------------------------------------------- (g)3 schedules
def test_momentum_schedule_is_monotone_from_0996_to_exactly_one() -> None:
    schedule = UniMiSSConfig.official().momentum_schedule(iters_per_epoch=37)
    assert len(schedule) == 200 * 37
    assert schedule[0] == pytest.approx(0.996, abs=1e-12)
    assert schedule[-1] == 1.0
    assert np.all(np.diff(schedule) >= 0)


def test_cosine_schedule_with_warmup_and_edge_cases() -> None:
    schedule = cosine_schedule(1.0, 0.1, total_iters=20, warmup_iters=5, start_warmup=0.0)
    assert len(schedule) == 20 and schedule[0] == 0.0 and schedule[4] == 1.0
    assert schedule[5] == pytest.approx(1.0) and schedule[-1] == 0.1
    assert np.all(np.diff(schedule[5:]) <= 0)
    assert cosine_schedule(0.5, 0.7, total_iters=1).tolist() == [0.7]
    with pytest.raises(ValueError):
        cosine_schedule(0.5, 0.7, total_iters=3, warmup_iters=4)


def test_config_schedules_learning_rate_weight_decay_and_epochs() -> None:
    config = UniMiSSConfig.official()
    assert config.scaled_lr(192) == pytest.approx(6e-4)
    counts = [3 if config.is_2d_epoch(e) else 2 for e in range(config.epochs)]
    lr = config.lr_schedule(counts, global_batch=192)
    assert len(lr) == sum(counts)
    assert lr.max() == pytest.approx(6e-4) and lr[-1] == pytest.approx(config.min_lr)
    assert int(np.argmax(lr)) == sum(counts[: config.warmup_epochs]) - 1
    weight_decay = config.weight_decay_schedule(counts)
    assert weight_decay[0] == pytest.approx(0.04) and weight_decay[-1] == pytest.approx(0.4)
    assert [config.is_2d_epoch(e) for e in range(6)] == [True, True, False, False, True, True]
    assert (config.teacher_temp, config.student_temp, config.center_momentum) == (0.04, 0.1, 0.9)
    assert (config.freeze_last_layer, config.clip_grad, config.interval) == (1, 0.3, 2)
    assert config.out_dim == 65536 and UniMiSSConfig.cpu_small().out_dim == 512
    with pytest.raises(ValueError):
        config.lr_schedule([1, 2], global_batch=8)


# --------------------------------------------------------------------------- (g)4, (g)5 loss
def test_loss_with_identical_logits_is_the_cross_view_cross_entropy() -> None:
    torch.manual_seed(0)
    criterion = DINOLoss(OUT_DIM, n_epochs=10)
    logits = torch.randn(2 * 3, OUT_DIM)
    loss = criterion(logits, logits.clone(), epoch=0)

    view_1, view_2 = logits.chunk(2)
    teacher_1, teacher_2 = F.softmax(view_1 / 0.04, dim=-1), F.softmax(view_2 / 0.04, dim=-1)
    log_student_1, log_student_2 = F.log_softmax(view_1 / 0.1, dim=-1), F.log_softmax(view_2 / 0.1, dim=-1)
    term_1 = -(teacher_1 * log_student_2).sum(-1).mean()
    term_2 = -(teacher_2 * log_student_1).sum(-1).mean()
    torch.testing.assert_close(loss, (term_1 + term_2) / 2)
    assert loss >= 0
    assert DINOLoss.view_pairs(2) == [(0, 1), (1, 0)]


def test_centre_update_after_calls() -> None:
    torch.manual_seed(0)
    criterion = DINOLoss(OUT_DIM, n_epochs=10)
    first, second = torch.randn(8, OUT_DIM), torch.randn(8, OUT_DIM)
    criterion(torch.randn(8, OUT_DIM), first, epoch=0)
    torch.testing.assert_close(criterion.center, 0.1 * first.mean(0, keepdim=True))
    criterion(torch.randn(8, OUT_DIM), second, epoch=0)
    expected = 0.9 * 0.1 * first.mean(0, keepdim=True) + 0.1 * second.mean(0, keepdim=True)
    torch.testing.assert_close(criterion.center, expected)


def test_centre_uses_the_reduce_hook() -> None:
    seen: list[Tensor] = []

    def reduce_fn(local_mean: Tensor) -> Tensor:
        seen.append(local_mean)
        return torch.full_like(local_mean, 5.0)

    criterion = DINOLoss(4, n_epochs=1, reduce_fn=reduce_fn)
    criterion(torch.randn(4, 4), torch.randn(4, 4), epoch=0)
    assert len(seen) == 1 and torch.allclose(criterion.center, torch.full((1, 4), 0.5))


def test_teacher_temperature_warms_up_then_stays() -> None:
    criterion = DINOLoss(4, n_epochs=10, teacher_temp=0.04, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=3)
    assert [criterion.teacher_temp_at(e) for e in (0, 1, 2, 3, 9, 50)] == pytest.approx(
        [0.02, 0.03, 0.04, 0.04, 0.04, 0.04]
    )
    assert DINOLoss(4, n_epochs=10).teacher_temp_at(0) == 0.04


# --------------------------------------------------------------------------- (g)9 slice path
class _RecordingModel(nn.Module):
    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.input_shapes: list[tuple[int, ...]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.input_shapes.append(tuple(x.shape))
        return x.mean(dim=(1, 2, 3)).unsqueeze(1) * torch.arange(1, self.out_dim + 1, dtype=x.dtype)


def test_slice_path_feeds_b_times_d_three_channel_images_and_averages() -> None:
    model = _RecordingModel(out_dim=5)
    volume = torch.randn(2, 1, 4, 8, 8)
    output = slice_forward(model, volume)
    assert model.input_shapes == [(8, 3, 8, 8)]
    assert output.shape == (2, 5)
    expected = volume.mean(dim=(1, 3, 4)).mean(dim=1, keepdim=True) * torch.arange(1, 6)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(slice_forward(model, volume, chunk_size=3), output)


def test_slice_path_through_the_student_gives_batch_by_out_dim() -> None:
    pair = make_pair()
    with torch.no_grad():
        output = slice_forward(pair.student, torch.randn(2, 1, 4, 32, 32))
    assert output.shape == (2, OUT_DIM)


def test_3d_loss_is_the_sum_of_the_four_terms_with_sequential_centre_updates() -> None:
    torch.manual_seed(0)
    criterion = DINOLoss(OUT_DIM, n_epochs=10)
    criterion.center.normal_()
    reference = copy.deepcopy(criterion)
    s_vol, t_vol, s_sl, t_sl = (torch.randn(6, OUT_DIM) for _ in range(4))
    total, terms = unimiss_3d_loss(criterion, s_vol, t_vol, s_sl, t_sl, epoch=0)
    expected = [
        reference(s_vol, t_vol, 0), reference(s_sl, t_vol, 0), reference(s_sl, t_sl, 0), reference(s_vol, t_sl, 0)
    ]
    assert list(terms) == ["vol_vol", "sl_vol", "sl_sl", "vol_sl"]
    torch.testing.assert_close(torch.stack(list(terms.values())), torch.stack(expected))
    torch.testing.assert_close(total, sum(expected))
    torch.testing.assert_close(criterion.center, reference.center)


def test_3d_step_trains_both_paths() -> None:
    pair = make_pair()
    loss = pair(views_3d(), epoch=2)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad for name, p in pair.student.named_parameters()}
    assert grads["backbone.stem.conv3D.weight"].abs().sum() > 0
    assert grads["backbone.stem.conv2D.weight"].abs().sum() > 0
    assert all(p.grad is None for p in pair.teacher.parameters())


# --------------------------------------------------------------------------- (g)7 frozen 3D params
def test_3d_parameters_are_bit_identical_through_a_2d_epoch_step() -> None:
    pair = make_pair()
    optimizer = torch.optim.AdamW(param_groups(pair.student, 0.04), lr=1e-3)
    pair(views_3d(), epoch=2).backward()
    optimizer.step()

    assert set_3d_trainable(pair.student, False) > 0
    before = snapshot(pair.student)
    optimizer.zero_grad(set_to_none=False)
    loss = pair(views_2d(), epoch=4)
    loss.backward()
    clip_gradients(pair.student, 0.3)
    optimizer.step()
    names_3d = dimension_specific_parameter_names(pair.student, "3D")
    names_2d = dimension_specific_parameter_names(pair.student, "2D")
    assert names_3d and all(torch.equal(before[n], pair.student.get_parameter(n)) for n in names_3d)
    assert any(not torch.equal(before[n], pair.student.get_parameter(n)) for n in names_2d)

    set_3d_trainable(pair.student, True)
    assert all(pair.student.get_parameter(n).requires_grad for n in names_3d)


# --------------------------------------------------------------------------- (g)10 head
def test_head_gain_is_exactly_one_and_frozen() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, OUT_DIM, hidden_dim=128, bottleneck_dim=64)
    gain = head.last_layer.parametrizations.weight.original0
    assert gain.shape == (OUT_DIM, 1) and not gain.requires_grad and torch.all(gain == 1.0)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(OUT_DIM))
    assert head(torch.randn(5, 16)).shape == (5, OUT_DIM)
    assert DINOHead(16, 8, 32, 4, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_last_layer_is_frozen_in_epoch_zero_and_trains_afterwards() -> None:
    pair = make_pair()
    optimizer = torch.optim.AdamW(param_groups(pair.student, 0.04), lr=1e-3)
    head = pair.student.head
    gain = head.last_layer.parametrizations.weight.original0
    direction = head.last_layer.parametrizations.weight.original1
    direction_before = direction.detach().clone()
    mlp_before = head.mlp[0].weight.detach().clone()

    pair(views_2d(), epoch=0).backward()
    cancel_last_layer_grads(pair.student, epoch=0, freeze_last_layer=1)
    optimizer.step()
    assert torch.equal(direction, direction_before) and torch.all(gain == 1.0)
    assert not torch.equal(head.mlp[0].weight, mlp_before)

    optimizer.zero_grad()
    pair(views_2d(), epoch=1).backward()
    cancel_last_layer_grads(pair.student, epoch=1, freeze_last_layer=1)
    optimizer.step()
    assert not torch.equal(direction, direction_before) and torch.all(gain == 1.0)


# --------------------------------------------------------------------------- optimiser helpers
def test_clip_gradients_caps_each_parameter_norm() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    for param in model.parameters():
        param.grad = torch.full_like(param, 10.0)
    model[1].bias.grad = torch.full_like(model[1].bias, 0.1)
    norms = clip_gradients(model, clip=0.3)
    assert norms.shape == (4,)
    for param in model.parameters():
        assert param.grad.norm() <= 0.3 + 1e-5
    assert torch.equal(model[1].bias.grad, torch.full_like(model[1].bias, 0.1))


def test_param_groups_split_decay_and_skip_frozen() -> None:
    pair = make_pair()
    groups = param_groups(pair.student, weight_decay=0.04)
    decayed, not_decayed = ({id(p) for p in g["params"]} for g in groups)
    names = {id(p): n for n, p in pair.student.named_parameters()}
    assert not decayed & not_decayed
    trainable = {id(p) for p in pair.student.parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable
    assert id(pair.student.head.last_layer.parametrizations.weight.original0) not in trainable
    assert all(names[i].endswith(".bias") or pair.student.get_parameter(names[i]).ndim == 1 for i in not_decayed)
    assert any("norm" in names[i] for i in not_decayed)
    assert all(pair.student.get_parameter(names[i]).ndim > 1 for i in decayed)

    optimizer = torch.optim.AdamW(groups, lr=0.0)
    apply_schedule_values(optimizer, lr=5e-4, weight_decay=0.3)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]


# --------------------------------------------------------------------------- learning check
def _structured_batch(generator: torch.Generator, batch: int, size: int) -> Tensor:
    """Images of random oriented gratings plus a bright square: simple, learnable structure."""
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.rand(batch, 1, 1, generator=generator) * torch.pi
    frequency = 2 + 4 * torch.rand(batch, 1, 1, generator=generator)
    gratings = torch.sin(frequency * torch.pi * (xx * torch.cos(angle) + yy * torch.sin(angle)))
    images = gratings.unsqueeze(1).repeat(1, 3, 1, 1)
    corner = torch.randint(0, size // 2, (batch, 2), generator=generator)
    for i, (row, col) in enumerate(corner.tolist()):
        images[i, :, row : row + size // 4, col : col + size // 4] += 2.0
    return images


def _teacher_student_kl(pair: UniMiSSStudentTeacher, images: Tensor) -> float:
    """KL(P_t || P_s) on ``images`` with the current teacher, centre and temperatures."""
    with torch.no_grad():
        teacher_probs = F.softmax((pair.teacher(images) - pair.criterion.center) / 0.04, dim=-1)
        student_log_probs = F.log_softmax(pair.student(images) / 0.1, dim=-1)
        teacher_log_probs = torch.log(teacher_probs.clamp_min(1e-30))
        return float((teacher_probs * (teacher_log_probs - student_log_probs)).sum(-1).mean())


def _distill(pair: UniMiSSStudentTeacher, base: Tensor, generator: torch.Generator, momentum: float) -> list[float]:
    """30 UniMiSS 2D steps (spec clip 0.3, AdamW) on noisy copies of ``base``; returns the losses."""
    optimizer = torch.optim.AdamW(param_groups(pair.student, 0.04), lr=1e-3)
    losses = []
    for _ in range(30):
        views = [base + 0.1 * torch.randn(base.shape, generator=generator) for _ in range(2)]
        loss = pair(views, epoch=1)
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(pair.student, 0.3)
        optimizer.step()
        pair.update_teacher(momentum)
        losses.append(loss.item())
    return losses


SMALL_2D = replace(MiTConfig.cpu_small(), img_size_2d=(32, 32))


def test_self_distillation_reduces_teacher_student_disagreement() -> None:
    """Real loop (moving centre, EMA teacher): the raw loss is not monotone in DINO - it rises
    as the centre flattens the targets - but the student's disagreement with the teacher
    (KL on held-out images) must fall."""
    generator = torch.Generator().manual_seed(0)
    pair = make_pair(mit_config=SMALL_2D)
    base, held_out = _structured_batch(generator, 4, 32), _structured_batch(generator, 4, 32)
    kl_before = _teacher_student_kl(pair, held_out)
    start = time.perf_counter()
    losses = _distill(pair, base, generator, momentum=0.996)
    assert time.perf_counter() - start < 10.0
    assert all(np.isfinite(losses))
    assert _teacher_student_kl(pair, held_out) < 0.5 * kl_before


def test_distillation_towards_a_fixed_teacher_lowers_the_loss() -> None:
    """With the teacher and centre held fixed (m = 1, centre momentum 1) the loss itself falls."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pair = UniMiSSStudentTeacher(MiT(SMALL_2D), replace(UniMiSSConfig.cpu_small(), center_momentum=1.0))
    start = time.perf_counter()
    losses = _distill(pair, _structured_batch(generator, 4, 32), generator, momentum=1.0)
    assert time.perf_counter() - start < 10.0
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
