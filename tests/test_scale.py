"""Stacks that need not fit in memory: dask (local and distributed), zarr."""

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose

from napari_mixcoef import MODELS, fit_stack, residuals

from conftest import make_stack


@pytest.mark.parametrize('model', list(MODELS))
@pytest.mark.parametrize(
    'chunks',
    [(7, 24, 20), (40, 24, 20), (5, 10, 20), (3, 11, 7), (1, 24, 20)],
)
def test_dask_any_chunking_equals_numpy(model, chunks):
    stack, a, b, _ = make_stack(lead=(40,), noise=6.0)
    mask = np.ones(a.shape, bool)
    mask[:3, :5] = False
    expected = fit_stack(stack, a, b, model=model, mask=mask)
    fit = fit_stack(
        da.from_array(stack, chunks=chunks), a, b, model=model, mask=mask
    )
    for key in ('coef', 'stderr', 'x', 'x_stderr', 'r2', 'rmse'):
        assert_allclose(
            getattr(fit, key),
            getattr(expected, key),
            rtol=1e-9,
            atol=1e-12,
            err_msg=key,
        )


def test_dask_two_leading_dims_uint16_and_progress():
    stack, a, b, _ = make_stack(lead=(6, 5), noise=6.0)
    stack = np.clip(stack, 0, None).astype(np.uint16)
    expected = fit_stack(stack, a, b, model='offset')
    calls = []
    fit = fit_stack(
        da.from_array(stack, chunks=(2, 3, 12, 20)),
        a,
        b,
        model='offset',
        progress=lambda d, t: calls.append(d),
    )
    # float32 sums in another order: agree to 1e-4 of a standard error
    assert np.all(np.abs(fit.coef - expected.coef) <= 1e-4 * expected.stderr)
    assert_allclose(fit.r2, expected.r2, rtol=1e-7)
    assert calls[0] == 0 and calls[-1] == 30 and calls == sorted(calls)


def test_dask_residuals_stay_lazy_and_match():
    stack, a, b, _ = make_stack(lead=(12,), noise=4.0)
    lazy = da.from_array(stack, chunks=(5, 12, 20))
    fit = fit_stack(lazy, a, b, model='scaled')
    res = residuals(lazy, a, b, fit)
    assert isinstance(res, da.Array)
    assert res.dtype == np.float32 and res.chunks == lazy.chunks
    expected = np.asarray(
        residuals(stack, a, b, fit_stack(stack, a, b, model='scaled'))
    )
    assert_allclose(res[3:7].compute(), expected[3:7], rtol=1e-5, atol=1e-4)


def test_dask_nan_names_the_slice():
    stack, a, b, _ = make_stack(lead=(20,))
    stack[13, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r'slice \(13,\) contains NaN'):
        fit_stack(da.from_array(stack, chunks=(4, 24, 20)), a, b)


def test_distributed_cluster_runs_the_fit():
    import distributed

    stack, a, b, _ = make_stack(lead=(64,), noise=6.0)
    stack = stack.astype(np.float32)
    expected = fit_stack(stack, a, b, model='offset')
    lazy = da.from_array(stack, chunks=(8, 12, 20))
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=40,
        ) as cluster,
        distributed.Client(cluster) as client,
        distributed.get_task_stream(client) as stream,
    ):
        fit = fit_stack(lazy, a, b, model='offset')
    # float32 work, two paths (dask: per slice; in memory: the compiled
    # passes): equal to rounding, the offset (near 0) in its stderr's units
    assert_allclose(fit.x, expected.x, rtol=1e-6)
    off = np.abs(fit.coef - expected.coef) / expected.stderr
    assert off.max() <= 1e-4
    assert_allclose(fit.stderr, expected.stderr, rtol=1e-4)
    assert_allclose(fit.rmse, expected.rmse, rtol=1e-6)
    workers = {task['worker'] for task in stream.data}
    assert len(workers) == 2  # both worker processes took blocks
    assert len(stream.data) >= 8


def test_zarr_streams_with_bounded_memory(tmp_path):
    import tracemalloc

    import zarr

    rng = np.random.default_rng(0)
    a, b = rng.random((2, 128, 128)) * 400 + 300
    x = rng.uniform(0.4, 0.7, 600)[:, None, None]
    z = zarr.create_array(
        store=tmp_path / 'big.zarr',
        shape=(600, 128, 128),
        chunks=(10, 128, 128),
        dtype='u2',
    )
    for i in range(0, 600, 100):  # 19.7 MB written in slabs
        slab = x[i : i + 100] * a + (1 - x[i : i + 100]) * b
        z[i : i + 100] = rng.poisson(slab).astype('u2')
    zr = zarr.open_array(tmp_path / 'big.zarr', mode='r')
    fit_stack(zr[:10], a, b)  # warm-up imports
    tracemalloc.start()
    try:
        fit = fit_stack(zr, a, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6e6, f'peak {peak / 1e6:.1f} MB for a 19.7 MB stack'
    assert np.abs(fit.x - x[:, 0, 0]).max() < 0.01
