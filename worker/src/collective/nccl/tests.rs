//! CPU tests (loading, refusals, dtype mapping) run everywhere; the rest need a CUDA device
//! and skip without one unless `MTL_REQUIRE_CUDA` is set.
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::*;
use crate::collective::nccl::ffi::candidates;

const CHILD_RANK_ENV: &str = "MTL_NCCL_TEST_CHILD_RANK";
const CHILD_ID_ENV: &str = "MTL_NCCL_TEST_ID_FILE";

fn cuda_or_skip() -> bool {
    if tch::Cuda::device_count() > 0 {
        return true;
    }
    assert!(
        std::env::var_os("MTL_REQUIRE_CUDA").is_none(),
        "MTL_REQUIRE_CUDA is set but CUDA is not available"
    );
    eprintln!("skipped: no CUDA");
    false
}

fn timeouts(setup_ms: u64, step_ms: u64) -> Timeouts {
    Timeouts { setup: Duration::from_millis(setup_ms), step: Duration::from_millis(step_ms) }
}

#[test]
fn load_failure_lists_every_path_tried() {
    let paths = [PathBuf::from("/nonexistent/libnccl.so.2"), PathBuf::from("/also/missing/libnccl.so")];
    let err = NcclLibrary::load_first(&paths).err().expect("bogus paths must not load").to_string();
    assert!(err.starts_with("nccl load: no NCCL library could be loaded; tried: "), "{err}");
    for p in &paths {
        assert!(err.contains(&p.display().to_string()), "{err}");
    }
}

#[test]
fn candidates_put_the_explicit_path_first_and_the_soname_last() {
    let explicit = PathBuf::from("/opt/nccl/libnccl.so.2");
    let c = candidates(Some(&explicit));
    assert_eq!(c.first(), Some(&explicit));
    assert_eq!(c.last(), Some(&PathBuf::from("libnccl.so.2")));
    let beside = PathBuf::from(env!("MTL_LIBTORCH_LIB")).join("../../nvidia/nccl/lib/libnccl.so.2");
    assert!(c.contains(&beside), "{c:?}");
    assert_eq!(candidates(None).first(), c.get(1));
}

#[test]
fn the_wheel_library_loads_when_present() {
    let beside = PathBuf::from(env!("MTL_LIBTORCH_LIB")).join("../../nvidia/nccl/lib/libnccl.so.2");
    if !beside.exists() {
        eprintln!("skipped: no nvidia-nccl wheel next to LibTorch");
        return;
    }
    let lib = NcclLibrary::load_first(&candidates(None)).unwrap();
    assert!(lib.version() >= 22800, "{}", lib.version());
}

#[test]
fn non_cuda_tensors_and_integer_tensors_are_refused() {
    let cpu = [Tensor::zeros([2], (Kind::Float, Device::Cpu))];
    let err = check_tensors(&cpu, 0, "all_reduce").unwrap_err().to_string();
    assert!(
        err.contains("all_reduce: unsupported tensor") && err.contains("cuda:0") && err.contains("Cpu"),
        "{err}"
    );
    // The kind is checked on the same pass, so a CPU i64 tensor names both.
    let ints = [Tensor::zeros([2], (Kind::Int64, Device::Cpu))];
    assert!(check_tensors(&ints, 0, "broadcast").unwrap_err().to_string().contains("Int64"));
    assert!(check_tensors(&[], 0, "broadcast").is_ok());
}

#[test]
fn dtypes_map_to_nccl_enums() {
    // ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9 (nccl.h 2.28).
    assert_eq!(nccl_dtype(Kind::Half), Some(6));
    assert_eq!(nccl_dtype(Kind::Float), Some(7));
    assert_eq!(nccl_dtype(Kind::Double), Some(8));
    assert_eq!(nccl_dtype(Kind::BFloat16), Some(9));
    assert_eq!(nccl_dtype(Kind::Int64), None);
    assert_eq!(nccl_dtype(Kind::Uint8), None);
}

#[test]
fn config_has_the_nccl_2_28_size() {
    // sizeof(ncclConfig_t) printed by a C program with the struct and initializer copied from
    // NCCL 2.28.9's nccl.h (it needs CUDA headers to include whole): 80.
    assert_eq!(std::mem::size_of::<Config>(), 80);
}

#[test]
fn bad_unique_id_and_rank_are_refused_before_loading_anything() {
    let err = NcclCollective::new(0, 1, &[0; 3], 0, timeouts(100, 100), 64).err().unwrap().to_string();
    assert!(err.contains("3 bytes, expected 128"), "{err}");
    let err = NcclCollective::new(2, 2, &[0; 128], 0, timeouts(100, 100), 64).err().unwrap().to_string();
    assert!(err.contains("rank 2 is not below the world size 2"), "{err}");
}

#[test]
fn world_of_one_reduces_broadcasts_and_barriers_on_cuda() {
    if !cuda_or_skip() {
        return;
    }
    let dev = Device::Cuda(0);
    let id = unique_id().unwrap();
    assert_eq!(id.len(), UNIQUE_ID_BYTES);
    let mut c = NcclCollective::new(0, 1, &id, 0, timeouts(30_000, 10_000), 64).unwrap();
    let arange = Tensor::arange(40, (Kind::Float, dev));
    let mut ts = vec![
        Tensor::full([2, 3], 1.5, (Kind::Float, dev)),
        Tensor::full([0], 1.0, (Kind::Float, dev)),
        Tensor::full([7], 2.5, (Kind::Double, dev)),
        arange.shallow_clone(), // one contiguous tensor > 64 bytes: in place
        Tensor::ones([4, 3], (Kind::BFloat16, dev)).tr(), // non-contiguous
        Tensor::full([5], 0.25, (Kind::Half, dev)),
    ];
    let before: Vec<Tensor> = ts.iter().map(|t| t.copy()).collect();
    c.all_reduce(&mut ts, ReduceOp::Sum).unwrap();
    c.all_reduce(&mut ts, ReduceOp::Mean).unwrap();
    for (t, b) in ts.iter().zip(&before) {
        assert_eq!(t.size(), b.size());
        assert_eq!(t.kind(), b.kind());
        assert!(t.equal(b), "{t} vs {b}");
    }
    c.broadcast(&mut ts, 0).unwrap();
    assert!(ts[3].equal(&arange));
    c.barrier().unwrap();
    let err = c.broadcast(&mut ts, 1).unwrap_err().to_string();
    assert!(err.contains("root 1"), "{err}");
    let mut cpu = [Tensor::zeros([1], (Kind::Float, Device::Cpu))];
    assert!(matches!(c.all_reduce(&mut cpu, ReduceOp::Sum), Err(CollectiveError::Unsupported { .. })));
}

#[test]
fn setup_times_out_and_aborts_when_a_rank_never_joins() {
    if !cuda_or_skip() {
        return;
    }
    let id = unique_id().unwrap();
    let start = Instant::now();
    let err =
        NcclCollective::new(0, 2, &id, 0, timeouts(2_000, 1_000), 64).err().expect("rank 1 never joins");
    let msg = err.to_string();
    assert!(msg.starts_with("nccl init: timed out after 2000 ms"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
}

/// One of the two processes of [`two_processes_share_one_gpu`]; a no-op when run directly.
#[test]
fn two_process_child() {
    let (Some(rank), Some(id_file)) = (std::env::var_os(CHILD_RANK_ENV), std::env::var_os(CHILD_ID_ENV))
    else {
        return;
    };
    let rank: usize = rank.to_str().unwrap().parse().unwrap();
    let id = std::fs::read(id_file).unwrap();
    match NcclCollective::new(rank, 2, &id, 0, timeouts(15_000, 10_000), 1 << 20) {
        Err(err) => eprintln!("OUTCOME rank {rank}: init failed: {err}"),
        Ok(mut c) => {
            let mut ts = [Tensor::full([1000], rank as f64 + 1.0, (Kind::Float, Device::Cuda(0)))];
            c.all_reduce(&mut ts, ReduceOp::Sum).unwrap();
            assert!(ts[0].equal(&Tensor::full([1000], 3.0, (Kind::Float, Device::Cuda(0)))));
            c.barrier().unwrap();
            eprintln!("OUTCOME rank {rank}: all_reduce of 2 ranks on cuda:0 gave 3.0");
        }
    }
}

/// Two processes, each one rank of a world of two, both on cuda:0, the unique id passed through a
/// file. Whether NCCL accepts two ranks on one GPU is what this records (printed as OUTCOME lines);
/// it fails only if a child crashes, gives wrong values, or does not finish in time.
/// Seen on an H100 with NCCL 2.28.9: both ranks fail init in about 1.7 s with "Duplicate GPU
/// detected : rank 0 and rank 1 both on CUDA device" (ncclInvalidUsage).
#[test]
fn two_processes_share_one_gpu() {
    if !cuda_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let id_file = dir.path().join("nccl_id");
    std::fs::write(&id_file, unique_id().unwrap()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..2)
        .map(|rank| {
            let log = dir.path().join(format!("rank{rank}.log"));
            let child = Command::new(&exe)
                .args([
                    "collective::nccl::tests::two_process_child",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_RANK_ENV, rank.to_string())
                .env(CHILD_ID_ENV, &id_file)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (child, log)
        })
        .collect();
    // Children bound their own waits (15 s set-up, 10 s steps); this only catches a hang.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut statuses = [None, None];
    while statuses.iter().any(Option::is_none) && Instant::now() < deadline {
        for (s, (child, _)) in statuses.iter_mut().zip(children.iter_mut()) {
            if s.is_none() {
                *s = child.try_wait().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut report = String::new();
    for (s, (child, log)) in statuses.iter().zip(children.iter_mut()) {
        if s.is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let text = std::fs::read_to_string(log).unwrap();
        report.push_str(&format!("exit {s:?}\n{text}\n"));
    }
    eprintln!("two processes on cuda:0:\n{report}");
    assert!(statuses.iter().all(|s| s.is_some_and(|s| s.success())), "{report}");
    assert_eq!(report.matches("OUTCOME rank").count(), 2, "{report}");
}
