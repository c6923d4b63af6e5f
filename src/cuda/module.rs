//! Loads the kernel image once per CUDA context.

use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::{Error, Result};

/// The kernel image: the nvcc fatbin (feature `cuda`), or a marker the emulated
/// driver accepts (feature `emulate` alone; its kernels are linked into it).
#[cfg(feature = "cuda")]
static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));
#[cfg(not(feature = "cuda"))]
static IMAGE: &[u8] = b"activation-kernels: emulated image\0";

static LOADED: Mutex<Vec<(Weak<CudaContext>, Arc<CudaModule>)>> = Mutex::new(Vec::new());

/// The crate's kernels loaded into one context.
#[derive(Debug, Clone)]
pub struct Kernels {
    module: Arc<CudaModule>,
}

impl Kernels {
    /// The kernels for `ctx`, loading the image on first use in that context.
    pub fn get(ctx: &Arc<CudaContext>) -> Result<Self> {
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        loaded.retain(|(w, _)| w.strong_count() > 0);
        if let Some((_, m)) = loaded
            .iter()
            .find(|(w, _)| w.upgrade().is_some_and(|c| Arc::ptr_eq(&c, ctx)))
        {
            return Ok(Self { module: m.clone() });
        }
        let module = ctx.load_module(Ptx::from_binary(IMAGE.to_vec()))?;
        loaded.push((Arc::downgrade(ctx), module.clone()));
        Ok(Self { module })
    }

    /// The kernel called `name`.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        self.module
            .load_function(name)
            .map_err(|e| Error::Driver(format!("kernel {name}: {e}")))
    }
}
