"""The maths of ``I ≈ Σ c_k·R_k (+ c)``: numpy and scipy only.

References and their checks, the three models for K references, the
orthonormal design they share, per-slice sums and the algebra from sums to
coefficients and errors, constraints, noise models, the noise's spatial
correlation and the result.  Nothing here reads a stack or starts a
thread: :mod:`napari_mixcoef.engine` does, through a backend.
"""
