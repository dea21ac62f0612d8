//! Floating-point helpers that reproduce numpy's arithmetic bit for bit.
//!
//! The reference tools (pycocotools, scikit-learn, numpy) reduce arrays with
//! numpy's pairwise summation, so a plain left-to-right sum can differ in the
//! last bits. These helpers follow numpy's `pairwise_sum` for contiguous
//! float64 arrays (8-way unrolled blocks of up to 128 elements, recursive
//! halving above that) and `np.linspace`.

/// Sums `values` exactly as `np.sum` does for a contiguous 1-D float64 array.
pub fn pairwise_sum(values: &[f64]) -> f64 {
    // numpy starts the reduction from the identity 0.0.
    0.0 + pairwise(values)
}

fn pairwise(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - (n % 8) {
            for (j, acc) in r.iter_mut().enumerate() {
                *acc += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise(&a[..n2]) + pairwise(&a[n2..])
    }
}

/// Mean of `values` as `np.mean` computes it (pairwise sum divided by the count);
/// NaN for an empty slice.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    pairwise_sum(values) / values.len() as f64
}

/// `np.nanmean` over values where `None` stands for NaN: the sum runs over the
/// full array with zeros in place of the missing values (as numpy does), divided
/// by the number of present values. `None` when no value is present.
pub fn nan_mean(values: &[Option<f64>]) -> Option<f64> {
    let count = values.iter().filter(|v| v.is_some()).count();
    if count == 0 {
        return None;
    }
    let filled: Vec<f64> = values.iter().map(|v| v.unwrap_or(0.0)).collect();
    Some(pairwise_sum(&filled) / count as f64)
}

/// `np.linspace(start, stop, num, endpoint=True)` element by element.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            out[num - 1] = stop;
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_bits() {
        // Hex values printed by numpy 2.4 for pycocotools' iouThrs.
        let t = linspace(0.5, 0.95, 10);
        assert_eq!(t[0], 0.5);
        assert_eq!(t[5], 0.75);
        assert_eq!(t[1].to_bits(), 0x3fe199999999999a);
        assert_eq!(t[3].to_bits(), 0x3fe4cccccccccccd);
        assert_eq!(t[8].to_bits(), 0x3fecccccccccccccu64);
        assert_eq!(t[9], 0.95);
    }

    #[test]
    fn pairwise_differs_from_naive_only_by_grouping() {
        let v: Vec<f64> = (0..300).map(|i| 0.1 * i as f64 + 1e-3).collect();
        let naive: f64 = v.iter().sum();
        assert!((pairwise_sum(&v) - naive).abs() < 1e-9);
        assert_eq!(pairwise_sum(&[]), 0.0);
        assert_eq!(pairwise_sum(&[1.5, 2.5]), 4.0);
    }

    #[test]
    fn nan_mean_skips_missing() {
        assert_eq!(nan_mean(&[Some(1.0), None, Some(0.5)]), Some(0.75));
        assert_eq!(nan_mean(&[None, None]), None);
    }
}
