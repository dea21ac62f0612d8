//! Loading NCCL with `libloading`, and the few CUDA driver calls the NCCL backend needs
//! (through cudarc's `driver::sys`). The NCCL C types are declared here (from NCCL 2.28's
//! `nccl.h`, the `ncclConfig_t` layout checked against it) instead of taken from cudarc, whose
//! NCCL loader only tries `libnccl.so`/`libnccl.so.<major>` names that the torch wheel does
//! not ship, and panics when none loads. Resolution order, first that loads wins: an explicit
//! path (`MTL_NCCL_LIBRARY`), `libnccl.so.2` of the `nvidia-nccl` wheel next to the LibTorch
//! this process mapped (from `/proc/self/maps`), the same next to the LibTorch this crate was
//! built against, then plain `libnccl.so.2` through the dynamic loader's search path (usually
//! already loaded by `libtorch_cuda`).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::collective::CollectiveError;

/// `ncclResult_t` / `CUresult`: plain C enums.
pub(super) type Status = c_int;
/// `ncclComm_t`: an opaque pointer.
pub(super) type Comm = *mut c_void;
/// `ncclSuccess`.
pub(super) const NCCL_SUCCESS: Status = 0;
/// `ncclInProgress`: a non-blocking call has not finished yet.
pub(super) const NCCL_IN_PROGRESS: Status = 7;
/// `ncclSum`.
pub(super) const NCCL_SUM: c_int = 0;
/// `ncclAvg`.
pub(super) const NCCL_AVG: c_int = 4;
/// `CUDA_SUCCESS`.
pub(super) const CUDA_SUCCESS: Status = 0;
/// `CUDA_ERROR_NOT_READY`: work is still queued on the stream.
pub(super) const CUDA_ERROR_NOT_READY: Status = 600;
/// `NCCL_UNIQUE_ID_BYTES`.
pub(crate) const UNIQUE_ID_BYTES: usize = 128;
/// The environment variable naming an explicit NCCL library path.
pub(crate) const LIBRARY_ENV: &str = "MTL_NCCL_LIBRARY";

/// `ncclUniqueId`: passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct UniqueId {
    pub internal: [u8; UNIQUE_ID_BYTES],
}

/// `ncclConfig_t` as of NCCL 2.28 (`ncclConfig_v22800`); NCCL reads only `size` bytes of it.
#[repr(C)]
pub(super) struct Config {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
    traffic_class: c_int,
    comm_name: *const c_char,
    collnet_enable: c_int,
    cta_policy: c_int,
    shrink_share: c_int,
    nvls_ctas: c_int,
    n_channels_per_net_peer: c_int,
    nvlink_centric_sched: c_int,
}

impl Config {
    /// `NCCL_CONFIG_INITIALIZER` (every field undefined, i.e. NCCL's default) with
    /// `blocking = 0`, so init and collectives return `ncclInProgress` instead of blocking.
    pub(super) fn non_blocking() -> Self {
        const UNDEF: c_int = c_int::MIN;
        Self {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            version: 22800, // NCCL_VERSION(2, 28, 0): the layout above.
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
            split_share: UNDEF,
            traffic_class: UNDEF,
            comm_name: std::ptr::null(),
            collnet_enable: UNDEF,
            cta_policy: UNDEF,
            shrink_share: UNDEF,
            nvls_ctas: UNDEF,
            n_channels_per_net_peer: UNDEF,
            nvlink_centric_sched: UNDEF,
        }
    }
}

type CollFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> Status;

/// The NCCL entry points the backend calls, resolved once.
pub(crate) struct NcclLibrary {
    path: PathBuf,
    version: c_int,
    pub(super) get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    pub(super) comm_init_rank_config:
        unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int, *mut Config) -> Status,
    /// `ncclAllReduce(send, recv, count, datatype, op, comm, stream)`.
    pub(super) all_reduce: CollFn,
    /// `ncclBroadcast(send, recv, count, datatype, root, comm, stream)`.
    pub(super) broadcast: CollFn,
    pub(super) comm_get_async_error: unsafe extern "C" fn(Comm, *mut Status) -> Status,
    pub(super) comm_finalize: unsafe extern "C" fn(Comm) -> Status,
    pub(super) comm_destroy: unsafe extern "C" fn(Comm) -> Status,
    pub(super) comm_abort: unsafe extern "C" fn(Comm) -> Status,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    get_last_error: unsafe extern "C" fn(Comm) -> *const c_char,
    // Last: the pointers above stay valid while it is loaded.
    _lib: libloading::Library,
}

/// Looks up `name` (NUL-terminated) in `lib`, naming the library and symbol on failure.
///
/// # Safety
/// `T` must be the symbol's C signature.
unsafe fn symbol<T: Copy>(lib: &libloading::Library, path: &Path, name: &str) -> Result<T, String> {
    let sym = unsafe { lib.get::<T>(name.as_bytes()) }
        .map_err(|e| format!("{}: missing symbol {}: {e}", path.display(), name.trim_end_matches('\0')))?;
    Ok(*sym)
}

impl NcclLibrary {
    /// Loads the first of `candidates` that loads and has every symbol; the error lists each
    /// path tried with why it failed.
    pub(crate) fn load_first(candidates: &[PathBuf]) -> Result<Self, CollectiveError> {
        let mut tried = Vec::new();
        for path in candidates {
            match Self::load(path) {
                Ok(lib) => return Ok(lib),
                Err(why) => tried.push(format!("{} ({why})", path.display())),
            }
        }
        Err(CollectiveError::Nccl {
            op: "load",
            message: format!("no NCCL library could be loaded; tried: {}", tried.join("; ")),
        })
    }

    fn load(path: &Path) -> Result<Self, String> {
        // SAFETY: loading NCCL runs only its (side-effect free) initialisers; every symbol type
        // below is the C signature from NCCL 2.28's nccl.h.
        unsafe {
            let lib = libloading::Library::new(path).map_err(|e| e.to_string())?;
            let get_version: unsafe extern "C" fn(*mut c_int) -> Status =
                symbol(&lib, path, "ncclGetVersion\0")?;
            let mut version = 0;
            get_version(&mut version);
            if version < 21900 {
                return Err(format!("NCCL version {version} is older than 2.19"));
            }
            Ok(Self {
                path: path.to_path_buf(),
                version,
                get_unique_id: symbol(&lib, path, "ncclGetUniqueId\0")?,
                comm_init_rank_config: symbol(&lib, path, "ncclCommInitRankConfig\0")?,
                all_reduce: symbol(&lib, path, "ncclAllReduce\0")?,
                broadcast: symbol(&lib, path, "ncclBroadcast\0")?,
                comm_get_async_error: symbol(&lib, path, "ncclCommGetAsyncError\0")?,
                comm_finalize: symbol(&lib, path, "ncclCommFinalize\0")?,
                comm_destroy: symbol(&lib, path, "ncclCommDestroy\0")?,
                comm_abort: symbol(&lib, path, "ncclCommAbort\0")?,
                get_error_string: symbol(&lib, path, "ncclGetErrorString\0")?,
                get_last_error: symbol(&lib, path, "ncclGetLastError\0")?,
                _lib: lib,
            })
        }
    }

    /// The process-wide library, resolved on first use from [`LIBRARY_ENV`] and [`candidates`].
    pub(crate) fn shared() -> Result<&'static Self, CollectiveError> {
        static LIB: OnceLock<Result<NcclLibrary, String>> = OnceLock::new();
        let explicit = std::env::var_os(LIBRARY_ENV).map(PathBuf::from);
        match LIB
            .get_or_init(|| Self::load_first(&candidates(explicit.as_deref())).map_err(|e| e.to_string()))
        {
            Ok(lib) => Ok(lib),
            Err(message) => Err(CollectiveError::Nccl { op: "load", message: message.clone() }),
        }
    }

    /// The path the library was loaded from.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `ncclGetVersion`, e.g. 22809 for 2.28.9.
    pub(crate) fn version(&self) -> i32 {
        self.version
    }

    /// NCCL's description of `status`, with the communicator's last error when there is one.
    pub(super) fn describe(&self, status: Status, comm: Comm) -> String {
        // SAFETY: both return static or comm-owned NUL-terminated strings (or null).
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let base = text(unsafe { (self.get_error_string)(status) });
        let last = text(unsafe { (self.get_last_error)(comm) });
        if last.is_empty() {
            format!("{base} (ncclResult {status})")
        } else {
            format!("{base} (ncclResult {status}): {last}")
        }
    }
}

/// Where to look for NCCL, in order: `explicit`, the wheel's `libnccl.so.2` next to the
/// LibTorch mapped into this process, the same next to the build-time LibTorch, then the
/// bare soname for the loader's search path. Duplicates are dropped.
pub(crate) fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let beside_torch = |torch_lib: &Path| torch_lib.join("../../nvidia/nccl/lib/libnccl.so.2");
    let mut out: Vec<PathBuf> = explicit.map(Path::to_path_buf).into_iter().collect();
    out.extend(mapped_torch_lib_dir().as_deref().map(beside_torch));
    out.push(beside_torch(Path::new(env!("MTL_LIBTORCH_LIB"))));
    out.push(PathBuf::from("libnccl.so.2"));
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// The directory of the `libtorch_cpu.so` mapped into this process, from `/proc/self/maps`.
fn mapped_torch_lib_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| Path::new(path).parent().map(Path::to_path_buf))
}

/// The CUDA driver calls the backend needs, through cudarc's `driver::sys` (which loads
/// `libcuda.so.1`). Checked with `is_culib_present` first: cudarc panics when no library loads.
pub(super) struct CudaDriver;

impl CudaDriver {
    /// The driver, loaded and initialised once per process.
    pub(super) fn shared() -> Result<&'static Self, CollectiveError> {
        use cudarc::driver::sys;
        static DRIVER: OnceLock<Result<CudaDriver, String>> = OnceLock::new();
        let loaded = DRIVER.get_or_init(|| {
            // SAFETY: plain C calls into the driver; `is_culib_present` only tries to load it.
            unsafe {
                if !sys::is_culib_present() {
                    return Err("the NVIDIA driver library (libcuda.so.1) is not loadable".into());
                }
                match sys::cuInit(0) {
                    sys::CUresult::CUDA_SUCCESS => Ok(CudaDriver),
                    status => Err(format!("cuInit failed with {status:?}")),
                }
            }
        });
        loaded
            .as_ref()
            .map_err(|message| CollectiveError::Nccl { op: "load libcuda", message: message.clone() })
    }

    /// The driver's handle for device `index`.
    pub(super) fn device(&self, index: usize) -> Result<c_int, CollectiveError> {
        let mut dev = 0;
        // SAFETY: writes one int.
        match unsafe { cudarc::driver::sys::cuDeviceGet(&mut dev, index as c_int) } {
            cudarc::driver::sys::CUresult::CUDA_SUCCESS => Ok(dev),
            status => Err(CollectiveError::Nccl {
                op: "init",
                message: format!("cuDeviceGet({index}) failed with {status:?}"),
            }),
        }
    }

    /// `cuDevicePrimaryCtxRetain`.
    ///
    /// # Safety
    /// `ctx` must be valid for one pointer write.
    pub(super) unsafe fn primary_ctx_retain(&self, ctx: *mut *mut c_void, dev: c_int) -> Status {
        unsafe { cudarc::driver::sys::cuDevicePrimaryCtxRetain(ctx.cast(), dev) as Status }
    }

    /// `cuDevicePrimaryCtxRelease`.
    ///
    /// # Safety
    /// `dev` must have a retained primary context.
    pub(super) unsafe fn primary_ctx_release(&self, dev: c_int) -> Status {
        unsafe { cudarc::driver::sys::cuDevicePrimaryCtxRelease_v2(dev) as Status }
    }

    /// `cuCtxSetCurrent`.
    ///
    /// # Safety
    /// `ctx` must be a live context.
    pub(super) unsafe fn ctx_set_current(&self, ctx: *mut c_void) -> Status {
        unsafe { cudarc::driver::sys::cuCtxSetCurrent(ctx.cast()) as Status }
    }

    /// `cuStreamQuery` on the legacy default stream: `CUDA_SUCCESS` once all queued work is done.
    ///
    /// # Safety
    /// The context of the device in use must be current.
    pub(super) unsafe fn stream_query_default(&self) -> Status {
        unsafe { cudarc::driver::sys::cuStreamQuery(std::ptr::null_mut()) as Status }
    }
}
