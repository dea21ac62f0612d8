use super::*;

fn mask_of(rle: &Rle) -> Vec<u8> {
    let mut out = vec![0u8; (rle.height * rle.width) as usize];
    rle.paint(&mut out, 1);
    out
}

#[test]
fn hand_made_counts_are_column_major_starting_with_zeros() {
    // 3 rows × 2 columns; runs 1 zero, 2 ones, 3 zeros → column 0 rows 1 and 2 set.
    let rle = Rle::new(3, 2, vec![1, 2, 3]).unwrap();
    assert_eq!(mask_of(&rle), vec![0, 0, 1, 0, 1, 0]);
    assert_eq!(rle.area(), 2);
    assert!(Rle::new(3, 2, vec![1, 2]).unwrap_err().contains("sum to 3"));
}

#[test]
fn hand_made_compressed_strings() {
    // Single-group counts are chr(48 + n); "X1" is 40 (8 | continue, then 1 << 5).
    assert_eq!(Rle::from_compressed("123", 3, 2).unwrap().counts, vec![1, 2, 3]);
    assert_eq!(Rle::from_compressed("X1:", 5, 10).unwrap().counts, vec![40, 10]);
    // From the 4th count on, values are differences to the count two places earlier:
    // "1111" = [1, 1, 1, 1 + 1].
    assert_eq!(Rle::from_compressed("1111", 5, 1).unwrap().counts, vec![1, 1, 1, 2]);
    assert!(Rle::from_compressed("1 1", 1, 2).unwrap_err().contains("invalid character"));
    assert!(Rle::from_compressed("X", 1, 2).unwrap_err().contains("ends inside"));
}

#[test]
fn hand_made_axis_aligned_square_polygon() {
    // pycocotools: frPyObjects([[1,1,4,1,4,4,1,4]], 6, 6) covers pixels 1..=3 in x and y.
    assert_eq!(Rle::from_polygon(&[], 2, 3).unwrap().counts, vec![6], "an empty polygon covers nothing");
    let rle = Rle::from_polygon(&[1.0, 1.0, 4.0, 1.0, 4.0, 4.0, 1.0, 4.0], 6, 6).unwrap();
    let m = mask_of(&rle);
    for y in 0..6 {
        for x in 0..6 {
            let inside = (1..=3).contains(&x) && (1..=3).contains(&y);
            assert_eq!(m[y * 6 + x], u8::from(inside), "pixel ({x},{y})");
        }
    }
}

/// Cases produced by pycocotools 2.0.11 (fixtures/make_coco_masks.py).
#[test]
fn matches_pycocotools_reference() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/coco_masks.json")).expect("fixture parses");
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let h = case["height"].as_u64().unwrap() as u32;
        let w = case["width"].as_u64().unwrap() as u32;
        let got = match case["kind"].as_str().unwrap() {
            "polygons" => {
                let polys: Vec<Vec<f64>> = serde_json::from_value(case["polygons"].clone()).unwrap();
                for (poly, want) in polys.iter().zip(case["per_polygon_fortran"].as_array().unwrap()) {
                    let rle = Rle::from_polygon(poly, h, w).unwrap();
                    let want: Vec<u8> = serde_json::from_value(want.clone()).unwrap();
                    let mut fortran = vec![0u8; (h * w) as usize];
                    let mut pos = 0;
                    for (i, &run) in rle.counts.iter().enumerate() {
                        fortran[pos..pos + run as usize].fill((i % 2) as u8);
                        pos += run as usize;
                    }
                    assert_eq!(fortran, want, "{name}: one polygon's runs");
                }
                let mut out = vec![0u8; (h * w) as usize];
                Segmentation::Polygons(polys).paint(&mut out, h, w, 1).unwrap();
                out
            }
            _ => {
                let rle = Rle::from_compressed(case["counts"].as_str().unwrap(), h, w).unwrap();
                assert_eq!(rle.area(), case["area"].as_u64().unwrap(), "{name}: area");
                mask_of(&rle)
            }
        };
        let area: u64 = got.iter().map(|&v| u64::from(v)).sum();
        assert_eq!(area, case["area"].as_u64().unwrap(), "{name}: area");
        if case["mask"].is_array() {
            let want: Vec<Vec<u8>> = serde_json::from_value(case["mask"].clone()).unwrap();
            assert_eq!(got, want.concat(), "{name}: mask");
        } else {
            let want: Vec<u64> = serde_json::from_value(case["mask_sum_rows"].clone()).unwrap();
            let rows: Vec<u64> =
                got.chunks(w as usize).map(|r| r.iter().map(|&v| u64::from(v)).sum()).collect();
            assert_eq!(rows, want, "{name}: row sums");
        }
    }
}

#[test]
fn later_shapes_paint_over_earlier_ones() {
    let square = |x0: f64, v: u8| {
        (v, Segmentation::Polygons(vec![vec![x0, 0.0, x0 + 3.0, 0.0, x0 + 3.0, 3.0, x0, 3.0]]))
    };
    let masks = InstanceMasks { width: 6, height: 3, shapes: vec![square(0.0, 1), square(2.0, 255)] };
    let m = rasterise(&masks).unwrap();
    assert_eq!(&m[6..12], &[1, 1, 255, 255, 255, 0]);
}

#[test]
fn polygons_that_would_take_unbounded_work_are_errors() {
    // Found by the property tests: a long, thin image allows coordinates far from the origin,
    // and the boundary points between them would take gigabytes.
    let err = Rle::from_polygon(&[0.0, 0.0, 1e9, 0.0, 0.0, 0.0], 1, 400_000_000).unwrap_err();
    assert!(err.contains("boundary of") && err.contains("allowed"), "{err}");
    let err = Rle::from_polygon(&[0.0, f64::NAN, 1.0, 1.0], 8, 8).unwrap_err();
    assert!(err.contains("far outside"), "{err}");
    // More pixels than a u32 count can hold.
    let err = Rle::from_polygon(&[], 70_000, 70_000).unwrap_err();
    assert!(err.contains("more pixels"), "{err}");
    // A polygon around a large image is fine.
    let side = 20_000.0;
    let rle = Rle::from_polygon(
        &[1.0, 1.0, side - 1.0, 1.0, side - 1.0, side - 1.0, 1.0, side - 1.0],
        20_000,
        20_000,
    )
    .unwrap();
    assert_eq!(rle.area(), 19_998 * 19_998);
}
