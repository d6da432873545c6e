//! [`GrammarMask`]: the logits processor that enforces a grammar.
//!
//! At each step it sets the logits of the tokens the grammar does not allow to `-inf`; when the
//! sampler has drawn a token ([`LogitsProcessor::accept`]) it hands the llguidance matcher to a
//! worker thread that advances it with that token and computes the next step's mask, so that
//! the mask of step `n + 1` is computed while the model runs the forward pass of token `n`
//! (as llguidance's own integrations in vLLM and llama.cpp overlap it with the GPU). The next
//! [`LogitsProcessor::process`] joins the worker.
//!
//! With fast-forward ([`GrammarMask::with_fast_forward`]), the worker first computes the
//! tokens the grammar forces next (llguidance's `compute_ff_tokens`: the canonical tokens of
//! bytes no choice can change, such as `{"name": "` of a tool call), consumes them and hands
//! them over ([`LogitsProcessor::forced`]) before it computes the mask after them: the token
//! stepper yields them without sampling and feeds them in one forward pass.
//!
//! With a token budget ([`GrammarMask::with_options`]), the worker also plans a way to the end
//! of the grammar once few tokens are left, and narrows the mask to it when the budget is
//! barely enough ([`super::closing`]), so that `max_tokens` does not cut the output short.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use llguidance::Matcher;
use toktrie::SimpleVob;

use super::{closing, Constraint, ConstraintError, GrammarEnv};
use crate::sampling::LogitsProcessor;

/// What a worker hands back: the matcher, the mask it computed for the next step (or the
/// error it met), and the tokens left in the budget after the forced ones.
struct Computed {
    m: Box<Matcher>,
    mask: Result<SimpleVob, String>,
    left: Option<usize>,
}

/// The two ends of the channel that carries the forced tokens (both `None` without
/// fast-forward).
type FfChannel = (Option<Sender<Vec<u32>>>, Option<Receiver<Vec<u32>>>);

enum State {
    /// A worker is advancing the matcher and computing the next mask; with fast-forward, it
    /// sends the forced tokens it consumed first (taken by [`LogitsProcessor::forced`]).
    Computing(JoinHandle<Computed>, Option<Receiver<Vec<u32>>>),
    /// The mask of the next step is known, and the tokens left in the budget.
    Ready(Box<Matcher>, SimpleVob, Option<usize>),
    /// The grammar failed; the message says why.
    Failed(String),
}

/// A [`LogitsProcessor`] that only lets through the tokens a [`Constraint`] allows next.
///
/// Add it to a sampler with [`crate::sampling::Sampler::with_processor`]; the generation code
/// does so for [`crate::generate::GenerateParams::constraint`]. Once the grammar is complete
/// and allows nothing more, only the end-of-generation tokens are allowed
/// ([`GrammarEnv::eos_tokens`]), so generation ends with finish reason `stop`. When the grammar
/// allows no token at all, every logit is set to `-inf` and [`LogitsProcessor::failure`] says
/// why (the stepper then returns [`crate::Error::Constraint`]).
pub struct GrammarMask {
    state: Option<State>,
    env: Arc<GrammarEnv>,
    fast_forward: bool,
    budget: Option<usize>,
}

impl std::fmt::Debug for GrammarMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            Some(State::Computing(..)) => "computing",
            Some(State::Ready(..)) => "ready",
            Some(State::Failed(_)) => "failed",
            None => "none",
        };
        f.debug_struct("GrammarMask")
            .field("state", &state)
            .field("fast_forward", &self.fast_forward)
            .field("budget", &self.budget)
            .finish()
    }
}

/// The mask of the matcher's current state: the allowed tokens, or only the EOS tokens once
/// the grammar has stopped. An empty mask is an error.
fn mask_of(m: &mut Matcher) -> Result<SimpleVob, String> {
    let mask = m.compute_mask_or_eos().map_err(|e| e.to_string())?;
    if mask.is_zero() {
        return Err("the grammar allows no token here".into());
    }
    Ok(mask)
}

/// With `ff`, consumes the tokens the grammar forces now and sends them (an empty list when
/// none); then computes the next mask, narrowed to the way to the end when `left` tokens are
/// barely enough for it ([`closing::narrow_to_budget`]).
fn forced_then_mask(
    mut m: Box<Matcher>,
    ff: Option<Sender<Vec<u32>>>,
    env: &GrammarEnv,
    mut left: Option<usize>,
) -> Computed {
    if let Some(tx) = ff {
        let forced = if m.is_stopped() {
            Vec::new()
        } else {
            m.compute_ff_tokens()
        };
        if let Err(e) = m.consume_tokens(&forced) {
            let mask = Err(format!("forced tokens {forced:?}: {e}"));
            return Computed { m, mask, left };
        }
        left = left.map(|l| l.saturating_sub(forced.len()));
        // The stepper may have stopped listening (generation ended): nothing to do then.
        let _ = tx.send(forced);
    }
    let mut mask = mask_of(&mut m);
    if let (Ok(mask), Some(l)) = (&mut mask, left) {
        closing::narrow_to_budget(
            &m,
            mask,
            l,
            env.trie(),
            env.closing_tokens(),
            env.eos_tokens()[0],
        );
    }
    Computed { m, mask, left }
}

/// Advances `m` with `token` (unless it has stopped and `token` ends generation, which a
/// generation that ignores EOS may draw again), then as [`forced_then_mask`].
fn advance(
    mut m: Box<Matcher>,
    token: u32,
    env: &GrammarEnv,
    ff: Option<Sender<Vec<u32>>>,
    left: Option<usize>,
) -> Computed {
    if !(m.is_stopped() && env.eos_tokens().contains(&token)) {
        if let Err(e) = m.consume_token(token) {
            let mask = Err(format!("token {token}: {e}"));
            return Computed { m, mask, left };
        }
    }
    forced_then_mask(m, ff, env, left)
}

impl GrammarMask {
    /// Compiles `constraint` against `env` and starts computing the first mask on a worker
    /// thread (it overlaps the prompt's prefill).
    ///
    /// Errors: [`ConstraintError::Grammar`] when the grammar, schema or regular expression does
    /// not compile (llguidance's message).
    pub fn new(env: Arc<GrammarEnv>, constraint: &Constraint) -> Result<Self, ConstraintError> {
        Self::with_options(env, constraint, false, None)
    }

    /// As [`GrammarMask::new`], with fast-forward: after each accepted token (and at the
    /// start) the tokens the grammar forces are consumed and reported by
    /// [`LogitsProcessor::forced`], which the caller must then append to the output without
    /// drawing them (the token stepper does). Masks, and greedy output, are those of
    /// [`GrammarMask::new`]; only who writes the forced tokens differs.
    ///
    /// Errors: as [`GrammarMask::new`].
    pub fn with_fast_forward(
        env: Arc<GrammarEnv>,
        constraint: &Constraint,
    ) -> Result<Self, ConstraintError> {
        Self::with_options(env, constraint, true, None)
    }

    /// As [`GrammarMask::new`], with fast-forward when `fast_forward` (as
    /// [`GrammarMask::with_fast_forward`]) and, with `token_budget`, budget-aware closing: the
    /// generation may emit at most `token_budget` more tokens (its `max_tokens`, the
    /// end-of-generation token counted as one step), and once the tokens left are within
    /// [`closing::SLACK`] of a planned way to the end of the grammar, the mask allows only that
    /// way's next token ([`super::closing`]). Every accepted and forced token counts.
    ///
    /// Errors: as [`GrammarMask::new`].
    pub fn with_options(
        env: Arc<GrammarEnv>,
        constraint: &Constraint,
        fast_forward: bool,
        token_budget: Option<usize>,
    ) -> Result<Self, ConstraintError> {
        let grammar = constraint.to_llguidance();
        let parser = env
            .factory()
            .create_parser(grammar)
            .map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Grammar(e));
        }
        let matcher = Box::new(matcher);
        let (tx, rx) = Self::ff_channel(fast_forward);
        let worker_env = env.clone();
        let worker =
            std::thread::spawn(move || forced_then_mask(matcher, tx, &worker_env, token_budget));
        Ok(GrammarMask {
            state: Some(State::Computing(worker, rx)),
            env,
            fast_forward,
            budget: token_budget,
        })
    }

    /// The channel of the forced tokens, with fast-forward.
    fn ff_channel(on: bool) -> FfChannel {
        if on {
            let (tx, rx) = channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        }
    }

    /// Starts a worker that advances `m` with `token`, `left` tokens having been left in the
    /// budget before it.
    fn spawn_advance(&self, m: Box<Matcher>, token: u32, left: Option<usize>) -> State {
        let env = self.env.clone();
        let (tx, rx) = Self::ff_channel(self.fast_forward);
        let left = left.map(|l| l.saturating_sub(1));
        State::Computing(
            std::thread::spawn(move || advance(m, token, &env, tx, left)),
            rx,
        )
    }

    /// Waits for the worker; returns the current mask, or records the failure.
    fn mask(&mut self) -> Option<&SimpleVob> {
        self.state = match self.state.take() {
            Some(State::Computing(h, _)) => Some(match h.join() {
                Ok(Computed {
                    m,
                    mask: Ok(mask),
                    left,
                }) => State::Ready(m, mask, left),
                Ok(Computed { mask: Err(e), .. }) => State::Failed(e),
                Err(_) => State::Failed("the grammar worker panicked".into()),
            }),
            other => other,
        };
        match &self.state {
            Some(State::Ready(_, mask, _)) => Some(mask),
            _ => None,
        }
    }
}

/// Sets `logits[i]` to `-inf` for every `i` not set in `mask` (ids beyond the mask, which a
/// model with padded embedding rows has, included).
pub fn apply_mask(mask: &SimpleVob, logits: &mut [f32]) {
    // `mask.len()` may not be a multiple of 32: bits past it are zero in its words.
    crate::sampling::processors::apply_mask_words(mask.as_slice(), logits);
}

impl LogitsProcessor for GrammarMask {
    fn name(&self) -> &str {
        "grammar"
    }

    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        match self.mask() {
            Some(mask) => apply_mask(mask, logits),
            None => logits.fill(f32::NEG_INFINITY),
        }
    }

    fn accept(&mut self, token: u32) {
        let state = self.state.take();
        self.state = Some(match state {
            Some(State::Ready(m, _, left)) => self.spawn_advance(m, token, left),
            Some(State::Computing(h, _)) => {
                // `accept` without `process` in between: advance after the pending mask.
                match h.join() {
                    Ok(Computed {
                        m,
                        mask: Ok(_),
                        left,
                    }) => self.spawn_advance(m, token, left),
                    Ok(Computed { mask: Err(e), .. }) => State::Failed(e),
                    Err(_) => State::Failed("the grammar worker panicked".into()),
                }
            }
            Some(State::Failed(e)) => State::Failed(e),
            None => State::Failed("the grammar state was lost".into()),
        });
    }

    fn forced(&mut self) -> Vec<u32> {
        match &mut self.state {
            // The worker sends before it computes the mask: the forward pass of these tokens
            // overlaps the mask after them. A worker that failed sends nothing; `process`
            // reports its failure.
            Some(State::Computing(_, rx)) => {
                rx.take().and_then(|rx| rx.recv().ok()).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    fn failure(&self) -> Option<String> {
        match &self.state {
            Some(State::Failed(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// The mask [`Self::process`] applies, as words (none set once the grammar failed, as
    /// `process` then sets every logit to `-inf`).
    fn mask_words(&mut self) -> Option<Vec<u32>> {
        Some(
            self.mask()
                .map(|m| m.as_slice().to_vec())
                .unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constrain::{TokenBytes, TokenSpelling};
    use crate::tokenizer::test_util::{single_byte_gpt2, tiny_spm};
    use crate::tokenizer::Tokenizer;

    /// One token per byte (ids 0..=255 are the bytes), `<|endoftext|>` = 256 is EOS.
    fn bytes_tokenizer() -> Tokenizer {
        Tokenizer::from_gguf_metadata(&single_byte_gpt2()).expect("tokenizer")
    }

    fn allowed(mask: &mut GrammarMask, n: usize) -> Vec<u32> {
        let mut l = vec![0.0f32; n];
        mask.process(&mut l, &[]);
        (0..n as u32).filter(|&i| l[i as usize] == 0.0).collect()
    }

    #[test]
    fn token_bytes_of_byte_level_and_byte_fallback_vocabularies() {
        let t = TokenBytes::from_tokenizer(&bytes_tokenizer()).unwrap();
        assert_eq!(t.spelling, TokenSpelling::ByteLevel);
        for b in 0..=255u8 {
            assert_eq!(t.bytes[b as usize], vec![b], "byte {b}");
        }
        assert_eq!(t.bytes[256], b"\xff<|endoftext|>".to_vec());
        assert!(t.special[256] && !t.special[32]);
        let spm = Tokenizer::from_gguf_metadata(&tiny_spm()).expect("tokenizer");
        let t = TokenBytes::from_tokenizer(&spm).unwrap();
        assert_eq!(
            t.spelling,
            TokenSpelling::ByteFallback { space: '\u{2581}' }
        );
        assert_eq!(t.bytes[3 + 0xE2], vec![0xE2], "<0xE2>");
        let id = |s: &str| spm.token_to_id(s).unwrap() as usize;
        assert_eq!(t.bytes[id("\u{2581}ab")], b" ab".to_vec());
        assert_eq!(t.bytes[id("</s>")], b"\xff</s>".to_vec());
    }

    #[test]
    fn the_mask_follows_the_grammar_then_allows_only_eos() {
        let tok = bytes_tokenizer();
        let env = GrammarEnv::for_tokenizer(&tok).unwrap();
        assert_eq!(env.eos_tokens(), &[256]);
        let mut m = GrammarMask::new(env, &Constraint::Regex("a(b|c)".into())).unwrap();
        assert_eq!(allowed(&mut m, 257), vec![b'a' as u32]);
        m.accept(b'a' as u32);
        assert_eq!(allowed(&mut m, 257), vec![b'b' as u32, b'c' as u32]);
        m.accept(b'c' as u32);
        assert_eq!(allowed(&mut m, 257), vec![256]);
        assert!(m.failure().is_none());
        // Ids beyond the vocabulary (padded embedding rows) are never allowed.
        assert_eq!(allowed(&mut m, 300), vec![256]);
    }

    /// `mask_words` (what the GPU sampler applies) lets through the ids `process` leaves
    /// finite, at every step of a grammar, with ids past the words never allowed; once the
    /// grammar has failed, none.
    #[test]
    fn mask_words_are_the_mask_process_applies() {
        let tok = bytes_tokenizer();
        let env = GrammarEnv::for_tokenizer(&tok).unwrap();
        let c = Constraint::Regex("a(b|c)d".into());
        let (mut by_process, mut by_words) = (
            GrammarMask::new(env.clone(), &c).unwrap(),
            GrammarMask::new(env, &c).unwrap(),
        );
        let from_words = |w: &[u32], n: usize| -> Vec<u32> {
            (0..n as u32)
                .filter(|&i| {
                    w.get(i as usize / 32)
                        .is_some_and(|&x| x & (1 << (i % 32)) != 0)
                })
                .collect()
        };
        for next in [b'a', b'c', b'd'] {
            let want = allowed(&mut by_process, 300);
            let words = by_words.mask_words().expect("a grammar is a mask");
            assert_eq!(from_words(&words, 300), want);
            by_process.accept(next as u32);
            by_words.accept(next as u32);
        }
        assert_eq!(from_words(&by_words.mask_words().unwrap(), 300), vec![256]);
        // A token the grammar refuses fails it: nothing is allowed after.
        by_words.accept(b'x' as u32);
        let words = by_words.mask_words().unwrap();
        assert!(by_words.failure().is_some());
        assert!(from_words(&words, 300).is_empty());
    }

    /// The single-byte vocabulary (EOS `<|endoftext|>` = 256) with two added tokens as
    /// Qwen's `tokenizer.json` has them: `<tool_call>` (257, `"special": false`) and
    /// `<|im_end|>` (258, special, end of generation).
    fn with_added_tokens() -> (tempfile::TempDir, Tokenizer) {
        let base = bytes_tokenizer();
        let mut json: serde_json::Value =
            serde_json::from_str(&base.inner().to_string(false).unwrap()).unwrap();
        let added = |id: u32, content: &str, special: bool| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": special})
        };
        let list = json["added_tokens"].as_array_mut().unwrap();
        list.push(added(257, "<tool_call>", false));
        list.push(added(258, "<|im_end|>", true));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"eos_token": "<|endoftext|>"}"#,
        )
        .unwrap();
        let tok = Tokenizer::from_files(
            &dir.path().join("tokenizer.json"),
            Some(&dir.path().join("tokenizer_config.json")),
        )
        .unwrap();
        (dir, tok)
    }

    #[test]
    fn added_tokens_not_marked_special_are_spelled_as_their_text() {
        let (_dir, tok) = with_added_tokens();
        assert_eq!(tok.token_to_id("<tool_call>"), Some(257));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(258));
        assert!(tok.is_eog(258) && tok.is_eog(256));
        let t = TokenBytes::from_tokenizer(&tok).unwrap();
        assert_eq!(t.bytes.len(), 259);
        assert_eq!(t.bytes[257], b"<tool_call>".to_vec());
        assert!(!t.special[257]);
        assert_eq!(t.bytes[258], b"\xff<|im_end|>".to_vec());
        assert!(t.special[258] && t.special[256]);

        // A grammar holding the literal `<tool_call>` produces the added token (llguidance
        // allows only the tokenizer's own tokenization of forced text).
        let env = GrammarEnv::for_tokenizer(&tok).unwrap();
        let lark = Constraint::Lark("start: \"<tool_call>\" \"x\"".into());
        let mut m = GrammarMask::new(env.clone(), &lark).unwrap();
        // Logits wider than the table (padded embedding rows, as Qwen's 151936 logits over
        // 151665 tokens): ids past the table are never allowed.
        assert_eq!(allowed(&mut m, 300), vec![257]);
        m.accept(257);
        assert_eq!(allowed(&mut m, 300), vec![b'x' as u32]);
        m.accept(b'x' as u32);
        let eos = allowed(&mut m, 300);
        assert_eq!(eos, vec![256, 258]);
        assert!(m.failure().is_none());

        // Free text allows `<tool_call>` but never the special end-of-generation tokens (only
        // as the end) or padded rows.
        let mut m = GrammarMask::new(env, &Constraint::Regex("[a-z<>_]+".into())).unwrap();
        let first = allowed(&mut m, 300);
        assert!(first.contains(&257) && first.contains(&(b'a' as u32)));
        assert!(first.iter().all(|&i| i < 256 || i == 257), "{first:?}");
    }

    #[test]
    fn a_token_the_grammar_rejects_is_a_failure() {
        let tok = bytes_tokenizer();
        let env = GrammarEnv::for_tokenizer(&tok).unwrap();
        let mut m = GrammarMask::new(env, &Constraint::Regex("[0-9]+".into())).unwrap();
        allowed(&mut m, 257);
        m.accept(b'x' as u32);
        assert!(allowed(&mut m, 257).is_empty());
        let why = m.failure().expect("a failure");
        assert!(why.contains("token 120"), "{why}");
    }

    #[test]
    fn apply_mask_handles_partial_words() {
        let mut v = SimpleVob::alloc(40);
        v.allow_token(3);
        v.allow_token(33);
        let mut l = vec![1.0f32; 70];
        apply_mask(&v, &mut l);
        let kept: Vec<usize> = (0..70).filter(|&i| l[i] == 1.0).collect();
        assert_eq!(kept, vec![3, 33]);
    }

    /// Drives `m` as a model that always prefers `favourite` (then `"`, `:`, the lowest
    /// allowed id that is not whitespace, the lowest allowed id) would, for at most `steps` tokens (forced tokens counted); returns the output bytes and
    /// whether it ended with EOS (256).
    fn drive(m: &mut GrammarMask, favourite: u8, steps: usize) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut used = 0;
        while used < steps {
            let forced = m.forced();
            used += forced.len();
            out.extend(forced.iter().map(|&t| t as u8));
            if used >= steps {
                break;
            }
            let ok = allowed(m, 257);
            let pick = [favourite, b'"', b':'].map(u32::from);
            let t = pick
                .into_iter()
                .chain(ok.iter().copied().filter(|&t| t > 32))
                .chain(ok.iter().copied())
                .find(|t| ok.contains(t))
                .expect("an allowed token");
            used += 1;
            if t == 256 {
                return (out, true);
            }
            out.push(t as u8);
            m.accept(t);
        }
        (out, false)
    }

    /// A model that loves `favourite` under the JSON Schema `properties` (both fields
    /// required), with and without fast-forward: without a budget it never ends within 40
    /// steps; with budgets 40 and 25 it ends within them. The outputs with a budget, parsed:
    /// (budget, text, value).
    fn budgeted_outputs(
        properties: serde_json::Value,
        favourite: u8,
    ) -> Vec<(usize, String, serde_json::Value)> {
        let tok = bytes_tokenizer();
        let env = GrammarEnv::for_tokenizer(&tok).unwrap();
        let required: Vec<&String> = properties.as_object().unwrap().keys().collect();
        let schema = Constraint::JsonSchema(serde_json::json!({
            "type": "object",
            "properties": properties,
            "required": required,
        }));
        let mut outputs = Vec::new();
        for ff in [false, true] {
            let mut m = GrammarMask::with_options(env.clone(), &schema, ff, None).unwrap();
            let (out, ended) = drive(&mut m, favourite, 40);
            assert!(!ended, "{}", String::from_utf8_lossy(&out));
            for budget in [40, 25] {
                let mut m =
                    GrammarMask::with_options(env.clone(), &schema, ff, Some(budget)).unwrap();
                let (out, ended) = drive(&mut m, favourite, budget);
                let text = String::from_utf8(out).unwrap();
                assert!(ended, "fast-forward {ff}, budget {budget}: {text}");
                let v: serde_json::Value = serde_json::from_str(&text).expect(&text);
                outputs.push((budget, text, v));
            }
        }
        outputs
    }

    /// Without a budget, a model that loves `a` stays inside the string. With one, it writes
    /// `a`s while the budget allows, then closes: the output parses and matches the schema,
    /// EOS included within the steps.
    #[test]
    fn a_token_budget_closes_the_json_in_time() {
        let properties =
            serde_json::json!({"city": {"type": "string"}, "days": {"type": "integer"}});
        for (budget, text, v) in budgeted_outputs(properties, b'a') {
            let city = v["city"].as_str().expect(&text);
            assert!(city.bytes().all(|b| b == b'a'), "{text}");
            assert!(budget < 40 || city.len() >= 5, "{text}");
            assert!(v["days"].is_i64(), "{text}");
        }
    }

    /// A model that loves a digit inside an integer: the way to the end leaves the number
    /// (a `0` there would only lengthen it), so the budget still closes the object.
    #[test]
    fn a_token_budget_closes_an_integer_in_time() {
        let properties =
            serde_json::json!({"days": {"type": "integer"}, "city": {"type": "string"}});
        for (_, text, v) in budgeted_outputs(properties, b'7') {
            assert!(v["days"].is_number(), "{text}");
            assert!(v["city"].is_string(), "{text}");
        }
    }

    #[test]
    fn closing_tokens_are_string_ends_then_brackets_then_zero() {
        let tok = bytes_tokenizer();
        let env = GrammarEnv::for_tokenizer(&tok).unwrap();
        let c = env.closing_tokens();
        assert_eq!(c, &[b'"' as u32, b']' as u32, b'}' as u32, b'0' as u32]);
    }
}
