"""Image similarity for the end-to-end check: PSNR and SSIM of [0, 1] float images (numpy + scipy).

scikit-image is not a dependency of koala-trt (nor installed in its environment), so SSIM is the
standard definition written out here: Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality
assessment: from error visibility to structural similarity", eq. 13, with its recommended settings
(11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03) and the paper's population (weighted)
variances, per colour channel; the mean SSIM averages the map over the region where the window lies
inside the image, then over channels and images. Identical images give 1.0.
"""

from __future__ import annotations

import math

import numpy as np

_SIGMA = 1.5
_TRUNCATE = 3.5  # window radius = int(3.5 * 1.5 + 0.5) = 5: the paper's 11x11 window
_K1, _K2 = 0.01, 0.03


def psnr(reference: np.ndarray, candidate: np.ndarray, data_range: float = 1.0) -> float:
    """10 log10(range^2 / MSE) in dB; +inf for identical images, NaN when the candidate is not finite."""
    if not np.isfinite(candidate).all():
        return float("nan")
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(reference: np.ndarray, candidate: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004, eq. 13) of images [..., H, W, C] (or [H, W]); NaN when not finite."""
    from scipy.ndimage import gaussian_filter

    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: {reference.shape} vs {candidate.shape}")
    if not np.isfinite(candidate).all():
        return float("nan")
    x = reference.astype(np.float64)
    y = candidate.astype(np.float64)
    if x.ndim == 2:
        x, y = x[None, :, :, None], y[None, :, :, None]
    x = x.reshape(-1, *x.shape[-3:])
    y = y.reshape(-1, *y.shape[-3:])
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    r = int(_TRUNCATE * _SIGMA + 0.5)
    values = []
    for img_x, img_y in zip(x, y):
        for c in range(img_x.shape[-1]):
            a, b = img_x[..., c], img_y[..., c]

            def blur(z: np.ndarray) -> np.ndarray:
                return gaussian_filter(z, sigma=_SIGMA, truncate=_TRUNCATE, mode="reflect")

            mu_a, mu_b = blur(a), blur(b)
            var_a = blur(a * a) - mu_a**2
            var_b = blur(b * b) - mu_b**2
            cov = blur(a * b) - mu_a * mu_b
            s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
            inner = s[r:-r, r:-r] if min(s.shape) > 2 * r else s  # drop the border the window overhangs
            values.append(float(inner.mean()))
    return float(np.mean(values))
