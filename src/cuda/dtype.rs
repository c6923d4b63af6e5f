//! Storage dtypes of the CUDA backend: f32, f16 and bf16 (arithmetic is f32).

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

/// A storage type the kernels are instantiated for. Kernels are named
/// `<op>_<NAME>`, e.g. `acon_c_fwd_f16`.
pub trait DType:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + std::fmt::Debug + 'static
{
    /// Suffix of the kernel names for this dtype.
    const NAME: &'static str;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Rounds from f32 to nearest even.
    fn from_f32(v: f32) -> Self;
}

impl DType for f32 {
    const NAME: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl DType for half::f16 {
    const NAME: &'static str = "f16";
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}
impl DType for half::bf16 {
    const NAME: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}
