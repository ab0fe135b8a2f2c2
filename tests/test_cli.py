"""The command line, end to end on real files."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr
from numpy.testing import assert_allclose

from napari_mixcoef import fit_stack, residuals
from napari_mixcoef.cli import main

from conftest import make_stack


@pytest.fixture
def files(tmp_path):
    stack, a, b, x = make_stack(lead=(25,), noise=8.0)
    stack = np.clip(stack, 0, None).astype(np.uint16)
    np.save(tmp_path / 'stack.npy', stack)
    tifffile.imwrite(tmp_path / 'stack.tif', stack)
    tifffile.imwrite(
        tmp_path / 'stack_zlib.tif', stack, compression='zlib', tile=(16, 16)
    )
    z = zarr.create_array(
        store=tmp_path / 'stack.zarr',
        shape=stack.shape,
        chunks=(4, 24, 20),
        dtype=stack.dtype,
    )
    z[:] = stack
    np.save(tmp_path / 'a.npy', a)
    tifffile.imwrite(tmp_path / 'b.tif', b.astype(np.float32))
    mask = np.ones(a.shape, np.uint8)
    mask[:4] = 0
    np.save(tmp_path / 'mask.npy', mask)
    return tmp_path, stack, a, b.astype(np.float32), mask


def read_csv(path):
    names = path.read_text().splitlines()[0].split(',')
    table = np.loadtxt(path, delimiter=',', skiprows=1, ndmin=2)
    return {name: table[:, i] for i, name in enumerate(names)}


@pytest.mark.parametrize(
    'name', ['stack.npy', 'stack.tif', 'stack_zlib.tif', 'stack.zarr']
)
def test_fit_each_format(files, name):
    path, stack, a, b, _ = files
    out = path / 'fit.csv'
    code = main(
        [
            'fit',
            str(path / name),
            '--ref1',
            str(path / 'a.npy'),
            '--ref2',
            str(path / 'b.tif'),
            '--model',
            'offset',
            '--csv',
            str(out),
        ]
    )
    assert code == 0
    expected = fit_stack(stack, a, b, model='offset')
    table = read_csv(out)
    assert list(table)[:3] == ['index_0', 'x', 'x_stderr']
    assert_allclose(table['index_0'], np.arange(25))
    # float32 work: a stack read lazily (compressed TIFF, zarr) is fitted
    # slice by slice, one in memory by the compiled passes; they round
    # differently (~1e-7), far below any statistical difference
    assert_allclose(table['x'], expected.x, rtol=1e-6)
    off = np.abs(table['c'] - expected.coef[:, 2]) / expected.stderr[:, 2]
    assert off.max() <= 1e-4
    assert_allclose(table['r2'], expected.r2, rtol=1e-6)


@pytest.mark.parametrize('suffix', ['.npy', '.tif', '.zarr'])
def test_residual_output(files, suffix):
    path, stack, a, b, mask = files
    out = path / f'res{suffix}'
    code = main(
        [
            'fit',
            str(path / 'stack.npy'),
            '--ref1',
            str(path / 'a.npy'),
            '--ref2',
            str(path / 'b.tif'),
            '--mask',
            str(path / 'mask.npy'),
            '--csv',
            str(path / 'f.csv'),
            '--residual',
            str(out),
        ]
    )
    assert code == 0
    fit = fit_stack(stack, a, b, mask=mask)
    assert_allclose(read_csv(path / 'f.csv')['x'], fit.x, rtol=1e-8)
    expected = np.asarray(residuals(stack, a, b, fit))
    if suffix == '.npy':
        got = np.load(out)
    elif suffix == '.tif':
        got = tifffile.imread(out)
    else:
        got = zarr.open_array(out, mode='r')[:]
    assert got.dtype == np.float32 and got.shape == stack.shape
    assert_allclose(got, expected)


@pytest.mark.parametrize(
    ('args', 'message'),
    [
        (['--ref1', 'missing.npy'], 'does not exist'),
        (['--ref1', 'a.txt'], 'unsupported file type'),
        (['--ref2', 'a.npy'], 'collinear'),
        (['--mask', 'small.npy'], 'mask has shape'),
        (['--ref1', 'nan.npy'], 'NaN'),
    ],
)
def test_bad_input_exit_code_2_one_line(files, capsys, args, message):
    path = files[0]
    np.save(path / 'small.npy', np.ones((3, 3)))
    a = np.load(path / 'a.npy')
    a[1, 1] = np.nan
    np.save(path / 'nan.npy', a)
    (path / 'a.txt').write_text('1 2 3')
    argv = {'--ref1': 'a.npy', '--ref2': 'b.tif'}
    extra = []
    for key, value in zip(args[::2], args[1::2]):
        if key in argv:
            argv[key] = value
        else:
            extra += [key, str(path / value)]
    cmd = ['fit', str(path / 'stack.npy'), '--csv', str(path / 'o.csv')]
    for key, value in argv.items():
        cmd += [key, str(path / value)]
    code = main(cmd + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count('\n') == 1 and 'Traceback' not in err
    assert not (path / 'o.csv').exists()


def test_console_script_end_to_end(files):
    path = files[0]
    exe = shutil.which('napari-mixcoef') or shutil.which(
        'napari-mixcoef',
        path=str(__import__('pathlib').Path(sys.executable).parent),
    )
    assert exe, 'console script napari-mixcoef is not installed'
    ok = subprocess.run(
        [
            exe,
            'fit',
            str(path / 'stack.zarr'),
            '--ref1',
            str(path / 'a.npy'),
            '--ref2',
            str(path / 'b.tif'),
            '--csv',
            str(path / 'cli.csv'),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(read_csv(path / 'cli.csv')['x']) == 25
    bad = subprocess.run(
        [
            exe,
            'fit',
            str(path / 'nope.npy'),
            '--ref1',
            str(path / 'a.npy'),
            '--ref2',
            str(path / 'b.tif'),
            '--csv',
            str(path / 'x.csv'),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count('\n') == 0
    assert 'nope.npy' in bad.stderr


def make_batch(path, n=3):
    stacks = []
    for i in range(n):
        stack, a, b, _ = make_stack(lead=(10 + i,), noise=5.0, seed=0)
        stack = np.clip(stack + i, 0, None).astype(np.uint16)
        np.save(path / f'run{i}.npy', stack)
        stacks.append(stack)
    np.save(path / 'ref_a.npy', a)
    np.save(path / 'ref_b.npy', b)
    return stacks, a, b


def test_batch_glob_one_csv_with_file_column(tmp_path, capsys):
    stacks, a, b = make_batch(tmp_path)
    # (a NaN pixel is left out, not a failure: the wrong shape is one)
    np.save(tmp_path / 'run9.npy', stacks[0][:, :-1])
    (tmp_path / 'run8.npy').write_bytes(b'not an npy file')
    out = tmp_path / 'all.csv'
    code = main(
        [
            'fit',
            str(tmp_path / 'run*.npy'),
            '--ref1',
            str(tmp_path / 'ref_a.npy'),
            '--ref2',
            str(tmp_path / 'ref_b.npy'),
            '--csv',
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1  # some failed
    assert 'run9.npy' in err and 'shape' in err
    assert 'run8.npy' in err
    lines = out.read_text().splitlines()
    assert lines[0].startswith('file,index_0,x,x_stderr')
    assert len(lines) == 1 + 10 + 11 + 12
    files = [line.split(',')[0] for line in lines[1:]]
    assert files[0].endswith('run0.npy') and files[-1].endswith('run2.npy')
    x = np.array([float(line.split(',')[2]) for line in lines[1:]])
    expected = np.concatenate([fit_stack(s, a, b).x for s in stacks])
    assert_allclose(x, expected, rtol=1e-8)


def test_batch_all_bad_exits_2_and_residual_needs_one_stack(tmp_path, capsys):
    make_batch(tmp_path, n=2)
    common = [
        '--ref1',
        str(tmp_path / 'ref_a.npy'),
        '--ref2',
        str(tmp_path / 'ref_a.npy'),
        '--csv',
        str(tmp_path / 'o.csv'),
    ]
    assert main(['fit', str(tmp_path / 'run*.npy'), *common]) == 2
    assert 'collinear' in capsys.readouterr().err
    assert main(['fit', str(tmp_path / 'nothing*.npy'), *common]) == 2
    assert 'no file matches' in capsys.readouterr().err
    code = main(
        [
            'fit',
            str(tmp_path / 'run0.npy'),
            str(tmp_path / 'run1.npy'),
            '--ref1',
            str(tmp_path / 'ref_a.npy'),
            '--ref2',
            str(tmp_path / 'ref_b.npy'),
            '--csv',
            str(tmp_path / 'o.csv'),
            '--residual',
            str(tmp_path / 'r.npy'),
        ]
    )
    assert code == 2
    assert 'single stack' in capsys.readouterr().err


def test_batch_on_a_distributed_scheduler(tmp_path):
    import distributed

    stacks, a, b = make_batch(tmp_path, n=2)
    tifffile.imwrite(tmp_path / 'run5.tif', stacks[1], compression='zlib')
    out = tmp_path / 'dist.csv'
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=40,
    ) as cluster:
        code = main(
            [
                'fit',
                str(tmp_path / 'run*'),
                '--ref1',
                str(tmp_path / 'ref_a.npy'),
                '--ref2',
                str(tmp_path / 'ref_b.npy'),
                '--model',
                'offset',
                '--csv',
                str(out),
                '--scheduler',
                cluster.scheduler_address,
            ]
        )
    assert code == 0
    table = out.read_text().splitlines()
    assert len(table) == 1 + 10 + 11 + 11
    x = np.array([float(line.split(',')[2]) for line in table[1:]])
    expected = np.concatenate(
        [
            fit_stack(s, a, b, model='offset').x
            for s in (stacks[0], stacks[1], stacks[1])
        ]
    )
    assert_allclose(x, expected, rtol=1e-6)


def test_statistics_options(files, capsys):
    path, stack, a, b, _ = files
    out = path / 'p.csv'
    common = [
        'fit',
        str(path / 'stack.npy'),
        '--ref1',
        str(path / 'a.npy'),
        '--ref2',
        str(path / 'b.tif'),
        '--csv',
        str(out),
    ]
    code = main(
        common
        + [
            '--noise',
            'poisson',
            '--gain',
            '2',
            '--camera-offset',
            '10',
            '--read-noise',
            '1.5',
            '--stderr',
            'ols',
        ]
    )
    assert code == 0
    expected = fit_stack(
        stack,
        a,
        b,
        noise='poisson',
        gain=2.0,
        camera_offset=10.0,
        read_noise=1.5,
        stderr='ols',
    )
    table = read_csv(out)
    assert_allclose(table['x'], expected.x, rtol=1e-8)
    assert_allclose(table['x_stderr'], expected.x_stderr, rtol=1e-8)
    assert main(common + ['--noise', 'poisson', '--gain', '-1']) == 2
    assert 'gain must be a positive' in capsys.readouterr().err


def fit_args(path, stack='stack.npy', **options):
    args = [
        'fit',
        str(path / stack),
        '--ref1',
        str(path / 'a.npy'),
        '--ref2',
        str(path / 'b.tif'),
    ]
    for key, value in options.items():
        args += [f'--{key}', str(value)]
    return args


@pytest.mark.parametrize(
    ('option', 'value', 'message'),
    [
        ('residual', 'res.png', 'cannot write .png'),
        ('residual', 'nowhere/res.npy', 'does not exist'),
        ('csv', 'nowhere/fit.csv', 'does not exist'),
        ('csv', 'fit.txt', 'ending in .csv'),
    ],
)
def test_outputs_are_checked_before_anything_is_read(
    files, capsys, option, value, message
):
    # the stack does not exist: the output's problem is found first, as
    # it would be before hours of reading a big one
    path = files[0]
    options = {'csv': path / 'ok.csv', option: path / value}
    code = main(fit_args(path, stack='missing.npy', **options))
    err = capsys.readouterr().err
    assert code == 2
    assert f'--{option}' in err and message in err
    assert 'missing.npy' not in err
    assert err.count('\n') == 1


def test_success_says_what_was_done_in_one_line(files, capsys):
    path = files[0]
    code = main(
        fit_args(path, csv=path / 'fit.csv', residual=path / 'res.npy')
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.count('\n') == 1
    table = read_csv(path / 'fit.csv')
    median = f'median x = {np.median(table["x"]):.4f}'
    assert f'fitted 25 slices of {path / "stack.npy"}' in out
    assert median in out
    assert str(path / 'fit.csv') in out and str(path / 'fit.json') in out
    assert str(path / 'res.npy') in out


def test_the_csv_says_what_it_is(files):
    import json

    path, *_ = files
    main(fit_args(path, csv=path / 'fit.csv', mask=path / 'mask.npy'))
    info = json.loads((path / 'fit.json').read_text())
    assert info['stack'] == str(path / 'stack.npy')
    assert info['references'] == [str(path / 'a.npy'), str(path / 'b.tif')]
    assert info['mask'] == str(path / 'mask.npy')
    assert info['model'] == 'mix' and info['noise'] == 'gaussian'


def test_every_option_has_help():
    import argparse

    from napari_mixcoef.cli import _parser

    parser = _parser()
    commands = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, (name, action.dest)


def test_a_glob_csv_is_the_single_csv_with_a_file_column(tmp_path):
    make_batch(tmp_path)
    refs = [
        '--ref1',
        str(tmp_path / 'ref_a.npy'),
        '--ref2',
        str(tmp_path / 'ref_b.npy'),
    ]
    one = tmp_path / 'one.csv'
    main(['fit', str(tmp_path / 'run1.npy'), *refs, '--csv', str(one)])
    every = tmp_path / 'all.csv'
    main(['fit', str(tmp_path / 'run*.npy'), *refs, '--csv', str(every)])
    single = one.read_text().splitlines()
    batch = every.read_text().splitlines()
    assert batch[0] == 'file,' + single[0]
    mine = [
        line for line in batch[1:] if line.startswith(str(tmp_path / 'run1'))
    ]
    assert mine == [f'{tmp_path / "run1.npy"},{line}' for line in single[1:]]


def test_a_nan_reference_is_explained_in_the_clis_words(files, capsys):
    path, *_ = files
    a = np.load(path / 'a.npy').astype(np.float32)
    a[2, 2] = np.nan
    np.save(path / 'nan_a.npy', a)
    args = fit_args(path, csv=path / 'o.csv')
    args[args.index('--ref1') + 1] = str(path / 'nan_a.npy')
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert 'NaN' in err and '--mask' in err
    assert 'mask=' not in err and 'nan_to_num' not in err


def test_nan_pixels_of_the_stack_are_left_out_and_counted(files, capsys):
    path, stack, a, b, _ = files
    bad = stack.astype(np.float32)
    bad[3, 2, 2] = np.nan
    bad[7, 0, :3] = np.nan
    np.save(path / 'holes.npy', bad)
    code = main(fit_args(path, stack='holes.npy', csv=path / 'o.csv'))
    out = capsys.readouterr().out
    assert code == 0
    assert '4 pixels in 2 slices left out (NaN or inf)' in out
    expected = fit_stack(bad, a, b, nan_policy='omit')
    assert_allclose(read_csv(path / 'o.csv')['x'], expected.x, rtol=1e-6)


@pytest.fixture
def three_files(tmp_path):
    from napari_mixcoef.sample_data import make_three_states

    stack, refs, _ = make_three_states(n_slices=30, shape=(32, 32))
    np.save(tmp_path / 'stack.npy', stack)
    for name, ref in zip('abc', refs):
        np.save(tmp_path / f'{name}.npy', ref)
    return tmp_path, stack, refs


def _three_refs(path):
    return [x for n in 'abc' for x in ('--ref', str(path / f'{n}.npy'))]


def test_ref_three_times_and_the_constraint(three_files, capsys):
    path, stack, refs = three_files
    out = path / 'fit.csv'
    code = main(
        ['fit', str(path / 'stack.npy'), *_three_refs(path)]
        + ['--constraint', 'nonneg', '--csv', str(out)]
    )
    line = capsys.readouterr().out
    assert code == 0
    expected = fit_stack(stack, *refs, constraint='nonneg')
    n = int(expected.at_bound.sum())
    assert n > 0
    assert f'with 3 references, nonneg ({n} at a bound)' in line
    assert 'median shares = ' in line
    table = read_csv(out)
    assert list(table) == [
        'index_0',
        'x1',
        'x1_stderr',
        'x2',
        'x2_stderr',
        'x3',
        'x3_stderr',
        'r2',
        'rmse',
        'at_bound',
    ]
    assert_allclose(table['x3'], expected.fractions[:, 2], rtol=1e-6)
    assert table['at_bound'].sum() == n
    import json

    info = json.loads((path / 'fit.json').read_text())
    assert info['references'] == [str(path / f'{n}.npy') for n in 'abc']
    assert info['constraint'] == 'nonneg'
    # unconstrained, with the residual of three references
    res = path / 'res.npy'
    code = main(
        ['fit', str(path / 'stack.npy'), *_three_refs(path)]
        + ['--csv', str(out), '--residual', str(res)]
    )
    assert code == 0
    fit = fit_stack(stack, *refs)
    # float32 residuals: the CLI writes blocks of slices, whose model
    # numpy sums in another SIMD order than one slice's (a few ulp)
    ulp = np.finfo(np.float32).eps * float(np.abs(stack).max())
    assert_allclose(
        np.load(res)[4], np.asarray(fit.residuals(stack)[4]), atol=8 * ulp
    )
    assert 'with 3 references, median shares' in capsys.readouterr().out


@pytest.mark.parametrize(
    ('args', 'message'),
    [
        (['--ref', 'a.npy', '--ref1', 'b.npy'], 'not both'),
        (['--ref1', 'a.npy'], '--ref2 is missing'),
        ([], 'no references'),
        (['--ref', 'a.npy'], 'mix'),
        (['--ref', 'a.npy', '--ref', 'b.npy', '--constraint', 'x'], None),
    ],
)
def test_bad_references_say_how_to_give_them(
    three_files, capsys, args, message
):
    path = three_files[0]
    args = [a if not a.endswith('.npy') else str(path / a) for a in args]
    cmd = ['fit', str(path / 'stack.npy'), '--csv', str(path / 'o.csv')]
    if message is None:  # argparse refuses an unknown choice itself
        with pytest.raises(SystemExit) as info:
            main(cmd + args)
        assert info.value.code == 2
        assert 'nonneg' in capsys.readouterr().err
        return
    assert main(cmd + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1
    assert not (path / 'o.csv').exists()


def test_register_translation_writes_each_slices_shift(tmp_path, capsys):
    from napari_mixcoef.sample_data import make_drifting_mixture

    stack, a, b, _, truth_shift = make_drifting_mixture(
        n_slices=16, shape=(64, 64)
    )
    for name, array in (('stack', stack), ('a', a), ('b', b)):
        np.save(tmp_path / f'{name}.npy', array)
    code = main(
        ['fit', str(tmp_path / 'stack.npy')]
        + ['--ref1', str(tmp_path / 'a.npy')]
        + ['--ref2', str(tmp_path / 'b.npy')]
        + ['--register', 'translation', '--csv', str(tmp_path / 'o.csv')]
    )
    assert code == 0, capsys.readouterr().err
    assert 'registered (translation)' in capsys.readouterr().out
    table = read_csv(tmp_path / 'o.csv')
    shift = np.stack([table['shift_0'], table['shift_1']], axis=-1)
    # the CLI runs the library's fit: the same numbers, to the CSV's digits
    fit = fit_stack(stack, a, b, register='translation', nan_policy='omit')
    assert_allclose(shift, fit.shift, rtol=1e-6, atol=1e-9)
    assert_allclose(shift, truth_shift, atol=0.05)
    assert np.all(table['shift_0_stderr'] > 0)


def _demo(tmp_path, *args, path=None):
    import os
    from pathlib import Path

    exe = Path(sys.executable).parent / 'napari-mixcoef'
    env = {k: v for k, v in os.environ.items() if k != 'DISPLAY'}
    env.pop('WAYLAND_DISPLAY', None)
    if path is not None:
        env['PATH'] = path
    return subprocess.run(
        [str(exe), 'demo', *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )


def test_demo_screenshot_without_a_display_runs_on_a_virtual_one(tmp_path):
    from skimage.io import imread

    out = _demo(tmp_path, '--screenshot', str(tmp_path / 'demo.png'))
    assert out.returncode == 0, out.stderr
    image = imread(tmp_path / 'demo.png')
    assert image.shape[0] > 600 and image.shape[1] > 1000


def test_demo_without_a_display_or_xvfb_says_what_to_install(tmp_path):
    from pathlib import Path

    # only the environment's own commands: no Xvfb, no xvfb-run
    bare = _demo(
        tmp_path,
        '--screenshot',
        str(tmp_path / 'demo.png'),
        path=str(Path(sys.executable).parent),
    )
    assert bare.returncode == 2
    assert bare.stderr.count('\n') == 1
    assert 'install Xvfb' in bare.stderr
    assert 'Traceback' not in bare.stderr
    assert not (tmp_path / 'demo.png').exists()
    shown = _demo(tmp_path)  # no screenshot: nothing to show napari on
    assert shown.returncode == 2
    assert 'no display' in shown.stderr and '--screenshot' in shown.stderr
