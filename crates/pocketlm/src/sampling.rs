//! Sampling: a chain of logit processors, then a draw.
