//! Optional oneDNN single-precision GEMM, loaded at run time.
//!
//! oneDNN (`libdnnl.so.2`, Debian's `libdnnl-dev`/`libdnnl2`) JIT-compiles its
//! kernels for the CPU it runs on and is what PyTorch uses on CPUs. Loading it
//! with `dlopen` keeps the build free of a C dependency: a machine without the
//! library runs the pure-Rust `gemm` crate, one `apt-get install libdnnl2` away
//! from the fast path. It is the default on Intel CPUs only: on AMD EPYC (Zen 4)
//! the `gemm` crate ran the seed ResNet's convolution shapes faster (e.g. 106
//! against 44 GFLOP/s at 48×16×1024, `examples/gemm_shapes.rs`) and the whole
//! exact HVP ~8% faster (docs/performance.md). `HVP_GEMM=rust` forces the Rust
//! kernels (used by the tests that compare the two paths); `HVP_GEMM=onednn`
//! uses oneDNN on any CPU and makes a missing library an error instead of a
//! silent fallback.

use libloading::Library;
use std::cell::Cell;
use std::os::raw::{c_char, c_float, c_int};
use std::sync::OnceLock;

type SgemmFn = unsafe extern "C" fn(
    c_char,
    c_char,
    i64,
    i64,
    i64,
    c_float,
    *const c_float,
    i64,
    *const c_float,
    i64,
    c_float,
    *mut c_float,
    i64,
) -> c_int;
type SetThreadsFn = unsafe extern "C" fn(c_int);

/// Library names tried, in order.
const CANDIDATES: [&str; 3] = ["libdnnl.so.3", "libdnnl.so.2", "libdnnl.so"];

pub(crate) struct OneDnn {
    sgemm: SgemmFn,
    /// `omp_set_num_threads` of the OpenMP runtime oneDNN was built with; the
    /// setting is per calling thread, so rayon workers can ask for one thread
    /// each while the main thread asks for the pool's size.
    set_threads: Option<SetThreadsFn>,
    name: &'static str,
    // Kept last so it is dropped after the function pointers (never, in practice).
    _library: Library,
}

static ONEDNN: OnceLock<Result<OneDnn, String>> = OnceLock::new();

thread_local! {
    static OMP_THREADS: Cell<c_int> = const { Cell::new(0) };
}

/// Which GEMM implementation f32 products use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmBackend {
    /// The pure-Rust `gemm` crate.
    Rust,
    /// oneDNN's `dnnl_sgemm`, loaded at run time.
    OneDnn,
}

fn load() -> Result<OneDnn, String> {
    // libgomp reads its wait policy once, when oneDNN loads it. Its default
    // keeps idle OpenMP workers spinning after each multi-threaded GEMM, taking
    // the cores from the rayon workers that run between GEMMs (the K-FAC
    // contraction pass on the seed ResNet ran 13% slower, 30% with `active`;
    // docs/performance.md). A user's own setting is kept.
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        std::env::set_var("OMP_WAIT_POLICY", "passive");
    }
    let mut last_error = String::new();
    for name in CANDIDATES {
        // SAFETY: loading oneDNN runs its (side-effect free) static constructors.
        let library = match unsafe { Library::new(name) } {
            Ok(library) => library,
            Err(e) => {
                last_error = e.to_string();
                continue;
            }
        };
        // SAFETY: the symbol types match the declarations in oneDNN's `dnnl.h`
        // and OpenMP's `omp.h`.
        let sgemm = match unsafe { library.get::<SgemmFn>(b"dnnl_sgemm\0") } {
            Ok(symbol) => *symbol,
            Err(e) => {
                last_error = format!("{name}: {e}");
                continue;
            }
        };
        let set_threads = unsafe { library.get::<SetThreadsFn>(b"omp_set_num_threads\0") }
            .ok()
            .map(|s| *s);
        return Ok(OneDnn {
            sgemm,
            set_threads,
            name,
            _library: library,
        });
    }
    Err(last_error)
}

fn requested() -> Option<GemmBackend> {
    match std::env::var("HVP_GEMM").ok()?.to_ascii_lowercase().as_str() {
        "rust" | "gemm" => Some(GemmBackend::Rust),
        "onednn" | "dnnl" => Some(GemmBackend::OneDnn),
        _ => None,
    }
}

/// Whether this CPU is an Intel one (CPUID vendor `GenuineIntel`), where
/// oneDNN's kernels are the faster of the two.
fn intel_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 0 (the vendor string) exists on every x86-64 CPU.
        let id = std::arch::x86_64::__cpuid(0);
        let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        vendor == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether oneDNN is wanted: asked for by `HVP_GEMM`, else on Intel CPUs.
fn wanted() -> bool {
    match requested() {
        Some(backend) => backend == GemmBackend::OneDnn,
        None => intel_cpu(),
    }
}

/// oneDNN when it is installed and wanted (see [`wanted`]).
pub(crate) fn library() -> Option<&'static OneDnn> {
    static CHOSEN: OnceLock<bool> = OnceLock::new();
    let use_it = *CHOSEN.get_or_init(wanted);
    if !use_it {
        return None;
    }
    ONEDNN.get_or_init(load).as_ref().ok()
}

/// oneDNN if it can be loaded, whatever `HVP_GEMM` says.
pub(crate) fn loaded() -> Option<&'static OneDnn> {
    ONEDNN.get_or_init(load).as_ref().ok()
}

/// Whether oneDNN can be loaded here (whether or not it is the default).
pub fn is_installed() -> bool {
    loaded().is_some()
}

/// The backend f32 GEMMs use in this process, and a description for logs
/// (library name, or why oneDNN is not used).
pub fn gemm_backend() -> (GemmBackend, String) {
    if requested() == Some(GemmBackend::Rust) {
        return (GemmBackend::Rust, "gemm crate (HVP_GEMM=rust)".into());
    }
    if !wanted() {
        let override_hint = if is_installed() {
            "; HVP_GEMM=onednn to use the installed oneDNN"
        } else {
            ""
        };
        return (
            GemmBackend::Rust,
            format!("gemm crate (non-Intel CPU, where it outruns oneDNN{override_hint})"),
        );
    }
    match ONEDNN.get_or_init(load) {
        Ok(lib) => (GemmBackend::OneDnn, format!("oneDNN ({})", lib.name)),
        Err(e) => (GemmBackend::Rust, format!("gemm crate (oneDNN not loaded: {e})")),
    }
}

/// Fails when `HVP_GEMM=onednn` was asked for but the library cannot be loaded,
/// so a benchmark never measures the fallback by mistake.
pub fn check_requested_backend() -> Result<(), String> {
    if requested() == Some(GemmBackend::OneDnn) {
        if let Err(e) = ONEDNN.get_or_init(load) {
            return Err(format!(
                "HVP_GEMM=onednn but oneDNN could not be loaded ({e}); install it with \
                 `apt-get install libdnnl2` or unset HVP_GEMM"
            ));
        }
    }
    Ok(())
}

impl OneDnn {
    /// Row-major `c = beta·c + op(a)·op(b)` (see `linalg::gemm_strided_into`;
    /// `ld` = row strides as stored), using `threads` OpenMP threads.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sgemm(
        &self,
        c: *mut f32,
        ldc: usize,
        a: &[f32],
        lda: usize,
        trans_a: bool,
        b: &[f32],
        ldb: usize,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
        threads: usize,
    ) {
        if let Some(set_threads) = self.set_threads {
            let threads = threads.max(1) as c_int;
            OMP_THREADS.with(|current| {
                if current.get() != threads {
                    // SAFETY: plain OpenMP runtime call affecting the calling thread.
                    unsafe { set_threads(threads) };
                    current.set(threads);
                }
            });
        }
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the caller checked that the slices hold the m×k and k×n
        // operands and `c` the m×n view at these row strides (valid for
        // writes; read only when accumulating, as β = 0 is never read); `c`
        // does not alias `a`/`b`.
        let status = unsafe {
            (self.sgemm)(
                if trans_a { b'T' } else { b'N' } as c_char,
                if trans_b { b'T' } else { b'N' } as c_char,
                m as i64,
                n as i64,
                k as i64,
                1.0,
                a.as_ptr(),
                lda as i64,
                b.as_ptr(),
                ldb as i64,
                beta,
                c,
                ldc as i64,
            )
        };
        // dnnl_sgemm only fails on invalid arguments, which the asserts in
        // `gemm_into` rule out; a failure here is a bug, not bad input.
        assert_eq!(status, 0, "dnnl_sgemm failed with status {status} for {m}x{n}x{k}");
    }
}
