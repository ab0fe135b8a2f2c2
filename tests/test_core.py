"""The engine against independent per-slice float64 least squares."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from napari_mixcoef import MODELS, fit_stack, residuals
from oracle import assert_matches, lstsq_two

from conftest import make_refs, make_stack

# float64 and 64-bit integers are fitted in float64; 16-bit integers and
# float32 in float32 (exact for their values), hence the two tolerances.
DTYPES = [
    (np.float64, 1e-8),
    (np.int64, 1e-8),
    (np.float32, 2e-5),
    (np.uint16, 2e-5),
]


@pytest.mark.parametrize('model', list(MODELS))
@pytest.mark.parametrize(('dtype', 'rtol'), DTYPES)
@pytest.mark.parametrize('use_mask', [False, True])
def test_matches_per_slice_lstsq(model, dtype, rtol, use_mask):
    stack, a, b, _ = make_stack(lead=(30,), noise=12.0)
    stack = np.clip(stack, 0, None).astype(dtype)
    mask = None
    if use_mask:
        mask = np.ones(a.shape, bool)
        mask[:5] = False
        mask[:, -3:] = False
        stack[:, 0, 0] = 60000 if dtype == np.uint16 else 1e6  # ignored
    fit = fit_stack(stack, a, b, model=model, mask=mask, stderr='ols')
    assert fit.model == model
    assert fit.names == MODELS[model]
    assert fit.n_pixels == (a.size if mask is None else mask.sum())
    expected = lstsq_two(stack, a, b, model, mask)
    assert_matches(fit, expected, rtol)


@pytest.mark.parametrize('model', list(MODELS))
def test_two_leading_dims(model):
    stack, a, b, _ = make_stack(lead=(6, 5), noise=8.0)
    fit = fit_stack(stack, a, b, model=model, stderr='ols')
    assert fit.x.shape == (6, 5)
    assert fit.coef.shape == (6, 5, len(MODELS[model]))
    assert_matches(fit, lstsq_two(stack, a, b, model), 1e-8)


def test_three_d_references_and_4d_stack():
    rng = np.random.default_rng(3)
    a = rng.random((4, 10, 12)) + 1
    b = rng.random((4, 10, 12)) + 1
    x = rng.uniform(0.4, 0.7, 7)
    stack = x[:, None, None, None] * a + (1 - x[:, None, None, None]) * b
    stack += rng.normal(0, 0.05, stack.shape)
    fit = fit_stack(stack, a, b, stderr='ols')
    assert fit.x.shape == (7,)
    assert_matches(fit, lstsq_two(stack, a, b, 'mix'), 1e-8)
    # the same stack seen with 2-D references has 7×4 slices
    fit2d = fit_stack(stack, a[0], b[0])
    assert fit2d.x.shape == (7, 4)
    assert_allclose(
        fit2d.x[:, 0],
        lstsq_two(stack[:, 0], a[0], b[0], 'mix')['x'],
        rtol=1e-8,
    )


def test_single_image_has_no_leading_dims():
    stack, a, b, x = make_stack(lead=(1,))
    fit = fit_stack(stack[0], a, b)
    assert fit.x.shape == ()
    assert_allclose(fit.x, fit_stack(stack, a, b).x[0], rtol=1e-12)


@pytest.mark.parametrize(
    'layout',
    [
        'big_endian',
        'fortran',
        'strided',
        'readonly',
        'memmap',
        'transposed_lead',
    ],
)
def test_any_memory_layout_gives_the_same_fit(layout, tmp_path):
    stack, a, b, _ = make_stack(lead=(12, 3), noise=5.0)
    stack = stack.astype(np.float32)
    expected = fit_stack(stack, a, b)
    if layout == 'big_endian':
        other = stack.astype('>f4')
    elif layout == 'fortran':
        other = np.asfortranarray(stack)
    elif layout == 'strided':
        wide = np.zeros((12, 3, 48, 40), np.float32)
        wide[:, :, ::2, ::2] = stack
        other = wide[:, :, ::2, ::2]
    elif layout == 'readonly':
        other = stack.copy()
        other.flags.writeable = False
    elif layout == 'memmap':
        path = tmp_path / 'stack.npy'
        np.save(path, stack)
        other = np.load(path, mmap_mode='r')
    else:
        other = np.ascontiguousarray(stack.transpose(1, 0, 2, 3))
        other = other.transpose(1, 0, 2, 3)
    fit = fit_stack(other, a, b)
    assert_allclose(fit.x, expected.x, rtol=1e-6)
    assert_allclose(fit.rmse, expected.rmse, rtol=1e-5)


def test_float16_and_uint8_inputs():
    stack, a, b, _ = make_stack(lead=(10,), noise=3.0)
    scaled = stack / 4
    for dtype in (np.float16, np.uint8):
        s = np.clip(scaled, 0, 255).astype(dtype)
        fit = fit_stack(s, a / 4, b / 4)
        expected = lstsq_two(s, a / 4, b / 4, 'mix')
        assert_allclose(fit.x, expected['x'], rtol=2e-5)
        assert_allclose(fit.rmse, expected['rmse'], rtol=2e-5)


def test_small_chunks_and_bands_agree_with_default():
    stack, a, b, _ = make_stack(lead=(9,), shape=(40, 30), noise=6.0)
    expected = fit_stack(stack, a, b, model='offset')
    # 1 kB per block: each slice (9.6 kB in float64) is split into bands
    for chunk_bytes in (1000, 20_000, 10**9):
        fit = fit_stack(stack, a, b, model='offset', chunk_bytes=chunk_bytes)
        assert_allclose(fit.coef, expected.coef, rtol=1e-10)
        assert_allclose(fit.r2, expected.r2, rtol=1e-10)
        assert_allclose(fit.rmse, expected.rmse, rtol=1e-10)


def test_zarr_and_dask_inputs_equal_numpy(tmp_path):
    import dask.array as da
    import zarr

    stack, a, b, _ = make_stack(lead=(20,), noise=6.0)
    stack = stack.astype(np.float32)
    expected = fit_stack(stack, a, b, model='scaled')
    z = zarr.create_array(
        store=tmp_path / 's.zarr',
        shape=stack.shape,
        chunks=(3, 24, 20),
        dtype='f4',
    )
    z[:] = stack
    zr = zarr.open_array(tmp_path / 's.zarr', mode='r')
    d = da.from_array(stack, chunks=(7, 12, 20))
    for other in (zr, d):
        fit = fit_stack(other, a, b, model='scaled')
        assert_allclose(fit.coef, expected.coef, rtol=1e-6)
        assert_allclose(fit.rmse, expected.rmse, rtol=1e-6)


def test_noise_free_stack_stays_accurate():
    """R² ≈ 1: the SSR shortcut would cancel; the guard recomputes it."""
    stack, a, b, x = make_stack(lead=(15,), noise=0.0)
    for dtype, atol in ((np.float64, 1e-9), (np.float32, 1e-3)):
        fit = fit_stack(stack.astype(dtype), a, b, model='offset')
        assert_allclose(fit.x, x, rtol=1e-5)
        assert np.all(fit.rmse >= 0)
        assert np.all(fit.rmse < atol)
        assert np.all(fit.r2 <= 1) and np.all(fit.r2 > 1 - 1e-9)
        expected = lstsq_two(stack.astype(dtype), a, b, 'offset')
        assert_allclose(fit.rmse, expected['rmse'], atol=atol)


def test_monte_carlo_matches_cramer_rao_and_covers():
    """x scatters at the Cramér–Rao bound and its 95 % intervals cover."""
    rng = np.random.default_rng(42)
    a, b = make_refs((32, 32), seed=5)
    sigma = 40.0
    n = 4000
    x = rng.uniform(0.4, 0.7, n)
    stack = x[:, None, None] * a + (1 - x[:, None, None]) * b
    stack = (stack + rng.normal(0, sigma, stack.shape)).astype(np.float32)
    fit = fit_stack(stack, a, b, stderr='ols')
    bound = sigma / np.linalg.norm(a - b)
    spread = np.std(fit.x - x)
    assert abs(spread / bound - 1) < 0.05
    assert abs(np.mean(fit.x_stderr) / bound - 1) < 0.05
    cover = np.mean(np.abs(fit.x - x) <= 1.96 * fit.x_stderr)
    assert 0.93 <= cover <= 0.97


def test_progress_reports_every_slice_in_order():
    stack, a, b, _ = make_stack(lead=(50,))
    calls = []
    fit_stack(
        stack,
        a,
        b,
        chunk_bytes=4 * a.nbytes,
        progress=lambda done, total: calls.append((done, total)),
    )
    done = [d for d, _ in calls]
    assert all(t == 50 for _, t in calls)
    assert done == sorted(done)
    assert done[0] == 0 and done[-1] == 50
    assert len(calls) > 5


def test_inputs_are_never_modified():
    stack, a, b, _ = make_stack(lead=(8,))
    mask = np.ones(a.shape, bool)
    mask[3] = False
    copies = [v.copy() for v in (stack, a, b, mask)]
    fit = fit_stack(stack, a, b, model='offset', mask=mask)
    np.asarray(residuals(stack, a, b, fit))
    for before, after in zip(copies, (stack, a, b, mask)):
        assert before.tobytes() == after.tobytes()


def test_no_full_size_copy_of_the_stack():
    import tracemalloc

    rng = np.random.default_rng(0)
    a, b = make_refs((128, 128))
    stack = rng.random((400, 128, 128), dtype=np.float32) * 100  # 26 MB
    counts = stack.astype(np.uint16)
    fit_stack(stack[:4], a, b)  # imports and first-call set-up
    tracemalloc.start()
    try:
        fit_stack(counts, a, b)
        fit_stack(stack, a, b, model='offset')
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8e6, f'peak extra memory {peak / 1e6:.1f} MB'


def test_to_csv(tmp_path):
    stack, a, b, _ = make_stack(lead=(4, 3))
    fit = fit_stack(stack, a, b, model='scaled')
    path = tmp_path / 'fit.csv'
    fit.to_csv(path)
    lines = path.read_text().splitlines()
    assert lines[0] == (
        'index_0,index_1,x,x_stderr,a,a_stderr,b,b_stderr,r2,rmse'
    )
    assert len(lines) == 13
    table = np.loadtxt(path, delimiter=',', skiprows=1)
    assert_allclose(table[:, 0], np.repeat(np.arange(4), 3))
    assert_allclose(table[:, 1], np.tile(np.arange(3), 4))
    assert_allclose(table[:, 2], fit.x.ravel(), rtol=1e-9)
    assert_allclose(table[:, 6], fit.coef[..., 1].ravel(), rtol=1e-9)
    assert_allclose(table[:, 9], fit.rmse.ravel(), rtol=1e-9)
    mix = fit_stack(stack, a, b)
    mix.to_csv(path)
    assert path.read_text().splitlines()[0] == (
        'index_0,index_1,x,x_stderr,r2,rmse'
    )


@pytest.mark.parametrize('model', list(MODELS))
def test_residuals_are_lazy_and_exact(model):
    stack, a, b, _ = make_stack(lead=(5, 4), noise=4.0)
    fit = fit_stack(stack, a, b, model=model)
    reads = []

    class Counting:
        shape, dtype, ndim = stack.shape, stack.dtype, stack.ndim

        def __getitem__(self, key):
            reads.append(key)
            return stack[key]

    res = residuals(Counting(), a, b, fit)
    assert res.shape == stack.shape and res.dtype == np.float32
    assert reads == []  # nothing computed until a slice is read
    one = np.asarray(res[2, 1])
    assert len(reads) == 1
    c = fit.coef[2, 1]
    if model == 'mix':
        model_img = c[0] * a + (1 - c[0]) * b
    else:
        model_img = c[0] * a + c[1] * b + (c[2] if model == 'offset' else 0)
    assert_allclose(one, stack[2, 1] - model_img, atol=1e-3)
    full = np.asarray(res)
    assert full.shape == stack.shape
    assert_allclose(full[2, 1], one)
    assert_allclose(res[1:3, :, 5:9, ::2], full[1:3, :, 5:9, ::2])
    assert_allclose(res[..., 3], full[..., 3])
    # the residual's RMS over the slice is the fit's rmse
    assert_allclose(
        np.sqrt(np.mean(full.astype(np.float64) ** 2, axis=(2, 3))),
        fit.rmse,
        rtol=1e-4,
    )


@pytest.mark.parametrize('stderr', ['ols', 'auto'])
def test_noise_free_slices_split_in_bands(stderr):
    """The SSR/HAC guard adds up a slice's bands when it recomputes."""
    stack, a, b, x = make_stack(lead=(9,), shape=(40, 30), noise=0.0)
    stack = stack.astype(np.float32)
    fit = fit_stack(stack, a, b, chunk_bytes=1000, stderr=stderr)
    whole = fit_stack(stack, a, b, stderr=stderr)
    assert_allclose(fit.x, x, rtol=1e-6)
    assert np.all(fit.rmse < 1e-3) and np.all(fit.x_stderr < 1e-6)
    # the residual is rounding noise: same size split or not
    assert_allclose(fit.rmse, whole.rmse, rtol=0.2)


def test_to_csv_writes_provenance_beside_it(tmp_path):
    import json

    import napari_mixcoef

    stack, a, b, _ = make_stack(lead=(6,))
    fit = fit_stack(stack, a, b, noise='poisson', gain=2.0, camera_offset=10.0)
    path = tmp_path / 'run.csv'
    outlier = np.zeros(6, bool)
    outlier[2] = True
    fit.to_csv(
        path,
        columns={'outlier': outlier},
        provenance={'stack': 'my stack', 'outliers': [2]},
    )
    header = path.read_text().splitlines()[0].split(',')
    assert header[-1] == 'outlier'
    table = np.loadtxt(path, delimiter=',', skiprows=1)
    assert_array_equal(table[:, -1], outlier)
    info = json.loads((tmp_path / 'run.json').read_text())
    assert info['napari_mixcoef_version'] == napari_mixcoef.__version__
    assert info['stack'] == 'my stack'
    assert info['outliers'] == [2]
    assert info['model'] == 'mix' and info['noise'] == 'poisson'
    assert info['detector'] == {
        'gain': 2.0,
        'camera_offset': 10.0,
        'read_noise': 0.0,
    }
    assert info['stderr_mode'] == 'auto'
    with pytest.raises(ValueError, match='one value per slice'):
        fit.to_csv(path, columns={'outlier': outlier[:3]})
