//! placeholder: filled in by the aiec work.
