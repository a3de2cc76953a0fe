//! CPU kernels.
pub mod attention;
