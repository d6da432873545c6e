//! Generation under a grammar ([`crate::constrain`] through [`GenerateParams::constraint`]),
//! on a stub model whose logits always prefer `x`: the grammar, not the model, decides.

use candle_core::{Device, Tensor};

use super::{generate, FinishReason, GenerateParams};
use crate::constrain::Constraint;
use crate::kv_cache::KvCache;
use crate::models::{CausalLM, Logits, ModelInfo};
use crate::sampling::SamplingParams;
use crate::tokenizer::test_util::single_byte_gpt2;
use crate::tokenizer::Tokenizer;

/// One token per byte (ids 0..=255 are the bytes), `<|endoftext|>` = 256 is EOS.
fn bytes_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf_metadata(&single_byte_gpt2()).expect("tokenizer")
}

/// A model that always prefers `x` (then `y`): the grammar must override it. Records the
/// number of tokens of each forward pass.
struct Stubborn {
    info: ModelInfo,
    passes: std::sync::Mutex<Vec<usize>>,
}

impl CausalLM for Stubborn {
    fn forward(&self, ids: &Tensor, _: &mut KvCache, _: Logits) -> crate::Result<Tensor> {
        self.passes.lock().unwrap().push(ids.dim(1)?);
        let mut row = vec![0f32; self.info.vocab_size];
        row[b'x' as usize] = 20.0;
        row[b'y' as usize] = 10.0;
        Ok(Tensor::new(row.as_slice(), &Device::Cpu)?.unsqueeze(0)?)
    }
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
}

#[test]
fn generation_under_a_grammar_ends_with_stop_and_unconstrained_is_unchanged() {
    let tok = bytes_tokenizer();
    let model = Stubborn {
        info: ModelInfo {
            architecture: "stubborn".into(),
            vocab_size: 260,
            n_layers: 0,
            hidden_size: 1,
            n_kv_heads: 1,
            head_dim: 1,
            context_length: 64,
        },
        passes: Default::default(),
    };
    let run = |constraint: Option<Constraint>, temperature: f32| {
        let mut cache = model.new_cache();
        let params = GenerateParams {
            max_tokens: 10,
            sampling: SamplingParams {
                temperature,
                seed: Some(1),
                ..Default::default()
            },
            constraint,
            ..Default::default()
        };
        generate(&model, &tok, &mut cache, &[b'q' as u32], params)
            .unwrap()
            .collect_output()
            .unwrap()
    };
    let free = run(None, 0.0);
    assert_eq!(free.text, "xxxxxxxxxx");
    assert_eq!(free.finish_reason, FinishReason::MaxTokens);
    for t in [0.0, 1.0] {
        let out = run(Some(Constraint::Regex("[0-9]{3}-(x|y)y".into())), t);
        assert_eq!(out.finish_reason, FinishReason::Eos, "{}", out.text);
        assert_eq!(out.finish_reason.as_openai(), "stop");
        assert_eq!(out.text.len(), 6, "{}", out.text);
        assert!(out.text.ends_with("-xy"), "{}", out.text);
        assert!(out.text[..3].bytes().all(|c| c.is_ascii_digit()));
    }
}

fn stubborn() -> Stubborn {
    Stubborn {
        info: ModelInfo {
            architecture: "stubborn".into(),
            vocab_size: 260,
            n_layers: 0,
            hidden_size: 1,
            n_kv_heads: 1,
            head_dim: 1,
            context_length: 64,
        },
        passes: Default::default(),
    }
}

/// Forced tokens (`abc` at the start, `fghij` after the choice) are appended without sampling
/// and fed in one forward pass: the same greedy output, fewer passes; `max_tokens` and the
/// stats stay right.
#[test]
fn forced_tokens_are_fast_forwarded_in_one_pass() {
    let tok = bytes_tokenizer();
    let run = |fast_forward: bool, max_tokens: usize, temperature: f32| {
        let model = stubborn();
        let mut cache = model.new_cache();
        let params = GenerateParams {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                seed: Some(3),
                ..Default::default()
            },
            constraint: Some(Constraint::Regex("abc(d|e)fghij[0-9]".into())),
            fast_forward,
            ..Default::default()
        };
        let out = generate(&model, &tok, &mut cache, &[b'q' as u32], params)
            .unwrap()
            .collect_output()
            .unwrap();
        let passes = model.passes.lock().unwrap().clone();
        (out, passes, cache.offset())
    };
    let (slow, slow_passes, slow_offset) = run(false, 20, 0.0);
    assert_eq!(slow.text, "abcdfghij0");
    assert_eq!(slow.finish_reason, FinishReason::Eos);
    // The prompt, then one pass per drawn token but the first (EOS included).
    assert_eq!(slow_passes, [vec![1], vec![1; 10]].concat());
    assert_eq!(slow.stats.decode_passes, 10);
    let (fast, fast_passes, fast_offset) = run(true, 20, 0.0);
    assert_eq!(fast.text, slow.text);
    assert_eq!(fast.token_ids, slow.token_ids);
    assert_eq!(fast.finish_reason, FinishReason::Eos);
    // `abc` is prefilled with the prompt; `d` and the forced `fghij` are one pass; then the
    // digit (whose pass draws EOS).
    assert_eq!(fast_passes, vec![4, 6, 1]);
    assert_eq!(fast.stats.decode_passes, 2);
    assert_eq!(fast.stats.prompt_tokens, 1);
    assert_eq!(fast.stats.generated_tokens, 10);
    assert_eq!(
        fast_offset, slow_offset,
        "the cache holds the same positions"
    );
    // max_tokens inside the forced run: the same cut, nothing fed past it.
    for n in [1, 2, 5, 7] {
        let (a, _, a_offset) = run(false, n, 0.0);
        let (b, _, b_offset) = run(true, n, 0.0);
        assert_eq!(
            (a.text.as_str(), &a.finish_reason),
            (b.text.as_str(), &b.finish_reason)
        );
        assert_eq!(b.finish_reason, FinishReason::MaxTokens);
        assert!(
            b_offset <= a_offset,
            "max_tokens {n}: {b_offset} > {a_offset}"
        );
    }
    // Sampled: still valid.
    let (hot, _, _) = run(true, 20, 1.0);
    assert!(hot.text.starts_with("abc") && hot.text[4..].starts_with("fghij"));
    // Log-probabilities turn fast-forward off (a forced token's needs the pass after it).
    let model = stubborn();
    let mut cache = model.new_cache();
    let params = GenerateParams {
        max_tokens: 20,
        logprobs: Some(1),
        constraint: Some(Constraint::Regex("abc(d|e)fghij[0-9]".into())),
        ..Default::default()
    };
    let out = generate(&model, &tok, &mut cache, &[b'q' as u32], params)
        .unwrap()
        .collect_output()
        .unwrap();
    assert_eq!(out.text, slow.text);
    assert_eq!(out.stats.decode_passes, 10);
}
