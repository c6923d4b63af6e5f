//! Loads the kernel image once per CUDA context, checking first that the driver can
//! run it.
//!
//! Order: the image nvcc built (feature `cuda`) when the driver is at least the
//! toolkit's major version; otherwise, or when the driver refuses it (e.g. a GPU the
//! image has no code for), the same source compiled at run time with the machine's
//! NVRTC for the device's exact architecture ([`super::rtc`], cached on disk). When
//! neither works, [`Kernels::get`] returns an [`Error::Driver`] that names the
//! driver's CUDA version, the toolkit the image needs, and the fixes.

use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::rtc;
use crate::{Error, Result};

/// The kernel image: the nvcc fatbin (feature `cuda`), or a marker the emulated
/// driver accepts (feature `emulate` alone; its kernels are linked into it). The
/// marker poses as an image of a CUDA 13.0 toolkit, so the emulated driver refuses it
/// when it poses as an older driver (`emu::set_driver_version`).
#[cfg(feature = "cuda")]
static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));
#[cfg(not(feature = "cuda"))]
static IMAGE: &[u8] = b"activation-kernels: emulated image; built with CUDA 13000\0";

/// The CUDA version of the toolkit that built [`IMAGE`] (driver-API encoding,
/// 1000·major + 10·minor).
#[cfg(feature = "cuda")]
const IMAGE_TOOLKIT: &str = env!("AK_CUDA_TOOLKIT_VERSION");
#[cfg(not(feature = "cuda"))]
const IMAGE_TOOLKIT: &str = "13000";

/// Version `v` (1000·major + 10·minor) as "major.minor".
fn dotted(v: i32) -> String {
    format!("{}.{}", v / 1000, v % 1000 / 10)
}

/// Where a context's kernels came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The image built with the crate (nvcc's fatbin, or the emulated image).
    Built,
    /// Compiled at run time by NVRTC for this device (`from_cache`: read from the
    /// disk cache instead of compiled).
    RunTime {
        /// NVRTC's version as (major, minor).
        nvrtc: (i32, i32),
        /// Whether the image came from the disk cache.
        from_cache: bool,
    },
}

/// The CUDA version the driver supports (`cuDriverGetVersion`).
pub fn driver_version() -> Result<i32> {
    let mut v = 0;
    // SAFETY: writes one int through a valid pointer; callable before cuInit.
    let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if rc != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Driver(format!("cuDriverGetVersion failed: {rc:?}")));
    }
    Ok(v)
}

/// Loads the kernels into `ctx` (see the module doc for the order).
fn load(ctx: &Arc<CudaContext>) -> Result<(Arc<CudaModule>, Origin)> {
    let driver = driver_version()?;
    let toolkit: i32 = IMAGE_TOOLKIT.parse().unwrap_or(i32::MAX);
    // An image needs a driver of its toolkit's major version (CUDA's minor-version
    // compatibility covers the rest for the SASS in it).
    let needs = toolkit / 1000 * 1000;
    let built_err = if driver >= needs {
        match ctx.load_module(Ptx::from_binary(IMAGE.to_vec())) {
            Ok(m) => return Ok((m, Origin::Built)),
            Err(e) => format!("the driver refused it ({e})"),
        }
    } else {
        format!("it needs a CUDA {}.x driver or newer", needs / 1000)
    };
    let (major, minor) = ctx.compute_capability()?;
    let arch = u32::try_from(major * 10 + minor)
        .map_err(|_| Error::Driver(format!("bad compute capability {major}.{minor}")))?;
    let target = rtc::Target::Cubin(arch);
    // Compiles (or reads from the cache) and loads; Err(from_cache, why) on failure.
    let attempt =
        |read_cache: bool| -> std::result::Result<(Arc<CudaModule>, Origin), (bool, String)> {
            let c = rtc::compile_for_driver(target, driver, read_cache)
                .map_err(|e| (false, e.to_string()))?;
            let origin = c.origin();
            ctx.load_module(Ptx::from_binary(c.image))
                .map(|m| (m, origin))
                .map_err(|e| {
                    (
                        c.from_cache,
                        format!("the driver refused its sm_{arch} image ({e})"),
                    )
                })
        };
    let rtc_err = match attempt(true) {
        Ok(loaded) => return Ok(loaded),
        // A cached image the driver refuses (e.g. written by a broken earlier run):
        // compile once more, replacing it.
        Err((true, _)) => match attempt(false) {
            Ok(loaded) => return Ok(loaded),
            Err((_, why)) => why,
        },
        Err((false, why)) => why,
    };
    Err(Error::Driver(format!(
        "cannot load the kernels on this GPU (sm_{arch}): the driver supports CUDA {} and \
         the built image comes from CUDA {} — {built_err}; the run-time compile failed: \
         {rtc_err}. Fix: update the NVIDIA driver to one that supports CUDA {}.x{}, or \
         rebuild with a CUDA {dmaj}.x toolkit (NVCC=/path/to/cuda-{dmaj}.x/bin/nvcc), or \
         install NVRTC {dmaj}.x (`pip install nvidia-cuda-nvrtc-cu{dmaj}`) and point \
         AK_NVRTC_LIB at its libnvrtc.so.{dmaj}",
        dotted(driver),
        dotted(toolkit),
        toolkit / 1000,
        if toolkit >= 13000 {
            " (R580 or newer)"
        } else {
            ""
        },
        dmaj = driver / 1000,
    )))
}

/// One context's kernels, or why they could not be loaded: a failure is kept too, so
/// later calls return it at once instead of repeating a run-time compile.
type Loaded = (
    Weak<CudaContext>,
    std::result::Result<(Arc<CudaModule>, Origin), Error>,
);
static LOADED: Mutex<Vec<Loaded>> = Mutex::new(Vec::new());

/// The crate's kernels loaded into one context.
#[derive(Debug, Clone)]
pub struct Kernels {
    module: Arc<CudaModule>,
    origin: Origin,
}

impl Kernels {
    /// The kernels for `ctx`, loading them on first use in that context (the built
    /// image, else a run-time compile; see the module doc). The error for a driver
    /// that can run neither names both CUDA versions and the fixes; it is kept for the
    /// context, so later calls return it without trying again.
    ///
    /// The first call in a context that needs the run-time compile takes the compile's
    /// time (about 30 s, once per machine and GPU architecture thanks to the disk
    /// cache); other threads asking for kernels wait for it meanwhile.
    pub fn get(ctx: &Arc<CudaContext>) -> Result<Self> {
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        loaded.retain(|(w, _)| w.strong_count() > 0);
        let found = loaded
            .iter()
            .find(|(w, _)| w.upgrade().is_some_and(|c| Arc::ptr_eq(&c, ctx)))
            .map(|(_, r)| r.clone());
        let r = match found {
            Some(r) => r,
            None => {
                let r = load(ctx);
                loaded.push((Arc::downgrade(ctx), r.clone()));
                r
            }
        };
        r.map(|(module, origin)| Self { module, origin })
    }

    /// Where these kernels came from: the built image, or NVRTC at run time.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The kernel called `name`.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        self.module
            .load_function(name)
            .map_err(|e| Error::Driver(format!("kernel {name}: {e}")))
    }
}
