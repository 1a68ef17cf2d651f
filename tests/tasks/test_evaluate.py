"""The classification half of the downstream harness: metrics that can fail, and a classifier that learns."""

from __future__ import annotations

import pytest
import torch

from tasks.evaluate import evaluate_classifier, linear_probe, train_classifier


class TinyBackbone(torch.nn.Sequential):
    """Flatten + linear feature extractor with the ``out_dim`` the harness reads from MiT."""

    def __init__(self, in_features: int, out_dim: int = 8) -> None:
        super().__init__(torch.nn.Flatten(), torch.nn.Linear(in_features, out_dim))
        self.out_dim = out_dim


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 4x4 images told apart by their mean intensity."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.3 + (y.float() * 2 - 1)[:, None, None, None]
    return x, y


def test_evaluate_classifier_scores_perfect_and_inverted_models():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([0, 0, 1, 1])
    right = torch.nn.Linear(1, 2)
    with torch.no_grad():
        right.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        right.bias.copy_(torch.tensor([1.5, -1.5]))
    assert evaluate_classifier(right, (x, y), 2) == {"accuracy": 1.0, "auc": 1.0}
    assert evaluate_classifier(right, (x, 1 - y), 2) == {"accuracy": 0.0, "auc": 0.0}


def test_auc_is_undefined_when_the_test_split_has_one_class():
    model = torch.nn.Linear(1, 2)
    result = evaluate_classifier(model, (torch.zeros(3, 1), torch.zeros(3, dtype=torch.long)), 2)
    assert result["auc"] != result["auc"]  # NaN


def test_train_classifier_learns_and_returns_an_eval_model():
    train, test = separable(64, 0), separable(32, 1)
    before = evaluate_classifier(torch.nn.Sequential(TinyBackbone(16), torch.nn.Linear(8, 2)).eval(), test, 2)
    model = train_classifier(TinyBackbone(16), train, 2, epochs=20, lr=1e-2)
    assert not model.training
    after = evaluate_classifier(model, test, 2)
    assert after["accuracy"] >= 0.95 and after["auc"] > before["auc"] - 1e-9 and after["auc"] >= 0.99


def test_linear_probe_leaves_the_backbone_unchanged():
    backbone = TinyBackbone(16)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = linear_probe(backbone, separable(64, 0), separable(32, 1), 2, epochs=100)
    assert result["accuracy"] >= 0.9
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("labels", [["normal", "effusion"], {"normal": 0, "effusion": 1}])
def test_classification_classes_accepts_a_list_or_a_map(labels):
    from tasks.evaluate import classification_classes

    class Reader:
        attrs = {"labels": labels}

    assert classification_classes(Reader()) == {"normal": 0, "effusion": 1}
