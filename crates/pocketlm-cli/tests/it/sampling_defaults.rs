//! The shipped sampling defaults on the real default model: answers that end by themselves
//! and do not loop (greedy decoding without a repetition penalty repeated one line of the haiku
//! up to the token limit).

use std::process::Command;

/// Prompts of different kinds, each with the seed it runs with (fixed, so that the test is
/// deterministic; without `--seed` each run draws differently).
const PROMPTS: [(&str, &str); 5] = [
    ("Write a haiku about the sea.", "1"),
    ("What is the capital of France?", "2"),
    ("Give me three tips for sleeping better.", "3"),
    ("Explain what a computer virus is in two sentences.", "4"),
    ("Write a short poem about autumn leaves.", "5"),
];

const MAX_TOKENS: usize = 256;

/// The most times one non-empty line occurs in `text`.
fn most_repeated_line(text: &str) -> usize {
    let mut counts = std::collections::HashMap::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        *counts.entry(l).or_insert(0usize) += 1;
    }
    counts.into_values().max().unwrap_or(0)
}

#[test]
fn default_sampling_gives_clean_answers() {
    let mut ended = 0;
    let mut report = Vec::new();
    for (prompt, seed) in PROMPTS {
        let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
            .args(["generate", "--prompt", prompt, "--seed", seed, "--verbose"])
            .args(["--max-tokens", &MAX_TOKENS.to_string()])
            .output()
            .expect("running pocketlm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{prompt}: {stderr}");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let stats = stderr
            .lines()
            .find(|l| l.starts_with("Generation:"))
            .unwrap_or_else(|| panic!("no statistics: {stderr}"));
        let stopped = stats.contains("(finished: stop)");
        ended += usize::from(stopped);
        report.push(format!("{prompt:?} seed {seed}: {stats}\n{text}"));
        assert!(
            most_repeated_line(&text) < 3,
            "{prompt:?} (seed {seed}) repeats a line 3 times or more:\n{text}"
        );
    }
    let report = report.join("\n");
    eprintln!("{report}");
    assert!(
        ended >= 4,
        "only {ended} of 5 answers ended before {MAX_TOKENS} tokens:\n{report}"
    );
}

#[test]
fn repeated_lines_are_counted() {
    assert_eq!(most_repeated_line("a\n\nb\n a \n"), 2);
    assert_eq!(most_repeated_line(""), 0);
}
