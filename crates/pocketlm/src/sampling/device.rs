//! Sampling where the logits are (a GPU), with only the token id copied back: the host-side
//! pieces of the GPU sampler (`src/cuda/sample.cu`) and its CPU mirror.
//!
//! The filters of the chain (top-k, min-p, top-p) each keep a prefix of one ranking (value
//! descending, lower id first on ties; see the [`super`] docs), so the kept set is the first
//! `min(k, n_min_p, n_top_p)` tokens of that ranking, and only the tokens near the top need to
//! be ranked: the kernel finds a threshold from a histogram of the distance to the top value,
//! sorts the tokens above it in shared memory, takes the kept prefix and draws from it in id
//! order with the caller's uniform draw. [`prefix_sample`] is that algorithm on the CPU (ranking
//! every token), tested against [`Sampler::sample`]; the GPU selftest compares the kernel with
//! [`Sampler::sample_with_uniform`] for the same draw.

use super::{apply_repetition_penalty, categorical_draw, sanitize, Sampler};

/// A [`Sampler`]'s chain as the parameters of the GPU kernel, for one step.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSampling {
    /// Repetition penalty (`1`: off).
    pub penalty: f32,
    /// The distinct ids (`< vocab`, ascending) the penalty rewrites: those among the last
    /// `repetition_context_size` tokens of the history.
    pub penalized: Vec<u32>,
    /// Top-k (`0`: off).
    pub top_k: usize,
    /// Top-p (`1`: off, and no log-softmax).
    pub top_p: f32,
    /// `ln(min_p)` computed in f32 as [`super::apply_min_p`] does; `-inf`: min-p off.
    pub ln_min_p: f32,
    /// `1 / temperature` in f32, as [`super::apply_temperature`] multiplies.
    pub inv_temp: f32,
    /// The ids the processors added to the chain let through (a grammar's mask,
    /// [`super::LogitsProcessor::mask_words`], several intersected): bit `i % 32` of word
    /// `i / 32` set when id `i` may be drawn, ids past the words not; `None`: every id.
    pub mask: Option<Vec<u32>>,
}

/// How a sequence's next token is drawn on a GPU ([`crate::generate::TokenState`]'s `device_pick`).
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the plan is read by the CUDA kernel's caller
pub(crate) enum DevicePick {
    /// Greedy: the argmax of the logits.
    Argmax,
    /// The sampler's chain with its uniform draw (`[0, 1)`), taken already.
    Sample(DeviceSampling, f64),
}

/// What a batch's draw on the device gave a sequence: its pick, and the id (`None` when the
/// kernel left the row to the CPU: the sampler then draws it there with the same uniform).
#[derive(Debug, Clone)]
pub(crate) struct DeviceDrawn {
    pub(crate) pick: DevicePick,
    pub(crate) id: Option<u32>,
}

impl DeviceSampling {
    /// Whether a filter is on (else the draw runs over the whole vocabulary).
    pub fn filters(&self) -> bool {
        self.top_k > 0 || self.top_p < 1.0 || self.ln_min_p > f32::NEG_INFINITY
    }
}

impl Sampler {
    /// The chain as [`DeviceSampling`] for a step with `history` (prompt and generated ids,
    /// oldest first) over `vocab` logits; `None` when it is the plain argmax (the argmax path
    /// applies) or holds a link the kernel does not run (presence/frequency penalties, logit
    /// biases, an added processor that is not a mask). An added mask (a grammar) is asked for
    /// this step's ids ([`super::LogitsProcessor::mask_words`]) in place of its `process`. A
    /// greedy chain with a mask or a repetition penalty is the kernel's top-1 (top-k 1: the
    /// largest value, the lowest id on ties, as [`super::argmax`]; the draw does not matter).
    pub fn device_sampling(&mut self, history: &[u32], vocab: usize) -> Option<DeviceSampling> {
        let p = &self.params;
        if self.is_plain_argmax()
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || !p.logit_bias.is_empty()
        {
            return None;
        }
        let mask = self.added_mask()?;
        let greedy = self.rng.is_none();
        let p = &self.params;
        let penalized = if p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repetition_context_size);
            let mut ids: Vec<u32> = history[start..]
                .iter()
                .copied()
                .filter(|&i| (i as usize) < vocab)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        } else {
            Vec::new()
        };
        let temp = p.temperature;
        if greedy {
            return Some(DeviceSampling {
                penalty: p.repetition_penalty,
                penalized,
                top_k: 1,
                top_p: 1.0,
                ln_min_p: f32::NEG_INFINITY,
                inv_temp: 1.0,
                mask,
            });
        }
        Some(DeviceSampling {
            penalty: p.repetition_penalty,
            penalized,
            top_k: p.top_k,
            top_p: if p.top_p > 0.0 && p.top_p < 1.0 {
                p.top_p
            } else {
                1.0
            },
            ln_min_p: if p.min_p > 0.0 {
                p.min_p.ln()
            } else {
                f32::NEG_INFINITY
            },
            inv_temp: if temp.is_nan() || temp <= 0.0 || temp == 1.0 {
                1.0
            } else {
                1.0 / temp
            },
            mask,
        })
    }

    /// The added processors' ids as one mask (each one's
    /// [`super::LogitsProcessor::mask_words`], intersected): `Some(None)` with none added,
    /// `None` when one of them is not a mask.
    fn added_mask(&mut self) -> Option<Option<Vec<u32>>> {
        if self.added > 0 && crate::switches::switched_off("POCKETLM_DEVICE_MASK") {
            return None;
        }
        let first = self.insert_at - self.added;
        let mut mask: Option<Vec<u32>> = None;
        for p in &mut self.chain[first..self.insert_at] {
            let w = p.mask_words()?;
            mask = Some(match mask {
                None => w,
                Some(m) => m.iter().zip(&w).map(|(a, b)| a & b).collect(),
            });
        }
        Some(mask)
    }

    /// The uniform draw of the next token (`[0, 1)` from the sampler's seeded generator), for
    /// a draw made elsewhere ([`Sampler::sample_with_uniform`], the GPU kernel); `None` when
    /// greedy.
    pub fn next_uniform(&mut self) -> Option<f64> {
        use rand::Rng;
        self.rng.as_mut().map(|r| r.random::<f64>())
    }

    /// The draw a step on the device takes: [`Self::next_uniform`], or `0` for a greedy chain
    /// (its top-1 plan does not use it; none is taken from the generator).
    pub(crate) fn device_uniform(&mut self) -> f64 {
        self.next_uniform().unwrap_or(0.0)
    }

    /// [`Sampler::sample`] with the draw `u` (`[0, 1)`) given instead of taken from the
    /// generator (greedy samplers ignore it).
    pub fn sample_with_uniform(&mut self, logits: &[f32], recent_tokens: &[u32], u: f64) -> u32 {
        let greedy = self.rng.is_none();
        let id = self.choose(logits, recent_tokens, greedy, || u);
        self.accept(id);
        id
    }

    /// The token of a draw made on the device with the uniform `u`: `id` as the kernel drew it
    /// (the chain told of it), or, where the kernel left the draw to the CPU (`None`: too many
    /// candidates), the same draw on the CPU over `logits` (`[1, vocab]` or `[vocab]`, any
    /// float dtype, any device; copied back).
    ///
    /// Errors: copying the logits back.
    pub(crate) fn finish_device_draw(
        &mut self,
        id: Option<u32>,
        logits: &candle_core::Tensor,
        recent_tokens: &[u32],
        u: f64,
    ) -> crate::Result<u32> {
        Ok(match id {
            Some(id) => {
                self.accept(id);
                id
            }
            None => {
                let l: Vec<f32> = logits
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?;
                self.sample_with_uniform(&l, recent_tokens, u)
            }
        })
    }

    /// Tells each processor of the chain the token drawn ([`super::LogitsProcessor::accept`]).
    pub fn accept(&mut self, id: u32) {
        for p in &mut self.chain {
            p.accept(id);
        }
    }
}

/// The GPU kernel's algorithm on the CPU (see the module docs): `logits: [vocab]` raw f32, the
/// chain `d`, the draw `u` in `[0, 1)` -> the token id. Sanitize, the mask and the penalty,
/// the log-softmax values when top-p is on, the full ranking, the kept prefix (top-k, then
/// min-p against the top value, then top-p on the mass ranked above), then temperature and the
/// inverse-CDF draw in id order.
pub fn prefix_sample(logits: &[f32], d: &DeviceSampling, u: f64) -> u32 {
    let mut x = logits.to_vec();
    sanitize(&mut x);
    if let Some(m) = &d.mask {
        super::processors::apply_mask_words(m, &mut x);
    }
    if d.penalty != 1.0 {
        apply_repetition_penalty(&mut x, &d.penalized, d.penalty, usize::MAX);
    }
    let use_p = d.top_p < 1.0;
    if use_p {
        super::log_softmax(&mut x);
    }
    let mut kept: Vec<u32> = (0..x.len() as u32)
        .filter(|&i| x[i as usize] > f32::NEG_INFINITY)
        .collect();
    if d.filters() && !kept.is_empty() {
        kept.sort_unstable_by(super::rank(&x));
        let mut keep = kept.len();
        if d.top_k > 0 {
            keep = keep.min(d.top_k);
        }
        if d.ln_min_p > f32::NEG_INFINITY {
            let thr = x[kept[0] as usize] + d.ln_min_p;
            keep = kept[..keep]
                .iter()
                .position(|&i| x[i as usize] < thr)
                .unwrap_or(keep);
        }
        if use_p {
            let mut above = 0.0f64;
            for (r, &i) in kept[..keep].iter().enumerate() {
                if above >= f64::from(d.top_p) {
                    keep = r;
                    break;
                }
                above += f64::from(x[i as usize].exp());
            }
        }
        kept.truncate(keep);
        kept.sort_unstable();
    }
    let mut masked = vec![f32::NEG_INFINITY; x.len()];
    for &i in &kept {
        masked[i as usize] = x[i as usize] * d.inv_temp;
    }
    categorical_draw(&mut masked, || u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::processors::{apply_mask_words, mask_words_of};
    use crate::sampling::SamplingParams;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn params(trial: usize) -> SamplingParams {
        SamplingParams {
            temperature: [0.3f32, 0.7, 1.0, 1.8][trial % 4],
            top_p: [1.0f32, 0.5, 0.9, 0.95][(trial / 2) % 4],
            top_k: [0usize, 1, 5, 40][(trial / 3) % 4],
            min_p: [0.0f32, 0.05, 0.2][(trial / 5) % 3],
            repetition_penalty: [1.0f32, 1.3][trial % 2],
            repetition_context_size: 10,
            seed: Some(trial as u64),
            ..SamplingParams::default()
        }
    }

    /// A mask processor for tests: lets through the ids of a set.
    pub(crate) struct Allowed(pub(crate) Vec<u32>);

    impl crate::sampling::LogitsProcessor for Allowed {
        fn name(&self) -> &str {
            "allowed"
        }
        fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
            let words = mask_words_of(self.0.iter().copied());
            apply_mask_words(&words, logits);
        }
        fn mask_words(&mut self) -> Option<Vec<u32>> {
            Some(mask_words_of(self.0.iter().copied()))
        }
    }

    #[test]
    fn prefix_algorithm_draws_what_the_chain_draws() {
        let mut rng = StdRng::seed_from_u64(17);
        for trial in 0..120 {
            let n = [7usize, 300, 5000][trial % 3];
            let logits: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..40) {
                    0 => 1.5, // ties
                    1 => f32::NAN,
                    2 => f32::NEG_INFINITY,
                    _ => rng.random_range(-6.0f32..6.0),
                })
                .collect();
            let history: Vec<u32> = (0..30).map(|_| rng.random_range(0..n as u32 + 3)).collect();
            let mut sampler = Sampler::new(params(trial)).unwrap();
            // Every third trial with a mask (a grammar's), some with two intersected.
            if trial % 3 == 1 {
                let ids: Vec<u32> = (0..n as u32).filter(|i| i % 3 != 0).collect();
                sampler = sampler.with_processor(Box::new(Allowed(ids)));
                if trial % 2 == 1 {
                    let ids: Vec<u32> = (0..n as u32 / 2).collect();
                    sampler = sampler.with_processor(Box::new(Allowed(ids)));
                }
            }
            let d = sampler.device_sampling(&history, n).expect("device-able");
            assert_eq!(d.mask.is_some(), trial % 3 == 1);
            for _ in 0..4 {
                let u: f64 = rng.random();
                let want = sampler.sample_with_uniform(&logits, &history, u);
                assert_eq!(prefix_sample(&logits, &d, u), want, "trial {trial} u {u}");
            }
        }
    }

    /// A greedy chain with a mask or a repetition penalty, as the kernel's top-1 plan, picks
    /// the argmax the CPU chain picks, whatever the draw.
    #[test]
    fn the_top_1_plan_of_a_greedy_chain_is_its_argmax() {
        let mut rng = StdRng::seed_from_u64(23);
        for trial in 0..60 {
            let n = [5usize, 300, 5000][trial % 3];
            let logits: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..20) {
                    0 => 2.5, // ties at the top
                    1 => f32::NAN,
                    _ => rng.random_range(-3.0f32..3.0),
                })
                .collect();
            let history: Vec<u32> = (0..20).map(|_| rng.random_range(0..n as u32)).collect();
            let mut sampler = Sampler::new(SamplingParams {
                repetition_penalty: [1.0f32, 1.4][trial % 2],
                repetition_context_size: 8,
                ..SamplingParams::default()
            })
            .unwrap();
            if trial % 2 == 0 || trial % 3 == 0 {
                let ids: Vec<u32> = (0..n as u32)
                    .filter(|i| i % 4 != trial as u32 % 4)
                    .collect();
                sampler = sampler.with_processor(Box::new(Allowed(ids)));
            }
            let d = sampler.device_sampling(&history, n).expect("device-able");
            let want = sampler.sample(&logits, &history);
            for u in [0.0, 0.5, 0.999] {
                assert_eq!(prefix_sample(&logits, &d, u), want, "trial {trial} u {u}");
            }
        }
    }

    #[test]
    fn sample_with_uniform_is_sample_with_the_generators_draw() {
        let mut rng = StdRng::seed_from_u64(3);
        let logits: Vec<f32> = (0..1000).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        let mut a = Sampler::new(params(5)).unwrap();
        let mut b = Sampler::new(params(5)).unwrap();
        for _ in 0..20 {
            let u = b.next_uniform().unwrap();
            assert_eq!(
                a.sample(&logits, &[1, 2]),
                b.sample_with_uniform(&logits, &[1, 2], u)
            );
        }
    }

    #[test]
    fn device_sampling_maps_the_chain_and_refuses_what_it_cannot_run() {
        let p = SamplingParams {
            temperature: 0.5,
            top_p: 0.9,
            top_k: 40,
            min_p: 0.1,
            repetition_penalty: 1.2,
            repetition_context_size: 3,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let d = Sampler::new(p.clone())
            .unwrap()
            .device_sampling(&[9, 4, 7, 4, 500], 100)
            .unwrap();
        assert_eq!(d.penalized, vec![4, 7]); // last 3, deduplicated, 500 >= vocab dropped
        assert_eq!((d.top_k, d.top_p, d.inv_temp), (40, 0.9, 2.0));
        assert_eq!(d.ln_min_p, 0.1f32.ln());
        let off = Sampler::new(SamplingParams {
            top_p: 1.0,
            min_p: 0.0,
            top_k: 0,
            ..p.clone()
        })
        .unwrap()
        .device_sampling(&[], 100)
        .unwrap();
        assert!(!off.filters());
        let mut greedy = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(greedy.device_sampling(&[], 100), None);
        let mut biased = Sampler::new(SamplingParams {
            logit_bias: vec![(1, 2.0)],
            ..p.clone()
        })
        .unwrap();
        assert_eq!(biased.device_sampling(&[], 100), None);
        // An added processor that is not a mask keeps the draw on the CPU; masks intersect.
        let mut other = Sampler::new(p.clone())
            .unwrap()
            .with_processor(Box::new(super::super::processors::Sanitize));
        assert_eq!(other.device_sampling(&[], 100), None);
        let mut masked = Sampler::new(p)
            .unwrap()
            .with_processor(Box::new(Allowed(vec![1, 3, 40])))
            .with_processor(Box::new(Allowed(vec![3, 40, 70])));
        let m = masked.device_sampling(&[], 100).unwrap().mask;
        assert_eq!(m, Some(vec![1 << 3, 1 << 8]));
        // Greedy with a mask or a repetition penalty: the top-1 plan.
        let mut greedy_masked = Sampler::new(SamplingParams::default())
            .unwrap()
            .with_processor(Box::new(Allowed(vec![2])));
        let d = greedy_masked.device_sampling(&[], 100).unwrap();
        assert_eq!((d.top_k, d.top_p, d.inv_temp), (1, 1.0, 1.0));
        assert_eq!(d.mask, Some(vec![1 << 2]));
        let mut greedy_penalty = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::default()
        })
        .unwrap();
        let d = greedy_penalty.device_sampling(&[7], 100).unwrap();
        assert_eq!(
            (d.top_k, d.penalized.as_slice(), d.mask),
            (1, &[7][..], None)
        );
    }
}
