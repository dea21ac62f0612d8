//! Link-time settings every binary that links LibTorch needs, and the C++ shim:
//! - an rpath to LibTorch's lib dir, so `target/*/worker` runs without LD_LIBRARY_PATH;
//! - `libtorch_cuda` kept as a dependency: nothing references it directly, so `--as-needed`
//!   would drop it and CUDA would then be "not available" on GPU machines;
//! - the C++ shim in `shim/` (bf16 autocast, fused optimisers and foreach ops, SyncBatchNorm,
//!   pinned allocation, the op counter, cuDNN benchmark and channels_last, post-accumulate-grad
//!   hooks, CUDA graphs). CUDA graphs need LibTorch's CUDA library and the CUDA runtime headers
//!   (the torch wheel's `nvidia/cu*/include`, `CUDA_HOME`, or /usr/local/cuda); without them
//!   the shim is built without them, and `train.cuda_graphs` says so at run time.

/// The C++ sources of the shim.
const SHIM_FILES: [&str; 8] = [
    "shim/autocast.cpp",
    "shim/cuda_graph.cpp",
    "shim/foreach.cpp",
    "shim/grad_hooks.cpp",
    "shim/kernels.cpp",
    "shim/op_counter.cpp",
    "shim/pinned.cpp",
    "shim/sync_batch_norm.cpp",
];

fn main() {
    // Set by torch-sys (links = "tch") for its direct dependents.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports its LibTorch lib dir");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let libtorch_cuda = std::path::Path::new(&lib).join("libtorch_cuda.so").exists();
    if libtorch_cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-env=MTL_LIBTORCH_LIB={lib}");

    // The C++ shim for what tch does not expose (bf16 autocast, fused optimisers and foreach ops,
    // SyncBatchNorm's custom autograd function, pinned allocation, op counting, gradient hooks),
    // built against the same LibTorch headers and C++ ABI as torch-sys.
    let include = std::path::Path::new(&lib).join("../include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    if let Some(cuda_include) = libtorch_cuda.then(|| cuda_runtime_include(&lib)).flatten() {
        build.define("MTL_CUDA", None).include(cuda_include);
        println!("cargo:rustc-link-arg=-lc10_cuda");
    }
    build
        .cpp(true)
        .files(SHIM_FILES)
        .include(&include)
        .flag("-std=c++17")
        // As LibTorch itself is built: some of its headers add debug-only members to classes
        // (RecordFunction), which would otherwise not match the library's layout.
        .define("NDEBUG", None)
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .warnings(false)
        .compile("mtl_shim");
    for file in SHIM_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-changed=shim/guard.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
}

/// The directory holding `cuda_runtime_api.h` for LibTorch in `lib`: the torch wheel's own
/// (`site-packages/nvidia/cu13/include`, or `nvidia/cuda_runtime/include` in CUDA 12 wheels),
/// else `CUDA_HOME`'s, else /usr/local/cuda's.
fn cuda_runtime_include(lib: &str) -> Option<std::path::PathBuf> {
    let site = std::path::Path::new(lib).join("../..");
    let mut candidates = Vec::new();
    if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
        for entry in entries.flatten() {
            candidates.push(entry.path().join("include"));
        }
    }
    candidates.sort();
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(std::path::PathBuf::from(home).join("include"));
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates.into_iter().find(|dir| dir.join("cuda_runtime_api.h").exists())
}
