//! pycocotools' `accumulate()` and `summarize()` over the per-image results.

use std::collections::BTreeMap;

use super::evaluate::{descending, iou_thresholds, recall_thresholds, PerImage, AREA_RANGES, MAX_DETS};
use super::DetectionMetrics;
use crate::numeric;

/// `precision[T, R, K, A, M]` and `recall[T, K, A, M]`, `-1` where undefined.
pub(super) struct Accumulated {
    num_categories: usize,
    iou_thrs: Vec<f64>,
    num_rec: usize,
    precision: Vec<f64>,
    recall: Vec<f64>,
}

const A: usize = AREA_RANGES.len();
const M: usize = MAX_DETS.len();

impl Accumulated {
    fn p_index(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> usize {
        (((t * self.num_rec + r) * self.num_categories + k) * A + a) * M + m
    }

    fn r_index(&self, t: usize, k: usize, a: usize, m: usize) -> usize {
        ((t * self.num_categories + k) * A + a) * M + m
    }

    /// pycocotools' `_summarize`: mean of the defined entries, in numpy's C order.
    fn summarize_one(&self, ap: bool, iou_thr: Option<f64>, a: usize, max_det: usize) -> f64 {
        let Some(m) = MAX_DETS.iter().position(|&x| x == max_det) else {
            return -1.0;
        };
        let ts: Vec<usize> =
            (0..self.iou_thrs.len()).filter(|&t| iou_thr.is_none_or(|x| self.iou_thrs[t] == x)).collect();
        let mut values = Vec::new();
        for &t in &ts {
            if ap {
                for r in 0..self.num_rec {
                    for k in 0..self.num_categories {
                        values.push(self.precision[self.p_index(t, r, k, a, m)]);
                    }
                }
            } else {
                for k in 0..self.num_categories {
                    values.push(self.recall[self.r_index(t, k, a, m)]);
                }
            }
        }
        mean_defined(values)
    }

    /// The 12 summary numbers and per-category AP.
    pub(super) fn summarize(&self, category_ids: &[u64]) -> DetectionMetrics {
        let s = |ap, thr, a, md| self.summarize_one(ap, thr, a, md);
        let per_category_ap: BTreeMap<u64, f64> = category_ids
            .iter()
            .enumerate()
            .map(|(k, &id)| {
                let mut values = Vec::new();
                for t in 0..self.iou_thrs.len() {
                    for r in 0..self.num_rec {
                        values.push(self.precision[self.p_index(t, r, k, 0, M - 1)]);
                    }
                }
                (id, mean_defined(values))
            })
            .collect();
        DetectionMetrics {
            ap: s(true, None, 0, 100),
            ap50: s(true, Some(0.5), 0, 100),
            ap75: s(true, Some(0.75), 0, 100),
            ap_small: s(true, None, 1, 100),
            ap_medium: s(true, None, 2, 100),
            ap_large: s(true, None, 3, 100),
            ar1: s(false, None, 0, 1),
            ar10: s(false, None, 0, 10),
            ar100: s(false, None, 0, 100),
            ar_small: s(false, None, 1, 100),
            ar_medium: s(false, None, 2, 100),
            ar_large: s(false, None, 3, 100),
            per_category_ap,
        }
    }
}

/// `np.mean(s[s > -1])`, or `-1` when nothing is defined.
fn mean_defined(mut values: Vec<f64>) -> f64 {
    values.retain(|&v| v > -1.0);
    if values.is_empty() {
        -1.0
    } else {
        numeric::mean(&values)
    }
}

/// pycocotools' `accumulate()`: per category, area range and maxDet, concatenate
/// the per-image results in image-id order, sort by score (stable), and build the
/// interpolated precision and the recall.
pub(super) fn accumulate(per_image: &PerImage, num_categories: usize) -> Accumulated {
    let iou_thrs = iou_thresholds();
    let rec_thrs = recall_thresholds();
    let (t_count, r_count) = (iou_thrs.len(), rec_thrs.len());
    let mut acc = Accumulated {
        num_categories,
        precision: vec![-1.0; t_count * r_count * num_categories * A * M],
        recall: vec![-1.0; t_count * num_categories * A * M],
        iou_thrs,
        num_rec: r_count,
    };
    for k in 0..num_categories {
        for a in 0..A {
            let evals: Vec<_> = (0..per_image.num_images).filter_map(|i| per_image.get(k, a, i)).collect();
            if evals.is_empty() {
                continue;
            }
            let npig: usize = evals.iter().map(|e| e.num_gt).sum();
            if npig == 0 {
                continue;
            }
            for (m, &max_det) in MAX_DETS.iter().enumerate() {
                // (score, eval index, detection index), concatenated in image order.
                let mut dets: Vec<(f64, usize, usize)> = Vec::new();
                for (e_idx, e) in evals.iter().enumerate() {
                    for (d, &score) in e.scores.iter().take(max_det).enumerate() {
                        dets.push((score, e_idx, d));
                    }
                }
                dets.sort_by(|x, y| descending(x.0, y.0));
                let nd = dets.len();
                for t in 0..t_count {
                    let mut tp = 0u64;
                    let mut fp = 0u64;
                    let mut rc = Vec::with_capacity(nd);
                    let mut pr = Vec::with_capacity(nd);
                    for &(_, e_idx, d) in &dets {
                        let e = evals[e_idx];
                        let idx = t * e.scores.len() + d;
                        if !e.ignored[idx] {
                            if e.matched[idx] {
                                tp += 1;
                            } else {
                                fp += 1;
                            }
                        }
                        let (tpf, fpf) = (tp as f64, fp as f64);
                        rc.push(tpf / npig as f64);
                        pr.push(tpf / (fpf + tpf + f64::EPSILON));
                    }
                    let ri = acc.r_index(t, k, a, m);
                    acc.recall[ri] = rc.last().copied().unwrap_or(0.0);
                    for i in (1..nd).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (r, &thr) in rec_thrs.iter().enumerate() {
                        let pos = rc.partition_point(|&x| x < thr);
                        let pi = acc.p_index(t, r, k, a, m);
                        acc.precision[pi] = if pos < nd { pr[pos] } else { 0.0 };
                    }
                }
            }
        }
    }
    acc
}
