//! Kernel handles resolved once per CUDA context, so that the launch path takes no
//! lock, formats no name, allocates nothing and makes no driver call to find a kernel.
//!
//! Every launcher names its kernel with [`kernel_fn!`] (a string literal, plus the
//! storage dtype for the `<op>_f32|f16|bf16` families). Each use site is a static
//! [`Site`] that takes one slot per name, numbered once per process on first use; each
//! context has a [`Table`] of slots, each filled once ([`Kernels::function`], i.e.
//! `cuModuleGetFunction`) on the first launch of that kernel in that context. The
//! table of a context is found through a thread-local list (no lock); a thread's first
//! call for a context consults the process-wide list once, under its lock.
//!
//! Cost per launch, steady state: one `OnceLock` read for the site, a short
//! thread-local scan comparing context pointers, one `OnceLock` read for the handle and
//! the handle's clone (one atomic increment). The handle's PTX version and the device's
//! compute capability (which pick the IieuConv2d GEMM forms) are cached the same way.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

use super::{DType, Kernels};
use crate::{Error, Result};

/// Slots per context: at least the number of names over all use sites of
/// [`kernel_fn!`] (three per dtype family), with room to spare.
const SLOTS: usize = 1024;

/// The next free slot number (sites take theirs on first use).
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// One use site of [`kernel_fn!`]: its kernel names (one, or one per storage dtype in
/// the order f32, f16, bf16) and the number of its first slot.
pub(crate) struct Site<const N: usize> {
    names: [&'static str; N],
    base: OnceLock<usize>,
}

impl<const N: usize> Site<N> {
    /// A site for `names` (its slots are numbered on first use).
    pub(crate) const fn new(names: [&'static str; N]) -> Self {
        Self {
            names,
            base: OnceLock::new(),
        }
    }

    /// The kernel `names[i]` for `stream`'s context.
    fn get_index(&self, stream: &Arc<CudaStream>, i: usize) -> Result<Kernel> {
        let name = self.names[i];
        let base = *self
            .base
            .get_or_init(|| NEXT_SLOT.fetch_add(N, Ordering::Relaxed));
        let slot = base + i;
        if slot >= SLOTS {
            return Err(Error::Driver(format!(
                "kernel {name}: more than {SLOTS} kernel-handle slots in use"
            )));
        }
        let (func, ptx) = with_table(stream.context(), |t| t.function(slot, name))?;
        Ok(Kernel { func, name, ptx })
    }
}

impl Site<1> {
    /// The site's kernel for `stream`'s context.
    pub(crate) fn get(&self, stream: &Arc<CudaStream>) -> Result<Kernel> {
        self.get_index(stream, 0)
    }
}

impl Site<3> {
    /// The site's kernel for storage dtype `T` (`<op>_<T::NAME>`) for `stream`'s
    /// context.
    pub(crate) fn get_for<T: DType>(&self, stream: &Arc<CudaStream>) -> Result<Kernel> {
        let i = match T::NAME {
            "f32" => 0,
            "f16" => 1,
            "bf16" => 2,
            other => {
                return Err(Error::Driver(format!(
                    "kernel {}: no kernels for storage dtype {other}",
                    self.names[0]
                )))
            }
        };
        self.get_index(stream, i)
    }
}

/// A kernel handle and the kernel's name (for errors: [`super::Launcher`] names the
/// kernel when `AK_CUDA_SYNC_CHECK=1` finds a fault). It does not deref to its
/// [`CudaFunction`]: the only way to launch it is [`super::launcher`], so no launch
/// can skip the sync check.
pub(crate) struct Kernel {
    func: CudaFunction,
    name: &'static str,
    ptx: i32,
}

impl Kernel {
    /// The kernel's name, e.g. `acon_c_fwd_f32`.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The virtual architecture the loaded code was compiled for (`__CUDA_ARCH__ / 10`;
    /// below the device's when the driver JIT-compiled older PTX), queried once per
    /// context when the handle was resolved.
    pub(crate) fn ptx_version(&self) -> i32 {
        self.ptx
    }

    /// The function handle, for [`super::launcher`] only.
    pub(crate) fn func(&self) -> &CudaFunction {
        &self.func
    }
}

/// The kernel handles of one context, each resolved on its first launch there (with
/// its PTX version), and the device's compute capability.
struct Table {
    kernels: Kernels,
    funcs: Box<[OnceLock<(CudaFunction, i32)>]>,
    cc: OnceLock<(i32, i32)>,
}

impl Table {
    fn new(kernels: Kernels) -> Self {
        Self {
            kernels,
            funcs: (0..SLOTS).map(|_| OnceLock::new()).collect(),
            cc: OnceLock::new(),
        }
    }

    /// The handle in `slot` (kernel `name`) and its PTX version, resolved now if it is
    /// the first use.
    fn function(&self, slot: usize, name: &'static str) -> Result<(CudaFunction, i32)> {
        let cell = self
            .funcs
            .get(slot)
            .ok_or_else(|| Error::Driver(format!("kernel {name}: slot {slot} out of range")))?;
        if let Some(f) = cell.get() {
            return Ok(f.clone());
        }
        // Two threads may both resolve it; either handle is the same kernel.
        let f = self.kernels.function(name)?;
        let ptx = f
            .ptx_version()
            .map_err(|e| Error::Driver(format!("kernel {name}: PTX version: {e}")))?;
        Ok(cell.get_or_init(|| (f, ptx)).clone())
    }
}

/// The compute capability `(major, minor)` of `stream`'s device, queried once per
/// context (the GEMM launchers pick their kernel form by it on every call).
pub(crate) fn compute_capability(stream: &Arc<CudaStream>) -> Result<(i32, i32)> {
    let ctx = stream.context();
    with_table(ctx, |t| {
        if let Some(cc) = t.cc.get() {
            return Ok(*cc);
        }
        let cc = ctx
            .compute_capability()
            .map_err(|e| Error::Driver(format!("compute capability: {e}")))?;
        Ok(*t.cc.get_or_init(|| cc))
    })
}

type Entry = (Weak<CudaContext>, Arc<Table>);

/// Every context's table (consulted once per thread and context).
static TABLES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's view of [`TABLES`]: the contexts it has launched on.
    static LOCAL: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

/// Whether `w` refers to the context `ctx`. A `Weak` keeps its allocation, so while the
/// entry exists no other context can have this address: pointer equality suffices.
fn same(w: &Weak<CudaContext>, ctx: &Arc<CudaContext>) -> bool {
    std::ptr::eq(w.as_ptr(), Arc::as_ptr(ctx))
}

/// Runs `f` on `ctx`'s table, creating the table (and loading the kernel image,
/// [`Kernels::get`]) on the process's first use of `ctx`.
fn with_table<R>(ctx: &Arc<CudaContext>, f: impl FnOnce(&Table) -> Result<R>) -> Result<R> {
    let mut f = Some(f);
    // `try_with`: during thread teardown the thread-local is gone; take the slow path.
    let hit = LOCAL
        .try_with(|l| {
            let l = l.try_borrow().ok()?;
            let t = l.iter().find(|(w, _)| same(w, ctx))?;
            f.take().map(|f| f(&t.1))
        })
        .ok()
        .flatten();
    if let Some(r) = hit {
        return r;
    }
    let table = {
        let mut all = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(w, _)| w.strong_count() > 0);
        match all.iter().find(|(w, _)| same(w, ctx)) {
            Some((_, t)) => t.clone(),
            None => {
                let t = Arc::new(Table::new(Kernels::get(ctx)?));
                all.push((Arc::downgrade(ctx), t.clone()));
                t
            }
        }
    };
    let _ = LOCAL.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            l.retain(|(w, _)| w.strong_count() > 0);
            l.push((Arc::downgrade(ctx), table.clone()));
        }
    });
    match f.take() {
        Some(f) => f(&table),
        None => Err(Error::Driver("kernel table: lookup ran twice".into())),
    }
}

/// The kernel handle for a launch on `$stream` (an `&Arc<CudaStream>`), resolved once
/// per context ([`crate::cuda::handles`]): `kernel_fn!(stream, "iieu_ln_fwd")` for a
/// kernel with one name, `kernel_fn!(stream, "aiec_tau_fwd", T)` for the family
/// `aiec_tau_fwd_f32|f16|bf16` picked by the storage dtype `T`. Evaluates to
/// `Result<Kernel>` (the handle and its name; launch it with [`crate::cuda::launcher`]).
macro_rules! kernel_fn {
    ($stream:expr, $name:literal, $t:ty) => {{
        static SITE: $crate::cuda::handles::Site<3> = $crate::cuda::handles::Site::new([
            concat!($name, "_f32"),
            concat!($name, "_f16"),
            concat!($name, "_bf16"),
        ]);
        SITE.get_for::<$t>($stream)
    }};
    // `$name`: a literal or a constant expression (e.g. `concat!`).
    ($stream:expr, $name:expr) => {{
        static SITE: $crate::cuda::handles::Site<1> = $crate::cuda::handles::Site::new([$name]);
        SITE.get($stream)
    }};
}
pub(crate) use kernel_fn;
