//! Models from the Hugging Face Hub: `org/name[@revision]` ids resolved through the standard HF cache
//! with `hf-hub` (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` honoured),
//! downloading with a progress bar when online.

use std::path::PathBuf;

use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// A Hub model id with an optional revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// Parses `org/name` or `org/name@revision`; `None` if `s` does not look like a Hub id.
    pub fn parse(s: &str) -> Option<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = |p: &str| !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        // A revision names a file under the cache (`refs/REVISION`): a branch, tag or commit, whose
        // path components may not climb out (`..`) or be empty.
        let rev_ok = revision.len() <= 256 && revision.split('/').all(ok);
        (ok(org) && ok(name) && rev_ok).then(|| Self { repo: repo.to_string(), revision: revision.to_string() })
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.revision == "main" {
            write!(f, "{}", self.repo)
        } else {
            write!(f, "{}@{}", self.repo, self.revision)
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")).unwrap_or(false)
}

/// The HF cache in use: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache() -> Cache {
    match std::env::var("HF_HUB_CACHE") {
        Ok(p) if !p.is_empty() => Cache::new(PathBuf::from(p)),
        _ => Cache::from_env(),
    }
}

/// Fetches files of one Hub repo, from the cache or (when online) the Hub.
pub struct HubFetcher {
    id: HubId,
    api: Option<ApiRepo>,
    listing: Option<Vec<String>>,
    cache: Cache,
    offline_reason: Option<String>,
}

impl HubFetcher {
    /// Connects to the Hub unless `HF_HUB_OFFLINE` is set; if the Hub cannot be reached, falls back to the cache.
    pub fn new(id: HubId, progress: bool) -> Result<Self> {
        let cache = cache();
        if env_flag("HF_HUB_OFFLINE") {
            return Ok(Self { id, api: None, listing: None, cache, offline_reason: Some("HF_HUB_OFFLINE is set".into()) });
        }
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| cache.token());
        let mut builder = ApiBuilder::from_cache(cache.clone()).with_progress(progress).with_token(token);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
        let api: Api = builder.build().map_err(|e| Error::Hub(format!("cannot set up the Hub client: {e}")))?;
        let repo = api.repo(id.repo());
        match repo.info() {
            Ok(info) => Ok(Self {
                id,
                listing: Some(info.siblings.into_iter().map(|s| s.rfilename).collect()),
                api: Some(repo),
                cache,
                offline_reason: None,
            }),
            Err(e) => {
                if let hf_hub::api::sync::ApiError::RequestError(re) = &e {
                    if let ureq::Error::Status(code, _) = re.as_ref() {
                        if *code == 401 || *code == 403 || *code == 404 {
                            return Err(Error::Hub(format!(
                                "{id}: the Hub answered {code}: the repo or revision does not exist, or it is gated/private (set HF_TOKEN to a token with access)"
                            )));
                        }
                    }
                }
                tracing::warn!("cannot reach the Hub ({e}); using the local cache only");
                Ok(Self { id, api: None, listing: None, cache, offline_reason: Some(format!("the Hub could not be reached: {e}")) })
            }
        }
    }

    /// The repo's file names, when online.
    pub fn listing(&self) -> Option<&[String]> {
        self.listing.as_deref()
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        let cache_repo = self.cache.repo(self.id.repo());
        if let Some(p) = cache_repo.get(file) {
            return Some(p);
        }
        // A commit hash as revision names its snapshot folder directly.
        let snapshot = self.cache.path().join(self.id.repo().folder_name()).join("snapshots").join(&self.id.revision).join(file);
        snapshot.exists().then_some(snapshot)
    }

    /// Does the repo have `file`? Online: from the listing; offline: whether the cache has it.
    pub fn has(&self, file: &str) -> bool {
        match &self.listing {
            Some(l) => l.iter().any(|f| f == file),
            None => self.cached(file).is_some(),
        }
    }

    /// The local path of `file`, downloading it if needed.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(file) {
            return Ok(p);
        }
        match (&self.api, &self.offline_reason) {
            (Some(api), _) => api.get(file).map_err(|e| Error::Hub(format!("{}: cannot download `{file}`: {e}", self.id))),
            (None, reason) => Err(Error::Hub(format!(
                "{}: `{file}` is not in the HF cache ({}) and {}; run `infer pull {}` while online",
                self.id,
                self.cache.path().display(),
                reason.as_deref().unwrap_or("offline"),
                self.id
            ))),
        }
    }

    pub fn id(&self) -> &HubId {
        &self.id
    }

    /// Where this repo's snapshot lives in the cache (the folder holding its files), if cached.
    pub fn cached_files(&self) -> Vec<String> {
        let dir = self.cache.path().join(self.id.repo().folder_name()).join("snapshots");
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for snap in rd.flatten() {
                if let Ok(files) = std::fs::read_dir(snap.path()) {
                    out.extend(files.flatten().map(|f| f.file_name().to_string_lossy().into_owned()));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Models present in the HF cache: (repo id, total bytes).
pub fn list_cached_models() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(cache().path()) else { return out };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix("models--") {
            let id = rest.replacen("--", "/", 1);
            let size = dir_size(&e.path().join("blobs"));
            out.push((id, size));
        }
    }
    out.sort();
    out
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p).map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_ids() {
        assert_eq!(
            HubId::parse("HuggingFaceTB/SmolLM2-135M-Instruct"),
            Some(HubId { repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), revision: "main".into() })
        );
        assert_eq!(HubId::parse("org/name@v1.0").unwrap().revision, "v1.0");
        assert_eq!(HubId::parse("org/name@refs/pr/1").unwrap().revision, "refs/pr/1");
        // A revision is a path under the cache: it may not climb out of it.
        for bad in [
            "name",
            "./a/b",
            "/abs/path",
            "a/b/c",
            "org/name@",
            "../x",
            "org/name@../../x",
            "org/name@a/../../b",
            "org/name@/etc",
            "org/name@a//b",
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }
}
