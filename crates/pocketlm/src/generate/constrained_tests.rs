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

/// A model that always prefers `x` (then `y`): the grammar must override it.
struct Stubborn {
    info: ModelInfo,
}

impl CausalLM for Stubborn {
    fn forward(&self, _: &Tensor, _: &mut KvCache, _: Logits) -> crate::Result<Tensor> {
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
