//! infer's error type: every failure a user can cause is one clear line naming what is wrong and,
//! where there is one, the fix.

use std::path::{Path, PathBuf};

/// Errors returned by the infer library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A model file exists but its content is wrong (truncated, corrupt, wrong field type, ...).
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },

    /// The model uses an architecture infer does not implement.
    #[error("unsupported model architecture `{arch}` (in {}); supported: {supported}", path.display())]
    UnsupportedArchitecture { arch: String, path: PathBuf, supported: String },

    /// Something is wrong with how the model was asked for (a bad id, a missing file in a repo, ...).
    #[error("{0}")]
    Model(String),

    /// The Hugging Face Hub could not give a file.
    #[error("{0}")]
    Hub(String),

    /// A generation parameter is out of range.
    #[error("invalid parameter `{name}`: {msg}")]
    InvalidParameter { name: &'static str, msg: String },

    /// Tokenizer construction or use failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),

    /// A structured-output constraint (JSON schema, regex, grammar, choice) is invalid or unsupported.
    #[error("{0}")]
    Constraint(String),

    /// The paged KV cache has no free block left.
    #[error("KV cache full: {needed} more blocks needed, {free} free of {total}; give the cache more memory (--kv-cache-mem) or shorten the request")]
    CacheFull { needed: usize, free: usize, total: usize },

    /// The request does not fit the model's context window.
    #[error("the prompt plus generation needs {needed} tokens but the context holds {limit}; shorten the prompt, lower --max-tokens or raise --ctx-size")]
    ContextOverflow { needed: usize, limit: usize },

    /// The requested device is not available.
    #[error("{0}")]
    Device(String),

    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with infer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn bad_file(path: &Path, msg: impl Into<String>) -> Self {
        Error::BadFile { path: path.to_path_buf(), msg: msg.into() }
    }
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
    pub(crate) fn param(name: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidParameter { name, msg: msg.into() }
    }
}
