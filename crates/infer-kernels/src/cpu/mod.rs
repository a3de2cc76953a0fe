//! CPU kernels.
pub mod attention;
pub mod halfmatmul;
pub mod qmatmul;
