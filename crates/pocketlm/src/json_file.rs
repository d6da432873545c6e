//! Optional JSON files of a model folder (`config.json`, `generation_config.json`,
//! `preprocessor_config.json`, ...), read with errors that name the file.

use std::path::Path;

use crate::{Error, Result};

/// Reads a JSON file; `Ok(None)` when it does not exist.
///
/// Errors: [`Error::Io`] when it cannot be read, [`Error::Model`] naming the file when it is not
/// valid JSON.
pub fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Model(format!("{}: not valid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}
