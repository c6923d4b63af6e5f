//! ReLU, forward and backward: the memory-bound floor the CPU benchmarks divide
//! every op's time by (`benches/cpu_ops.rs`, docs/performance.md).
//!
//! A floor is only honest if it is written as well as the ops it is compared with,
//! so it uses their policies: the element loops are runtime-dispatched to the same
//! SIMD level ([`crate::fastmath::simd_level`]: AVX-512, AVX2 + FMA or the build
//! target, forced lower with `AK_SIMD=avx2|scalar`), read 16 KB ahead with software
//! prefetch like the IIEU-B streaming loops ([`crate::fastmath`]'s `AHEAD`), and run
//! on rayon in tasks of [`GRAIN`] elements. Outputs are ordinary cached stores, as in
//! the ops.
//!
//! Forward `y = max(x, 0)` (`x` where `x ≥ 0`, so `−0` and NaN pass through as in
//! PyTorch's `relu`); backward `dx = dy·[x > 0]`.

use rayon::prelude::*;

use crate::error::{check_len, check_nonzero, Result};
use crate::fastmath::{prefetch_ahead, simd_fn};
use crate::real::Real;

/// Elements per rayon task (256 KB of f32): large enough that scheduling is noise,
/// small enough that two threads split a 1 MB tensor evenly.
pub const GRAIN: usize = 1 << 16;

/// Elements per prefetch step (256 B of f32 = 4 cache lines).
const BLOCK: usize = 64;

/// `y[i] = max(x[i], 0)` over one task's range, `x` being the whole input and
/// `start` where `y` begins in it (so the prefetch runs across task boundaries).
#[inline(always)]
fn fwd_impl<T: Real>(x: &[T], start: usize, y: &mut [T]) {
    let zero = T::zero();
    let xs = &x[start..start + y.len()];
    for (k, (yc, xc)) in y.chunks_mut(BLOCK).zip(xs.chunks(BLOCK)).enumerate() {
        prefetch_ahead(x, start + k * BLOCK, BLOCK);
        for (o, &v) in yc.iter_mut().zip(xc) {
            *o = if v < zero { zero } else { v };
        }
    }
}

/// `dx[i] = dy[i]·[x[i] > 0]` over one task's range (see [`fwd_impl`]).
#[inline(always)]
fn bwd_impl<T: Real>(dy: &[T], x: &[T], start: usize, dx: &mut [T]) {
    let zero = T::zero();
    let end = start + dx.len();
    let (xs, gs) = (&x[start..end], &dy[start..end]);
    let blocks = dx
        .chunks_mut(BLOCK)
        .zip(xs.chunks(BLOCK))
        .zip(gs.chunks(BLOCK));
    for (k, ((oc, xc), gc)) in blocks.enumerate() {
        prefetch_ahead(x, start + k * BLOCK, BLOCK);
        prefetch_ahead(dy, start + k * BLOCK, BLOCK);
        for ((o, &v), &g) in oc.iter_mut().zip(xc).zip(gc) {
            *o = if v > zero { g } else { zero };
        }
    }
}

simd_fn! {
    fn fwd_task<T: Real>(x: &[T], start: usize, y: &mut [T]) => fwd_impl;
}

simd_fn! {
    fn bwd_task<T: Real>(dy: &[T], x: &[T], start: usize, dx: &mut [T]) => bwd_impl;
}

/// ReLU forward into a caller-owned buffer: `y = max(x, 0)` element-wise (`−0` and
/// NaN pass through). `Err` if `x` is empty or `y.len() != x.len()`.
///
/// ```
/// use activation_kernels::cpu::relu;
/// let x = [-1.5f32, 0.0, 2.0];
/// let mut y = [9.0f32; 3];
/// relu::forward_into(&x, &mut y)?;
/// assert_eq!(y, [0.0, 0.0, 2.0]);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn forward_into<T: Real>(x: &[T], y: &mut [T]) -> Result<()> {
    check_nonzero("x", x.len())?;
    check_len("y", x.len(), y.len())?;
    y.par_chunks_mut(GRAIN)
        .enumerate()
        .for_each(|(t, yc)| fwd_task(x, t * GRAIN, yc));
    Ok(())
}

/// ReLU forward: a new `Vec` holding `max(x, 0)` (see [`forward_into`]).
pub fn forward<T: Real>(x: &[T]) -> Result<Vec<T>> {
    let mut y = vec![T::zero(); x.len()];
    forward_into(x, &mut y)?;
    Ok(y)
}

/// ReLU backward into a caller-owned buffer: `dx = dy·[x > 0]` (the subgradient 0
/// at `x = 0`, as PyTorch). `Err` if `x` is empty or a length differs from `x`'s.
///
/// ```
/// use activation_kernels::cpu::relu;
/// let (x, dy) = ([-1.0f32, 0.0, 3.0], [5.0f32, 6.0, 7.0]);
/// let mut dx = [0.0f32; 3];
/// relu::backward_into(&dy, &x, &mut dx)?;
/// // finite difference at x = 3: (relu(3 + h) − relu(3 − h)) / 2h = 1, times dy = 7
/// assert_eq!(dx, [0.0, 0.0, 7.0]);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn backward_into<T: Real>(dy: &[T], x: &[T], dx: &mut [T]) -> Result<()> {
    check_nonzero("x", x.len())?;
    check_len("dy", x.len(), dy.len())?;
    check_len("dx", x.len(), dx.len())?;
    dx.par_chunks_mut(GRAIN)
        .enumerate()
        .for_each(|(t, oc)| bwd_task(dy, x, t * GRAIN, oc));
    Ok(())
}

/// ReLU backward: a new `Vec` holding `dy·[x > 0]` (see [`backward_into`]).
pub fn backward<T: Real>(dy: &[T], x: &[T]) -> Result<Vec<T>> {
    let mut dx = vec![T::zero(); x.len()];
    backward_into(dy, x, &mut dx)?;
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn matches_the_definition_across_task_and_block_boundaries() {
        // 2·GRAIN + 37: three tasks, the last ragged, and a ragged prefetch block.
        let n = 2 * GRAIN + 37;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1001) as f32 - 500.0).collect();
        let dy: Vec<f32> = (0..n).map(|i| (i % 13) as f32 + 0.5).collect();
        let y = forward(&x).unwrap();
        let dx = backward(&dy, &x).unwrap();
        for i in 0..n {
            assert_eq!(y[i], if x[i] < 0.0 { 0.0 } else { x[i] }, "y[{i}]");
            assert_eq!(dx[i], if x[i] > 0.0 { dy[i] } else { 0.0 }, "dx[{i}]");
        }
        assert!(y.contains(&0.0) && y.iter().any(|&v| v > 0.0));
    }

    #[test]
    fn nan_and_negative_zero_pass_through_forward() {
        let y = forward(&[f32::NAN, -0.0, -3.0]).unwrap();
        assert!(y[0].is_nan());
        assert!(y[1] == 0.0 && y[1].is_sign_negative());
        assert_eq!(y[2], 0.0);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut out = [0.0f32; 2];
        assert!(matches!(
            forward_into::<f32>(&[], &mut []),
            Err(Error::Empty { .. })
        ));
        assert!(matches!(
            forward_into(&[1.0f32, 2.0, 3.0], &mut out),
            Err(Error::LengthMismatch { what: "y", .. })
        ));
        assert!(matches!(
            backward_into(&[1.0f32], &[1.0f32, 2.0], &mut out),
            Err(Error::LengthMismatch { what: "dy", .. })
        ));
        assert!(matches!(
            backward_into(&[1.0f32, 2.0], &[1.0f32, 2.0], &mut [0.0f32; 3]),
            Err(Error::LengthMismatch { what: "dx", .. })
        ));
    }
}
