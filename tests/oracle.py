"""Independent per-slice float64 least squares: the oracle of the fits."""

import numpy as np
import scipy.linalg


def lstsq_reference(stack, refs, model, mask=None):
    """Per-slice scipy.linalg.lstsq in float64 with textbook statistics.

    Returns the reported coefficients (all K fractions for a mix of three
    or more; x alone for two), their errors, the fractions and errors,
    R² and RMSE, computed independently of the package.
    """
    refs = np.stack(refs).astype(np.float64)
    k = len(refs)
    sel = np.ones(refs.shape[1:], bool) if mask is None else mask
    cols = refs[:, sel]  # (K, n)
    if model == 'mix':
        design = (cols[:-1] - cols[-1]).T
        lift = np.vstack([np.eye(k - 1), -np.ones((1, k - 1))])  # θ → x
        x0 = np.zeros(k)
        x0[-1] = 1.0
    else:
        design = cols.T
        if model == 'offset':
            design = np.column_stack([design, np.ones(len(design))])
    n, p = design.shape
    gram_inv = np.linalg.inv(design.T @ design)
    out = {key: [] for key in ('coef', 'stderr', 'fractions',
                               'fractions_stderr', 'r2', 'rmse')}  # fmt: skip
    lead = stack.shape[: stack.ndim - refs.ndim + 1]
    for y in stack.reshape((-1, *refs.shape[1:])).astype(np.float64):
        yv = y[sel]
        target = yv - cols[-1] if model == 'mix' else yv
        theta, *_ = scipy.linalg.lstsq(design, target)
        resid = target - design @ theta
        ssr = resid @ resid
        cov = ssr / (n - p) * gram_inv
        if model == 'mix':
            fr = x0 + lift @ theta
            fcov = lift @ cov @ lift.T
            coef, ccov = (fr[:1], fcov[:1, :1]) if k == 2 else (fr, fcov)
        else:
            coef, ccov = theta, cov
            a = theta[:k]
            s = a.sum()
            fr = a / s
            jac = np.zeros((k, p))
            jac[:, :k] = (np.eye(k) - fr[:, None]) / s
            fcov = jac @ cov @ jac.T
        out['coef'].append(coef)
        out['stderr'].append(np.sqrt(np.diag(ccov)))
        out['fractions'].append(fr)
        out['fractions_stderr'].append(np.sqrt(np.maximum(np.diag(fcov), 0)))
        out['r2'].append(1 - ssr / ((yv - yv.mean()) ** 2).sum())
        out['rmse'].append(np.sqrt(ssr / n))
    return {
        key: np.array(v).reshape(lead + np.shape(v[0]))
        for key, v in out.items()
    }


def assert_matches(fit, want, rtol):
    for key, value in want.items():
        got = getattr(fit, key)
        # coefficients and fractions near zero are judged in units of
        # their standard errors
        if key in ('coef', 'fractions'):
            err = want['stderr' if key == 'coef' else 'fractions_stderr']
            atol = rtol * err
        else:
            atol = 0
        bad = np.abs(got - value) > atol + rtol * np.abs(value)
        assert not bad.any(), (key, np.abs(got - value).max())


def lstsq_two(stack, a, b, model, mask=None):
    """:func:`lstsq_reference` of two references, with ``x`` and its error."""
    want = lstsq_reference(stack, [a, b], model, mask)
    want['x'] = want['fractions'][..., 0]
    want['x_stderr'] = want['fractions_stderr'][..., 0]
    del want['fractions'], want['fractions_stderr']
    return want
