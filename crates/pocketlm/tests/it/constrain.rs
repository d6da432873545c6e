//! Constrained decoding (`pocketlm::constrain`, llguidance):
//! - the token-bytes table of the default model's GGUF tokenizer and of Hugging Face
//!   `tokenizer.json` files round-trips through our decoder;
//! - on the real default model (SmolLM2-135M-Instruct Q4_1), sampling at temperature 1.0 with
//!   no other filter, 100 varied prompts under a nested JSON Schema all give JSON that parses
//!   and that the `jsonschema` crate (an independent validator) accepts; likewise any JSON
//!   object, a date regex and a Lark grammar with `%json` inside;
//! - on random weights (the tiny Qwen2 and Mistral GGUF files of `tests/golden/archs`) the
//!   same holds: the grammar, not the model, guarantees it;
//! - errors: a schema or regex that does not compile; the typed [`generate_json`] call.

use std::path::PathBuf;
use std::sync::Arc;

use pocketlm::chat_template::Message;
use pocketlm::constrain::{Constraint, ConstraintError, GrammarEnv, TokenBytes};
use pocketlm::generate::{generate, FinishReason, GenerateParams, GenerationOutput};
use pocketlm::loader::{load, LoadOptions, LoadedModel, Prompt};
use pocketlm::sampling::SamplingParams;
use pocketlm::structured::generate_json;
use pocketlm::tokenizer::Tokenizer;
use pocketlm::Error;
use serde_json::{json, Value};

fn golden(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(path)
}

/// Checks that every token's bytes are what our tokenizer decodes it to. Returns
/// `(checked as text, checked as lossy text, special)` counts.
///
/// A token is decoded after an anchor token (`a`), so that SentencePiece's decoder does not
/// strip the token's own leading space; the anchor's text is then cut off. Tokens whose bytes
/// are not UTF-8 on their own (byte-fallback `<0x80>`..`<0xFF>`, byte-level pieces of a
/// multi-byte character) decode to U+FFFD, so for them the decoded text is compared with the
/// lossy UTF-8 of the bytes. Special tokens are `0xFF` then their text, and decode to that text.
fn check_round_trip(tok: &Tokenizer) -> (usize, usize, usize) {
    let table = TokenBytes::from_tokenizer(tok).expect("token bytes");
    assert!(table.bytes.len() >= tok.vocab_size());
    let anchor = tok.encode("a", false).expect("encode")[0];
    let base = tok.decode(&[anchor], false).expect("decode");
    let (mut text, mut lossy, mut special) = (0, 0, 0);
    for (id, bytes) in table.bytes.iter().enumerate() {
        let id = id as u32;
        if tok.id_to_token(id).is_none() {
            assert!(bytes.is_empty(), "id {id} has no entry but bytes {bytes:?}");
            continue;
        }
        if table.special[id as usize] {
            assert_eq!(bytes[0], 0xFF, "special id {id}");
            let name = tok.id_to_token(id).unwrap();
            assert_eq!(&bytes[1..], name.as_bytes(), "special id {id}");
            assert_eq!(tok.decode(&[id], false).unwrap(), name, "special id {id}");
            special += 1;
            continue;
        }
        let decoded = tok.decode(&[anchor, id], false).expect("decode");
        let decoded = decoded
            .strip_prefix(base.as_str())
            .unwrap_or_else(|| panic!("id {id}: {decoded:?} does not start with {base:?}"));
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                assert_eq!(decoded, s, "id {id} ({:?})", tok.id_to_token(id));
                text += 1;
            }
            Err(_) => {
                assert_eq!(
                    decoded,
                    String::from_utf8_lossy(bytes),
                    "id {id} ({:?})",
                    tok.id_to_token(id)
                );
                lossy += 1;
            }
        }
    }
    (text, lossy, special)
}

#[test]
fn token_bytes_round_trip_gguf_and_tokenizer_json() {
    // The default model's GGUF tokenizer (byte-level BPE, 49152 tokens).
    let m = pocketlm_testutil::default_model(false);
    let (text, lossy, special) = check_round_trip(&m.tokenizer);
    assert_eq!(text + lossy + special, 49152);
    assert!(special >= 2 && lossy > 0, "{text} {lossy} {special}");
    // Hugging Face tokenizer.json files of the tiny models: byte-level BPE (Qwen2, Qwen3) and
    // SentencePiece with byte fallback (Mistral, Gemma 2, Phi-3).
    for arch in ["qwen2", "qwen3", "mistral", "gemma2", "phi3"] {
        let dir = golden(&format!("archs/{arch}"));
        let tok = Tokenizer::from_files(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
        )
        .expect(arch);
        let (text, _, _) = check_round_trip(&tok);
        assert!(text > 100, "{arch}: {text}");
    }
    // A SentencePiece GGUF vocabulary (byte fallback, `▁` for a space).
    let path = golden("tokenizer/tiny_spm.gguf");
    let mut f = std::fs::File::open(&path).expect("tiny_spm.gguf");
    let md = candle_core::quantized::gguf_file::Content::read(&mut f)
        .expect("tiny_spm.gguf")
        .metadata;
    let spm = Tokenizer::from_gguf_metadata(&md).expect("tiny_spm.gguf");
    let table = TokenBytes::from_tokenizer(&spm).unwrap();
    assert_eq!(
        table.spelling,
        pocketlm::constrain::TokenSpelling::ByteFallback { space: '\u{2581}' }
    );
    let (_, lossy, _) = check_round_trip(&spm);
    assert!(lossy >= 128, "<0x80>..<0xFF> are not UTF-8 alone: {lossy}");
}

#[test]
fn the_grammar_environment_is_built_once_per_tokenizer() {
    let m = pocketlm_testutil::default_model(false);
    let a = GrammarEnv::for_tokenizer(&m.tokenizer).unwrap();
    let b = GrammarEnv::for_tokenizer(&m.tokenizer.clone()).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "clones share the cache");
    assert_eq!(a.vocab_size(), 49152);
    assert_eq!(a.eos_tokens()[0], m.tokenizer.eos_token_id().unwrap());
    eprintln!("grammar environment, 49152 tokens: {:?}", a.build_time());
}

fn cpu() -> LoadOptions {
    LoadOptions {
        device: pocketlm::device::DeviceSpec::Cpu,
        ..Default::default()
    }
}

/// Temperature 1.0 and nothing else: the model's own distribution, seeded.
fn hot(seed: u64, max_tokens: usize, c: Constraint) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        },
        constraint: Some(c),
        ..Default::default()
    }
}

fn run(m: &LoadedModel, prompt: &Prompt, params: GenerateParams) -> GenerationOutput {
    let ids = m.encode(prompt).expect("encode");
    let mut cache = m.model.new_cache();
    generate(m.model.as_ref(), &m.tokenizer, &mut cache, &ids, params)
        .expect("starts")
        .collect_output()
        .expect("generates")
}

/// Nested object, enum, array, integer bounds, required fields; strings bounded and no
/// whitespace between JSON tokens (the schema's own `x-guidance` options), so that every output
/// is short (about 25 tokens).
fn pet_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 5},
            "kind": {"enum": ["cat", "dog", "bird", "fish"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "tags": {"type": "array", "items": {"enum": ["old", "shy"]}, "maxItems": 2},
            "owner": {
                "type": "object",
                "properties": {"adult": {"type": "boolean"}},
                "required": ["adult"],
                "additionalProperties": false
            }
        },
        "required": ["name", "kind", "age", "tags", "owner"],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false}
    })
}

fn prompts(n: usize) -> Vec<Prompt> {
    const WHO: [&str; 10] = [
        "a cat",
        "an old dog",
        "a parrot",
        "a goldfish",
        "my neighbour's pet",
        "a lazy kitten",
        "a guide dog",
        "a singing bird",
        "a tiny fish",
        "the family pet",
    ];
    const HOW: [&str; 10] = [
        "Describe {} as JSON.",
        "Give me a JSON record for {}.",
        "Invent {}.",
        "Tell me about {}.",
        "Write data about {}, please.",
        "What is {} like?",
        "Fill in a profile of {}.",
        "Make up {} living in Paris.",
        "{}: name, kind, age, tags, owner.",
        "Create an entry for {} in our database.",
    ];
    (0..n)
        .map(|i| {
            let text = HOW[i % 10].replace("{}", WHO[(i / 10 + i) % 10]);
            Prompt::Chat(vec![Message::user(text)])
        })
        .collect()
}

/// Parses `out.text` as JSON, checks the finish reason, validates it against `schema`.
fn check_json(out: &GenerationOutput, validator: &jsonschema::Validator, what: &str) -> Value {
    assert_eq!(
        out.finish_reason,
        FinishReason::Eos,
        "{what}: ended by {:?}: {}",
        out.finish_reason,
        out.text
    );
    let v: Value = serde_json::from_str(&out.text)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", out.text));
    if let Err(e) = validator.validate(&v) {
        panic!("{what}: does not validate ({e}): {}", out.text);
    }
    v
}

#[test]
fn json_schema_holds_on_100_hot_prompts_of_the_default_model() {
    let m = pocketlm_testutil::default_model(false);
    let schema = pet_schema();
    let validator = jsonschema::validator_for(&schema).expect("valid schema");
    let mut kinds = std::collections::BTreeSet::new();
    let t0 = std::time::Instant::now();
    let (mut tokens, mut passes) = (0, 0);
    // The prompts share the chat template's system turn: it is prefilled once, and each
    // prompt's own tokens are prefilled after it (the cache cut back to it each time).
    let encoded: Vec<Vec<u32>> = prompts(100)
        .iter()
        .map(|p| m.encode(p).expect("encode"))
        .collect();
    let shared = encoded.iter().fold(encoded[0].len(), |n, ids| {
        n.min(
            ids.iter()
                .zip(&encoded[0])
                .take_while(|(a, b)| a == b)
                .count(),
        )
    });
    let mut cache = m.model.new_cache();
    let prefix = GenerateParams {
        max_tokens: 1,
        ..Default::default()
    };
    generate(
        m.model.as_ref(),
        &m.tokenizer,
        &mut cache,
        &encoded[0][..shared],
        prefix,
    )
    .expect("starts")
    .collect_output()
    .expect("prefills");
    assert_eq!(cache.offset(), shared);
    for (i, ids) in encoded.iter().enumerate() {
        cache.truncate(shared).expect("truncate");
        let params = hot(i as u64, 80, Constraint::JsonSchema(schema.clone()));
        let out = generate(
            m.model.as_ref(),
            &m.tokenizer,
            &mut cache,
            &ids[shared..],
            params,
        )
        .expect("starts")
        .collect_output()
        .expect("generates");
        let v = check_json(&out, &validator, &format!("prompt {i}"));
        kinds.insert(v["kind"].as_str().unwrap().to_string());
        tokens += out.stats.generated_tokens;
        passes += out.stats.decode_passes;
        if i < 3 {
            eprintln!("{}", out.text);
        }
    }
    eprintln!(
        "100 prompts ({shared} shared prompt tokens prefilled once): {tokens} tokens, \
         {passes} decode passes (forced tokens fast-forwarded) in {:?}",
        t0.elapsed()
    );
    // Fast-forward feeds the schema's forced keys and punctuation together.
    assert!(
        passes < tokens * 3 / 4,
        "{passes} passes for {tokens} tokens"
    );
    assert!(kinds.len() >= 2, "sampling varies: {kinds:?}");
}

#[test]
fn json_object_regex_and_lark_hold_on_the_default_model() {
    let m = pocketlm_testutil::default_model(false);
    // Any JSON object, with the default whitespace: a hot small model may write on past the
    // token limit, so an output cut by `max_tokens` is allowed, but some must end by
    // themselves and every one that ends must parse.
    let object = jsonschema::validator_for(&json!({"type": "object"})).unwrap();
    let mut ended = 0;
    for i in 0..5u64 {
        let prompt = Prompt::Chat(vec![Message::user("Reply with a tiny JSON object.")]);
        let out = run(&m, &prompt, hot(100 + i, 100, Constraint::JsonObject));
        if out.finish_reason == FinishReason::MaxTokens {
            assert!(out.text.starts_with('{'), "{}", out.text);
            continue;
        }
        check_json(&out, &object, &format!("json_object {i}"));
        ended += 1;
    }
    assert!(ended >= 2, "{ended} of 5 JSON objects ended");
    let date = Constraint::Regex(r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])".into());
    for (i, p) in [
        "When was the Eiffel tower built?",
        "Today's date?",
        "A date in May.",
    ]
    .iter()
    .enumerate()
    {
        let prompt = Prompt::Chat(vec![Message::user(*p)]);
        let out = run(&m, &prompt, hot(i as u64, 20, date.clone()));
        assert_eq!(out.finish_reason, FinishReason::Eos, "{}", out.text);
        let b = out.text.as_bytes();
        assert!(
            b.len() == 10
                && b[4] == b'-'
                && b[7] == b'-'
                && b.iter()
                    .enumerate()
                    .all(|(k, c)| k == 4 || k == 7 || c.is_ascii_digit())
                && matches!(
                    &out.text[5..7],
                    "01" | "02"
                        | "03"
                        | "04"
                        | "05"
                        | "06"
                        | "07"
                        | "08"
                        | "09"
                        | "10"
                        | "11"
                        | "12"
                ),
            "not a date: {:?}",
            out.text
        );
    }
    for (i, p) in prompts(4).iter().enumerate() {
        let out = run(&m, p, hot(200 + i as u64, 60, tool_call_lark()));
        check_tool_call(&out);
    }
}

/// A tool call as the server's grammars will shape it: a fixed tag, then JSON under a schema
/// embedded with llguidance's `%json`.
fn tool_call_lark() -> Constraint {
    Constraint::Lark(
        r#"
start: "<tool_call>" call "</tool_call>"
call: %json {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": false
        }
    },
    "required": ["name", "arguments"],
    "additionalProperties": false
}
"#
        .into(),
    )
}

fn check_tool_call(out: &GenerationOutput) {
    assert_eq!(out.finish_reason, FinishReason::Eos, "{}", out.text);
    let inner = out
        .text
        .strip_prefix("<tool_call>")
        .and_then(|t| t.strip_suffix("</tool_call>"))
        .unwrap_or_else(|| panic!("not a tool call: {}", out.text));
    let v: Value = serde_json::from_str(inner).unwrap_or_else(|e| panic!("{e}: {inner}"));
    assert_eq!(v["name"], "get_weather", "{inner}");
    assert!(v["arguments"]["city"].is_string(), "{inner}");
    assert!(
        ["celsius", "fahrenheit"].contains(&v["arguments"]["unit"].as_str().unwrap()),
        "{inner}"
    );
}

#[test]
fn grammars_hold_on_random_weights() {
    // Compact JSON (the schema's own x-guidance options replace the default whitespace): the
    // tiny models hold 256 positions.
    let schema = json!({
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog"]},
            "n": {"type": "integer", "minimum": -5, "maximum": 99},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}
        },
        "required": ["kind", "n", "ok", "tags"],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false}
    });
    let validator = jsonschema::validator_for(&schema).unwrap();
    let list =
        Constraint::Lark("start: \"(\" NUM (\",\" NUM){0,3} \")\"\nNUM: /[0-9]{1,3}/".into());
    let date = Constraint::Regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}".into());
    for name in ["qwen2.gguf", "mistral.gguf"] {
        let m = load(golden(&format!("archs/{name}")), &cpu()).expect(name);
        let prompt = Prompt::Text("Hello".into());
        for seed in 0..5 {
            let out = run(
                &m,
                &prompt,
                hot(seed, 200, Constraint::JsonSchema(schema.clone())),
            );
            check_json(&out, &validator, &format!("{name} seed {seed}"));
            let out = run(&m, &prompt, hot(seed, 30, date.clone()));
            assert_eq!(out.finish_reason, FinishReason::Eos, "{name}: {}", out.text);
            assert!(
                out.text.len() == 10
                    && out
                        .text
                        .bytes()
                        .enumerate()
                        .all(|(k, c)| if k == 4 || k == 7 {
                            c == b'-'
                        } else {
                            c.is_ascii_digit()
                        }),
                "{name}: {:?}",
                out.text
            );
            let out = run(&m, &prompt, hot(seed, 40, list.clone()));
            assert_eq!(out.finish_reason, FinishReason::Eos, "{name}: {}", out.text);
            let inner = out.text.strip_prefix('(').and_then(|t| t.strip_suffix(')'));
            let nums: Vec<&str> = inner.expect(&out.text).split(',').collect();
            assert!(
                (1..=4).contains(&nums.len())
                    && nums.iter().all(
                        |n| (1..=3).contains(&n.len()) && n.bytes().all(|c| c.is_ascii_digit())
                    ),
                "{name}: {:?}",
                out.text
            );
        }
    }
}

#[test]
fn bad_grammars_are_typed_errors_naming_the_problem() {
    let m = pocketlm_testutil::default_model(false);
    let ids = m.encode(&Prompt::Text("Hi".into())).unwrap();
    for (c, needle) in [
        (
            Constraint::Regex("(unclosed".into()),
            "grammar does not compile",
        ),
        (
            Constraint::JsonSchema(
                json!({"type": "object", "properties": {"a": {"type": "nonsense"}}}),
            ),
            "nonsense",
        ),
        (
            Constraint::Lark("start: undefined_rule".into()),
            "undefined_rule",
        ),
    ] {
        let mut cache = m.model.new_cache();
        let params = GenerateParams {
            constraint: Some(c.clone()),
            ..Default::default()
        };
        let e = match generate(m.model.as_ref(), &m.tokenizer, &mut cache, &ids, params) {
            Ok(_) => panic!("{c:?} compiled"),
            Err(e) => e,
        };
        assert!(
            matches!(e, Error::Constraint(ConstraintError::Grammar(_))),
            "{c:?}: {e:?}"
        );
        assert!(e.to_string().contains(needle), "{c:?}: {e}");
    }
}

#[test]
fn generate_json_returns_a_typed_value() {
    #[derive(Debug, serde::Deserialize)]
    struct Owner {
        adult: bool,
    }
    #[derive(Debug, serde::Deserialize)]
    struct Pet {
        name: String,
        kind: String,
        age: u8,
        tags: Vec<String>,
        owner: Owner,
    }
    let m = pocketlm_testutil::default_model(false);
    let prompt = Prompt::Chat(vec![Message::user("Describe a dog called Rex.")]);
    let params = GenerateParams {
        max_tokens: 80,
        sampling: SamplingParams {
            temperature: 0.7,
            seed: Some(3),
            ..Default::default()
        },
        ..Default::default()
    };
    let pet: Pet = generate_json(&m, &prompt, &pet_schema(), &params).expect("a pet");
    eprintln!("{pet:?}, owner adult: {}", pet.owner.adult);
    assert!(["cat", "dog", "bird", "fish"].contains(&pet.kind.as_str()));
    assert!(pet.age <= 30 && pet.tags.len() <= 2 && pet.name.chars().count() <= 5);
    // A schema that does not describe the type: a typed error with the text.
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Other {
        missing: u32,
    }
    let e = generate_json::<Other>(&m, &prompt, &pet_schema(), &params).unwrap_err();
    assert!(
        matches!(e, Error::Constraint(ConstraintError::Deserialize { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("missing"), "{e}");
    // Too few tokens for the JSON: incomplete, not a parse error.
    let short = GenerateParams {
        max_tokens: 3,
        ..params
    };
    let e = generate_json::<Pet>(&m, &prompt, &pet_schema(), &short).unwrap_err();
    assert!(
        matches!(e, Error::Constraint(ConstraintError::Incomplete { .. })),
        "{e:?}"
    );
}
