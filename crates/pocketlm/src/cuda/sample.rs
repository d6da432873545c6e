//! Token sampling on the GPU (kernel `sample_token` in `src/cuda/sample.cu`): the sampler's chain
//! ([`DeviceSampling`]) and one uniform draw in, the token id out, with no copy of the logits and
//! no sort of the vocabulary. See [`crate::device::sample_on_device`] for its use.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Storage, Tensor};

use crate::sampling::DeviceSampling;
use crate::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sample.ptx"));
const MODULE: &str = "pocketlm_sample";

/// Draws the next token from `logits` (`[1, vocab]` or `[vocab]`, any float dtype, on CUDA)
/// under the chain `d` with the uniform draw `u` in `[0, 1)`: the id [`crate::sampling::Sampler`]
/// gives for the same logits and draw (up to rounding at the boundaries), or `None` when the
/// candidates near the top do not fit the kernel (a very flat distribution under a filter; the
/// caller samples on the CPU).
///
/// Errors: [`Error::InvalidArgument`] for logits off CUDA or an empty or too large
/// vocabulary; CUDA errors of the launch and copies.
pub fn sample_token(logits: &Tensor, d: &DeviceSampling, u: f64) -> Result<Option<u32>> {
    let Device::Cuda(dev) = logits.device() else {
        return Err(Error::InvalidArgument(
            "sampling logits are not on CUDA".into(),
        ));
    };
    let n = logits.elem_count();
    if n == 0 || n > i32::MAX as usize || d.penalized.iter().any(|&i| i as usize >= n) {
        return Err(Error::InvalidArgument(format!(
            "GPU sampling of {n} logits with penalized ids up to {:?}",
            d.penalized.last()
        )));
    }
    let l = logits.flatten_all()?.to_dtype(DType::F32)?.contiguous()?;
    let stream = dev.cuda_stream();
    let func = dev.get_or_load_custom_func("sample_token", MODULE, PTX)?;
    let work = unsafe { dev.alloc::<f32>(n) }?;
    let pen = if d.penalized.is_empty() {
        stream.clone_htod(&[0u32]).w()?
    } else {
        stream.clone_htod(&d.penalized).w()?
    };
    let out = dev.alloc_zeros::<u32>(2)?;
    {
        let (s, lay) = l.storage_and_layout();
        let Storage::Cuda(s) = &*s else {
            return Err(Error::InvalidArgument(
                "sampling logits are not on CUDA".into(),
            ));
        };
        if lay.start_offset() != 0 {
            return Err(Error::InvalidArgument(
                "GPU sampling needs logits at the start of their buffer".into(),
            ));
        }
        let lp = s.as_cuda_slice::<f32>()?.device_ptr(&stream).0;
        let (wp, pp, op) = (
            work.device_ptr(&stream).0,
            pen.device_ptr(&stream).0,
            out.device_ptr(&stream).0,
        );
        let (ni, npen, top_k) = (
            n as i32,
            d.penalized.len() as i32,
            d.top_k.min(i32::MAX as usize) as i32,
        );
        let mut b = func.builder();
        b.arg(&lp);
        b.arg(&wp);
        b.arg(&ni);
        b.arg(&pp);
        b.arg(&npen);
        b.arg(&d.penalty);
        b.arg(&top_k);
        b.arg(&d.top_p);
        b.arg(&d.ln_min_p);
        b.arg(&d.inv_temp);
        b.arg(&u);
        b.arg(&op);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
    }
    let r = stream.clone_dtoh(&out).w()?;
    Ok((r[1] == 0).then_some(r[0]))
}
