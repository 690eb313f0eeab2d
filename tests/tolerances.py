"""Float tolerances of the test suite, derived from float32 arithmetic, not from one CPU's output.

Two float32 computations of one quantity agree bit for bit only when they run the same operations in
the same order. Other CPUs (SSE / AVX2 / AVX-512 kernels of ATen, MKL and oneDNN), other batch shapes
(padding changes a GEMM's blocking) and GPUs reorder the reductions. Reordering a sum of ``K`` terms
changes it by at most ``K * u * sum(|terms|)`` (``u = 2**-24``, float32's unit roundoff), typically by
``sqrt(K) * u``. The suite therefore uses three kinds of comparison:

* **bit-exact** (``torch.equal``): the same computation, same process, same batch: a real promise
  (a hook that edits nothing, a defense that flags nothing, a cache that returns what it stored);
  and discrete outputs (token ids, masks, positions);
* **one reduction apart** (:data:`F32_SUM_ATOL`): a quantity in ``[0, 1]`` (attention weights,
  group masses) recomputed from the same float32 tensor by another reduction (a sum over at most
  a few hundred keys);
* **two forward passes apart** (:data:`F32_FORWARD_RTOL`): values read from two different float32
  forwards of a tiny model (another batch composition, another code path: eager hooks vs
  ``output_attentions``, batched vs single). Each forward of the tiny models chains at most 8 layers
  of reductions of length ``K <= 1024``; the worst case per reduction is ``K * u ~ 6e-5``, the
  typical compounded error over the layers about ``8 * sqrt(K) * u ~ 2e-5``; ``1e-4`` covers both
  with room and is still 3-4 orders of magnitude below what a wrong query row, a shifted token
  group or a missing mask changes.

Derived quantities propagate these bounds explicitly (:func:`ratio_rtol`, :func:`distance_atol`).
"""

from __future__ import annotations

import numpy as np

#: float32 unit roundoff (half the machine epsilon).
U32 = 2.0 ** -24

#: values in [0, 1] (attention weights, masses) recomputed by another reduction over <= ~600 keys
#: of the same float32 tensor: K * u with K = 600 is 3.6e-5; sums of probabilities that should be 1.
F32_SUM_ATOL = 5e-5

#: relative agreement of one value read from two different float32 forwards of a tiny model.
F32_FORWARD_RTOL = 1e-4


#: Attention rows of one layer computed two ways from the SAME q and k (tests/test_sdpa_rows.py): eager
#: attention's full ``softmax(q k^T * c + mask)`` (``c = d**-0.5``) sliced to the chosen queries, and the SDPA
#: path's rows of those queries only (``models.attention_hooks.rows_from_qk``). The two run the same float32
#: operations in the same order except the accumulation inside each score ``s = c * sum_i q_i k_i``, a sum
#: of ``d`` products that a GEMM over ``T`` query rows and one over ``n`` rows may block differently. Each of
#: the ``d`` accumulation steps rounds by a roughly uniform error of at most ``u`` times a partial sum, and
#: every partial sum is bounded by ``S = c * sum_i |q_i k_i|``, so two orders differ typically by
#: ``sqrt(2 d / 3) * u * S`` (worst case ``2 d u S``). The tiny models have ``d = 32`` and, over the scores
#: that get weight (real queries, real causal keys), ``S <= SDPA_SCORE_SPAN = 50`` (the test checks it):
#: ``|ds| ~ 4.6 * 6e-8 * 50 = 1.4e-5``. A softmax entry moves by ``|dp_j| = p_j |ds_j - sum_k p_k ds_k| <=
#: 2 p_j (1 - p_j) max|ds| <= max|ds| / 2 ~ 7e-6``; masked keys get exactly zero weight on both paths. 1e-5
#: covers this (measured: <= 1.2e-6). Rows further down a forward whose EARLIER layers ran SDPA instead of
#: eager differ more: those are two forward passes apart (:data:`F32_FORWARD_RTOL`).
SDPA_ROWS_ATOL = 1e-5
SDPA_SCORE_SPAN = 50.0


def sum_rtol(n_terms: int) -> float:
    """Worst-case relative difference of two float32 sums of the same ``n_terms`` positive numbers taken
    in different orders (or one in float64): ``n_terms * u``."""
    return n_terms * U32


def ratio_rtol(rtol: float = F32_FORWARD_RTOL) -> float:
    """Relative error of ``a / b`` when ``a`` and ``b`` each carry relative error ``rtol``."""
    return 2.0 * rtol + rtol * rtol


def distance_atol(x: np.ndarray, sigma: np.ndarray, rtol: float, eps: float = 1e-8) -> np.ndarray:
    """Per-row bound on ``|D(x') - D(x)|`` for ``D(x) = ||(x - mu) / (sigma + eps)||`` when ``x'`` differs
    from ``x`` by relative error ``rtol`` elementwise (triangle inequality: ``||(x' - x) / sigma||``).

    Args:
        x: features ``[N, D]``; sigma: ``[D]``; rtol: relative error of each feature.
    Returns:
        ``[N]`` absolute tolerances.
    """
    x = np.asarray(x, dtype=np.float64)
    return rtol * np.linalg.norm(np.abs(x) / (np.asarray(sigma, dtype=np.float64) + eps), axis=-1)
