//! Tensor-library (candle) errors as one line of text. A leaf module (it imports nothing from
//! the crate), so that every layer, [`crate::quant`] included, can format candle errors without
//! depending on [`crate::error`], which gathers their error types.

/// A tensor-library (candle) error as one line of text: without the backtrace that candle
/// attaches when `RUST_BACKTRACE` is set (its `Error::WithBacktrace` prints it after the
/// message, over many lines), and with context and path parts joined by `: ` instead of
/// newlines. Use it wherever a candle error becomes part of a message.
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        E::WrappedContext { wrapped, context } => one_line(&format!("{context}: {wrapped}")),
        other => one_line(&other.to_string()),
    }
}

/// `text` with its lines trimmed and joined by `; ` (empty lines dropped).
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
