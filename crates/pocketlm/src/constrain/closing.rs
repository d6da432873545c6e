//! Budget-aware closing: finishing a constrained output before `max_tokens` cuts it.
//!
//! A grammar guarantees that every prefix of the output can still be completed, not that it
//! will be completed in time: a model that writes a long JSON string (random weights loop
//! inside one) is cut by `max_tokens` with an unparsable half object. llama.cpp, mistral.rs
//! and vLLM leave it so. Here the [`super::GrammarMask`] plans, from the matcher's state, a
//! short way to the end of the grammar ([`closing_path`]) and, once the tokens left are
//! barely enough for it, allows only that way's next token, so the output ends complete within
//! the budget.
//!
//! The way to the end is greedy, not the shortest: at each state it takes the tokens the
//! grammar forces (llguidance's fast-forward tokens), else the end-of-generation token once
//! the grammar accepts, else the first allowed of the closing tokens ([`closing_tokens`]:
//! a string's end with the brackets after it, then brackets, then `0`), else the allowed token
//! of fewest bytes that is not whitespace (lowest id on ties). A `0` is not taken where a
//! second `0` could follow it: there the walk is inside a number (JSON allows no `00` at a
//! number's start), which a `0` would only lengthen.

use llguidance::Matcher;
use toktrie::{SimpleVob, TokTrie};

/// Tokens left (the end-of-generation token counted) at which the mask starts planning a way
/// to the end; above it, planning is skipped (it costs one mask computation per planned
/// token).
pub const PLAN_WINDOW: usize = 64;

/// Tokens of slack kept above the planned way's length before the mask follows it: the most
/// one freely drawn token is assumed to add to the way to the end (a token such as `[{"` in a
/// value position opens three structures).
pub const SLACK: usize = 8;

/// The vocabulary's preferred closing tokens, in preference order: tokens made of a `"` then
/// only `}` and `]` (a string's end and the structures around it; longest first, then lowest
/// id), then tokens made only of `}` and `]` (the same order), then the tokens spelled `0` (a
/// number's shortest value).
///
/// Inside a string only the first kind closes anything (`}` there is text), and those tokens
/// come first; outside one, a token of the first kind opens a string that the next such token
/// closes, so a walk never stays inside a string. Special tokens (bytes starting with
/// [`TokTrie::SPECIAL_TOKEN_MARKER`]) are never closers.
pub fn closing_tokens(trie: &TokTrie) -> Vec<u32> {
    let brackets = |b: &[u8]| !b.is_empty() && b.iter().all(|c| matches!(c, b'}' | b']'));
    let mut quoted: Vec<(usize, u32)> = Vec::new();
    let mut bare: Vec<(usize, u32)> = Vec::new();
    let mut zeros: Vec<u32> = Vec::new();
    for id in 0..trie.vocab_size() as u32 {
        let b = trie.token(id);
        if b == b"\"" || (b.first() == Some(&b'"') && brackets(&b[1..])) {
            quoted.push((b.len(), id));
        } else if brackets(b) {
            bare.push((b.len(), id));
        } else if b == b"0" {
            zeros.push(id);
        }
    }
    let longest_first =
        |v: &mut Vec<(usize, u32)>| v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    longest_first(&mut quoted);
    longest_first(&mut bare);
    quoted
        .into_iter()
        .chain(bare)
        .map(|(_, id)| id)
        .chain(zeros)
        .collect()
}

/// The allowed token of fewest bytes that is not only whitespace (lowest id on ties), else
/// the allowed whitespace token of fewest bytes: whitespace never brings the end nearer.
/// Special tokens count their marker.
fn shortest_allowed(mask: &SimpleVob, trie: &TokTrie) -> Option<u32> {
    let mut best: Option<(bool, usize, u32)> = None;
    mask.iter_set_entries(|i| {
        let b = trie.token(i as u32);
        let key = (b.iter().all(u8::is_ascii_whitespace), b.len(), i as u32);
        if !b.is_empty() && best.is_none_or(|k| key < k) {
            best = Some(key);
        }
    });
    best.map(|(_, _, id)| id)
}

/// A way from `m`'s state to the end of its grammar, `eos` included as its last token: at most
/// `limit` tokens, chosen as the module describes; `None` when none was found within `limit`
/// (or the grammar failed on the way). `m` itself is not changed (a deep clone walks).
pub fn closing_path(
    m: &Matcher,
    trie: &TokTrie,
    closers: &[u32],
    eos: u32,
    limit: usize,
) -> Option<Vec<u32>> {
    let mut m = m.deep_clone();
    let mut path = Vec::new();
    let zero = |t: u32| trie.token(t) == b"0";
    while path.len() < limit {
        if m.is_stopped() || m.is_accepting().ok()? {
            path.push(eos);
            return Some(path);
        }
        let forced = m.compute_ff_tokens();
        if !forced.is_empty() {
            m.consume_tokens(&forced).ok()?;
            path.extend(forced);
            continue;
        }
        let mut mask = m.compute_mask().ok()?;
        for &t in closers.iter().filter(|&&t| zero(t)) {
            if mask.is_allowed(t) && m.validate_tokens(&[t, t]).ok() == Some(2) {
                mask.disallow_token(t);
            }
        }
        let next = closers
            .iter()
            .copied()
            .find(|&t| mask.is_allowed(t))
            .or_else(|| shortest_allowed(&mask, trie))?;
        m.consume_token(next).ok()?;
        path.push(next);
    }
    None
}

/// With `left` tokens left (end-of-generation included) and the mask `mask` of `m`'s state:
/// when `left` is within [`PLAN_WINDOW`] and no more than the planned way's length plus
/// [`SLACK`], narrows `mask` to the way's next token (the end-of-generation token once the
/// grammar accepts). Returns whether it narrowed. A way that cannot be found leaves the mask.
pub fn narrow_to_budget(
    m: &Matcher,
    mask: &mut SimpleVob,
    left: usize,
    trie: &TokTrie,
    closers: &[u32],
    eos: u32,
) -> bool {
    if left > PLAN_WINDOW {
        return false;
    }
    let Some(path) = closing_path(m, trie, closers, eos, PLAN_WINDOW) else {
        return false;
    };
    if left > path.len() + SLACK {
        return false;
    }
    let next = path[0];
    if !mask.is_allowed(next) {
        return false;
    }
    mask.set_all(false);
    mask.allow_token(next);
    true
}
