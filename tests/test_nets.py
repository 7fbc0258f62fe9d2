"""BUTTER's shapes and width search: parameter counts, conformance and the reference network."""

from __future__ import annotations

import pytest
import torch

from butter_pipeline.nets import MLP, SHAPES, count_parameters, layout_for, residual_layers, widths_for


@pytest.mark.parametrize("width", [1, 3, 5, 10, 20, 75])
def test_rectangle_count_matches_butters_published_mnist_sizes(width):
    # Published num_free_parameters for mnist, depth-3 rectangles: w^2 + 796 w + 10 (784 in, 10 out).
    assert count_parameters(widths_for("rectangle", width, 3, 10), 784) == width**2 + 796 * width + 10


@pytest.mark.parametrize(
    ("size", "expected"), [(1024, 807), (2048, 2407), (4096, 4015), (8192, 8070), (16384, 16330), (65536, 65335)]
)
def test_width_search_finds_butters_mnist_layouts(size, expected):
    layout = layout_for("rectangle", size, 3, 784, 10)
    assert layout.num_parameters == expected


def test_non_conformant_size_is_flagged():
    layout = layout_for("rectangle", 1024, 3, 784, 10)  # 807 parameters: 21 % under, as in BUTTER's data
    assert not layout.conformant and layout.relative_size_error == pytest.approx(807 / 1024 - 1)
    assert layout_for("rectangle", 4096, 3, 784, 10).conformant


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("depth", [2, 3, 5])
def test_every_shape_reaches_large_targets_closely(shape, depth):
    layout = layout_for(shape, 2**16, depth, 20, 3)
    assert abs(layout.relative_size_error) < 0.02
    assert layout.widths[-1] == 3 and len(layout.widths) == depth
    assert layout.num_parameters == sum(p.numel() for p in MLP(layout).parameters())


def test_shape_formulas():
    assert widths_for("trapezoid", 10, 4, 1) == [10, 7, 4, 1]
    assert widths_for("exponential", 64, 4, 1) == [64, 16, 4, 1]
    assert widths_for("wide_first_4x", 64, 4, 2) == [64, 16, 16, 2]
    assert widths_for("wide_first_16x", 8, 4, 2) == [8, 1, 1, 2]
    assert widths_for("wide_first_2x", 8, 2, 2) == [8, 2]


def test_residual_layers_skip_first_and_output():
    assert residual_layers("rectangle", 6) == ()
    assert residual_layers("rectangle_residual", 2) == ()
    assert residual_layers("rectangle_residual", 5) == (1, 2, 3)


def test_residual_add_comes_after_the_activation():
    layout = layout_for("rectangle_residual", 60, 3, 2, 1)
    model = MLP(layout)
    model.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.randn(4, 2)
    h0 = torch.relu(model.layers[0](x))
    h1 = torch.relu(model.layers[1](h0)) + h0
    assert torch.allclose(model(x), model.layers[2](h1))


def test_glorot_uniform_init_and_zero_bias():
    layout = layout_for("rectangle", 2**14, 3, 100, 10)
    model = MLP(layout)
    model.reset_parameters(torch.Generator().manual_seed(1))
    first = model.layers[0]
    limit = (6.0 / (100 + first.weight.shape[0])) ** 0.5
    assert first.weight.abs().max() <= limit and first.weight.abs().max() > 0.9 * limit
    assert all((layer.bias == 0).all() for layer in model.layers)


def test_every_shape_depth_and_core_size_is_conformant_or_rejected_for_every_task():
    """BUTTER's grid (8 shapes, depths 2..20, sizes 2^5..2^24) on all 13 tasks' real input/output widths.

    Each layout is internally consistent, and only small targets can miss by more than 20 %: from 2^14
    parameters on, every shape at every depth lands within 20 % for every task.
    """
    from butter_pipeline.tasks import DATASETS, load_task

    rejected = 0
    for dataset in DATASETS:
        task = load_task(dataset)
        for shape in SHAPES:
            for depth in range(2, 21):
                for exponent in range(5, 25):
                    layout = layout_for(shape, 2**exponent, depth, task.n_in, task.n_out)
                    assert len(layout.widths) == depth and layout.widths[-1] == task.n_out
                    assert min(layout.widths) >= 1
                    assert layout.num_parameters == count_parameters(list(layout.widths), task.n_in)
                    assert layout.conformant == (abs(layout.relative_size_error) <= 0.2)
                    if not layout.conformant:
                        rejected += 1
                        assert exponent <= 13, (dataset, shape, depth, exponent, layout.widths)
    assert 0 < rejected < 13 * 8 * 19 * 20 // 5
