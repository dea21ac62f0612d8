//! COCO segmentations: polygons and run-length encodings, rasterised exactly as pycocotools'
//! `maskApi.c` does (`rleFrPoly`, `rleFrString`, column-major runs starting with zeros), so
//! masks built here match the ones the COCO tools evaluate against.
use super::sample::InstanceMasks;

/// A COCO run-length encoding: alternating runs of 0s and 1s over the pixels in column-major
/// order, starting with a (possibly empty) run of 0s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rle {
    /// Image height in pixels.
    pub height: u32,
    /// Image width in pixels.
    pub width: u32,
    /// Run lengths; they sum to `height * width`.
    pub counts: Vec<u32>,
}

/// One instance's segmentation as COCO stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum Segmentation {
    /// One or more polygons `[x0, y0, x1, y1, ...]` in pixel coordinates (their union).
    Polygons(Vec<Vec<f64>>),
    /// A run-length encoding (from a list of counts or a compressed string).
    Rle(Rle),
}

impl Rle {
    /// Checks that the runs cover the image exactly.
    pub fn new(height: u32, width: u32, counts: Vec<u32>) -> Result<Self, String> {
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let pixels = u64::from(height) * u64::from(width);
        if total != pixels {
            return Err(format!("RLE counts sum to {total}, expected height*width = {pixels}"));
        }
        Ok(Self { height, width, counts })
    }

    /// Decodes COCO's compressed string form (pycocotools `rleFrString`): each count is a
    /// LEB128-like run of 5-bit groups offset by 48, with a sign bit in the last group, and
    /// counts after the second are stored as differences to the count two places before.
    pub fn from_compressed(text: &str, height: u32, width: u32) -> Result<Self, String> {
        let bytes = text.as_bytes();
        let mut counts: Vec<u32> = Vec::new();
        let mut p = 0;
        while p < bytes.len() {
            let mut x: i64 = 0;
            let mut k = 0;
            loop {
                let byte = bytes[p];
                if !(48..48 + 64).contains(&byte) {
                    return Err(format!(
                        "invalid character {:?} at offset {p} of the RLE string",
                        byte as char
                    ));
                }
                if k >= 12 {
                    return Err(format!("RLE count at offset {p} is too long"));
                }
                let c = i64::from(byte - 48);
                x |= (c & 0x1f) << (5 * k);
                let more = c & 0x20 != 0;
                p += 1;
                k += 1;
                if !more {
                    if c & 0x10 != 0 {
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
                if p == bytes.len() {
                    return Err("RLE string ends inside a count".into());
                }
            }
            if counts.len() > 2 {
                x += i64::from(counts[counts.len() - 2]);
            }
            let count = u32::try_from(x).map_err(|_| format!("RLE count {x} is out of range"))?;
            counts.push(count);
        }
        Self::new(height, width, counts)
    }

    /// Rasterises one polygon exactly as pycocotools' `rleFrPoly` does (upsampled ×5
    /// boundary, pixel centres inside the polygon are set). Work grows with the distance
    /// between vertices, so coordinates must pass [`check_polygon`]; an image whose pixels an
    /// RLE cannot count (more than `u32::MAX`) is an error too.
    pub fn from_polygon(xy: &[f64], height: u32, width: u32) -> Result<Self, String> {
        check_polygon(xy, height, width)?;
        let pixels = u32::try_from(u64::from(height) * u64::from(width))
            .map_err(|_| format!("a {width}x{height} image has more pixels than an RLE counts"))?;
        let (h, w) = (i64::from(height), i64::from(width));
        let scale = 5.0;
        let k = xy.len() / 2;
        if k == 0 {
            return Ok(Self { height, width, counts: vec![pixels] });
        }
        let mut x: Vec<i64> = (0..k).map(|j| (scale * xy[2 * j] + 0.5) as i64).collect();
        let mut y: Vec<i64> = (0..k).map(|j| (scale * xy[2 * j + 1] + 0.5) as i64).collect();
        x.push(x[0]);
        y.push(y[0]);
        // Dense boundary points on the ×5 grid.
        let (mut u, mut v) = (Vec::new(), Vec::new());
        for j in 0..k {
            let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
            let dx = (xe - xs).abs();
            let dy = (ys - ye).abs();
            let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
            if flip {
                std::mem::swap(&mut xs, &mut xe);
                std::mem::swap(&mut ys, &mut ye);
            }
            let s = if dx >= dy { (ye - ys) as f64 / dx as f64 } else { (xe - xs) as f64 / dy as f64 };
            if dx >= dy {
                for d in 0..=dx {
                    let t = if flip { dx - d } else { d };
                    u.push(t + xs);
                    v.push((ys as f64 + s * t as f64 + 0.5) as i64);
                }
            } else {
                for d in 0..=dy {
                    let t = if flip { dy - d } else { d };
                    v.push(t + ys);
                    u.push((xs as f64 + s * t as f64 + 0.5) as i64);
                }
            }
        }
        // Points where the boundary crosses a column centre, downsampled to pixels.
        let mut starts: Vec<u64> = Vec::new();
        for j in 1..u.len() {
            if u[j] == u[j - 1] {
                continue;
            }
            let xd = if u[j] < u[j - 1] { u[j] } else { u[j] - 1 } as f64;
            let xd = (xd + 0.5) / scale - 0.5;
            if xd.floor() != xd || xd < 0.0 || xd > (w - 1) as f64 {
                continue;
            }
            let yd = v[j].min(v[j - 1]) as f64;
            let yd = ((yd + 0.5) / scale - 0.5).clamp(0.0, h as f64).ceil();
            starts.push((xd as i64 * h + yd as i64) as u64);
        }
        starts.push((h * w) as u64);
        starts.sort_unstable();
        let mut prev = 0;
        for a in starts.iter_mut() {
            let t = *a;
            *a -= prev;
            prev = t;
        }
        let mut counts: Vec<u32> = vec![starts[0] as u32];
        let mut j = 1;
        while j < starts.len() {
            if starts[j] > 0 {
                counts.push(starts[j] as u32);
                j += 1;
            } else {
                j += 1;
                if j < starts.len() {
                    *counts.last_mut().expect("non-empty") += starts[j] as u32;
                    j += 1;
                }
            }
        }
        Ok(Self { height, width, counts })
    }

    /// Number of set pixels.
    pub fn area(&self) -> u64 {
        self.counts.iter().skip(1).step_by(2).map(|&c| u64::from(c)).sum()
    }

    /// Writes `value` into a row-major `height × width` buffer wherever the RLE is set.
    pub fn paint(&self, out: &mut [u8], value: u8) {
        let h = self.height as usize;
        let w = self.width as usize;
        let mut pos = 0usize;
        for (i, &run) in self.counts.iter().enumerate() {
            let run = run as usize;
            if i % 2 == 1 {
                for p in pos..pos + run {
                    let (col, row) = (p / h, p % h);
                    out[row * w + col] = value;
                }
            }
            pos += run;
        }
    }
}

/// Most boundary points (on the ×5 grid) one polygon may have: 16 Mi points, 256 MiB of work
/// space; a polygon around a 20000-pixel square needs 400 Ki.
const MAX_BOUNDARY_POINTS: f64 = (1u64 << 24) as f64;

/// Checks a polygon before it is rasterised: coordinates finite and within four image sizes of
/// the image (further out is no annotation), and a boundary short enough that rasterising it
/// takes bounded time and memory whatever the image size.
pub(crate) fn check_polygon(xy: &[f64], height: u32, width: u32) -> Result<(), String> {
    let limit = 4.0 * f64::from(height.max(width));
    if let Some(v) = xy.iter().find(|v| !v.is_finite() || v.abs() > limit) {
        return Err(format!("coordinate {v} is far outside the {width}x{height} image"));
    }
    let k = xy.len() / 2;
    let points: f64 = (0..k)
        .map(|j| {
            let next = (j + 1) % k;
            let dx = (xy[2 * next] - xy[2 * j]).abs();
            let dy = (xy[2 * next + 1] - xy[2 * j + 1]).abs();
            5.0 * dx.max(dy) + 2.0
        })
        .sum();
    if points > MAX_BOUNDARY_POINTS {
        return Err(format!(
            "a polygon of {k} vertices with a boundary of {points:.0} points (x5 grid), more than the {MAX_BOUNDARY_POINTS} allowed"
        ));
    }
    Ok(())
}

impl Segmentation {
    /// Writes `value` into a row-major `height × width` buffer over the shape's pixels. An RLE
    /// must be of this size; `out` must hold `height × width` pixels.
    pub fn paint(&self, out: &mut [u8], height: u32, width: u32, value: u8) -> Result<(), String> {
        match self {
            Segmentation::Polygons(polys) => {
                for poly in polys {
                    Rle::from_polygon(poly, height, width)?.paint(out, value);
                }
            }
            Segmentation::Rle(rle) if (rle.height, rle.width) == (height, width) => rle.paint(out, value),
            Segmentation::Rle(rle) => {
                return Err(format!(
                    "RLE of {}x{} painted on a {width}x{height} image",
                    rle.width, rle.height
                ))
            }
        }
        Ok(())
    }
}

/// The semantic mask of one image: 0 background, shapes painted in order (row-major).
pub(crate) fn rasterise(masks: &InstanceMasks) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; masks.width as usize * masks.height as usize];
    for (value, shape) in &masks.shapes {
        shape.paint(&mut out, masks.height, masks.width, *value)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
