//! Pooling: how the token states of one input become one vector, as sentence-transformers'
//! `Pooling` module computes it (<https://sbert.net>, `sentence_transformers/models/Pooling.py`).

use std::path::Path;

use crate::{Error, Result};

/// How the token states of one input become one vector (sentence-transformers'
/// `Pooling` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The first token's state (`[CLS]`; `pooling_mode_cls_token`).
    Cls,
    /// The mean over the input's tokens (`pooling_mode_mean_tokens`).
    Mean,
    /// The element-wise maximum over the input's tokens (`pooling_mode_max_tokens`).
    Max,
    /// The sum over the tokens divided by the square root of their number
    /// (`pooling_mode_mean_sqrt_len_tokens`).
    MeanSqrtLen,
    /// The last token's state (`pooling_mode_lasttoken`; decoders such as Qwen3-Embedding).
    LastToken,
}

impl Pooling {
    /// All modes with their names in `1_Pooling/config.json` (`pooling_mode_<name>`) and on
    /// the command line.
    pub const NAMES: [(&'static str, &'static str, Pooling); 5] = [
        ("cls", "pooling_mode_cls_token", Pooling::Cls),
        ("mean", "pooling_mode_mean_tokens", Pooling::Mean),
        ("max", "pooling_mode_max_tokens", Pooling::Max),
        (
            "mean_sqrt_len",
            "pooling_mode_mean_sqrt_len_tokens",
            Pooling::MeanSqrtLen,
        ),
        ("lasttoken", "pooling_mode_lasttoken", Pooling::LastToken),
    ];

    /// The mode named `cls`, `mean`, `max`, `mean_sqrt_len` or `lasttoken`.
    ///
    /// Errors: [`Error::InvalidArgument`] for another name.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, p)| *p)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "pooling `{name}`: expected one of cls, mean, max, mean_sqrt_len, lasttoken"
                ))
            })
    }

    /// The short name ([`Self::from_name`]'s).
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, _, p)| *p == self)
            .map(|(n, _, _)| *n)
            .unwrap_or("?")
    }

    /// Pools `states`, the `len` real token states (row-major `[len, hidden]`, `len >= 1`) of
    /// one input, into `[hidden]`.
    pub fn pool(self, states: &[f32], hidden: usize) -> Vec<f32> {
        let len = states.len() / hidden;
        let rows = states.chunks_exact(hidden);
        match self {
            Pooling::Cls => states[..hidden].to_vec(),
            Pooling::LastToken => states[(len - 1) * hidden..len * hidden].to_vec(),
            Pooling::Max => rows.fold(vec![f32::NEG_INFINITY; hidden], |mut acc, r| {
                acc.iter_mut().zip(r).for_each(|(a, &v)| *a = a.max(v));
                acc
            }),
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let mut sum = vec![0f32; hidden];
                for r in rows {
                    sum.iter_mut().zip(r).for_each(|(a, &v)| *a += v);
                }
                let d = if self == Pooling::Mean {
                    len as f32
                } else {
                    (len as f32).sqrt()
                };
                sum.iter_mut().for_each(|a| *a /= d);
                sum
            }
        }
    }

    /// The mode `1_Pooling/config.json` (`path`, for messages) turns on.
    ///
    /// Errors: [`Error::Model`] naming the file when no mode or several are on (sentence-
    /// transformers would concatenate them), or for `pooling_mode_weightedmean_tokens`.
    pub fn from_sentence_transformers(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let on = |key: &str| config.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
        if on("pooling_mode_weightedmean_tokens") {
            return Err(Error::Model(format!(
                "{}: `pooling_mode_weightedmean_tokens` is not supported",
                path.display()
            )));
        }
        let modes: Vec<Pooling> = Self::NAMES
            .iter()
            .filter(|(_, key, _)| on(key))
            .map(|(_, _, p)| *p)
            .collect();
        match modes.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::Model(format!(
                "{}: no pooling mode is on (pooling_mode_cls_token, pooling_mode_mean_tokens, \
                 pooling_mode_max_tokens, pooling_mode_mean_sqrt_len_tokens, \
                 pooling_mode_lasttoken)",
                path.display()
            ))),
            _ => Err(Error::Model(format!(
                "{}: several pooling modes are on ({}); their concatenation is not supported",
                path.display(),
                modes
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes_follow_their_formulas() {
        // Three tokens of width 2.
        let s = [1.0f32, -2.0, 3.0, 4.0, -5.0, 6.0];
        assert_eq!(Pooling::Cls.pool(&s, 2), vec![1.0, -2.0]);
        assert_eq!(Pooling::LastToken.pool(&s, 2), vec![-5.0, 6.0]);
        assert_eq!(Pooling::Max.pool(&s, 2), vec![3.0, 6.0]);
        assert_eq!(Pooling::Mean.pool(&s, 2), vec![-1.0 / 3.0, 8.0 / 3.0]);
        let r = Pooling::MeanSqrtLen.pool(&s, 2);
        assert!((r[0] + 1.0 / 3f32.sqrt()).abs() < 1e-6 && (r[1] - 8.0 / 3f32.sqrt()).abs() < 1e-6);
        for (name, _, p) in Pooling::NAMES {
            assert_eq!(Pooling::from_name(name).unwrap(), p);
        }
        assert!(Pooling::from_name("avg").is_err());
    }

    #[test]
    fn pooling_config_needs_exactly_one_mode() {
        let p = Path::new("1_Pooling/config.json");
        let one =
            serde_json::json!({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false});
        assert_eq!(
            Pooling::from_sentence_transformers(&one, p).unwrap(),
            Pooling::Cls
        );
        let two =
            serde_json::json!({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true});
        let e = Pooling::from_sentence_transformers(&two, p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1_Pooling/config.json") && e.contains("cls, mean"),
            "{e}"
        );
        let none = serde_json::json!({});
        assert!(Pooling::from_sentence_transformers(&none, p).is_err());
        let w = serde_json::json!({"pooling_mode_weightedmean_tokens": true});
        let e = Pooling::from_sentence_transformers(&w, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("weightedmean"), "{e}");
    }
}
