"""Downstream heads: segmentation shapes and training, Dice+CE loss, classifier / linear probe."""

from __future__ import annotations

import pytest
import torch

from models.mit import MiT, MiTConfig
from models.segmentation import MiTClassifier, MiTSegmenter, SegmentationLoss


def make_backbone(seed: int = 0) -> MiT:
    torch.manual_seed(seed)
    return MiT(MiTConfig.cpu_small())


@pytest.mark.parametrize(
    "input_shape",
    [(2, 3, 64, 64), (1, 3, 50, 46), (1, 1, 16, 32, 32), (1, 1, 12, 30, 34)],
)
def test_segmenter_output_matches_the_input_spatial_shape(input_shape: tuple[int, ...]) -> None:
    model = MiTSegmenter(make_backbone(), num_classes=4)
    with torch.no_grad():
        logits = model(torch.randn(input_shape))
    assert logits.shape == (input_shape[0], 4, *input_shape[2:])


def test_segmenter_head_follows_the_2d_3d_naming_and_routing() -> None:
    model = MiTSegmenter(make_backbone(), num_classes=3)
    own = [name for name, _ in model.named_parameters() if not name.startswith("backbone.")]
    assert own and all("2D" in name or "3D" in name for name in own)
    model(torch.randn(1, 1, 16, 32, 32)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[n] is None for n in own if "2D" in n)
    assert all(grads[n] is not None for n in own if "3D" in n)
    assert grads["backbone.encoder_stages.0.blocks.0.attn.q.weight"] is not None


def test_segmentation_training_fits_a_single_sample() -> None:
    torch.manual_seed(0)
    model = MiTSegmenter(make_backbone(), num_classes=2)
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 8:20, 10:24] = 1.0
    target = (image[:, 0] > 0.5).long()
    loss_fn = SegmentationLoss(use_monai=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = loss_fn(model(image + 0.05 * torch.randn_like(image)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("include_background", [True, False])
def test_torch_dice_ce_matches_monai(include_background: bool) -> None:
    pytest.importorskip("monai")
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 7, 5)
    target = torch.randint(0, 4, (2, 1, 6, 7, 5))
    monai_loss = SegmentationLoss(include_background=include_background)
    torch_loss = SegmentationLoss(include_background=include_background, use_monai=False)
    assert monai_loss.uses_monai and not torch_loss.uses_monai
    torch.testing.assert_close(monai_loss(logits, target), torch_loss(logits, target))
    torch.testing.assert_close(monai_loss(logits, target[:, 0]), monai_loss(logits, target))


def test_segmentation_loss_prefers_the_correct_prediction() -> None:
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = 20.0 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    loss_fn = SegmentationLoss(use_monai=False)
    assert loss_fn(perfect, target) < 0.01
    assert loss_fn(torch.zeros_like(perfect), target) > 0.5


@pytest.mark.parametrize("input_shape", [(2, 3, 64, 64), (2, 1, 16, 32, 32)])
def test_linear_probe_trains_only_the_head(input_shape: tuple[int, ...]) -> None:
    model = MiTClassifier(make_backbone(), num_classes=2, linear_probe=True)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training and model.head.training
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.fc.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    logits = model(torch.randn(input_shape))
    assert logits.shape == (input_shape[0], 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    optimizer.step()
    assert all(torch.equal(backbone_before[k], v) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(head_before, model.head.fc.weight)


def test_fine_tuning_classifier_reaches_the_backbone_and_decoder_features_work() -> None:
    model = MiTClassifier(make_backbone(), num_classes=3)
    model(torch.randn(2, 1, 16, 32, 32)).sum().backward()
    assert model.backbone.encoder_stages[3].blocks[0].attn.q.weight.grad is not None
    assert model.head.fc.in_features == 64
    decoder_model = MiTClassifier(make_backbone(), num_classes=3, features="decoder")
    assert decoder_model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert decoder_model.head.fc.in_features == 16
