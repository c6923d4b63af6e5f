//! Storage dtype ↔ f32 on the device (`kernels/cast.cu`): widening a parameter pack
//! to the kernels' f32 and rounding f32 parameter gradients to the storage dtype
//! without a host round trip (for f32 the kernels copy). The rounding is to nearest
//! even, as `half`'s `from_f32` on the host: the same bits for every non-NaN value (a
//! NaN stays a NaN; the device's payload is canonical).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut, PushKernelArg};

use crate::cuda::handles::kernel_fn;
use crate::cuda::iieu::elementwise;
use crate::cuda::{launcher, DType, DeviceInput};
use crate::error::{check_len, check_nonzero, Result};

/// `src` widened to a new f32 device buffer (exact).
///
/// Errors: an empty `src` ([`crate::Error::Empty`]), driver errors
/// ([`crate::Error::Driver`]).
///
/// # Example (both directions)
///
/// ```
/// use activation_kernels::cuda::{cast, real_driver_present, CudaContext};
/// use half::bf16;
///
/// # #[cfg(not(feature = "emulate"))]
/// # if !real_driver_present() { return Ok(()); } // no GPU and no emulator: nothing to run on
/// // Without a GPU, the emulated device (feature `emulate`) stands in for one.
/// #[cfg(feature = "emulate")]
/// if !real_driver_present() {
///     activation_kernels::emu::install().expect("the emulated device");
/// }
/// let stream = CudaContext::new(0)?.default_stream();
/// let src = stream.clone_htod(&[1.5f32, -0.1, 3.0e38].map(bf16::from_f32))?;
/// let wide = cast::to_f32(&stream, &src)?; // exact
/// assert_eq!(stream.clone_dtoh(&wide)?, [1.5, bf16::from_f32(-0.1).to_f32(), bf16::from_f32(3.0e38).to_f32()]);
///
/// // And back, rounding to nearest even as `half` does on the host.
/// let grads = stream.clone_htod(&[0.1f32, 1.0 / 3.0, -2.0])?;
/// let mut out = stream.alloc_zeros::<bf16>(3)?;
/// cast::from_f32_into(&stream, &grads, &mut out.slice_mut(..))?;
/// assert_eq!(stream.clone_dtoh(&out)?, [0.1f32, 1.0 / 3.0, -2.0].map(bf16::from_f32));
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn to_f32<T: DType>(
    stream: &Arc<CudaStream>,
    src: &impl DeviceInput<T>,
) -> Result<CudaSlice<f32>> {
    let v = src.view();
    let n = v.len();
    check_nonzero("cast source", n)?;
    // SAFETY: the kernel writes every element of `out` (length n) before any read.
    let mut out = unsafe { stream.alloc::<f32>(n) }?;
    let f = kernel_fn!(stream, "cast_to_f32", T)?;
    let n64 = n as i64;
    let mut b = launcher(stream, &f);
    b.arg(&v).arg(&mut out).arg(&n64);
    // SAFETY: threads cover i < n = src.len() = out.len() (grid-stride).
    unsafe { b.launch(elementwise(n, 1)) }?;
    Ok(out)
}

/// `src` rounded to `T` into `dst` (same length; empty: nothing to do).
///
/// Errors: a length mismatch ([`crate::Error::LengthMismatch`]), driver errors.
///
/// Example: [`to_f32`]'s casts both ways.
pub fn from_f32_into<T: DType>(
    stream: &Arc<CudaStream>,
    src: &impl DeviceInput<f32>,
    dst: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let v = src.view();
    check_len("cast destination", v.len(), dst.len())?;
    let n = v.len();
    if n == 0 {
        return Ok(());
    }
    let f = kernel_fn!(stream, "cast_from_f32", T)?;
    let n64 = n as i64;
    let mut b = launcher(stream, &f);
    b.arg(&v).arg(dst).arg(&n64);
    // SAFETY: threads cover i < n = src.len() = dst.len() (grid-stride).
    unsafe { b.launch(elementwise(n, 1)) }?;
    Ok(())
}
