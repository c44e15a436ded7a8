from __future__ import annotations

import pytest
import torch

from daskdl import models


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet18", "vgg11", "vgg16"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8)])
def test_models_take_their_shape_from_the_data(name, shape):
    model = models.build(name, shape, 7)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)


def test_resnet18_is_the_cifar_variant():
    model = models.build("resnet18", (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_vgg_has_batch_norm():
    model = models.build("vgg11", (3, 32, 32), 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_factories_work_with_and_without_arguments():
    assert isinstance(models.build(lambda: torch.nn.Linear(4, 2), (4,), 2), torch.nn.Linear)
    built = models.build(lambda shape, k: torch.nn.Linear(shape[0], k), (5,), 3)
    assert built.out_features == 3


def test_model_errors_say_what_to_do():
    with pytest.raises(ValueError, match="Unknown model 'resnet50'.*small_cnn"):
        models.build("resnet50", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="small_cnn needs images.*model='mlp'"):
        models.build("small_cnn", (64,), 10)
    with pytest.raises(TypeError, match="not a model instance"):
        models.build(torch.nn.Linear(2, 2), (2,), 2)
    with pytest.raises(TypeError, match="returned int"):
        models.build(lambda: 3, (2,), 2)
