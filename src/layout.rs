//! Activation tensor shapes shared by the ops that need no convolution
//! (ACON, AIEC, TAU): NCHW (`N, C, spatial...`) and channels-last tokens `(N, L, C)`.

use crate::error::{check_len, check_nonzero, Result};

/// Memory order of an activation tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `(N, C, S)` with `S` = H·W (or any flattened spatial extent): channel-major.
    Nchw,
    /// `(N, L, C)`: tokens, channels contiguous (transformer activations).
    Nlc,
}

/// Shape of an activation tensor: `n` samples, `c` channels, `s` positions per
/// (sample, channel) — H·W for NCHW, the token count L for `(N, L, C)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ActShape {
    /// Batch size N.
    pub n: usize,
    /// Channels C.
    pub c: usize,
    /// Positions per (sample, channel): H·W, or tokens L.
    pub s: usize,
    /// Memory order.
    pub layout: Layout,
}

impl ActShape {
    /// NCHW shape with spatial size `h × w`.
    pub fn nchw(n: usize, c: usize, h: usize, w: usize) -> Self {
        Self {
            n,
            c,
            s: h.saturating_mul(w),
            layout: Layout::Nchw,
        }
    }

    /// Channels-last token shape `(N, L, C)`.
    pub fn nlc(n: usize, l: usize, c: usize) -> Self {
        Self {
            n,
            c,
            s: l,
            layout: Layout::Nlc,
        }
    }

    /// Total element count, or an error if it overflows `usize`.
    pub fn numel(&self) -> Result<usize> {
        self.n
            .checked_mul(self.c)
            .and_then(|v| v.checked_mul(self.s))
            .ok_or_else(|| crate::Error::Shape {
                what: "activation",
                msg: format!("{self:?} overflows usize"),
            })
    }

    /// Checks that no dimension is zero and that `len` matches the shape.
    pub fn validate(&self, what: &'static str, len: usize) -> Result<()> {
        check_nonzero("batch N", self.n)?;
        check_nonzero("channels C", self.c)?;
        check_nonzero("positions S (H·W or L)", self.s)?;
        check_len(what, self.numel()?, len)
    }

    /// Flat index of element (sample `n`, channel `c`, position `s`).
    #[inline(always)]
    pub fn idx(&self, n: usize, c: usize, s: usize) -> usize {
        match self.layout {
            Layout::Nchw => (n * self.c + c) * self.s + s,
            Layout::Nlc => (n * self.s + s) * self.c + c,
        }
    }
}
