//! Token sampling on the GPU (kernel `sample_tokens` in `src/cuda/sample.cu`, one block a row):
//! the sampler's chain ([`DeviceSampling`]) and one uniform draw per row in, the token ids out,
//! with no copy of the logits and no sort of the vocabulary. See
//! [`crate::device::sample_on_device`] and [`crate::device::draw_rows_on_device`] for its use.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Storage, Tensor};

use super::modules::{kernel, SAMPLE};
use crate::sampling::DeviceSampling;
use crate::{Error, Result};

/// Draws the next token from `logits` (`[1, vocab]` or `[vocab]`, any float dtype, on CUDA;
/// a row of a larger tensor, as a batch's `[B, vocab]`, too)
/// under the chain `d` with the uniform draw `u` in `[0, 1)`: the id [`crate::sampling::Sampler`]
/// gives for the same logits and draw (up to rounding at the boundaries), or `None` when the
/// candidates near the top do not fit the kernel (a very flat distribution under a filter; the
/// caller samples on the CPU).
///
/// Errors: [`Error::InvalidArgument`] for logits off CUDA or an empty or too large
/// vocabulary; CUDA errors of the launch and copies.
pub fn sample_token(logits: &Tensor, d: &DeviceSampling, u: f64) -> Result<Option<u32>> {
    let row = logits.reshape((1, logits.elem_count()))?;
    Ok(sample_tokens(&row, &[(d, u)])?.pop().flatten())
}

/// Draws one token from each row of `logits` (`[rows, vocab]`, any float dtype, on CUDA) in
/// one launch (kernel `sample_tokens`, one block a row): row `r` under `draws[r]` (its chain
/// and uniform draw), as [`sample_token`] draws it from that row alone. Returns, per row, the
/// id or `None` where the candidates do not fit the kernel (the caller samples that row on the
/// CPU with the same draw).
///
/// Errors: [`Error::InvalidArgument`] for logits off CUDA or not 2-D, `draws` not one per row,
/// an empty or too large vocabulary or a penalized id out of it; CUDA errors of the launch and
/// copies.
pub fn sample_tokens(
    logits: &Tensor,
    draws: &[(&DeviceSampling, f64)],
) -> Result<Vec<Option<u32>>> {
    let Device::Cuda(dev) = logits.device() else {
        return Err(Error::InvalidArgument(
            "sampling logits are not on CUDA".into(),
        ));
    };
    let (rows, n) = logits.dims2()?;
    if rows != draws.len()
        || n == 0
        || n > i32::MAX as usize
        || draws
            .iter()
            .any(|(d, _)| d.penalized.iter().any(|&i| i as usize >= n))
    {
        return Err(Error::InvalidArgument(format!(
            "GPU sampling of {rows} rows of {n} logits with {} draws",
            draws.len()
        )));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    // Rows 16-byte aligned for the kernel's loads: a padded copy where `vocab % 4 != 0`.
    let stride = n.div_ceil(4) * 4;
    let mut l = logits.to_dtype(DType::F32)?;
    if stride != n {
        l = l.pad_with_zeros(1, 0, stride - n)?;
    }
    let mut l = l.contiguous()?;
    if l.layout().start_offset() % 4 != 0 {
        l = l.force_contiguous()?;
    }
    let mut pen: Vec<u32> = Vec::new();
    let mut params: Vec<u32> = Vec::with_capacity(8 * rows);
    // The masked rows' masks, each ceil(n / 32) words (ids past a mask's words not allowed).
    let words = n.div_ceil(32);
    let mut masks: Vec<u32> = Vec::new();
    for (d, _) in draws {
        let mask = match &d.mask {
            Some(m) => {
                let at = masks.len();
                masks.extend(m.iter().take(words));
                masks.resize(at + words, 0);
                (at / words + 1) as u32
            }
            None => 0,
        };
        params.extend_from_slice(&[
            pen.len() as u32,
            d.penalized.len() as u32,
            d.penalty.to_bits(),
            d.top_k.min(i32::MAX as usize) as u32,
            d.top_p.to_bits(),
            d.ln_min_p.to_bits(),
            d.inv_temp.to_bits(),
            mask,
        ]);
        pen.extend_from_slice(&d.penalized);
    }
    if pen.is_empty() {
        pen.push(0);
    }
    if masks.is_empty() {
        masks.push(0);
    }
    let us: Vec<f64> = draws.iter().map(|&(_, u)| u).collect();
    let stream = dev.cuda_stream();
    let func = kernel(dev, &SAMPLE, "sample_tokens")?;
    let work = unsafe { dev.alloc::<f32>(rows * stride) }?;
    let pen = stream.clone_htod(&pen).w()?;
    let params = stream.clone_htod(&params).w()?;
    let us = stream.clone_htod(&us).w()?;
    let masks = stream.clone_htod(&masks).w()?;
    let out = dev.alloc_zeros::<u32>(2 * rows)?;
    {
        let (s, lay) = l.storage_and_layout();
        let Storage::Cuda(s) = &*s else {
            return Err(Error::InvalidArgument(
                "sampling logits are not on CUDA".into(),
            ));
        };
        let off = lay.start_offset();
        let lv = s.as_cuda_slice::<f32>()?.slice(off..off + rows * stride);
        let lp = lv.device_ptr(&stream).0;
        let (wp, pp, prp, up, mp, op) = (
            work.device_ptr(&stream).0,
            pen.device_ptr(&stream).0,
            params.device_ptr(&stream).0,
            us.device_ptr(&stream).0,
            masks.device_ptr(&stream).0,
            out.device_ptr(&stream).0,
        );
        let (ni, st) = (n as i32, stride as i64);
        let mut b = func.builder();
        b.arg(&lp);
        b.arg(&st);
        b.arg(&wp);
        b.arg(&ni);
        b.arg(&pp);
        b.arg(&prp);
        b.arg(&up);
        b.arg(&mp);
        b.arg(&op);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
    }
    let r = stream.clone_dtoh(&out).w()?;
    Ok(r.chunks(2).map(|p| (p[1] == 0).then_some(p[0])).collect())
}
