//! The orthonormal Walsh–Hadamard transform, used to rotate vectors before they are quantized.
//!
//! `H_n / sqrt(n)` (Sylvester's construction, `n` a power of two) is symmetric and orthogonal,
//! so it is its own inverse and keeps dot products: `(H q) · (H k) = q · k`. Rotating a head
//! vector spreads a few large channels (outliers) over all of them, which shrinks the range of
//! an affine quantization group and with it the rounding error. This is the rotation QuaRot
//! applies to keys and values before quantizing them (Ashkboos et al., "QuaRot: Outlier-Free
//! 4-Bit Inference in Rotated LLMs", 2024, section 4); the fast transform is the textbook
//! butterfly in `n log2 n` additions.

/// Whether [`rotate`] accepts vectors of length `n` (a power of two, at least 2).
pub fn supports(n: usize) -> bool {
    n >= 2 && n.is_power_of_two()
}

/// Rotates each consecutive run of `n` values of `x` in place by `H_n / sqrt(n)`. Applying it
/// twice gives back the input up to f32 rounding (about `log2 n` ulps).
///
/// Panics (a caller bug, checked with [`supports`] first) when `n` is not a power of two of at
/// least 2 or `x.len()` is not a multiple of `n`.
pub fn rotate(x: &mut [f32], n: usize) {
    assert!(
        supports(n),
        "Hadamard length {n} is not a power of two >= 2"
    );
    assert!(
        x.len().is_multiple_of(n),
        "{} values are not whole vectors of {n}",
        x.len()
    );
    let norm = 1.0 / (n as f32).sqrt();
    for v in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for block in v.chunks_exact_mut(2 * h) {
                let (a, b) = block.split_at_mut(h);
                for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                    let (s, d) = (*x + *y, *x - *y);
                    *x = s;
                    *y = d;
                }
            }
            h *= 2;
        }
        v.iter_mut().for_each(|x| *x *= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `H_n[i][j] = (-1)^popcount(i & j) / sqrt(n)`, the closed form of Sylvester's matrix.
    fn naive(x: &[f32]) -> Vec<f32> {
        let n = x.len();
        (0..n)
            .map(|i| {
                let s: f64 = (0..n)
                    .map(|j| {
                        let sign = if (i & j).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * x[j] as f64
                    })
                    .sum();
                (s / (n as f64).sqrt()) as f32
            })
            .collect()
    }

    #[test]
    fn matches_the_closed_form_and_is_its_own_inverse() {
        for n in [2usize, 4, 8, 64, 128, 256] {
            let x: Vec<f32> = (0..3 * n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let mut y = x.clone();
            rotate(&mut y, n);
            for (c, chunk) in x.chunks(n).enumerate() {
                let want = naive(chunk);
                for (a, b) in y[c * n..(c + 1) * n].iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "n={n}: {a} vs {b}");
                }
            }
            // orthonormal: the norm is kept, and a second rotation undoes the first
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            assert!((norm(&x) - norm(&y)).abs() <= 1e-4 * norm(&x));
            rotate(&mut y, n);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn spreads_an_outlier_over_all_channels() {
        let mut x = vec![0.0f32; 64];
        x[5] = 8.0;
        rotate(&mut x, 64);
        assert!(x.iter().all(|v| (v.abs() - 1.0).abs() < 1e-6));
    }

    #[test]
    fn supported_lengths() {
        assert!(supports(64) && supports(2) && supports(256));
        assert!(!supports(0) && !supports(1) && !supports(80) && !supports(96));
    }
}
