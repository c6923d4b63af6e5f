//! placeholder: filled in by the acon work.
