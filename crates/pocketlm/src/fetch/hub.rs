//! Hugging Face hub snapshots, through the `hf-hub` crate's blocking API.
//!
//! The cache layout is the one of the Python `huggingface_hub` library
//! (<https://huggingface.co/docs/huggingface_hub/guides/manage-cache>):
//! `<cache>/models--{org}--{name}/{blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/<revision>}`,
//! so a snapshot downloaded here is reused by Python tools and the other way round. Environment
//! variables follow the same library (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`,
//! `HF_HUB_OFFLINE`); [`HubOptions`] carries them explicitly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::{home_dir, redact, FetchError, FetchProgress, Throttle};

/// The hub used when `$HF_ENDPOINT` is not set.
pub const DEFAULT_HUB_ENDPOINT: &str = "https://huggingface.co";

/// The files a model needs besides its weights, downloaded when the repository has them.
const DEFAULT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// The index of a sharded safetensors checkpoint (`{"weight_map": {tensor: shard file}}`).
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// Where and how to reach the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Hub base URL without a trailing slash (`https://huggingface.co`).
    pub endpoint: String,
    /// The hub cache directory (the folder holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// Access token for private or gated repositories.
    pub token: Option<String>,
    /// Use only the cache; never touch the network.
    pub offline: bool,
}

impl HubOptions {
    /// Options for `endpoint` and `cache_dir`, without token, online.
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
        }
    }

    /// Options from the environment, with the rules of Python `huggingface_hub`:
    /// - `HF_HOME` (default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`);
    /// - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`;
    /// - endpoint: `HF_ENDPOINT`, else [`DEFAULT_HUB_ENDPOINT`];
    /// - token: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the file `HF_TOKEN_PATH`
    ///   (default `$HF_HOME/token`);
    /// - offline: `HF_HUB_OFFLINE` is `1`, `ON`, `YES` or `TRUE` (any case).
    pub fn from_env() -> Self {
        let hf_home = env_path("HF_HOME").unwrap_or_else(|| {
            env_path("XDG_CACHE_HOME")
                .unwrap_or_else(|| home_dir().join(".cache"))
                .join("huggingface")
        });
        let cache_dir = env_path("HF_HUB_CACHE")
            .or_else(|| env_path("HUGGINGFACE_HUB_CACHE"))
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = env_str("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_HUB_ENDPOINT.to_string());
        let token = env_str("HF_TOKEN")
            .or_else(|| env_str("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = env_path("HF_TOKEN_PATH").unwrap_or_else(|| hf_home.join("token"));
                let t = std::fs::read_to_string(path).ok()?;
                let t = t.trim();
                (!t.is_empty()).then(|| t.to_string())
            });
        let offline = env_str("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
        });
        HubOptions {
            token,
            offline,
            ..HubOptions::new(endpoint, cache_dir)
        }
    }
}

/// A non-empty, trimmed environment variable.
fn env_str(name: &str) -> Option<String> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// A non-empty environment variable as a path, with a leading `~/` expanded.
fn env_path(name: &str) -> Option<PathBuf> {
    let v = std::env::var_os(name).filter(|v| !v.is_empty())?;
    match v.to_str().and_then(|s| s.strip_prefix("~/")) {
        Some(rest) => Some(home_dir().join(rest)),
        None => Some(PathBuf::from(v)),
    }
}

/// Downloads a model snapshot from the Hugging Face hub and returns its folder
/// (`<cache>/models--org--name/snapshots/<commit>`), with options from the environment
/// ([`HubOptions::from_env`]) and no progress reports. See [`hub_snapshot_with`].
pub fn hub_snapshot(
    repo_id: &str,
    revision: Option<&str>,
    allow: &[&str],
) -> Result<PathBuf, FetchError> {
    hub_snapshot_with(
        repo_id,
        revision,
        allow,
        &HubOptions::from_env(),
        &mut |_| {},
    )
}

/// Downloads the files of hub model `repo_id` (`org/name`) at `revision` (branch, tag or commit;
/// default `main`) into the cache `opts.cache_dir` and returns the snapshot folder.
///
/// Which files: with `allow` empty, `config.json` (required), the tokenizer files
/// (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`,
/// `tokenizer.model`, `vocab.json`, `merges.txt`, `chat_template.jinja`, `chat_template.json`)
/// and `generation_config.json` when present, and the weights: `model.safetensors.index.json` and
/// every shard its `weight_map` names, or else every top-level `*.safetensors` (at least one is
/// required). With `allow` non-empty, exactly the repository files matching one of the glob
/// patterns (`*` any run of characters, `/` included; `?` one character), plus the shards named
/// by any matched `*.safetensors.index.json`. Files already in the snapshot are not downloaded
/// again; `refs/<revision>` is updated to the resolved commit.
///
/// Online, this asks `GET {endpoint}/api/models/{repo}/revision/{revision}` for the commit and
/// file list, then downloads each file from `{endpoint}/{repo}/resolve/{commit}/{file}` with
/// `hf-hub`. When the hub cannot be reached (no network), a complete cached snapshot is used
/// instead. With `opts.offline`, only the cache is read.
///
/// Errors: [`FetchError::InvalidArgument`] (bad id, revision or pattern),
/// [`FetchError::NotCached`] (offline and not in the cache), [`FetchError::Network`] (no network
/// and no complete cached copy), [`FetchError::Http`] (e.g. 401 gated/private, 404 unknown
/// repository or revision, with the URL), [`FetchError::Hub`] (no `config.json` or weights,
/// malformed index, unexpected response).
pub fn hub_snapshot_with(
    repo_id: &str,
    revision: Option<&str>,
    allow: &[&str],
    opts: &HubOptions,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, FetchError> {
    validate_repo_id(repo_id)?;
    let revision = revision.unwrap_or("main");
    validate_revision(revision)?;
    if let Some(p) = allow.iter().find(|p| p.trim().is_empty()) {
        return Err(FetchError::InvalidArgument(format!(
            "empty allow pattern {p:?} for hub repository `{repo_id}`"
        )));
    }
    if opts.offline {
        return cached_snapshot(repo_id, revision, allow, &opts.cache_dir).map_err(|detail| {
            FetchError::NotCached {
                repo: repo_id.to_string(),
                revision: revision.to_string(),
                cache: opts.cache_dir.clone(),
                detail,
            }
        });
    }

    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint.trim_end_matches('/').to_string())
        .with_token(opts.token.clone())
        .with_progress(false)
        .with_retries(2)
        .with_user_agent("pocketlm", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| map_api_error(repo_id, &opts.endpoint, e))?;
    let info_url = format!(
        "{}/api/models/{repo_id}/revision/{}",
        opts.endpoint.trim_end_matches('/'),
        revision.replace('/', "%2F")
    );
    let info = match api
        .repo(Repo::with_revision(
            repo_id.to_string(),
            RepoType::Model,
            revision.to_string(),
        ))
        .info()
    {
        Ok(info) => info,
        Err(e) => {
            let err = map_api_error(repo_id, &info_url, e);
            if let FetchError::Network { url, msg } = err {
                // As Python huggingface_hub does: without network, fall back to the cache.
                return match cached_snapshot(repo_id, revision, allow, &opts.cache_dir) {
                    Ok(path) => {
                        tracing::warn!(
                            "cannot reach {url} ({msg}); using the cached snapshot {}",
                            path.display()
                        );
                        Ok(path)
                    }
                    Err(detail) => Err(FetchError::Network {
                        url,
                        msg: format!("{msg}; and the cache has no complete copy: {detail}"),
                    }),
                };
            }
            return Err(err);
        }
    };
    let sha = info.sha.trim().to_string();
    if !is_safe_component(&sha) {
        return Err(FetchError::Hub {
            repo: repo_id.to_string(),
            msg: format!("{info_url}: the hub gave an unusable commit id {sha:?}"),
        });
    }
    let siblings: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let (mut files, indexes) = select_files(repo_id, &siblings, allow)?;

    let cache = Cache::new(opts.cache_dir.clone());
    let repo_dir = opts
        .cache_dir
        .join(Repo::model(repo_id.to_string()).folder_name());
    let snapshot = repo_dir.join("snapshots").join(&sha);
    let sha_ref = repo_dir.join("refs").join(&sha);
    let sha_ref_existed = sha_ref.exists();
    // Downloads pin the commit, so that every file comes from the same snapshot.
    let pinned = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        sha.clone(),
    ));
    let fetch = |file: &str, progress: &mut dyn FnMut(FetchProgress)| {
        let want = snapshot.join(file);
        if want.exists() {
            return Ok(());
        }
        let got = pinned
            .download_with_progress(file, HubProgress::new(progress))
            .map_err(|e| map_api_error(repo_id, &pinned.url(file), e))?;
        if got != want {
            return Err(FetchError::Hub {
                repo: repo_id.to_string(),
                msg: format!(
                    "{}: the hub served commit folder {} while the revision resolved to {sha}",
                    pinned.url(file),
                    got.display()
                ),
            });
        }
        Ok(())
    };
    for index in &indexes {
        fetch(index, progress)?;
        for shard in index_shards(repo_id, &snapshot, index)? {
            if !siblings.contains(&shard) {
                return Err(FetchError::Hub {
                    repo: repo_id.to_string(),
                    msg: format!("{index} names shard `{shard}` that the repository does not have"),
                });
            }
            files.insert(shard);
        }
    }
    for file in &files {
        fetch(file, progress)?;
    }
    if revision != sha {
        cache
            .repo(Repo::with_revision(
                repo_id.to_string(),
                RepoType::Model,
                revision.to_string(),
            ))
            .create_ref(&sha)
            .map_err(|e| FetchError::io(repo_dir.join("refs").join(revision), e))?;
        if !sha_ref_existed {
            // hf-hub records the pinned commit as a ref of itself; Python does not. Tidy up.
            let _ = std::fs::remove_file(&sha_ref);
        }
    }
    Ok(snapshot)
}

/// Chooses the files to download among `siblings` (see [`hub_snapshot_with`]); returns the
/// plain files and, separately, the safetensors indexes whose shards must be added.
fn select_files(
    repo_id: &str,
    siblings: &BTreeSet<String>,
    allow: &[&str],
) -> Result<(BTreeSet<String>, Vec<String>), FetchError> {
    let hub_err = |msg: String| FetchError::Hub {
        repo: repo_id.to_string(),
        msg,
    };
    let listing = || {
        let v: Vec<&str> = siblings.iter().map(String::as_str).take(30).collect();
        v.join(", ")
    };
    let mut files = BTreeSet::new();
    let mut indexes = Vec::new();
    if allow.is_empty() {
        if !siblings.contains("config.json") {
            return Err(hub_err(format!(
                "no config.json (files: {}); pass allow patterns to fetch other files",
                listing()
            )));
        }
        for f in DEFAULT_FILES {
            if siblings.contains(*f) {
                files.insert(f.to_string());
            }
        }
        if siblings.contains(SAFETENSORS_INDEX) {
            indexes.push(SAFETENSORS_INDEX.to_string());
        } else {
            let weights: Vec<&String> = siblings
                .iter()
                .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
                .collect();
            if weights.is_empty() {
                return Err(hub_err(format!(
                    "no *.safetensors weights (files: {}); pocketlm loads safetensors, or pass allow patterns such as \"*.gguf\"",
                    listing()
                )));
            }
            files.extend(weights.into_iter().cloned());
        }
    } else {
        for f in siblings {
            if allow.iter().any(|p| glob_match(p, f)) {
                if f.ends_with(".safetensors.index.json") {
                    indexes.push(f.clone());
                } else {
                    files.insert(f.clone());
                }
            }
        }
    }
    for f in files.iter().chain(indexes.iter()) {
        if !is_safe_relative(f) {
            return Err(hub_err(format!("refusing unsafe file name {f:?}")));
        }
    }
    Ok((files, indexes))
}

/// The shard files named by the safetensors index `index` (a path inside `snapshot`), as
/// repository paths (relative to the index's folder).
fn index_shards(repo_id: &str, snapshot: &Path, index: &str) -> Result<Vec<String>, FetchError> {
    let hub_err = |msg: String| FetchError::Hub {
        repo: repo_id.to_string(),
        msg: format!("{index}: {msg}"),
    };
    let path = snapshot.join(index);
    let text = std::fs::read_to_string(&path).map_err(|e| FetchError::io(&path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| hub_err(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| hub_err("no `weight_map` object".to_string()))?;
    let dir = match index.rfind('/') {
        Some(i) => &index[..=i],
        None => "",
    };
    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| hub_err(format!("weight_map[`{tensor}`] is not a string")))?;
        let full = format!("{dir}{shard}");
        if !is_safe_relative(&full) {
            return Err(hub_err(format!(
                "weight_map[`{tensor}`] names an unsafe file {shard:?}"
            )));
        }
        shards.insert(full);
    }
    if shards.is_empty() {
        return Err(hub_err("`weight_map` is empty".to_string()));
    }
    Ok(shards.into_iter().collect())
}

/// The cached snapshot of `repo_id` at `revision` under `cache_dir`, checked to hold what
/// [`hub_snapshot_with`] would download; `Err` says what is missing.
fn cached_snapshot(
    repo_id: &str,
    revision: &str,
    allow: &[&str],
    cache_dir: &Path,
) -> Result<PathBuf, String> {
    let repo_dir = cache_dir.join(Repo::model(repo_id.to_string()).folder_name());
    let direct = repo_dir.join("snapshots").join(revision);
    let snapshot = if is_commit_hash(revision) && direct.is_dir() {
        direct
    } else {
        let ref_path = repo_dir.join("refs").join(revision);
        let sha =
            std::fs::read_to_string(&ref_path).map_err(|_| format!("no {}", ref_path.display()))?;
        let sha = sha.trim();
        if !is_safe_component(sha) {
            return Err(format!("{} holds no commit id", ref_path.display()));
        }
        repo_dir.join("snapshots").join(sha)
    };
    if !snapshot.is_dir() {
        return Err(format!("no snapshot folder {}", snapshot.display()));
    }
    let check_index = |index: &str| -> Result<(), String> {
        let shards = index_shards(repo_id, &snapshot, index).map_err(|e| e.to_string())?;
        match shards.iter().find(|s| !snapshot.join(s).exists()) {
            Some(s) => Err(format!("shard {s} named by {index} is missing")),
            None => Ok(()),
        }
    };
    if allow.is_empty() {
        if !snapshot.join("config.json").exists() {
            return Err(format!("no config.json in {}", snapshot.display()));
        }
        if snapshot.join(SAFETENSORS_INDEX).exists() {
            check_index(SAFETENSORS_INDEX)?;
        } else {
            let any = std::fs::read_dir(&snapshot)
                .map_err(|e| format!("{}: {e}", snapshot.display()))?
                .filter_map(|e| e.ok())
                .any(|e| {
                    e.file_name().to_string_lossy().ends_with(".safetensors") && e.path().exists()
                });
            if !any {
                return Err(format!("no *.safetensors in {}", snapshot.display()));
            }
        }
    } else {
        let mut files = Vec::new();
        list_files(&snapshot, "", &mut files);
        let matched: Vec<&String> = files
            .iter()
            .filter(|f| allow.iter().any(|p| glob_match(p, f)))
            .collect();
        if matched.is_empty() {
            return Err(format!(
                "no file in {} matches {}",
                snapshot.display(),
                allow.join(", ")
            ));
        }
        for f in matched {
            if f.ends_with(".safetensors.index.json") {
                check_index(f)?;
            }
        }
    }
    Ok(snapshot)
}

/// Appends the files under `dir` (following symlinks to existing blobs) as `/`-joined paths
/// prefixed with `prefix`.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if path.is_dir() {
            list_files(&path, &format!("{prefix}{name}/"), out);
        } else if path.exists() {
            out.push(format!("{prefix}{name}"));
        }
    }
}

/// Turns an `hf-hub` error about `url` into a [`FetchError`].
fn map_api_error(repo_id: &str, url: &str, e: ApiError) -> FetchError {
    match e {
        ApiError::RequestError(e) => match *e {
            ureq2::Error::Status(status, resp) => {
                let hint = match status {
                    401 | 403 => "; the repository may be private or gated: accept its terms on the hub and set HF_TOKEN",
                    404 => "; no such repository, revision or file (private repositories need HF_TOKEN)",
                    _ => "",
                };
                FetchError::Http {
                    url: redact(resp.get_url()),
                    status,
                    hint: hint.to_string(),
                }
            }
            ureq2::Error::Transport(t) => FetchError::Network {
                url: t
                    .url()
                    .map_or_else(|| redact(url), |u| redact(u.as_str())),
                msg: t.to_string(),
            },
        },
        ApiError::TooManyRetries(inner) => map_api_error(repo_id, url, *inner),
        ApiError::MissingHeader(h) | ApiError::InvalidHeader(h) => FetchError::Hub {
            repo: repo_id.to_string(),
            msg: format!(
                "{}: missing or invalid `{h}` response header (is the endpoint a Hugging Face hub?)",
                redact(url)
            ),
        },
        e => FetchError::Hub {
            repo: repo_id.to_string(),
            msg: format!("{}: {e}", redact(url)),
        },
    }
}

/// Forwards `hf-hub` progress callbacks to a [`FetchProgress`] sink, throttled.
struct HubProgress<'a> {
    sink: Option<&'a mut dyn FnMut(FetchProgress)>,
    throttle: Option<Throttle<'a>>,
}

impl<'a> HubProgress<'a> {
    fn new(sink: &'a mut dyn FnMut(FetchProgress)) -> Self {
        HubProgress {
            sink: Some(sink),
            throttle: None,
        }
    }
}

impl hf_hub::api::Progress for HubProgress<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        let total = Some(size as u64);
        match (&mut self.throttle, self.sink.take()) {
            (Some(t), _) => {
                // hf-hub announces a file twice before its first byte; report it once.
                if !(t.done == 0 && t.total == total && t.file == filename) {
                    t.restart(filename, total);
                }
            }
            (None, Some(sink)) => self.throttle = Some(Throttle::start(sink, filename, total)),
            (None, None) => {}
        }
    }

    fn update(&mut self, size: usize) {
        if let Some(t) = &mut self.throttle {
            t.add(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(t) = &mut self.throttle {
            t.finish();
        }
    }
}

/// Glob match with `*` (any run of characters, `/` included, as Python `fnmatch`) and `?` (one
/// character); everything else literal.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A repository id: `name` or `org/name`, each part of `A-Z a-z 0-9 - _ .`, not starting or
/// ending with `-` or `.`, without `--` or `..`, at most 96 characters (the hub's own rules).
fn validate_repo_id(repo_id: &str) -> Result<(), FetchError> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    let ok = !repo_id.is_empty()
        && repo_id.len() <= 96
        && parts.len() <= 2
        && !repo_id.contains("--")
        && !repo_id.contains("..")
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        });
    if ok {
        Ok(())
    } else {
        Err(FetchError::InvalidArgument(format!(
            "`{repo_id}` is not a Hugging Face repository id (expected `org/name`)"
        )))
    }
}

/// A revision (branch, tag such as `v1.0`, `refs/pr/1`, or commit hash) safe to use as a cache
/// path below `refs/`.
fn validate_revision(revision: &str) -> Result<(), FetchError> {
    let ok = !revision.is_empty()
        && revision.len() <= 256
        && !revision.starts_with('/')
        && !revision.ends_with('/')
        && !revision.contains('\\')
        && !revision
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        && revision
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
    if ok {
        Ok(())
    } else {
        Err(FetchError::InvalidArgument(format!(
            "`{revision}` is not a usable hub revision"
        )))
    }
}

/// 40 lowercase hex digits (a git commit id).
fn is_commit_hash(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One path component that cannot escape its folder.
fn is_safe_component(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\']) && !s.contains('\0')
}

/// A relative `/`-separated path whose components are all safe.
fn is_safe_relative(s: &str) -> bool {
    s.split('/').all(is_safe_component)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "*.safetensors",
            "model-00001-of-00002.safetensors"
        ));
        assert!(glob_match("*.safetensors", "sub/x.safetensors"));
        assert!(!glob_match("*.safetensors", "model.safetensors.index.json"));
        assert!(glob_match(
            "model-?????-of-*.safetensors",
            "model-00001-of-00002.safetensors"
        ));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYbc"));
        assert!(!glob_match("a*b*c", "aXXbYYb"));
        assert!(glob_match("config.json", "config.json"));
        assert!(!glob_match("config.json", "config.jsonx"));
    }

    #[test]
    fn repo_ids_and_revisions() {
        for good in ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/a.b_c-d"] {
            assert!(validate_repo_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a/b/c",
            "../x",
            "a/..",
            "org/na me",
            "org/-x",
            "a--b/c",
            "/x",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
        for good in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(validate_revision(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/../b", "/main", "a b", "a\\b"] {
            assert!(validate_revision(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_selection_uses_the_index_and_skips_extra_weights() {
        let siblings: BTreeSet<String> = [
            "config.json",
            "tokenizer.json",
            "README.md",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "consolidated.safetensors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (files, indexes) = select_files("o/n", &siblings, &[]).unwrap();
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            vec!["config.json".to_string(), "tokenizer.json".to_string()]
        );
        assert_eq!(indexes, vec![SAFETENSORS_INDEX.to_string()]);

        let no_config: BTreeSet<String> = ["model.safetensors".to_string()].into();
        let err = select_files("o/n", &no_config, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no config.json"), "{err}");

        let (files, _) = select_files("o/n", &siblings, &["*.md", "consolidated*"]).unwrap();
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            vec![
                "README.md".to_string(),
                "consolidated.safetensors".to_string()
            ]
        );
        let evil: BTreeSet<String> =
            ["config.json".to_string(), "../x.safetensors".to_string()].into();
        assert!(select_files("o/n", &evil, &["*"]).is_err());
    }
}
