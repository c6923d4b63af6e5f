//! The crate's error type. Every public entry point validates its input and
//! returns one of these before touching any data: bad input is never a panic.

/// Why an op refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A buffer has the wrong number of elements for the shape it was given with.
    #[error("{what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// Elements implied by the shape.
        expected: usize,
        /// Elements actually passed.
        got: usize,
    },
    /// A shape is inconsistent with another argument or with the op.
    #[error("{what}: {msg}")]
    Shape {
        /// Which argument.
        what: &'static str,
        /// What is wrong with it.
        msg: String,
    },
    /// A dimension that must be non-zero is zero.
    #[error("{what} must not be empty (a dimension is 0)")]
    Empty {
        /// Which argument or dimension.
        what: &'static str,
    },
    /// Convolution geometry that cannot exist (zero stride, output size <= 0, groups
    /// not dividing the channels, ...).
    #[error("invalid convolution geometry: {0}")]
    Geometry(String),
    /// A class label is not in `0..classes`.
    #[error("label {label} of sample {sample} is out of range for {classes} classes")]
    LabelOutOfRange {
        /// Index of the offending sample.
        sample: usize,
        /// The label found there.
        label: usize,
        /// Number of classes K.
        classes: usize,
    },
    /// The CUDA driver reported an error (allocation, copy, launch).
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// A scalar hyper-parameter outside its domain (e.g. a negative TAU threshold).
    #[error("invalid parameter {what}: {msg}")]
    InvalidParam {
        /// Which parameter.
        what: &'static str,
        /// Why it is invalid.
        msg: String,
    },
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// `Err(LengthMismatch)` unless `got == expected`.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// `Err(Empty)` if `n == 0`.
pub(crate) fn check_nonzero(what: &'static str, n: usize) -> Result<()> {
    if n == 0 {
        Err(Error::Empty { what })
    } else {
        Ok(())
    }
}
