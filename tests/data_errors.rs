//! `worker train --standalone` on COCO data it cannot read fails with an error that says so,
//! instead of training to the end on empty batches: an `image_root` that does not exist fails
//! at open, images that are all missing fail at the first step (`data.max_unreadable_fraction`).
mod common;

use std::path::Path;
use std::process::Command;

use serde_json::json;

/// A COCO file of four 16 px images (`images/<i>.png`, not written) with one box each.
fn coco(dir: &Path) -> std::path::PathBuf {
    let images: Vec<_> = (0..4)
        .map(|i| json!({"id": i, "file_name": format!("images/{i}.png"), "width": 16, "height": 16}))
        .collect();
    let annotations: Vec<_> = (0..4)
        .map(|i| json!({"id": i + 1, "image_id": i, "category_id": 1, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0}))
        .collect();
    let doc =
        json!({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]});
    let path = dir.join("instances.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

fn train(dir: &Path, image_root: &Path) -> (bool, String) {
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[job]\nname = \"data-errors\"\n[data]\nformat = \"coco\"\ntrain = \"{}\"\nimage_root = \"{}\"\n\
             image_size = 16\nloader_threads = 1\n[model]\nbackbone = \"tiny\"\nnorm = \"group\"\n\
             [train]\nsteps = 2\nbatch_size = 2\n[checkpoint]\ndir = \"{}\"\n",
            coco(dir).display(),
            image_root.display(),
            dir.join("checkpoints").display()
        ),
    )
    .unwrap();
    let out = Command::new(common::bin("worker"))
        .args(["train", "--standalone", "--config", job.to_str().unwrap()])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_coco_job_without_its_images_fails_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = train(dir.path(), &dir.path().join("no-such-dir"));
    assert!(!ok, "a missing image_root must fail:\n{stderr}");
    assert!(
        stderr.contains("`data.image_root`")
            && stderr.contains("no-such-dir")
            && stderr.contains("not a directory"),
        "{stderr}"
    );

    // The directory exists, the images do not.
    let (ok, stderr) = train(dir.path(), dir.path());
    assert!(!ok, "a run that reads no image must fail:\n{stderr}");
    assert!(stderr.contains("`data.max_unreadable_fraction`") && stderr.contains("epoch 0"), "{stderr}");
    assert!(stderr.contains("images/") && stderr.contains(".png"), "example paths: {stderr}");

    // With the images, the same job trains.
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    for i in 0..4 {
        image::RgbImage::from_pixel(16, 16, image::Rgb([40 * i as u8, 90, 200]))
            .save(dir.path().join(format!("images/{i}.png")))
            .unwrap();
    }
    let (ok, stderr) = train(dir.path(), dir.path());
    assert!(ok, "{stderr}");
}
