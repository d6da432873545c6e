//! Ctrl-C in `pocketlm chat`: during a reply it stops the reply and the conversation goes on;
//! at the prompt it ends the program.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Collects what `pipe` yields into a shared string, on a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = b.lock() {
                s.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        }
    });
    buf
}

fn text(buf: &Arc<Mutex<String>>) -> String {
    buf.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Waits up to 120 s for `cond` on the collected output.
fn wait_for(buf: &Arc<Mutex<String>>, what: &str, cond: impl Fn(&str) -> bool) {
    let t0 = Instant::now();
    while !cond(&text(buf)) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}; got: {}",
            text(buf)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigint(child: &Child) {
    let pid = i32::try_from(child.id()).expect("pid fits in i32");
    // SAFETY: kill(2) on our own child's pid (not yet reaped, so not reused) with SIGINT.
    let rc = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(rc, 0, "kill failed");
}

#[test]
fn ctrl_c_stops_the_reply_and_keeps_the_session() {
    // Greedy decoding of this prompt repeats a line until the token limit: a reply that is
    // still running when the signal comes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["chat", "--temp", "0", "--max-tokens", "4000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting pocketlm chat");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = collect(child.stdout.take().expect("stdout"));
    let stderr = collect(child.stderr.take().expect("stderr"));

    stdin
        .write_all(b"Write a haiku about the sea.\n")
        .expect("write");
    stdin.flush().expect("flush");
    wait_for(&stdout, "the first reply", |s| s.len() > 40);
    sigint(&child);
    wait_for(&stderr, "the stop notice", |s| s.contains("reply stopped"));
    assert!(child.try_wait().expect("try_wait").is_none(), "it exited");
    let first = text(&stdout);
    assert!(first.len() < 4000, "the reply ran on: {first}");

    // The session goes on and answers (greedy again, and as long).
    stdin
        .write_all(b"What is the capital of France?\n")
        .expect("write");
    stdin.flush().expect("flush");
    wait_for(&stdout, "the second reply", |s| s.len() > first.len() + 40);
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "{}",
        text(&stderr)
    );

    // Ctrl-C twice: the first stops the second reply, the second comes at the prompt and
    // ends the program.
    sigint(&child);
    wait_for(&stderr, "the second stop notice", |s| {
        s.matches("reply stopped").count() == 2
    });
    assert!(child.try_wait().expect("try_wait").is_none(), "it exited");
    sigint(&child);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        matches!(status.code(), Some(0) | Some(130)),
        "{status:?}: {}",
        text(&stderr)
    );
    assert!(!text(&stderr).contains("panicked"), "{}", text(&stderr));
}
