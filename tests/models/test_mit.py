"""MiT backbone: presets, shapes (spec (g)8), SPE switching (spec (g)6), naming, checkpoints."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
from torch import nn

from models.checkpoint_keys import from_official_unimiss, load_matching
from models.mit import (
    STEM_STRIDE_2D,
    STEM_STRIDE_3D,
    AffineInstanceNorm,
    MiT,
    MiTConfig,
    dimension_specific_parameter_names,
    pyramid_grids,
    resize_pos_embed,
)
from models.unimiss import UniMiSSConfig, UniMiSSStudentTeacher

DIMENSION_SPECIFIC_MODULES = (
    nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, AffineInstanceNorm,
)


def make_cpu_model(seed: int = 0) -> MiT:
    torch.manual_seed(seed)
    return MiT(MiTConfig.cpu_small())


def expected_feature_shapes(config: MiTConfig, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    batch, spatial = input_shape[0], input_shape[2:]
    stem_stride = STEM_STRIDE_2D if len(spatial) == 2 else STEM_STRIDE_3D
    grids = pyramid_grids(spatial, stem_stride, config.stem_kernel)
    shapes = {"stem": (batch, config.stem_channels, *grids[0])}
    for i, width in enumerate(config.embed_dims, start=1):
        shapes[f"enc{i}"] = (batch, width, *grids[i])
    for j, width in enumerate(config.decoder_dims, start=1):
        shapes[f"dec{j}"] = (batch, width, *grids[4 - j])
    shapes["enc_cls"] = (batch, config.embed_dims[-1])
    shapes["cls"] = (batch, config.out_dim)
    return shapes


# --------------------------------------------------------------------------- configuration
def test_presets_follow_the_spec() -> None:
    small, tiny, cpu = MiTConfig.official_small(), MiTConfig.official_tiny(), MiTConfig.cpu_small()
    assert small.embed_dims == (48, 128, 256, 512) and small.num_heads == (1, 2, 4, 8)
    assert small.depths == (2, 3, 4, 3) and small.decoder_depths == (3, 4, 3)
    assert small.sr_ratios == (6, 4, 2, 1) and small.decoder_sr_ratios == (2, 4, 6)
    assert small.decoder_dims == (256, 128, 48) and small.decoder_num_heads == (8, 4, 2)
    assert small.mlp_ratio == 4.0 and small.qkv_bias and small.layer_norm_eps == 1e-6
    assert (small.in_chans_2d, small.in_chans_3d, small.stem_channels, small.stem_kernel) == (3, 1, 32, 7)
    assert small.drop_path_rate == 0.0 and small.out_dim == 48
    assert tiny.depths == (1, 1, 1, 1) and tiny.decoder_depths == (1, 1, 1)
    assert cpu.embed_dims == (16, 32, 48, 64) and cpu.num_heads == (1, 1, 2, 2)
    assert cpu.depths == (1, 1, 1, 1) and cpu.decoder_depths == (1, 1, 1)
    assert cpu.sr_ratios == (4, 2, 1, 1) and cpu.decoder_sr_ratios == (1, 2, 4)
    assert cpu.img_size_2d == (64, 64) and cpu.out_dim == 16


def test_config_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MiTConfig(embed_dims=(48, 128, 256, 510))
    with pytest.raises(ValueError, match="4 entries"):
        MiTConfig(depths=(1, 1, 1))


# --------------------------------------------------------------------------- naming convention
def test_all_and_only_dimension_specific_parameters_are_named_2d_or_3d() -> None:
    model = make_cpu_model()
    dimension_specific: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, DIMENSION_SPECIFIC_MODULES):
            dimension_specific |= {f"{module_name}.{name}" for name, _ in module.named_parameters()}
    dimension_specific |= {
        name for name, _ in model.named_parameters() if name.endswith(("pos_embed2D", "pos_embed3D"))
    }
    named = {name for name, _ in model.named_parameters() if "2D" in name or "3D" in name}
    assert named == dimension_specific
    names_2d = set(dimension_specific_parameter_names(model, "2D"))
    names_3d = set(dimension_specific_parameter_names(model, "3D"))
    assert not names_2d & names_3d
    assert {name.replace("2D", "3D") for name in names_2d} == names_3d
    shared = {name for name, _ in model.named_parameters()} - named
    assert any(".attn.q." in name for name in shared) and any(".mlp.fc1." in name for name in shared)
    assert "encoder_stages.0.cls_token" in shared and "decoder_norm.weight" in shared


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("input_shape", [(2, 3, 64, 64), (2, 1, 16, 32, 32), (2, 1, 32, 32, 32)])
def test_cpu_small_feature_shapes(input_shape: tuple[int, ...]) -> None:
    model = make_cpu_model()
    features = model.forward_features(torch.randn(input_shape))
    assert {k: tuple(v.shape) for k, v in features.items()} == expected_feature_shapes(model.config, input_shape)
    assert model(torch.randn(input_shape)).shape == (input_shape[0], 16)
    assert torch.isfinite(features["cls"]).all()


def test_official_small_shapes_match_the_spec() -> None:
    torch.manual_seed(0)
    model = MiT(MiTConfig.official_small())
    with torch.no_grad():
        features_2d = model.forward_features(torch.randn(1, 3, 224, 224))
        features_3d = model.forward_features(torch.randn(1, 1, 16, 96, 96))
    grids_2d = [features_2d[k].shape[2:] for k in ("stem", "enc1", "enc2", "enc3", "enc4")]
    grids_3d = [features_3d[k].shape[2:] for k in ("stem", "enc1", "enc2", "enc3", "enc4")]
    assert [tuple(g) for g in grids_2d] == [(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]
    assert [tuple(g) for g in grids_3d] == [(16, 48, 48), (8, 24, 24), (4, 12, 12), (2, 6, 6), (1, 3, 3)]
    assert [features_3d[f"enc{i}"].shape[1] for i in range(1, 5)] == [48, 128, 256, 512]
    assert [features_2d[f"dec{j}"].shape[1] for j in range(1, 4)] == [256, 128, 48]
    assert features_2d["cls"].shape == (1, 48) and features_3d["cls"].shape == (1, 48)


@pytest.mark.parametrize("input_shape", [(1, 3, 96, 80), (1, 3, 16, 16), (1, 1, 12, 30, 34)])
def test_other_input_sizes_use_resized_position_embeddings(input_shape: tuple[int, ...]) -> None:
    model = make_cpu_model()
    with torch.no_grad():
        assert model(torch.randn(input_shape)).shape == (1, 16)


def test_resize_pos_embed_is_identity_on_the_reference_grid_and_keeps_cls() -> None:
    pos_embed = torch.randn(1, 1 + 2 * 4 * 4, 8)
    assert resize_pos_embed(pos_embed, (2, 4, 4), (2, 4, 4)) is pos_embed
    resized = resize_pos_embed(pos_embed, (2, 4, 4), (3, 5, 6))
    assert resized.shape == (1, 1 + 3 * 5 * 6, 8)
    assert torch.equal(resized[:, 0], pos_embed[:, 0])


def test_spatial_reduction_never_exceeds_the_grid() -> None:
    config = replace(MiTConfig.cpu_small(), sr_ratios=(8, 8, 4, 2), decoder_sr_ratios=(4, 8, 8))
    model = MiT(config)
    for module_name, module in model.named_modules():
        if module_name.endswith(("sr2D", "sr3D")):
            stage = model.get_submodule(module_name.split(".blocks.")[0])
            grid = stage.grid_2d if module_name.endswith("sr2D") else stage.grid_3d
            assert all(k <= n for k, n in zip(module.kernel_size, grid)), (module_name, module.kernel_size, grid)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 16)
        assert model(torch.randn(2, 1, 8, 16, 16)).shape == (2, 16)


def test_inputs_of_wrong_rank_or_channels_are_rejected() -> None:
    model = make_cpu_model()
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 1, 64, 64))


# --------------------------------------------------------------------------- switchable patch embedding
def _gradients_after_backward(model: MiT, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    return {name: param.grad for name, param in model.named_parameters()}


def _has_signal(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


def test_spe_switching_routes_gradients_by_input_rank() -> None:
    model = make_cpu_model()
    grads_2d = _gradients_after_backward(model, torch.randn(2, 3, 64, 64))
    grads_3d = _gradients_after_backward(model, torch.randn(2, 1, 16, 32, 32))

    for name in dimension_specific_parameter_names(model, "3D"):
        assert not _has_signal(grads_2d[name]), f"2D input reached {name}"
    for name in dimension_specific_parameter_names(model, "2D"):
        assert not _has_signal(grads_3d[name]), f"3D input reached {name}"
    assert _has_signal(grads_2d["stem.conv2D.weight"]) and _has_signal(grads_3d["stem.conv3D.weight"])
    assert _has_signal(grads_2d["encoder_stages.0.pos_embed2D"])
    assert _has_signal(grads_3d["encoder_stages.0.pos_embed3D"])

    shared = [
        "encoder_stages.0.blocks.0.attn.q.weight",
        "encoder_stages.3.blocks.0.mlp.fc2.weight",
        "decoder_stages.2.blocks.0.attn.kv.weight",
        "encoder_stages.0.cls_token",
        "decoder_norm.weight",
    ]
    for name in shared:
        assert _has_signal(grads_2d[name]) and _has_signal(grads_3d[name]), name


# --------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_gives_identical_outputs() -> None:
    model = make_cpu_model(seed=1)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = make_cpu_model(seed=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x_2d, x_3d = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x_2d), restored(x_2d))
        assert torch.equal(model(x_3d), restored(x_3d))


def test_official_layout_is_mapped_back_onto_the_backbone() -> None:
    source = make_cpu_model(seed=3)
    student = {f"module.backbone.transformer.{k}": v for k, v in source.state_dict().items()}
    student["module.head.last_layer.weight_g"] = torch.ones(512, 1)
    student["module.head.mlp.0.weight"] = torch.zeros(128, 16)
    checkpoint = {"student": student, "teacher": {}, "epoch": 3}

    mapped = from_official_unimiss(checkpoint)
    assert not any(key.startswith("head.") for key in mapped)
    target = make_cpu_model(seed=4)
    report = load_matching(target, mapped)
    assert not report.missing and not report.unexpected and not report.shape_mismatch
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_pvt_style_names_are_renamed_and_unknown_keys_reported() -> None:
    tensor = torch.zeros(1)
    mapped = from_official_unimiss(
        {
            "module.backbone.transformer.block1.0.attn.q.weight": tensor,
            "module.backbone.transformer.pos_embed3D2": tensor,
            "module.backbone.transformer.patch_embed2D4.proj.weight": tensor,
            "module.backbone.transformer.patch_embed3D1.norm.bias": tensor,
            "module.backbone.transformer.cls_token": tensor,
            "module.backbone.transformer.norm.weight": tensor,
            "module.backbone.transformer.some_unknown.weight": tensor,
            "module.head.last_layer.weight_v": tensor,
        }
    )
    assert set(mapped) == {
        "encoder_stages.0.blocks.0.attn.q.weight",
        "encoder_stages.1.pos_embed3D",
        "encoder_stages.3.patch_embed.conv2D.weight",
        "encoder_stages.0.patch_embed.norm3D.bias",
        "encoder_stages.0.cls_token",
        "decoder_norm.weight",
        "some_unknown.weight",
    }
    report = load_matching(make_cpu_model(), mapped)
    assert report.unexpected == ["some_unknown.weight"]
    assert "encoder_stages.0.cls_token" in report.shape_mismatch


def test_own_student_teacher_checkpoint_maps_to_the_student_backbone() -> None:
    torch.manual_seed(5)
    pair = UniMiSSStudentTeacher(MiT(MiTConfig.cpu_small()), UniMiSSConfig.cpu_small())
    with torch.no_grad():
        pair.teacher.backbone.decoder_norm.weight.add_(1.0)
    mapped = from_official_unimiss(pair.state_dict())
    backbone_state = pair.student.backbone.state_dict()
    assert set(mapped) == set(backbone_state)
    assert all(torch.equal(mapped[k], v) for k, v in backbone_state.items())
