//! placeholder: filled in by the iieu work.
