//! Fine-tuning data in the formats mlx-lm reads (`mlx_lm/tuner/datasets.py`): a folder with
//! `train.jsonl`, `valid.jsonl` and `test.jsonl`, one JSON object per line, each one of
//! - `{"text": ...}`: tokenized as plain text (with BOS if the tokenizer adds one), EOS appended
//!   when missing (`TextDataset`);
//! - `{"prompt": ..., "completion": ...}`: rendered with the chat template as a user turn and
//!   an assistant turn (`CompletionsDataset`);
//! - `{"messages": [{"role", "content"}, ...]}`: rendered with the chat template
//!   (`ChatDataset`).
//!
//! With `mask_prompt`, the loss skips the prompt tokens: the offset is the length of the
//! rendering of all messages but the last, with the generation prompt (mlx-lm's rule).

use std::path::{Path, PathBuf};

use crate::chat_template::Message;
use crate::loader::LoadedModel;
use crate::{Error, Result};

/// One training record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// `{"text"}`.
    Text(String),
    /// `{"prompt", "completion"}`.
    Completion {
        /// The user turn.
        prompt: String,
        /// The assistant turn.
        completion: String,
    },
    /// `{"messages"}`.
    Chat(Vec<Message>),
}

/// A tokenized example: the token ids and the index of the first target token that counts in
/// the loss (0 unless the prompt is masked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Tokens before this position are not scored.
    pub offset: usize,
}

/// Errors reading a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A line is not a record of a known format.
    #[error("{}:{line}: {msg}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
}

impl From<DataError> for Error {
    fn from(e: DataError) -> Self {
        Error::Model(e.to_string())
    }
}

/// Reads a `.jsonl` file of records (blank lines skipped).
///
/// Errors: [`Error::Io`]; [`DataError::Record`] naming the line of a malformed record.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| DataError::Record {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let rec = if let Some(m) = v.get("messages") {
            let msgs: Vec<Message> = serde_json::from_value(m.clone())
                .map_err(|e| bad(format!("field `messages`: {e}")))?;
            Record::Chat(msgs)
        } else if let (Some(p), Some(c)) = (s("prompt"), s("completion")) {
            Record::Completion {
                prompt: p,
                completion: c,
            }
        } else if let Some(t) = s("text") {
            Record::Text(t)
        } else {
            return Err(bad(
                "expected a `text`, `prompt`+`completion` or `messages` record".into(),
            )
            .into());
        };
        out.push(rec);
    }
    Ok(out)
}

/// Tokenizes one record for `model` as mlx-lm does.
///
/// Errors: a chat record for a model without a chat template; tokenizer errors.
pub fn tokenize(model: &LoadedModel, rec: &Record, mask_prompt: bool) -> Result<Example> {
    let tok = &model.tokenizer;
    let chat = |msgs: &[Message]| -> Result<Example> {
        let tpl = model.chat_template.as_ref().ok_or_else(|| {
            Error::Model(format!(
                "{}: chat records need a chat template",
                model.path.display()
            ))
        })?;
        let tokens = tok.encode(&tpl.render(msgs, false)?, false)?;
        let offset = if mask_prompt && !msgs.is_empty() {
            let gen = msgs.last().is_some_and(|m| m.role == "assistant");
            tok.encode(&tpl.render(&msgs[..msgs.len() - 1], gen)?, false)?
                .len()
        } else {
            0
        };
        Ok(Example { tokens, offset })
    };
    match rec {
        Record::Text(t) => {
            let mut tokens = tok.encode(t, true)?;
            if let Some(eos) = tok.eos_token_id() {
                if tokens.last() != Some(&eos) {
                    tokens.push(eos);
                }
            }
            Ok(Example { tokens, offset: 0 })
        }
        Record::Completion { prompt, completion } => chat(&[
            Message::user(prompt.clone()),
            Message::assistant(completion.clone()),
        ]),
        Record::Chat(m) => chat(m),
    }
}

/// Reads and tokenizes `dir/{split}.jsonl` (`split`: `train`, `valid` or `test`). Returns
/// `None` when the file does not exist.
pub fn load_split(
    model: &LoadedModel,
    dir: &Path,
    split: &str,
    mask_prompt: bool,
) -> Result<Option<Vec<Example>>> {
    let path = dir.join(format!("{split}.jsonl"));
    if !path.is_file() {
        return Ok(None);
    }
    let recs = read_jsonl(&path)?;
    let mut out = Vec::with_capacity(recs.len());
    for (i, r) in recs.iter().enumerate() {
        let ex = tokenize(model, r, mask_prompt).map_err(|e| DataError::Record {
            path: path.clone(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        out.push(ex);
    }
    Ok(Some(out))
}
