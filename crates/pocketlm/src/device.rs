//! Choosing the device tensors live on. CPU always; CUDA and Metal when built with those features.

use candle_core::Device;

/// Which device to run on, as a user names it (`auto`, `cpu`, `cuda`, `cuda:N`, `metal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The best device this build supports and this machine has.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// An NVIDIA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
    /// An Apple GPU (needs the `metal` feature).
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(crate::Error::InvalidArgument(format!(
                    "unknown device `{s}` (expected auto, cpu, cuda, cuda:N or metal)"
                ))),
            },
        }
    }
}

impl DeviceSpec {
    /// Opens the device. `Auto` picks CUDA, then Metal, then the CPU, among what is compiled in
    /// and present.
    pub fn open(self) -> crate::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Ok(single_stream(Device::new_cuda(n)?)),
            Self::Metal => Ok(Device::new_metal(0)?),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(single_stream(d));
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// Our CUDA tensors live on the device's one stream, so the per-tensor events that cudarc
/// records for cross-stream safety only cost time (a record and a wait per use); turn them off.
fn single_stream(d: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        // Safety: every tensor pocketlm makes on this device is used on its default stream only.
        unsafe { c.disable_event_tracking() };
        if let Err(e) = crate::cuda::keep_freed_memory(&d) {
            tracing::warn!("CUDA memory pool left as it is: {e}");
        }
    }
    d
}

/// `(free, total)` bytes of the device's memory: `Some` on a CUDA device (built with the `cuda`
/// feature), `None` elsewhere.
pub fn gpu_memory(d: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    return crate::cuda::memory_info(d);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = d;
        None
    }
}

/// A short name for reports: `cpu`, `cuda:N`, `metal`.
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// The tokens of several rows of a batch's logits (`[rows, vocab]`, any float dtype, on CUDA)
/// drawn on the device together: for each `(row, pick)` the row's argmax or its draw under the
/// pick's chain, in at most two launches (one argmax over the rows, one sampling kernel for
/// the sampled ones, [`crate::cuda::sample_tokens`]) and one copy back each, not a launch and a
/// copy a row. `None` for a row whose candidates do not fit the sampling kernel (the caller
/// draws it on the CPU with the pick's uniform), and for every row off CUDA or in a build
/// without the `cuda` feature.
///
/// Errors: CUDA errors of the launches and copies; a row out of `logits`.
pub(crate) fn draw_rows_on_device(
    logits: &candle_core::Tensor,
    picks: &[(usize, &crate::sampling::DevicePick)],
) -> crate::Result<Vec<Option<u32>>> {
    #[cfg(not(feature = "cuda"))]
    {
        let _ = logits;
        Ok(vec![None; picks.len()])
    }
    #[cfg(feature = "cuda")]
    {
        let mut ids = vec![None; picks.len()];
        use crate::sampling::DevicePick;
        use candle_core::{Tensor, D};
        if !logits.device().is_cuda() || picks.is_empty() {
            return Ok(ids);
        }
        let rows = logits.dim(0)?;
        if let Some(&(r, _)) = picks.iter().find(|&&(r, _)| r >= rows) {
            return Err(crate::Error::InvalidArgument(format!(
                "row {r} of a batch's logits of {rows} rows"
            )));
        }
        let idx = |which: &[usize]| -> crate::Result<Tensor> {
            let v: Vec<u32> = which.iter().map(|&r| r as u32).collect();
            Ok(Tensor::new(v.as_slice(), logits.device())?)
        };
        let (mut greedy, mut sampled) = (Vec::new(), Vec::new());
        for (j, (r, p)) in picks.iter().enumerate() {
            match p {
                DevicePick::Argmax => greedy.push((j, *r)),
                DevicePick::Sample(d, u) => sampled.push((j, *r, d, *u)),
            }
        }
        if !greedy.is_empty() {
            let best: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            for &(j, r) in &greedy {
                ids[j] = Some(best[r]);
            }
        }
        if !sampled.is_empty() {
            let which: Vec<usize> = sampled.iter().map(|s| s.1).collect();
            let l = if which.iter().copied().eq(0..rows) {
                logits.clone()
            } else {
                logits.index_select(&idx(&which)?, 0)?
            };
            let draws: Vec<_> = sampled.iter().map(|&(_, _, d, u)| (d, u)).collect();
            let got = crate::cuda::sample_tokens(&l, &draws)?;
            for (&(j, ..), id) in sampled.iter().zip(got) {
                ids[j] = id;
            }
        }
        Ok(ids)
    }
}

/// The next token drawn on the logits' own device (a GPU), only the id copied back:
/// `logits: [1, vocab]` or `[vocab]` (any float dtype) on CUDA, `history` the ids of the prompt
/// and of the tokens generated so far (oldest first). `Ok(None)` when it does not apply (logits
/// off CUDA, a build without the `cuda` feature, or a chain the kernel does not run, see
/// [`crate::sampling::Sampler::device_sampling`]); the caller then copies the logits and calls
/// [`crate::sampling::Sampler::sample`]. The draw is the sampler's next uniform, so a seeded generation gives
/// the tokens [`crate::sampling::Sampler::sample`] would give for the same logits (up to rounding at the
/// boundaries, see `src/cuda/sample.cu`). When the candidates of a very flat distribution do
/// not fit the kernel, it copies the logits and samples them on the CPU with the same draw.
///
/// Errors: CUDA errors of the launch and copies.
pub fn sample_on_device(
    sampler: &mut crate::sampling::Sampler,
    logits: &candle_core::Tensor,
    history: &[u32],
) -> crate::Result<Option<u32>> {
    #[cfg(feature = "cuda")]
    {
        if !logits.device().is_cuda() {
            return Ok(None);
        }
        let vocab = logits.elem_count();
        let Some(plan) = sampler.device_sampling(history, vocab) else {
            return Ok(None);
        };
        let u = sampler.device_uniform();
        let id = crate::cuda::sample_token(logits, &plan, u)?;
        Ok(Some(sampler.finish_device_draw(id, logits, history, u)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (sampler, logits, history);
        Ok(None)
    }
}
