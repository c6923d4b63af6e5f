//! 2-D convolution geometry (the conv an IIEU follows): validation and output size.

use crate::error::{check_nonzero, Error, Result};

/// Geometry of the convolution `x = conv(x_pre, W)` that an IIEU follows.
///
/// `x_pre` is `(n, c_in, h, w)`, `W` is `(c_out, c_in/groups, kh, kw)` and the conv
/// output `x` is `(n, c_out, out_h, out_w)` with
/// `out = (in + 2·pad − dil·(k−1) − 1) / stride + 1` (floor), as in PyTorch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2dGeometry {
    /// Batch size N.
    pub n: usize,
    /// Input channels C.
    pub c_in: usize,
    /// Input height H.
    pub h: usize,
    /// Input width W.
    pub w: usize,
    /// Output channels O.
    pub c_out: usize,
    /// Kernel height KH.
    pub kh: usize,
    /// Kernel width KW.
    pub kw: usize,
    /// Stride (vertical, horizontal).
    pub stride: (usize, usize),
    /// Zero padding (top/bottom, left/right).
    pub padding: (usize, usize),
    /// Dilation (vertical, horizontal).
    pub dilation: (usize, usize),
    /// Groups g: C and O must both be multiples of g (depthwise: g = C).
    pub groups: usize,
}

impl Conv2dGeometry {
    /// A stride-1, unpadded, undilated, ungrouped geometry; adjust fields as needed.
    pub fn new(
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        kh: usize,
        kw: usize,
    ) -> Self {
        Self {
            n,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }

    /// Builder: stride.
    pub fn with_stride(mut self, sh: usize, sw: usize) -> Self {
        self.stride = (sh, sw);
        self
    }
    /// Builder: padding.
    pub fn with_padding(mut self, ph: usize, pw: usize) -> Self {
        self.padding = (ph, pw);
        self
    }
    /// Builder: dilation.
    pub fn with_dilation(mut self, dh: usize, dw: usize) -> Self {
        self.dilation = (dh, dw);
        self
    }
    /// Builder: groups.
    pub fn with_groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }

    fn out_dim(what: &str, input: usize, k: usize, s: usize, p: usize, d: usize) -> Result<usize> {
        let span = d
            .checked_mul(k - 1)
            .and_then(|v| v.checked_add(1))
            .ok_or_else(|| Error::Geometry(format!("{what}: dilated kernel extent overflows")))?;
        let padded = input
            .checked_add(p.saturating_mul(2))
            .ok_or_else(|| Error::Geometry(format!("{what}: padded size overflows")))?;
        if padded < span {
            return Err(Error::Geometry(format!(
                "{what}: output size <= 0 (input {input} + 2·pad {p} < dilated kernel extent {span})"
            )));
        }
        Ok((padded - span) / s + 1)
    }

    /// Validates every field and returns the output size `(out_h, out_w)`.
    pub fn validate(&self) -> Result<(usize, usize)> {
        check_nonzero("batch N", self.n)?;
        check_nonzero("input channels C", self.c_in)?;
        check_nonzero("input height H", self.h)?;
        check_nonzero("input width W", self.w)?;
        check_nonzero("output channels O", self.c_out)?;
        check_nonzero("kernel height KH", self.kh)?;
        check_nonzero("kernel width KW", self.kw)?;
        if self.stride.0 == 0 || self.stride.1 == 0 {
            return Err(Error::Geometry(format!(
                "stride {:?} must be >= 1",
                self.stride
            )));
        }
        if self.dilation.0 == 0 || self.dilation.1 == 0 {
            return Err(Error::Geometry(format!(
                "dilation {:?} must be >= 1",
                self.dilation
            )));
        }
        if self.groups == 0 || self.c_in % self.groups != 0 || self.c_out % self.groups != 0 {
            return Err(Error::Geometry(format!(
                "groups {} must be >= 1 and divide both C = {} and O = {}",
                self.groups, self.c_in, self.c_out
            )));
        }
        let oh = Self::out_dim(
            "height",
            self.h,
            self.kh,
            self.stride.0,
            self.padding.0,
            self.dilation.0,
        )?;
        let ow = Self::out_dim(
            "width",
            self.w,
            self.kw,
            self.stride.1,
            self.padding.1,
            self.dilation.1,
        )?;
        // Every buffer length must be representable.
        let sizes = [
            [self.n, self.c_in, self.h, self.w],
            [self.c_out, self.c_in / self.groups, self.kh, self.kw],
            [self.n, self.c_out, oh, ow],
        ];
        for s in sizes {
            s.iter()
                .try_fold(1usize, |a, &b| a.checked_mul(b))
                .ok_or_else(|| Error::Geometry(format!("tensor of shape {s:?} overflows usize")))?;
        }
        Ok((oh, ow))
    }

    /// Channels per group on the input side, C/g.
    pub fn cin_per_group(&self) -> usize {
        self.c_in / self.groups
    }
    /// Channels per group on the output side, O/g.
    pub fn cout_per_group(&self) -> usize {
        self.c_out / self.groups
    }
    /// Elements of `x_pre`.
    pub fn input_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }
    /// Elements of `W`.
    pub fn weight_len(&self) -> usize {
        self.c_out * self.cin_per_group() * self.kh * self.kw
    }
}
