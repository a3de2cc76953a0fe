//! CPU kernels.
pub mod attention;
pub mod qmatmul;
