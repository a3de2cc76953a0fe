pub use infer_core::*;
