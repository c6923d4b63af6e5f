//! placeholder: filled in by the iieu_dc work.
