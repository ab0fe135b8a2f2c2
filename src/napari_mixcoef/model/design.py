"""The design every slice shares, solved through an orthonormal basis.

A slice ``y`` centred on ``M`` (``y_c = y − M``) is regressed on the
model's design ``D`` (``n × k``).  Instead of the normal equations (whose
condition is the square of ``D``'s), the design is factored once,
``D = Q_k T`` with ``Q_k`` orthonormal (float64, from the references
only) and ``T`` upper triangular.  Per slice only ``g = Q_kᵀ y_c`` (one
dot product per basis vector) and ``Σ y_c²`` are summed, and

* the least-squares fit is ``z = g`` in the orthonormal coordinates
  and ``θ = T⁻¹ z`` (a triangular solve: LAPACK ``lstsq`` accuracy);
* ``SSR = Σy_c² − ‖g‖²`` (the columns of ``Q_k`` are orthonormal);
* the centred total needs only ``Σ y_c`` and ``u2ᵀ y_c`` with ``u2 = M −
  mean M``, two more sums that need no basis vector of their own.

Every estimator (weighted, robust, constrained) works in the coordinates
``z`` of the orthonormal basis, where the bread of the sandwich is the
identity for least squares; :meth:`Design.to_model` maps the result back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from .models import Model, make_model
from .references import (
    References,
    singular_cond,
    warn_if_ill_conditioned,
    working_dtype,
)

__all__ = ['Design', 'calibrated_terms', 'make_design']

#: A vector with less than this share of its norm outside the span of
#: those before it is linearly dependent on them in float64.
_DEPENDENT = 64 * float(np.finfo(np.float64).eps)

#: Robust errors of several coefficients sum the sandwich's meat over a
#: fixed random sample of about this many fitted pixels, where a slice has
#: more than twice as many: its sampling error (~3 %) moves a standard
#: error by ~1.5 %, and a pass over every pixel for k(k+1)/2 terms would
#: cost more than the rest of the fit.
MEAT_PIXELS = 4096
#: Pixels per chunk of that sample: whole chunks are drawn (runs long
#: enough for the compiled passes, many enough to spread over the image).
MEAT_CHUNK = 64


def meat_sample(
    fitted: NDArray[np.bool_] | None, n_ref: int, n_pixels: int, k: int
) -> tuple[NDArray[np.bool_] | None, float]:
    """Return the pixels the sandwich's meat is summed over, and weight.

    Parameters
    ----------
    fitted : (n_ref,) ndarray of bool or None
        Fitted pixels of the flattened image (None: all).
    n_ref, n_pixels, k : int
        Pixels of the image, fitted pixels, coefficients.

    Returns
    -------
    sample : (n_ref,) ndarray of bool or None
        Chunks of :data:`MEAT_CHUNK` pixels drawn with a fixed seed (the
        same sample in every fit of that image size), within the fitted
        pixels; None: every fitted pixel.
    scale : float
        ``n_pixels / sampled pixels``: the meat's weight.
    """
    if k < 2 or n_pixels < 2 * MEAT_PIXELS:
        return None, 1.0
    chunks = -(-n_ref // MEAT_CHUNK)
    count = min(chunks, -(-chunks * MEAT_PIXELS // n_pixels))
    rng = np.random.default_rng(20261203)
    pick = np.zeros(chunks, bool)
    pick[rng.choice(chunks, count, replace=False)] = True
    sample = np.repeat(pick, MEAT_CHUNK)[:n_ref]
    if fitted is not None:
        sample &= fitted
    count = int(sample.sum())
    if count == 0:  # the drawn chunks missed the mask: every pixel
        return None, 1.0
    return sample, n_pixels / count


def calibrated_terms(
    picked: NDArray[np.float64],
    total: NDArray[np.float64],
    scale: float,
    dtype,
) -> NDArray:
    """Weigh the sample's sandwich terms so that they sum to ``total``.

    Parameters
    ----------
    picked : (P, n_s) ndarray of float64
        The terms at the sample's pixels.
    total : (P,) ndarray of float64
        The terms' sums over every fitted pixel.
    scale : float
        Fitted pixels over sampled ones (:func:`meat_sample`).
    dtype : dtype
        Of the result (the working dtype).

    Returns
    -------
    (P, n_s) ndarray
        ``picked · w_p`` with ``w_p = s(1 + λᵀ T_p)``, ``λ`` such that the
        weighted sums equal ``total`` (a regression estimator, Deville and
        Särndal 1992): the sample's meat is exact in expectation for noise
        of even variance, whatever the references' pattern.
    """
    gram = scale * (picked @ picked.T)
    gap = total - scale * picked.sum(axis=1)
    lam = np.linalg.lstsq(gram, gap, rcond=None)[0]
    weights = scale * (1.0 + lam @ picked)
    return np.ascontiguousarray((picked * weights).astype(dtype))


@dataclass(frozen=True, eq=False)
class Design:
    """Everything about the references that every slice shares.

    Attributes
    ----------
    refs : References
        The checked references and mask.
    model : Model
        The model.
    dtype : dtype
        Working float type of the sums (float32 or float64).
    centre : (n_ref,) ndarray
        ``M``, the mean reference, in the working dtype (flat).
    mean : float
        Mean of ``M`` over the fitted pixels, rounded to the working dtype.
    spread : (n_ref,) ndarray
        ``u2 = M − mean`` in the working dtype, zero outside the mask.
    spread_norm2 : float
        ``‖u2‖²`` (of the rounded ``u2``).
    basis : (k, n_ref) ndarray
        Rows of ``Q_kᵀ`` in the working dtype, zero outside the mask: an
        orthonormal basis of the model's design.
    tri, tri_inv : (k, k) ndarray of float64
        ``T`` with ``D = Q_k T`` over the fitted pixels, and its inverse.
    meat, meat_scale : (n_ref,) ndarray of bool or None, and float
        The sample the robust errors' meat is summed over, and its weight
        (see :func:`meat_sample`).
    cond : float
        Condition number of the unit-normalised design (references, and
        the constant for the offset model).
    """

    refs: References
    model: Model
    dtype: np.dtype
    centre: NDArray
    mean: float
    spread: NDArray
    spread_norm2: float
    basis: NDArray
    tri: NDArray[np.float64]
    tri_inv: NDArray[np.float64]
    meat: NDArray[np.bool_] | None
    meat_scale: float
    cond: float

    @property
    def k(self) -> int:
        """Free parameters of the model (leading basis vectors)."""
        return self.model.k

    @property
    def n_pixels(self) -> int:
        """Fitted pixels per slice."""
        return self.refs.n_pixels

    @property
    def mask(self) -> NDArray[np.bool_] | None:
        """Fitted pixels, or None for all of them."""
        return self.refs.mask

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one reference image."""
        return self.refs.shape

    def centred_total(self, s: NDArray, h: NDArray, yy: NDArray) -> NDArray:
        """``Σ (y − mean y)²`` per slice from ``Σy_c``, ``u2ᵀy_c``, ``Σy_c²``.

        With ``y = y_c + M`` and ``u2 = M − mean M``: ``Σy_c² −
        (Σy_c)²/n + 2(u2ᵀy_c − Σy_c·Σu2/n) + ‖u2‖²`` (``Σu2`` is zero but
        for the rounding of ``u2``).
        """
        n = self.n_pixels
        return (
            yy - s * s / n + 2.0 * (h - s / n * self.spread_sum)
        ) + self.spread_norm2

    @property
    def spread_sum(self) -> float:
        """``Σ u2`` of the rounded ``u2`` (zero in exact arithmetic)."""
        cached = self.__dict__.get('_spread_sum')
        if cached is None:
            cached = float(self.spread.sum(dtype=np.float64))
            object.__setattr__(self, '_spread_sum', cached)
        return cached

    def to_model(
        self, z: NDArray, cov_z: NDArray | None = None
    ) -> tuple[NDArray, NDArray | None]:
        """Map basis coordinates (and covariance) to reported coefficients.

        Parameters
        ----------
        z : (n, k) ndarray
            Coordinates of each slice's fit in the first k basis vectors.
        cov_z : (n, k, k) ndarray, optional
            Their covariance.

        Returns
        -------
        coef : (n, m) ndarray
            ``β = β0 + E T⁻¹ z``.
        cov : (n, m, m) ndarray or None
            ``E T⁻¹ cov_z T⁻ᵀ Eᵀ``.
        """
        lift = self.model.expand @ self.tri_inv  # (m, k)
        coef = self.model.beta0 + z @ lift.T
        if cov_z is None:
            return coef, None
        return coef, lift @ cov_z @ lift.T


def _orthonormalised(rows: NDArray) -> tuple[NDArray, NDArray]:
    """Classical Gram–Schmidt, twice: ``rows = rᵀ q`` with ``q`` orthonormal.

    Parameters
    ----------
    rows : (m, n) ndarray of float64
        Vectors to orthonormalise, in order (overwritten: it becomes q).

    Returns
    -------
    q : (m, n) ndarray
        Orthonormal rows; a row whose vector lies in the span of those
        before it (less than ``_DEPENDENT`` of its norm outside) is zero.
    r : (m, m) ndarray
        Upper triangular, ``rows[j] = Σ_i r[i, j] q[i]``.

    Notes
    -----
    Twice is enough: the second pass makes ``q`` orthonormal to working
    precision for any vectors short of linear dependence, as Householder's
    QR does, at a few BLAS calls per vector.
    """
    m, n = rows.shape
    q = rows  # orthonormalised in place
    r = np.zeros((m, m))
    for j in range(m):
        v = q[j]
        size = float(np.sqrt(v @ v))
        for _ in range(2 if j else 0):
            c = q[:j] @ v
            v -= c @ q[:j]
            r[:j, j] += c
        norm = float(np.sqrt(v @ v))
        if norm > _DEPENDENT * size:
            v /= norm
            r[j, j] = norm
        else:
            v[:] = 0.0
    return q, r


def _cond(tri: NDArray) -> float:
    """Condition number of an upper triangular matrix (inf if singular)."""
    if tri.shape[0] == 0:
        return 1.0
    if not np.all(np.diag(tri) > 0):
        return math.inf
    return _cond_of(tri)


def _check_conditioning(
    refs: References,
    model: Model,
    r: NDArray,
    coords: NDArray,
    dtype,
    stacklevel: int,
) -> float:
    """Raise for a design singular in ``dtype``; warn when it is poor.

    ``r`` is the triangular factor of the unit-normalised references and
    the constant, ``coords`` the model's design in their orthonormal basis
    (see :func:`make_design`).  The references themselves must be linearly
    independent (a mix of collinear references is a change of brightness)
    wherever there are pixels enough for that; a mix of more references
    than pixels needs only their differences to be independent.
    """
    k = refs.k
    limit = singular_cond(dtype)
    linear = _cond(r[:k, :k])
    cond = linear
    if model.name == 'mix':
        norms = np.sqrt(np.einsum('ij,ij->j', coords, coords))
        with np.errstate(divide='ignore', invalid='ignore'):
            affine = _cond_of(coords / norms) if norms.all() else math.inf
        if refs.n_pixels < k:  # more references than pixels
            linear, cond = affine, affine
        linear = max(linear, affine)
    names = refs.names
    if linear >= limit:
        if k == 1:
            raise ValueError(
                f'{names[0]} is zero over the fitted pixels (collinear with '
                'nothing to fit); choose a reference with signal'
            )
        if k == 2:
            raise ValueError(
                f'{names[0]} and {names[1]} are collinear (one is a '
                'multiple of the other over the fitted pixels; condition '
                f'number {linear:.3g}), so their mix cannot be told apart '
                'from a change of brightness; choose two references that '
                'differ in pattern'
            )
        raise ValueError(
            'the references are collinear: one of them is a linear '
            'combination of the others over the fitted pixels (condition '
            f'number {linear:.3g}), so their fractions cannot be told apart; '
            'leave the redundant reference out (see '
            'reference_diagnostics()) or choose references that differ in '
            'pattern'
        )
    if model.name == 'offset':
        cond_offset = _cond(r)
        if cond_offset >= limit:
            listed = ', '.join(names)
            raise ValueError(
                f'{listed} and a constant offset are collinear (the '
                'references differ only by an offset and a scale; condition '
                f'number {cond_offset:.3g}); use model="scaled" or "mix", or '
                'choose references that differ in pattern'
            )
        cond = max(cond, cond_offset)
    warn_if_ill_conditioned(refs, cond, stacklevel + 1)
    return cond


def _cond_of(matrix: NDArray) -> float:
    """Condition number of any matrix (its singular values' ratio)."""
    s = np.linalg.svd(matrix, compute_uv=False)
    return math.inf if s.size == 0 or s[-1] <= 0 else float(s[0] / s[-1])


def _model_coordinates(model: Model, r: NDArray, scale: NDArray) -> NDArray:
    """Return the model's design columns in the references' QR basis.

    ``D = Q C``: ``(K+1, k)``, from ``r`` of the unit columns and their
    norms ``scale``.
    """
    k = model.n_references
    full = r * scale  # coordinates of the references and of 1
    if model.name == 'scaled':
        return full[:, :k]
    if model.name == 'offset':
        return full
    return full[:, : k - 1] - full[:, k - 1 : k]  # R_k − R_K


def make_design(
    refs: References,
    model_name: str,
    stack_dtype: np.dtype,
    *,
    stacklevel: int = 2,
) -> Design:
    """Check the model against the references and build the design.

    One orthonormalisation of the unit-normalised references and the
    constant, ``[R_1 … R_K, 1] = Q R``, serves every model and its checks:
    the model's design has coordinates ``C`` in ``Q`` (small), whose QR
    ``C = U S`` gives the orthonormal basis ``Q U`` of the design, with
    ``T = S``.

    Parameters
    ----------
    refs : References
        Checked references and mask.
    model_name : str
        ``"mix"``, ``"scaled"`` or ``"offset"``.
    stack_dtype : dtype
        The stack's dtype, which sets the working dtype.
    stacklevel : int
        For the CollinearityWarning: the caller's frame.

    Raises
    ------
    ValueError
        Unknown model, too few references or fitted pixels, collinear
        references.
    """
    model = make_model(model_name, refs.k)
    n = refs.n_pixels
    if n < model.k:
        where = 'the images have'
        if refs.mask is not None:
            where = 'the mask selects'
        raise ValueError(
            f'{where} {n} pixel(s), but the {model.name!r} model has '
            f'{model.k} coefficient(s) and needs at least {model.k} fitted '
            'pixels (more for standard errors); select more pixels in the '
            'mask'
        )
    dtype = working_dtype(stack_dtype)
    fitted = refs.fitted()
    norms = np.sqrt(np.einsum('ij,ij->i', fitted, fitted))
    scale = np.append(norms, math.sqrt(n))
    unit = np.empty((refs.k + 1, n))
    with np.errstate(divide='ignore', invalid='ignore'):
        np.divide(fitted, norms[:, None], out=unit[:-1])
    unit[:-1][norms == 0] = 0.0  # a zero reference: singular below
    unit[-1] = 1.0 / scale[-1]
    q, r = _orthonormalised(unit)
    kept = np.flatnonzero(np.diag(r) > 0)
    coords = _model_coordinates(model, r, scale)[kept]
    cond = _check_conditioning(
        refs, model, r, coords, dtype, stacklevel + 1
    )
    u, s = np.linalg.qr(coords)  # (kept, k) and (k, k)
    # a positive diagonal: q₁ points along the design's first column
    signs = np.where(np.diag(s) < 0, -1.0, 1.0)
    u = u * signs
    tri = np.triu(s * signs[:, None])
    k = model.k
    basis64 = u.T @ (q if len(kept) == len(q) else q[kept])
    flat = refs.images.reshape(refs.k, -1)
    centre = flat.mean(axis=0).astype(dtype)
    fitted_px = None if refs.mask is None else refs.mask.reshape(-1)
    if fitted_px is None:
        basis = basis64.astype(dtype)
        centre_fit = centre
    else:
        basis = np.zeros((k, flat.shape[1]), dtype)
        basis[:, fitted_px] = basis64
        centre_fit = centre[fitted_px]
    # u2 = M − mean(M) as the compiled kernels form it, in the working dtype
    mean = dtype.type(centre_fit.sum(dtype=np.float64) / n)
    spread = centre - mean
    if fitted_px is not None:
        spread[~fitted_px] = 0
    used = spread if fitted_px is None else spread[fitted_px]
    meat, meat_scale = meat_sample(fitted_px, flat.shape[1], n, k)
    return Design(
        refs=refs,
        model=model,
        dtype=dtype,
        centre=centre,
        mean=float(mean),
        spread=spread,
        spread_norm2=float(np.dot(used, used.astype(np.float64))),
        basis=basis,
        tri=tri,
        tri_inv=np.linalg.inv(tri),
        meat=meat,
        meat_scale=meat_scale,
        cond=cond,
    )


@dataclass(frozen=True, eq=False)
class DesignView:
    """The design over one range of pixels, as the backends read it.

    Attributes
    ----------
    centre : (n_px,) ndarray
        ``M`` in the working dtype.
    mean : scalar of the working dtype
        Mean of ``M`` over the fitted pixels: ``u2 = M − mean``.
    spread : (n_px,) ndarray
        ``u2`` in the working dtype (zero outside the mask).
    basis : (k, n_px) ndarray
        Orthonormal basis rows in the working dtype (zero outside the mask).
    fitted : (n_px,) ndarray of bool or None
        Fitted pixels of the range (None: all).
    n_pixels : int
        Fitted pixels of the whole slice.
    hac : (n_px,) ndarray or None
        Sandwich term ``t = q₁·(ρ⋆q₁)`` for the one-pass HAC sums.
    terms : (k(k+1)/2, n_px) ndarray or None
        Sandwich terms ``½(q_a ρ⋆q_b + q_b ρ⋆q_a)``, ``a ≤ b < k``.
    sample : ndarray of intp or None
        Up to 2048 fitted pixels spread over the slice (robust scales).
    meat : (n_px,) ndarray of bool or None
        The pixels the robust errors' meat is summed over (None: every
        fitted pixel), and ``meat_scale`` their weight.
    calibrated : (P, n_s) ndarray or None
        :attr:`meat_terms` made already (from the sample's pixels only,
        see ``engine.fit.sample_terms``), instead of ``terms``.
    """

    centre: NDArray
    mean: np.floating
    spread: NDArray
    basis: NDArray
    fitted: NDArray[np.bool_] | None
    n_pixels: int
    hac: NDArray | None = None
    terms: NDArray | None = None
    sample: NDArray | None = None
    meat: NDArray[np.bool_] | None = None
    meat_scale: float = 1.0
    calibrated: NDArray | None = None

    @property
    def dtype(self) -> np.dtype:
        """Working dtype."""
        return self.centre.dtype

    @property
    def k(self) -> int:
        """Basis vectors: free parameters of the model."""
        return self.basis.shape[0]

    @property
    def sums_rows(self) -> NDArray:
        """Rows ``[Q_k; 1; u2]`` (k + 2, n_px): ``g``, ``s``, ``h`` at once."""
        cached = self.__dict__.get('_sums_rows')
        if cached is None:
            ones = np.ones((1, self.n_px), self.dtype)
            if self.fitted is not None:
                ones[0, ~self.fitted] = 0
            cached = np.vstack([self.basis, ones, self.spread[None]])
            object.__setattr__(self, '_sums_rows', cached)
        return cached

    @property
    def n_px(self) -> int:
        """Pixels of the range (fitted or not)."""
        return self.centre.size

    @property
    def pairs(self) -> NDArray:
        """Products ``q_a q_b``, ``a ≤ b < k``: (k(k+1)/2, n_px)."""
        cached = self.__dict__.get('_pairs')
        if cached is None:
            a, b = np.triu_indices(self.k)
            cached = self.basis[a] * self.basis[b]
            object.__setattr__(self, '_pairs', cached)
        return cached

    def sampled(self) -> DesignView:
        """Return the view with its meat's sample as its fitted pixels."""
        if self.meat is None:
            return self
        cached = self.__dict__.get('_sampled')
        if cached is None:
            cached = replace(self, fitted=self.meat, meat=None)
            object.__setattr__(self, '_sampled', cached)
        return cached

    @property
    def meat_terms(self) -> NDArray:
        """The sandwich terms at the meat's pixels, weighted: (P, n_s).

        Every fitted pixel (weight 1), or the sample with calibration
        weights: ``w_p = s(1 + λᵀ T_p)`` with ``s = n / n_s`` and ``λ``
        such that the weighted sample sums of the terms equal their sums
        over every fitted pixel (a regression estimator, Deville and
        Särndal 1992).  So the sample's meat is exact in expectation for
        noise of even variance, whatever the references' pattern, and a
        fixed sample costs no bias.  Compacted in the order the compiled
        residual squares come (runs of the sample, each in order).
        """
        if self.calibrated is not None:
            return self.calibrated
        cached = self.__dict__.get('_meat_terms')
        if cached is None:
            cached = np.ascontiguousarray(self._weighted_terms())
            object.__setattr__(self, '_meat_terms', cached)
        return cached

    @property
    def meat_design(self) -> tuple[NDArray, NDArray]:
        """``M`` (P,) and the basis (k, P) at the meat's pixels, compacted.

        In the order of :attr:`meat_terms`: the design of the residuals
        whose squares the meat sums, contiguous for one long pass each.
        """
        cached = self.__dict__.get('_meat_design')
        if cached is None:
            index = self.sampled().fitted_index
            cached = (
                np.ascontiguousarray(self.centre[index]),
                np.ascontiguousarray(self.basis[:, index]),
            )
            object.__setattr__(self, '_meat_design', cached)
        return cached

    def _weighted_terms(self) -> NDArray:
        terms = self.terms
        if self.meat is None:
            return terms if self.fitted is None else terms[:, self.fitted]
        every = terms if self.fitted is None else terms[:, self.fitted]
        total = every.sum(axis=1, dtype=np.float64)
        picked = terms[:, self.meat].astype(np.float64)
        return calibrated_terms(picked, total, self.meat_scale, self.dtype)

    @property
    def fitted_index(self) -> NDArray[np.int64]:
        """Indices of the fitted pixels of the range, ascending."""
        cached = self.__dict__.get('_fitted_index')
        if cached is None:
            if self.fitted is None:
                cached = np.arange(self.n_px, dtype=np.int64)
            else:
                cached = np.flatnonzero(self.fitted).astype(np.int64)
            object.__setattr__(self, '_fitted_index', cached)
        return cached

    def runs(self, length: int) -> NDArray[np.int64]:
        """Return the runs of fitted pixels, ``(r, 2)`` starts and stops.

        No run crosses a multiple of ``length``: compiled kernels sum each
        run in the working dtype, then in float64, and never read a pixel
        outside the mask.
        """
        cache = self.__dict__.setdefault('_runs', {})
        hit = cache.get(length)
        if hit is None:
            hit = cache[length] = runs_of(self.fitted, self.n_px, length)
        return hit


def runs_of(fitted, n_px: int, length: int) -> NDArray[np.int64]:
    """Return runs of consecutive fitted pixels, cut every ``length``.

    Parameters
    ----------
    fitted : (n_px,) ndarray of bool or None
        Fitted pixels (None: all).
    n_px : int
        Pixels.
    length : int
        Longest run.

    Returns
    -------
    (r, 2) ndarray of int64
    """
    if fitted is None or fitted.all():
        starts = np.arange(0, n_px, length, dtype=np.int64)
        return np.stack([starts, np.minimum(starts + length, n_px)], axis=1)
    mask = np.asarray(fitted, bool).reshape(-1)
    edges = np.flatnonzero(np.diff(mask.astype(np.int8), prepend=0, append=0))
    cuts = np.arange(length, len(mask), length)
    bounds = np.union1d(edges, cuts)
    lo, hi = bounds[:-1], bounds[1:]
    inside = mask[lo]  # a piece between bounds is all in or all out
    return np.stack([lo[inside], hi[inside]], axis=1).astype(np.int64)


def make_view(
    design: Design,
    px: slice = slice(None),
    *,
    hac: NDArray | None = None,
    terms: NDArray | None = None,
    calibrated: NDArray | None = None,
) -> DesignView:
    """Return the design over the pixels ``px`` of the flattened image.

    Parameters
    ----------
    design : Design
        The design.
    px : slice
        A range of the flattened reference image.
    hac, terms : ndarray, optional
        Sandwich terms over the whole image (see :class:`DesignView`).
    calibrated : ndarray, optional
        The meat's terms at its sample, for the whole image (``px`` all).
    """
    mask = design.mask
    fitted = None if mask is None else mask.reshape(-1)[px]
    sample = None
    whole = px == slice(None)
    if calibrated is not None and not whole:
        raise ValueError('the meat sample\'s terms are for the whole image')
    if whole:
        inside = (
            np.arange(design.centre.size)
            if fitted is None
            else np.flatnonzero(fitted)
        )
        sample = inside[:: max(1, len(inside) // 2048)]
    return DesignView(
        centre=np.ascontiguousarray(design.centre[px]),
        mean=design.dtype.type(design.mean),
        spread=np.ascontiguousarray(design.spread[px]),
        basis=np.ascontiguousarray(design.basis[:, px]),
        fitted=None if fitted is None else np.ascontiguousarray(fitted),
        n_pixels=design.n_pixels,
        hac=None if hac is None else _working(hac[px], design.dtype),
        terms=None if terms is None else _working(terms[:, px], design.dtype),
        sample=sample,
        meat=None if design.meat is None else design.meat[px],
        meat_scale=design.meat_scale,
        calibrated=calibrated,
    )


def _working(values: NDArray, dtype: np.dtype) -> NDArray:
    """``values`` C-ordered in the working dtype (the kernels' arithmetic)."""
    return np.ascontiguousarray(values, dtype=dtype)
