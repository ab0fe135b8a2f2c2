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
