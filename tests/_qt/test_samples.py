"""The samples open in a real viewer with the layers the contract names."""

import numpy as np


def test_three_states_sample_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample('napari-mixcoef', 'three_states')
    names = [layer.name for layer in viewer.layers]
    assert names == ['state 1', 'state 2', 'state 3', 'three states stack']
    stack = viewer.layers['three states stack']
    assert stack.data.dtype == np.uint16 and stack.data.shape[0] == 300
    truth = stack.metadata['truth_fractions']
    assert truth.shape == (300, 3)
    np.testing.assert_allclose(truth.sum(axis=1), 1.0)


def test_drifting_mixture_sample_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample('napari-mixcoef', 'drifting_mixture')
    names = [layer.name for layer in viewer.layers]
    assert names == ['reference 1', 'reference 2', 'drifting mixture stack']
    stack = viewer.layers['drifting mixture stack']
    assert stack.data.dtype == np.uint16 and stack.data.shape[0] == 200
    assert stack.metadata['truth_shift'].shape == (200, 2)
    assert stack.metadata['truth_x'].shape == (200,)
    assert np.abs(stack.metadata['truth_shift']).max() <= 3.0
