//! Synthetic GGUF tokenizer metadata for unit tests.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

/// GPT-2's byte -> printable char table (`bytes_to_unicode` in openai/gpt-2 `encoder.py`).
pub(crate) fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut table = vec!['\0'; 256];
    for &b in &printable {
        table[b as usize] = char::from_u32(b).expect("latin-1");
    }
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            table[b as usize] = char::from_u32(256 + extra).expect("extended");
            extra += 1;
            printable.push(b);
        }
    }
    table
}

fn strings(xs: &[String]) -> Value {
    Value::Array(xs.iter().map(|x| Value::String(x.clone())).collect())
}

/// Byte-level BPE whose tokens are the 256 single bytes (no merges), then `<|endoftext|>`
/// (control, id 256, EOS): every character of the text is split into its UTF-8 bytes.
pub(crate) fn single_byte_gpt2() -> HashMap<String, Value> {
    let mut tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
    tokens.push("<|endoftext|>".into());
    let mut types = vec![Value::I32(1); 256];
    types.push(Value::I32(3));
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.pre".into(), Value::String("gpt-2".into()));
    md.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    md.insert("tokenizer.ggml.merges".into(), Value::Array(vec![]));
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(256));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(256));
    md
}

/// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 `<0xNN>` byte tokens, then a
/// few pieces (`▁`, `a`, `b`, `▁a`, `▁b`, `ab`, `▁ab`) with scores favouring longer pieces.
/// Anything else (CJK, emoji) falls back to bytes.
pub(crate) fn tiny_spm() -> HashMap<String, Value> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
    let mut scores = vec![Value::F32(0.0); 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(Value::I32(6));
        scores.push(Value::F32(0.0));
    }
    for (piece, score) in [
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("▁a", -4.0),
        ("▁b", -5.0),
        ("ab", -6.0),
        ("▁ab", -7.0),
    ] {
        tokens.push(piece.into());
        types.push(Value::I32(1));
        scores.push(Value::F32(score));
    }
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    md.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    md.insert("tokenizer.ggml.scores".into(), Value::Array(scores));
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
    md.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
    md
}
