//! Structured output: a typed reply from a JSON Schema (`pocketlm::structured::generate_json`).
//! The grammar engine (llguidance) masks every token that would leave the schema, so the reply
//! always parses; serde then turns it into a Rust value.
//!
//! Run: `cargo run --release -p pocketlm --example structured -- "a dog called Rex"`
//! (the default model is downloaded into $POCKETLM_HOME on first use).

use pocketlm::chat_template::Message;
use pocketlm::generate::GenerateParams;
use pocketlm::loader::{load, LoadOptions, Prompt};
use pocketlm::structured::generate_json;
use serde::Deserialize;
use serde_json::json;

/// The reply's shape; the schema below describes it.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // the fields are shown through Debug
struct Pet {
    name: String,
    kind: String,
    age: u8,
    tags: Vec<String>,
}

fn main() -> pocketlm::Result<()> {
    let about = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "a dog called Rex".into());
    let path = pocketlm::fetch::ensure_default_model(&mut |_| {})?;
    let m = load(&path, &LoadOptions::default())?;
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "kind": {"enum": ["cat", "dog", "bird", "fish"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4}
        },
        "required": ["name", "kind", "age", "tags"],
        "additionalProperties": false
    });
    let prompt = Prompt::Chat(vec![Message::user(format!("Describe {about} as JSON."))]);
    let params = GenerateParams {
        max_tokens: 200,
        sampling: m.default_sampling(),
        ..Default::default()
    };
    let pet: Pet = generate_json(&m, &prompt, &schema, &params)?;
    println!("{pet:#?}");
    Ok(())
}
