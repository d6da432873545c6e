//! Our CUDA code (feature `cuda`): block-quantized matrices for GGUF `Q4_0`/`Q4_1`/`Q8_0` and MLX
//! affine 4/8-bit weights ([`CudaQMatrix`]: integer GEMV for decode, f16 dequantization + cuBLAS
//! for prefill), the fused decode step replayed as a CUDA graph ([`CudaDecoder`], run for any
//! model that exports a [`crate::models::DecodePlan`] of its shape by `crate::accel`), and GPU
//! memory readings. The kernels are in `src/cuda/*.cu`, compiled by `build.rs` with `nvcc` into
//! fat binaries (machine code and PTX) that `modules` loads; [`selftest`] compares each matrix
//! kernel with its CPU reference over many shapes (`pocketlm gpu-selftest` runs it on a GPU
//! machine).

mod decoder;
mod launch;
mod modules;
mod qmatrix;
mod sample;

pub use decoder::{
    CudaDecoder, DecoderFfn, DecoderLayer, DecoderMoe, DecoderSpec, MoeRows, SeqStep, MAX_BATCH,
    MOE_MAX_EXPERTS, MOE_MAX_TOPK,
};
pub use qmatrix::{CudaQMatrix, Epilogue, GEMV_MAX_ROWS, MMQ_MAX_ROWS};
pub use sample::{sample_token, sample_tokens};

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::quant::mlx_affine::{AffineQuantized, ParamDtype};
use crate::Result;
use modules::{kernel, QMATRIX};

/// `(free, total)` bytes of the GPU's memory (`cuMemGetInfo`), `None` off CUDA.
pub fn memory_info(dev: &Device) -> Option<(usize, usize)> {
    match dev {
        Device::Cuda(d) => {
            d.cuda_stream().context().bind_to_thread().ok()?;
            candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()
        }
        _ => None,
    }
}

/// Keeps what the device's stream-ordered allocator frees mapped for the next allocation
/// (the pool's `CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` at its maximum, as PyTorch's caching
/// allocator keeps freed blocks). cudarc allocates with `cuMemAllocAsync` from the device's
/// current pool, whose threshold of 0 hands every freed byte back to the driver at each
/// synchronization; a prompt's passes then map their temporaries (f16 weights, activations)
/// afresh after every token read back. The memory stays the process's until it exits and
/// counts as used in [`memory_info`]. `POCKETLM_CUDA_POOL_KEEP=0` leaves the threshold at 0.
///
/// Errors: the driver's.
pub fn keep_freed_memory(dev: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(d) = dev else {
        return Ok(());
    };
    if crate::switches::switched_off("POCKETLM_CUDA_POOL_KEEP") {
        return Ok(());
    }
    let stream = d.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut threshold = u64::MAX;
    // SAFETY: the device is the context's; the pool it returns lives as long as the context;
    // this attribute's value is a `u64`, as the driver API documents.
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device()).w()?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .w()?;
    }
    Ok(())
}

/// `‖a - b‖ / ‖b‖` over two equal-length slices (`‖·‖` the Euclidean norm): rounding that
/// grows with the reduction length shows up here in proportion, unlike an element-wise bound.
fn norm_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let r: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / r.max(f64::MIN_POSITIVE)).sqrt() as f32
}

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `(codes, scale, bias)` of block `b` (values `32 b .. 32 b + 32`) of row `r` of a GGUF matrix
/// in ggml's layout, such that each value is `scale * code + bias`.
fn gguf_block(
    dtype: GgmlDType,
    bytes: &[u8],
    cols: usize,
    r: usize,
    b: usize,
) -> ([i32; 32], f32, f32) {
    let size = match dtype {
        GgmlDType::Q4_0 => 18,
        GgmlDType::Q4_1 => 20,
        _ => 34,
    };
    let blk = &bytes[(r * cols / 32 + b) * size..][..size];
    let f = |i: usize| half::f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
    let mut q = [0i32; 32];
    match dtype {
        GgmlDType::Q8_0 => {
            for (j, v) in q.iter_mut().enumerate() {
                *v = blk[2 + j] as i8 as i32;
            }
            (q, f(0), 0.0)
        }
        _ => {
            let off = if dtype == GgmlDType::Q4_1 { 4 } else { 2 };
            for j in 0..16 {
                q[j] = (blk[off + j] & 15) as i32;
                q[j + 16] = (blk[off + j] >> 4) as i32;
            }
            let d = f(0);
            let bias = if dtype == GgmlDType::Q4_1 {
                f(2)
            } else {
                -8.0 * d
            };
            (q, d, bias)
        }
    }
}

/// `(codes, scale, bias)` of block `b` of row `r` of an MLX affine matrix.
fn mlx_block(q: &AffineQuantized, r: usize, b: usize) -> ([i32; 32], f32, f32) {
    let bits = q.bits();
    let per_word = 32 / bits;
    let mut out = [0i32; 32];
    for (j, v) in out.iter_mut().enumerate() {
        let k = b * 32 + j;
        let w = q.weight()[r * q.packed_cols() + k / per_word];
        *v = ((w >> ((k % per_word) * bits)) & ((1u32 << bits) - 1)) as i32;
    }
    let g = r * q.groups_per_row() + b * 32 / q.group_size();
    (
        out,
        q.scales().get(g).unwrap_or(0.0),
        q.biases().get(g).unwrap_or(0.0),
    )
}

fn float_matmul(x: &[f32], m: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * rows];
    for i in 0..m {
        for r in 0..rows {
            let mut acc = 0f64;
            for k in 0..cols {
                acc += x[i * cols + k] as f64 * w[r * cols + k] as f64;
            }
            y[i * rows + r] = acc as f32;
        }
    }
    y
}

/// Compares every CUDA matrix kernel with its CPU reference over many shapes and returns one
/// line per case (`kernel shape norm_rel_err PASS|FAIL`) and whether all passed. Needs a CUDA
/// device.
///
/// For each format (GGUF `Q4_0`, `Q4_1`, `Q8_0`; MLX bits 4/8 x groups 32/64/128 x f16/bf16/f32
/// scales) and shape: the GEMV (m = 1) and the small-batch GEMM (m = 3 to 40) against the CPU
/// mirror of their formula ([`qmatrix::reference_gemv`], tolerance 1e-5) and against the float
/// product with the dequantized weights (the cost of 8-bit activations, tolerance 2e-2); the
/// prefill path (m = 65, f16 weights and inputs, cuBLAS) against the float product (5e-3); the
/// `Add`, `SwiGlu` and `GeGlu` epilogues of both against the CPU (1e-5).
/// `POCKETLM_SELFTEST=matmul` runs only the matrix products of up to 2^22 weights and the
/// epilogues (a quick check of the matrix kernels).
pub fn selftest(dev: &Device) -> Result<(Vec<String>, bool)> {
    let matmul_only = std::env::var("POCKETLM_SELFTEST").is_ok_and(|v| v == "matmul");
    let mut lines = Vec::new();
    let mut ok = true;
    let mut seed = 1u64;
    let mut record = |lines: &mut Vec<String>, what: String, err: f32, tol: f32| {
        let pass = err.is_finite() && err <= tol;
        ok &= pass;
        lines.push(format!(
            "{what:<62} norm_rel_err {err:.3e} (tol {tol:.0e}) {}",
            if pass { "PASS" } else { "FAIL" }
        ));
    };
    let shapes = [
        (32, 64),
        (8, 128),
        (64, 256),
        (100, 384),
        (257, 512),
        (1000, 1024),
        (4096, 4096),
        (1024, 14336),
        (14336, 4096),
    ];
    // (label, matrix, dequantized weights, block accessor)
    type Block<'a> = Box<dyn Fn(usize, usize) -> ([i32; 32], f32, f32) + 'a>;
    let mut check = |lines: &mut Vec<String>,
                     label: &str,
                     g: &CudaQMatrix,
                     wf: &[f32],
                     block: &Block,
                     seed: u64|
     -> Result<()> {
        let (rows, cols) = g.dims();
        for &m in &[1usize, 3, 8, 17, 40, 65] {
            let large = rows * cols > 1 << 22;
            if (large && matches!(m, 3 | 65)) || (m == 40 && rows * cols > 1 << 20) {
                continue;
            }
            let x = pseudo_random(m * cols, seed + 1000);
            let xt = Tensor::from_vec(x.clone(), (m, cols), dev)?;
            let got: Vec<f32> = g.forward(&xt)?.flatten_all()?.to_vec1()?;
            let float = float_matmul(&x, m, wf, rows, cols);
            if m <= MMQ_MAX_ROWS {
                let want = qmatrix::reference_gemv(&x, m, rows, cols, block);
                let kind = if m == 1 { "gemv" } else { "mmq" };
                record(
                    lines,
                    format!("{label} {kind} [{rows}x{cols}] m={m} vs formula"),
                    norm_rel_err(&got, &want),
                    1e-5,
                );
                record(
                    lines,
                    format!("{label} {kind} [{rows}x{cols}] m={m} vs float"),
                    norm_rel_err(&got, &float),
                    2e-2,
                );
            } else {
                record(
                    lines,
                    format!("{label} gemm [{rows}x{cols}] m={m} vs float"),
                    norm_rel_err(&got, &float),
                    5e-3,
                );
            }
        }
        Ok(())
    };
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for &(rows, cols) in &shapes {
            if matmul_only && rows * cols > 1 << 22 {
                continue;
            }
            seed += 1;
            let w = pseudo_random(rows * cols, seed);
            let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu)?;
            let qt = QTensor::quantize(&wt, dtype)?;
            let bytes = qt.data()?.to_vec();
            let wf: Vec<f32> = qt.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            let g = CudaQMatrix::from_gguf(dtype, &bytes, rows, cols, dev)?;
            let block: Block = Box::new(move |r, b| gguf_block(dtype, &bytes, cols, r, b));
            check(
                &mut lines,
                &format!("gguf {dtype:?}"),
                &g,
                &wf,
                &block,
                seed,
            )?;
        }
    }
    for &bits in &[4usize, 8] {
        for &group in &[32usize, 64, 128] {
            for pd in [ParamDtype::F16, ParamDtype::BF16, ParamDtype::F32] {
                for &(rows, cols) in &shapes {
                    // The large shapes (Llama-3-8B's) once per bit width and dtype, at g64.
                    let large = rows * cols > 1 << 22;
                    if cols % group != 0 || (large && (group != 64 || matmul_only)) {
                        continue;
                    }
                    seed += 1;
                    let w = pseudo_random(rows * cols, seed);
                    let q = crate::quant::mlx_affine::quantize(&w, rows, cols, group, bits, pd)?;
                    let g = CudaQMatrix::from_mlx(&q, dev)?;
                    let wf = q.dequantize();
                    let block: Block = Box::new(|r, b| mlx_block(&q, r, b));
                    check(
                        &mut lines,
                        &format!("mlx b{bits} g{group} {pd:?}"),
                        &g,
                        &wf,
                        &block,
                        seed,
                    )?;
                }
            }
        }
    }
    // Epilogues, on raw buffers as the decoder uses them: the GEMV (m = 1) and the small-batch
    // GEMM (columns split over blocks on the last shape).
    for (rows, cols) in [(256usize, 512usize), (14336 * 2, 4096), (4096, 14336)] {
        seed += 1;
        let w = pseudo_random(rows * cols, seed);
        let q = crate::quant::mlx_affine::quantize(&w, rows, cols, 64, 4, ParamDtype::F16)?;
        let g = CudaQMatrix::from_mlx(&q, dev)?;
        let ms: &[usize] = if rows * cols > 1 << 20 {
            &[1, 5]
        } else {
            &[1, 5, 33, 64]
        };
        for &m in ms {
            let kind = if m == 1 { "gemv" } else { "mmq" };
            let mmq = (m > 1).then_some(m);
            let x = pseudo_random(m * cols, seed + 7);
            let plain = qmatrix::reference_gemv(&x, m, rows, cols, |r, b| mlx_block(&q, r, b));
            let y0 = pseudo_random(m * rows, seed + 9);
            let add_want: Vec<f32> = plain.iter().zip(&y0).map(|(a, b)| a + b).collect();
            let got_add = qmatrix::run_epilogue(&g, Epilogue::Add, &x, &y0, dev, mmq)?;
            record(
                &mut lines,
                format!("mlx b4 g64 F16 {kind} add [{rows}x{cols}] m={m}"),
                norm_rel_err(&got_add, &add_want),
                1e-5,
            );
            // With the column splits added in split order (`POCKETLM_MMQ_DETERMINISTIC=1`),
            // the same launch again gives the same bits, and the sums of the atomic way.
            if m > 1 {
                let was = qmatrix::set_serial_splits(true);
                let first = qmatrix::run_epilogue(&g, Epilogue::Add, &x, &y0, dev, mmq);
                let mut again = Vec::new();
                for _ in 0..4 {
                    again.push(qmatrix::run_epilogue(&g, Epilogue::Add, &x, &y0, dev, mmq));
                }
                qmatrix::set_serial_splits(was);
                let first = first?;
                let mut most = 0f32;
                for a in again {
                    most = most.max(norm_rel_err(&a?, &first));
                }
                record(
                    &mut lines,
                    format!("mlx b4 g64 F16 mmq add [{rows}x{cols}] m={m} serial vs atomic"),
                    norm_rel_err(&first, &got_add),
                    1e-6,
                );
                record(
                    &mut lines,
                    format!("mlx b4 g64 F16 mmq add [{rows}x{cols}] m={m} serial, 4 reruns"),
                    most,
                    0.0,
                );
            }
            let n = rows / 2;
            let gated = |f: &dyn Fn(f64) -> f64| -> Vec<f32> {
                (0..m * n)
                    .map(|i| {
                        let (t, r) = (i / n, i % n);
                        let gt = plain[t * rows + r] as f64;
                        (f(gt) * plain[t * rows + r + n] as f64) as f32
                    })
                    .collect()
            };
            let swi_want = gated(&|g| g / (1.0 + (-g).exp()));
            let got_swi =
                qmatrix::run_epilogue(&g, Epilogue::SwiGlu, &x, &vec![0.0; m * n], dev, mmq)?;
            record(
                &mut lines,
                format!("mlx b4 g64 F16 {kind} swiglu [{rows}x{cols}] m={m}"),
                norm_rel_err(&got_swi, &swi_want),
                1e-5,
            );
            let geg_want = gated(&|x| {
                0.5 * x
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
            });
            let got_geg =
                qmatrix::run_epilogue(&g, Epilogue::GeGlu, &x, &vec![0.0; m * n], dev, mmq)?;
            record(
                &mut lines,
                format!("mlx b4 g64 F16 {kind} geglu [{rows}x{cols}] m={m}"),
                norm_rel_err(&got_geg, &geg_want),
                1e-5,
            );
            // The batched step's unfused gated product (split columns, then glu_q8): its
            // 8-bit output against the same values; 1e-2 is the 8-bit rounding's share.
            if m > 1 {
                for (gelu, want, what) in [(false, &swi_want, "swiglu"), (true, &geg_want, "geglu")]
                {
                    let got = qmatrix::run_gated_split(&g, gelu, &x, dev, m, 4)?;
                    record(
                        &mut lines,
                        format!("mlx b4 g64 F16 mmq {what} split4+q8 [{rows}x{cols}] m={m}"),
                        norm_rel_err(&got, want),
                        1e-2,
                    );
                }
            }
        }
    }
    if matmul_only {
        return Ok((lines, ok));
    }
    // Embedding lookups: equal to the CPU's dequantize_row, bit for bit.
    for &bits in &[4usize, 8] {
        for pd in [ParamDtype::F16, ParamDtype::BF16, ParamDtype::F32] {
            let (rows, cols) = (300usize, 256usize);
            seed += 1;
            let w = pseudo_random(rows * cols, seed);
            let q = crate::quant::mlx_affine::quantize(&w, rows, cols, 64, bits, pd)?;
            let g = CudaQMatrix::from_mlx(&q, dev)?;
            let ids: Vec<u32> = vec![0, 7, 299, 7, 123];
            let mut want = vec![0f32; ids.len() * cols];
            for (id, row) in ids.iter().zip(want.chunks_mut(cols)) {
                q.dequantize_row(*id as usize, row)?;
            }
            let got: Vec<f32> = g
                .embedding(&Tensor::new(ids.as_slice(), dev)?)?
                .flatten_all()?
                .to_vec1()?;
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            record(
                &mut lines,
                format!("mlx b{bits} g64 {pd:?} embedding [{rows}x{cols}] max_abs_diff"),
                diff,
                0.0,
            );
        }
    }
    // Prefill helpers.
    {
        let (m, n) = (5usize, 96usize);
        let y = pseudo_random(m * 2 * n, 77);
        let want: Vec<f32> = (0..m * n)
            .map(|i| {
                let (r, j) = (i / n, i % n);
                let g = y[r * 2 * n + j];
                g / (1.0 + (-g).exp()) * y[r * 2 * n + n + j]
            })
            .collect();
        let got: Vec<f32> = swiglu_stacked(&Tensor::from_vec(y, (m, 2 * n), dev)?, n)?
            .flatten_all()?
            .to_vec1()?;
        record(
            &mut lines,
            format!("swiglu_stacked [{m}x{}]", 2 * n),
            norm_rel_err(&got, &want),
            1e-6,
        );
        let (heads, q_len, cols, scale) = (3usize, 7usize, 11usize, 0.3f32);
        let att = pseudo_random(heads * q_len * cols, 78);
        let mask: Vec<f32> = (0..q_len * cols)
            .map(|i| {
                if i % cols > i / cols + (cols - q_len) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mut want = vec![0f32; att.len()];
        for (r, (a, w)) in att.chunks(cols).zip(want.chunks_mut(cols)).enumerate() {
            let mr = &mask[(r % q_len) * cols..][..cols];
            let v: Vec<f32> = a.iter().zip(mr).map(|(x, m)| x * scale + m).collect();
            let mx = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = v.iter().map(|x| (x - mx).exp()).collect();
            let sum: f32 = e.iter().sum();
            for (wi, ei) in w.iter_mut().zip(&e) {
                *wi = ei / sum;
            }
        }
        let got: Vec<f32> = softmax_scaled_masked(
            &Tensor::from_vec(att, (1, heads, q_len, cols), dev)?,
            Some(&Tensor::from_vec(mask, (q_len, cols), dev)?),
            q_len,
            scale,
        )?
        .flatten_all()?
        .to_vec1()?;
        record(
            &mut lines,
            format!("softmax_scaled_masked [{heads}x{q_len}x{cols}]"),
            norm_rel_err(&got, &want),
            1e-6,
        );
    }
    // Decode attention (split over the positions, query heads sharing a key/value head) vs
    // the float softmax attention on the CPU; its output is quantized to 8 bits per 32 values
    // (tolerance 1e-2).
    if let Device::Cuda(cd) = dev {
        for &(nh, nkv, hd, len, cap, kv_f16, window) in &[
            (32usize, 8usize, 128usize, 1usize, 16usize, false, 0),
            (32, 8, 128, 63, 64, false, 0),
            (32, 8, 128, 65, 128, false, 0),
            (32, 8, 128, 4096, 4100, false, 0),
            (32, 8, 128, 16384, 16384, false, 0),
            (32, 8, 64, 1000, 1024, false, 0),
            (8, 8, 64, 300, 300, false, 0),
            (12, 2, 64, 777, 800, false, 0),
            (16, 2, 128, 5000, 5000, false, 0),
            (32, 8, 128, 1, 16, true, 0),
            (32, 8, 128, 4096, 4100, true, 0),
            (32, 8, 128, 16384, 16384, true, 0),
            (32, 8, 64, 1000, 1024, true, 0),
            (12, 2, 64, 777, 800, true, 0),
            (32, 8, 128, 33, 40, true, 0),
            (32, 8, 128, 65, 128, true, 0),
            (8, 8, 64, 300, 300, true, 0),
            (16, 2, 128, 5000, 5000, true, 0),
            // Phi-3's head width, and sliding windows (Mistral, Phi-3).
            (32, 32, 96, 300, 320, false, 0),
            (32, 32, 96, 2100, 2100, true, 0),
            (24, 8, 96, 777, 800, true, 0),
            (32, 8, 128, 5000, 5000, true, 4096),
            (32, 8, 128, 5000, 5000, false, 4096),
            (32, 32, 96, 3000, 3000, true, 2047),
            (32, 8, 128, 100, 128, true, 4096),
            // Gemma 3's head width (the SIMT kernel), with and without its window.
            (8, 4, 256, 1500, 1500, true, 1024),
            (8, 4, 256, 3000, 3000, true, 0),
            (4, 1, 256, 700, 720, false, 0),
            (4, 1, 256, 700, 720, true, 512),
            // Short contexts, which one split finishes by itself (the default `direct`).
            (32, 32, 96, 100, 128, true, 0),
            (4, 1, 256, 120, 128, false, 0),
            (8, 4, 256, 128, 128, true, 0),
            (12, 2, 64, 129, 160, true, 0),
        ] {
            seed += 1;
            let q = pseudo_random(nh * hd, seed);
            let k: Vec<f32> = pseudo_random(nkv * cap * hd, seed + 1)
                .iter()
                .map(|x| 3.0 * x)
                .collect();
            let v = pseudo_random(nkv * cap * hd, seed + 2);
            let want = attention_reference(&q, &k, &v, (nh, nkv, hd), (len, window), cap);
            // An f16 cache on the tensor cores and on the SIMT kernel; f32 on the SIMT one.
            let kernels: &[bool] = if kv_f16 { &[true, false] } else { &[false] };
            for &tc in kernels {
                let run = |paged: bool| {
                    decoder::run_attention(
                        cd,
                        &q,
                        &k,
                        &v,
                        (nh, nkv, hd),
                        (len, window),
                        cap,
                        (kv_f16, paged),
                        tc,
                    )
                };
                let got = run(false)?;
                let kt = match (kv_f16, tc) {
                    (true, true) => "f16 mma",
                    (true, false) => "f16 simt",
                    _ => "f32 simt",
                };
                record(
                    &mut lines,
                    format!(
                        "attention h{nh} kv{nkv} d{hd} len {len} window {window} {kt} cache vs float"
                    ),
                    norm_rel_err(&got, &want),
                    1e-2,
                );
                // The same cache in scrambled pool blocks through a block table: the same
                // values read in the same order, so the same bits.
                let paged = run(true)?;
                record(
                    &mut lines,
                    format!("attention h{nh} kv{nkv} d{hd} len {len} window {window} {kt} paged vs contiguous"),
                    norm_rel_err(&paged, &got),
                    0.0,
                );
            }
        }
    }
    // Fused prefill attention (f16 tensor-core products, f32 softmax) vs causal float
    // attention: query heads sharing key/value heads, depths, partial tiles, f32 and f16 caches,
    // and a cache view whose heads lie `cap` rows apart.
    if let Device::Cuda(_) = dev {
        for &(nh, nkv, hd, s, kv_len, cap, f16) in &[
            (32usize, 8usize, 128usize, 77usize, 77usize, 77usize, false),
            (32, 8, 128, 130, 300, 300, true),
            (32, 8, 128, 256, 1100, 1100, false),
            (32, 8, 128, 512, 600, 640, true),
            (12, 2, 64, 100, 1000, 1000, false),
            (8, 8, 64, 64, 64, 80, true),
            (16, 2, 128, 33, 4133, 4200, true),
            (14, 2, 64, 2, 9, 9, false),
            (12, 2, 64, 70, 1001, 1010, true),
        ] {
            seed += 1;
            let q = pseudo_random(nh * s * hd, seed);
            let k: Vec<f32> = pseudo_random(nkv * cap * hd, seed + 1)
                .iter()
                .map(|x| 3.0 * x)
                .collect();
            let v = pseudo_random(nkv * cap * hd, seed + 2);
            let dt = if f16 {
                candle_core::DType::F16
            } else {
                candle_core::DType::F32
            };
            let kt = Tensor::from_vec(k.clone(), (1, nkv, cap, hd), dev)?
                .to_dtype(dt)?
                .narrow(2, 0, kv_len)?;
            let vt = Tensor::from_vec(v.clone(), (1, nkv, cap, hd), dev)?
                .to_dtype(dt)?
                .narrow(2, 0, kv_len)?;
            let qt = Tensor::from_vec(q.clone(), (1, nh, s, hd), dev)?;
            let scale = 1.0 / (hd as f32).sqrt();
            let name = format!(
                "flash prefill h{nh} kv{nkv} d{hd} s{s} kv_len {kv_len} {} vs float",
                if f16 { "f16" } else { "f32" }
            );
            // f16 caches: both kernels (loaded through registers, and by cp.async).
            let kernels: &[(bool, &str)] = if f16 {
                &[(false, ""), (true, " (cp.async)")]
            } else {
                &[(false, "")]
            };
            for &(pipelined, which) in kernels {
                let name = format!("{name}{which}");
                match flash_attention_with(&qt, &kt, &vt, scale, pipelined)? {
                    Some(o) => {
                        let got: Vec<f32> = o.flatten_all()?.to_vec1()?;
                        let want = prefill_reference(&q, &k, &v, (nh, nkv, hd), s, kv_len, cap);
                        record(&mut lines, name, norm_rel_err(&got, &want), 5e-3);
                    }
                    None => record(&mut lines, format!("{name}: not taken"), f32::NAN, 5e-3),
                }
            }
            // The same keys and values in scrambled pool blocks read through a block table
            // (a paged cache, as `serve --kv-memory` keeps it): the same bits. The blocks no
            // position maps to hold 1e4, so a wrong block shows.
            if f16 {
                let bl = crate::kv_pool::BLOCK;
                let used = kv_len.div_ceil(bl);
                let mut nb = used + 3;
                if nb % 7 == 0 {
                    nb += 1;
                }
                let table: Vec<u32> = (0..used).map(|i| ((7 * i + 3) % nb) as u32).collect();
                let pool = |src: &[f32]| -> Result<Tensor> {
                    let mut b = vec![1e4f32; nb * nkv * bl * hd];
                    for h in 0..nkv {
                        for t in 0..kv_len {
                            let at = ((table[t / bl] as usize * nkv + h) * bl + t % bl) * hd;
                            b[at..at + hd].copy_from_slice(&src[(h * cap + t) * hd..][..hd]);
                        }
                    }
                    Ok(Tensor::from_vec(b, (nb, nkv, bl, hd), dev)?.to_dtype(dt)?)
                };
                let (kb, vb) = (pool(&k)?, pool(&v)?);
                let paged = flash_attention_paged(&qt, &kb, &vb, &table, kv_len, scale)?;
                let contiguous = flash_attention_with(&qt, &kt, &vt, scale, flash_pipelined())?;
                let err = match contiguous {
                    Some(c) => norm_rel_err(
                        &paged.flatten_all()?.to_vec1()?,
                        &c.flatten_all()?.to_vec1()?,
                    ),
                    None => f32::NAN,
                };
                record(&mut lines, format!("{name} paged vs contiguous"), err, 0.0);
            }
        }
        lines.extend(prefill_timing(dev)?);
    }
    if let Device::Cuda(cd) = dev {
        lines.extend(decoder::attention_timing(cd)?);
    }
    sample_selftest(dev, &mut lines, &mut ok)?;
    Ok((lines, ok))
}

/// Softmax attention of `q: [nh, hd]` over positions `0..len` (the last `window` of them when
/// `window` > 0) of `k`, `v: [nkv, cap, hd]`
/// (query head h reads key/value head `h / (nh / nkv)`), scale `hd^-0.5`, in f64:
/// `[nh * hd]`.
fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (nh, nkv, hd): (usize, usize, usize),
    (len, window): (usize, usize),
    cap: usize,
) -> Vec<f32> {
    let scale = 1.0 / (hd as f64).sqrt();
    let lo = if window > 0 {
        len.saturating_sub(window)
    } else {
        0
    };
    let mut out = vec![0f32; nh * hd];
    for h in 0..nh {
        let kvh = h / (nh / nkv);
        let qh = &q[h * hd..][..hd];
        let s: Vec<f64> = (lo..len)
            .map(|t| {
                let kr = &k[(kvh * cap + t) * hd..][..hd];
                qh.iter()
                    .zip(kr)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..hd {
            let o: f64 = (lo..len)
                .map(|t| e[t - lo] * v[(kvh * cap + t) * hd + d] as f64)
                .sum();
            out[h * hd + d] = (o / z) as f32;
        }
    }
    out
}

/// Causal softmax attention of `q: [nh, s, hd]` at positions `kv_len - s .. kv_len` over
/// positions `0..kv_len` of `k`, `v: [nkv, cap, hd]`, scale `hd^-0.5`, in f64: `[s, nh * hd]`.
fn prefill_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (nh, nkv, hd): (usize, usize, usize),
    s: usize,
    kv_len: usize,
    cap: usize,
) -> Vec<f32> {
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; s * nh * hd];
    for h in 0..nh {
        let kvh = h / (nh / nkv);
        for i in 0..s {
            let qh = &q[(h * s + i) * hd..][..hd];
            let seen = kv_len - s + i + 1;
            let sc: Vec<f64> = (0..seen)
                .map(|t| {
                    let kr = &k[(kvh * cap + t) * hd..][..hd];
                    qh.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let mut o = vec![0f64; hd];
            for (t, et) in e.iter().enumerate() {
                let vr = &v[(kvh * cap + t) * hd..][..hd];
                for (od, vd) in o.iter_mut().zip(vr) {
                    *od += et * *vd as f64;
                }
            }
            for (dst, od) in out[(i * nh + h) * hd..][..hd].iter_mut().zip(&o) {
                *dst = (od / z) as f32;
            }
        }
    }
    out
}

/// Milliseconds a call of prefill attention takes at Llama-3-8B shapes (32 heads, 8 key/value
/// heads, head_dim 128, 512 queries) after 0 and 4096 cached positions: the fused kernel and the
/// GEMM + softmax + GEMM path, each the median of 10 timed calls after 2 warm-ups.
fn prefill_timing(dev: &Device) -> Result<Vec<String>> {
    if !dev.is_cuda() {
        return Ok(Vec::new());
    }
    let (nh, nkv, hd, s) = (32usize, 8usize, 128usize, 512usize);
    let mut lines = Vec::new();
    for depth in [0usize, 4096] {
        let kv_len = depth + s;
        let q = Tensor::from_vec(pseudo_random(nh * s * hd, 5), (1, nh, s, hd), dev)?;
        let k = Tensor::from_vec(
            pseudo_random(nkv * kv_len * hd, 6),
            (1, nkv, kv_len, hd),
            dev,
        )?;
        let v = Tensor::from_vec(
            pseudo_random(nkv * kv_len * hd, 7),
            (1, nkv, kv_len, hd),
            dev,
        )?;
        // The additive causal mask `[s, kv_len]` of the general path (as `nn::causal_mask`).
        let mask: Vec<f32> = (0..s * kv_len)
            .map(|x| {
                if x % kv_len > depth + x / kv_len {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (s, kv_len), dev)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
            let mut ts = Vec::new();
            for i in 0..12 {
                dev.synchronize()?;
                let t0 = std::time::Instant::now();
                let o = f()?;
                dev.synchronize()?;
                drop(o);
                if i >= 2 {
                    ts.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            ts.sort_by(f64::total_cmp);
            Ok(ts[ts.len() / 2])
        };
        let fused = time(&|| {
            flash_attention(&q, &k, &v, scale as f32)?
                .ok_or_else(|| crate::Error::InvalidArgument("flash attention not taken".into()))
        })?;
        // The f16 cache the models keep on CUDA, with each of its two kernels.
        let f16 = candle_core::DType::F16;
        let (kh, vh) = (k.to_dtype(f16)?, v.to_dtype(f16)?);
        let f16_kernel = |pipelined: bool| {
            time(&|| {
                flash_attention_with(&q, &kh, &vh, scale as f32, pipelined)?.ok_or_else(|| {
                    crate::Error::InvalidArgument("flash attention not taken".into())
                })
            })
        };
        let (plain, piped) = (f16_kernel(false)?, f16_kernel(true)?);
        // The general CUDA path of `nn::scaled_dot_product_attention`: query heads grouped by
        // their kv head, GEMM, one scale + mask + softmax kernel, GEMM.
        let general = time(&|| {
            let qg = q.reshape((1, nkv, nh / nkv * s, hd))?;
            let att = qg.matmul(&k.t()?)?;
            let att = softmax_scaled_masked(&att, Some(&mask), s, scale as f32)?;
            Ok(att.matmul(&v)?.reshape((1, nh, s, hd))?)
        })?;
        let flops = 4.0 * (nh * hd) as f64 * (s * depth + s * (s + 1) / 2) as f64;
        lines.push(format!(
            "timing prefill attention h{nh} kv{nkv} d{hd} s{s} depth {depth}: fused {fused:.3} ms ({:.0} TFLOP/s), gemm+softmax+gemm {general:.3} ms; f16 cache: {plain:.3} ms ({:.0} TFLOP/s), cp.async pipelined {piped:.3} ms ({:.0} TFLOP/s)",
            flops / fused / 1e9,
            flops / plain / 1e9,
            flops / piped / 1e9
        ));
    }
    Ok(lines)
}

/// A mask for the sampling selftest, as a grammar's: every id below `vocab` but those `≡ 2 (mod
/// 5)` and `skip` (one of the ids tied at the top), or with `few` only 5 ids (the ids `≡ 1
/// (mod vocab / 5)`, as a grammar allowing a few tokens).
struct SelftestMask {
    vocab: usize,
    skip: usize,
    few: bool,
}

impl SelftestMask {
    fn allows(&self, i: usize) -> bool {
        if self.few {
            return i < self.vocab && i % (self.vocab / 5) == 1;
        }
        i < self.vocab && i % 5 != 2 && i != self.skip
    }

    fn words(&self) -> Vec<u32> {
        let ids = (0..self.vocab)
            .filter(|&i| self.allows(i))
            .map(|i| i as u32);
        crate::sampling::processors::mask_words_of(ids)
    }
}

impl crate::sampling::LogitsProcessor for SelftestMask {
    fn name(&self) -> &str {
        "selftest mask"
    }
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        let words = self.words();
        crate::sampling::processors::apply_mask_words(&words, logits);
    }
    fn mask_words(&mut self) -> Option<Vec<u32>> {
        Some(self.words())
    }
}

/// GPU sampling ([`sample_token`]) vs the CPU chain ([`crate::sampling::Sampler`]) with the
/// same uniform draws, over vocabularies of real sizes, logits with ties, NaN and infinities,
/// and the sampler's settings (greedy ones too, as the top-1 plan), each also under two masks
/// (as a grammar's, [`SelftestMask`]): every drawn id must be equal. Draws the kernel hands
/// back to the CPU (too many candidates) are counted, not compared, except under the mask of
/// few ids, where none may be. Each draw is made again from the same logits as a row of a
/// batch's `[2, vocab]` (as `serve` on CUDA samples), which must agree.
fn sample_selftest(dev: &Device, lines: &mut Vec<String>, ok: &mut bool) -> Result<()> {
    use crate::sampling::{Sampler, SamplingParams};
    let settings: [(f32, f32, usize, f32, f32); 9] = [
        // (temperature, top_p, top_k, min_p, repetition penalty)
        (0.7, 0.9, 40, 0.0, 1.0),
        (0.7, 0.9, 40, 0.05, 1.3),
        (1.0, 1.0, 0, 0.0, 1.0),
        (0.5, 1.0, 0, 0.0, 1.2),
        (0.8, 1.0, 10, 0.0, 1.0),
        (1.2, 0.95, 0, 0.0, 1.0),
        (0.6, 1.0, 0, 0.1, 1.1),
        // Greedy: the top-1 plan under a mask or a repetition penalty (plain greedy takes the
        // argmax path and is skipped).
        (0.0, 1.0, 0, 0.0, 1.0),
        (0.0, 1.0, 0, 0.0, 1.3),
    ];
    let params_of =
        |si: usize, &(temperature, top_p, top_k, min_p, pen): &(f32, f32, usize, f32, f32)| {
            SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                repetition_penalty: pen,
                repetition_context_size: 64,
                seed: Some(si as u64),
                ..SamplingParams::default()
            }
        };
    for &(vocab, spread) in &[
        (128256usize, 6.0f32),
        (32000, 12.0),
        (151936, 3.0),
        (1000, 4.0),
        // Not a multiple of 4: the batch's rows are padded, a row alone copied.
        (50257, 5.0),
    ] {
        let mut logits: Vec<f32> = pseudo_random(vocab, vocab as u64)
            .iter()
            .map(|x| x * spread)
            .collect();
        for i in (0..vocab).step_by(997) {
            logits[i] = f32::NAN;
        }
        for i in (5..vocab).step_by(1999) {
            logits[i] = f32::NEG_INFINITY;
        }
        // Ties at the top.
        logits[vocab / 3] = spread * 1.5;
        logits[vocab / 2] = spread * 1.5;
        logits[vocab - 1] = spread * 1.5;
        let history: Vec<u32> = (0..80).map(|i| (i * 7919 % vocab) as u32).collect();
        history
            .iter()
            .take(3)
            .for_each(|&i| logits[i as usize] = spread * 1.4);
        let lt = Tensor::from_vec(logits.clone(), vocab, dev)?;
        let skip = vocab / 3;
        // mask 0: none; 1: most ids; 2: five ids.
        let sampler = |si: usize, mask: usize| -> Result<Sampler> {
            let s = Sampler::new(params_of(si, &settings[si]))?;
            Ok(if mask > 0 {
                let few = mask == 2;
                s.with_processor(Box::new(SelftestMask { vocab, skip, few }))
            } else {
                s
            })
        };
        // A batch's rows drawn in one launch (`sample_tokens`) equal each row drawn alone
        // (every other setting under the mask).
        let mut plans = Vec::new();
        for si in 0..settings.len() {
            if let Some(plan) = sampler(si, si % 3)?.device_sampling(&history, vocab) {
                plans.push(plan);
            }
        }
        let scaled: Vec<Tensor> = (0..plans.len())
            .map(|r| (&lt * (1.0 + 0.1 * r as f64)).map_err(crate::Error::from))
            .collect::<Result<_>>()?;
        let batch = Tensor::stack(&scaled, 0)?;
        let draws: Vec<(&crate::sampling::DeviceSampling, f64)> = plans
            .iter()
            .enumerate()
            .map(|(r, p)| (p, (r as f64 + 0.37) / plans.len() as f64))
            .collect();
        let together = sample_tokens(&batch, &draws)?;
        let mut same = 0;
        for (r, &(p, u)) in draws.iter().enumerate() {
            same += usize::from(sample_token(&batch.get(r)?, p, u)? == together[r]);
        }
        let pass = same == draws.len();
        *ok &= pass;
        lines.push(format!(
            "{:<62} equal {same}/{} {}",
            format!("sample V={vocab} batch of {} rows", draws.len()),
            draws.len(),
            if pass { "PASS" } else { "FAIL" }
        ));
        // The same logits as row 1 of a batch's `[2, vocab]` (starting inside the buffer).
        let batch = Tensor::stack(&[&lt.neg()?, &lt], 0)?;
        let row = batch.narrow(0, 1, 1)?;
        for (si, mask) in (0..3 * settings.len()).map(|k| (k / 3, k % 3)) {
            let (temperature, top_p, top_k, min_p, pen) = settings[si];
            let mut cpu = sampler(si, mask)?;
            let Some(plan) = cpu.device_sampling(&history, vocab) else {
                continue;
            };
            let (mut equal, mut fallback, mut total) = (0, 0, 0);
            for j in 0..24 {
                let u = (j as f64 + 0.5) / 24.0 * 0.999;
                let want = cpu.sample_with_uniform(&logits, &history, u);
                total += 1;
                let got = sample_token(&lt, &plan, u)?;
                // A batch row must draw what the tensor alone draws.
                if sample_token(&row, &plan, u)? != got {
                    continue;
                }
                match got {
                    Some(id) if id == want => equal += 1,
                    Some(_) => {}
                    None => fallback += 1,
                }
            }
            let pass = equal + fallback == total && (mask < 2 || fallback == 0);
            *ok &= pass;
            lines.push(format!(
                "{:<62} equal {equal}/{total} (cpu fallback {fallback}) {}",
                format!(
                    "sample V={vocab} t{temperature} p{top_p} k{top_k} minp{min_p} rep{pen}{}",
                    ["", " mask", " mask5"][mask]
                ),
                if pass { "PASS" } else { "FAIL" }
            ));
        }
    }
    Ok(())
}

/// The device address of a contiguous f32 or f16 CUDA tensor's first element (a KV cache
/// buffer for [`CudaDecoder::step`]).
///
/// Errors: [`crate::Error::InvalidArgument`] for a tensor off CUDA, of another dtype or not
/// contiguous.
pub fn kv_address(t: &Tensor) -> Result<u64> {
    if t.dtype() == candle_core::DType::F32 {
        return device_address(t);
    }
    let (s, l) = t.storage_and_layout();
    let (candle_core::Storage::Cuda(s), candle_core::DType::F16, true) =
        (&*s, t.dtype(), l.is_contiguous())
    else {
        return Err(crate::Error::InvalidArgument(format!(
            "a KV buffer must be contiguous f32 or f16 on CUDA, got {:?}",
            t.dtype()
        )));
    };
    let Device::Cuda(d) = t.device() else {
        return Err(crate::Error::InvalidArgument(
            "tensor is not on CUDA".into(),
        ));
    };
    let v = s.as_cuda_slice::<half::f16>()?.slice(l.start_offset()..);
    let stream = d.cuda_stream();
    let ptr = v.device_ptr(&stream).0;
    Ok(ptr)
}

/// The device address of a contiguous f32 CUDA tensor's first element.
///
/// Errors: [`crate::Error::InvalidArgument`] for a tensor off CUDA, not f32 or not contiguous.
pub fn device_address(t: &Tensor) -> Result<u64> {
    let Device::Cuda(d) = t.device() else {
        return Err(crate::Error::InvalidArgument(
            "tensor is not on CUDA".into(),
        ));
    };
    decoder::tensor_ptr(t, &d.cuda_stream())
}

fn cuda_of(t: &Tensor) -> Result<&candle_core::cuda_backend::CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d),
        _ => Err(crate::Error::InvalidArgument(
            "tensor is not on CUDA".into(),
        )),
    }
}

/// A launch of one thread per value for `n` values, in blocks of 256 threads.
fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// SwiGLU on a stacked gate/up product (prefill): `y: [.., 2 n]` f32 (gate values, then up) ->
/// `[.., n]` f32, `silu(gate) * up` (Shazeer 2020), in one kernel.
///
/// Errors: [`crate::Error::InvalidArgument`] for a tensor off CUDA, not f32, or whose last
/// dimension is not `2 n`.
pub fn swiglu_stacked(y: &Tensor, n: usize) -> Result<Tensor> {
    let dev = cuda_of(y)?;
    let mut dims = y.dims().to_vec();
    if dims.last() != Some(&(2 * n)) || y.dtype() != candle_core::DType::F32 {
        return Err(crate::Error::InvalidArgument(format!(
            "SwiGLU of {:?} {:?} with {n} outputs",
            y.dims(),
            y.dtype()
        )));
    }
    let y = y.contiguous()?;
    let m = y.elem_count() / (2 * n).max(1);
    let out = unsafe { dev.alloc::<f32>(m * n) }?;
    {
        let stream = dev.cuda_stream();
        let yp = device_address(&y)?;
        let (op, _sync) = out.device_ptr(&stream);
        let f = kernel(dev, &QMATRIX, "swiglu_stacked")?;
        let (mi, ni) = (m as i32, n as i32);
        let mut b = f.builder();
        b.arg(&yp);
        b.arg(&op);
        b.arg(&mi);
        b.arg(&ni);
        unsafe { b.launch(grid_1d(m * n)) }.w()?;
    }
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok(qmatrix::into_tensor(out, dev, dims))
}

/// `softmax(att * scale + mask)` over the last dimension, in one kernel (prefill attention):
/// `att: [.., rows_per_mask_cycle, cols]` f32, row `r` takes mask row `r % q_len` of `mask:
/// [q_len, cols]` (additive, `-inf` where masked) or no mask. Returns a new tensor of `att`'s
/// shape.
///
/// Errors: [`crate::Error::InvalidArgument`] for tensors off CUDA or not f32, or a mask of
/// another width.
pub fn softmax_scaled_masked(
    att: &Tensor,
    mask: Option<&Tensor>,
    q_len: usize,
    scale: f32,
) -> Result<Tensor> {
    let dev = cuda_of(att)?;
    let cols = att.dims().last().copied().unwrap_or(0);
    // A fresh copy that the kernel rewrites in place.
    let out = att
        .to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .copy()?;
    let mask = match mask {
        Some(m) => {
            if m.dims() != [q_len, cols] {
                return Err(crate::Error::InvalidArgument(format!(
                    "attention mask {:?} for {q_len} queries and {cols} keys",
                    m.dims()
                )));
            }
            Some(m.to_dtype(candle_core::DType::F32)?.contiguous()?)
        }
        None => None,
    };
    let rows = out.elem_count() / cols.max(1);
    {
        let op = device_address(&out)?;
        let mp = match &mask {
            Some(m) => device_address(m)?,
            None => 0u64,
        };
        let f = kernel(dev, &QMATRIX, "softmax_scaled_masked")?;
        let (ci, qi) = (cols as i32, q_len.max(1) as i32);
        let mut b = f.builder();
        b.arg(&op);
        b.arg(&mp);
        b.arg(&ci);
        b.arg(&qi);
        b.arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(out)
}

/// Whether prefill attention runs as one fused kernel ([`flash_attention`]); `POCKETLM_FLASH_ATTN=0`
/// keeps the GEMM + softmax + GEMM path.
fn flash_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !crate::switches::switched_off("POCKETLM_FLASH_ATTN"))
}

/// Whether the fused prefill attention over an f16 cache streams its key/value tiles by
/// cp.async a step ahead (`flash_prefill_*_f16p`); `POCKETLM_FLASH_PIPE=0` loads each tile
/// through registers before using it, as the f32 kernels do.
fn flash_pipelined() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !crate::switches::switched_off("POCKETLM_FLASH_PIPE"))
}

/// The device address of element `layout.start_offset()` of a CUDA f32 or f16 tensor's storage.
fn raw_address(t: &Tensor) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    let (candle_core::Storage::Cuda(s), Device::Cuda(d)) = (&*s, t.device()) else {
        return Err(crate::Error::InvalidArgument(
            "tensor is not on CUDA".into(),
        ));
    };
    let stream = d.cuda_stream();
    Ok(match t.dtype() {
        candle_core::DType::F32 => {
            let v = s.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
            let ptr = v.device_ptr(&stream).0;
            ptr
        }
        candle_core::DType::F16 => {
            let v = s.as_cuda_slice::<half::f16>()?.slice(l.start_offset()..);
            let ptr = v.device_ptr(&stream).0;
            ptr
        }
        other => {
            return Err(crate::Error::InvalidArgument(format!(
                "a CUDA f32 or f16 tensor, got {other:?}"
            )))
        }
    })
}

/// Causal attention of one sequence in one fused kernel (`flash_prefill_*` in qmatrix.cu:
/// tensor-core tiles, online softmax, no score matrix in memory): `q: [1, heads, s, d]` f32 at
/// positions `kv_len - s .. kv_len` over `k`, `v: [1, kv_heads, kv_len, d]` (f32 or f16, rows
/// contiguous, heads any stride apart, the same for both) -> `[1, s, heads * d]` f32. Q, K, V and
/// the probabilities enter the products as f16 (f32 accumulation), as in llama.cpp's CUDA flash
/// attention.
///
/// Returns `None` where the kernel does not apply (off CUDA, batch > 1, head_dim not 64 or 128,
/// other dtypes or layouts, `POCKETLM_FLASH_ATTN=0`); the caller then takes the general path.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    flash_attention_with(q, k, v, scale, flash_pipelined())
}

/// [`flash_attention`] with the f16 kernel chosen by `pipelined` (see [`flash_pipelined`]).
fn flash_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    pipelined: bool,
) -> Result<Option<Tensor>> {
    use candle_core::DType;
    let Device::Cuda(dev) = q.device() else {
        return Ok(None);
    };
    let (Ok((b, heads, s, d)), Ok((kb, n_kv, kv_len, kd))) = (q.dims4(), k.dims4()) else {
        return Ok(None);
    };
    let (ks, vs) = (k.stride(), v.stride());
    let kv_ok = |t: &Tensor| {
        t.dtype() == k.dtype()
            && matches!(t.dtype(), DType::F32 | DType::F16)
            && t.device().is_cuda()
            && t.stride()[3] == 1
            && t.stride()[2] == d
    };
    if !flash_enabled()
        || b != 1
        || kb != 1
        || kd != d
        || !matches!(d, 64 | 128)
        || q.dtype() != DType::F32
        || v.dims() != k.dims()
        || n_kv == 0
        || heads % n_kv != 0
        || kv_len < s
        || s == 0
        || !kv_ok(k)
        || !kv_ok(v)
        || ks[1] != vs[1]
    {
        return Ok(None);
    }
    let hs = if n_kv > 1 { ks[1] as i64 } else { 0i64 };
    let shape = FlashShape {
        s,
        heads,
        n_kv,
        kv_len,
        d,
    };
    let kv = (raw_address(k)?, raw_address(v)?, k.dtype());
    launch_flash(dev, q, kv, (hs, 0), &shape, scale, pipelined).map(Some)
}

/// The sizes of a [`flash_attention`] launch: `s` queries of `heads` heads over `kv_len`
/// positions of `n_kv` key/value heads, head dimension `d`.
struct FlashShape {
    s: usize,
    heads: usize,
    n_kv: usize,
    kv_len: usize,
    d: usize,
}

/// Launches `flash_prefill_*` for `q: [1, heads, s, d]` f32 over keys and values at the device
/// addresses `kv` (f32 or f16 as its dtype says), their heads `kv_head_stride` values apart or,
/// with `table` (the device address of `i32` block ids; else 0), in a pool layer's blocks
/// `[n_blocks, n_kv, 16, d]`: `[1, s, heads * d]` f32.
fn launch_flash(
    dev: &candle_core::cuda_backend::CudaDevice,
    q: &Tensor,
    kv: (u64, u64, candle_core::DType),
    (kv_head_stride, table): (i64, u64),
    sh: &FlashShape,
    scale: f32,
    pipelined: bool,
) -> Result<Tensor> {
    use candle_core::DType;
    let FlashShape {
        s,
        heads,
        n_kv,
        kv_len,
        d,
    } = *sh;
    let q = q.contiguous()?;
    let out = unsafe { dev.alloc::<f32>(s * heads * d) }?;
    {
        let stream = dev.cuda_stream();
        let qp = device_address(&q)?;
        let (kp, vp, dtype) = kv;
        let (op, _sync) = out.device_ptr(&stream);
        let kt = match dtype {
            DType::F16 if pipelined => "f16p",
            DType::F16 => "f16",
            _ => "f32",
        };
        let f = kernel(dev, &QMATRIX, &format!("flash_prefill_d{d}_{kt}"))?;
        let (si, hi, kvi, li) = (s as i32, heads as i32, n_kv as i32, kv_len as i32);
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let mut bld = f.builder();
        bld.arg(&qp);
        bld.arg(&kp);
        bld.arg(&vp);
        bld.arg(&op);
        bld.arg(&si);
        bld.arg(&hi);
        bld.arg(&kvi);
        bld.arg(&li);
        bld.arg(&kv_head_stride);
        bld.arg(&table);
        bld.arg(&scale_log2);
        let rows = s * (heads / n_kv);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(64) as u32, n_kv as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok(qmatrix::into_tensor(out, dev, vec![1, s, heads * d]))
}

/// Whether [`flash_attention_paged`] takes queries `q` (`[1, heads, s, head_dim]` f32 on CUDA,
/// head_dim 64 or 128, `POCKETLM_FLASH_ATTN` not `0`): what to ask before appending to a paged
/// cache.
pub fn flash_paged_applies(q: &Tensor) -> bool {
    matches!(q.dims(), &[1, _, s, 64 | 128] if s > 0)
        && q.dtype() == candle_core::DType::F32
        && q.device().is_cuda()
        && flash_enabled()
}

/// [`flash_attention`] over a paged KV cache read in place: `k_blocks`, `v_blocks` are a pool
/// layer's blocks `[n_blocks, kv_heads, 16, head_dim]` (f16 or f32, contiguous) and `table`
/// the sequence's block ids (`table[t / 16]` holds position `t`), `kv_len` positions; the
/// queries are the last `s` of them. No gathered copy of the keys and values is made (vLLM's
/// PagedAttention). Only the table (4 bytes a block) is copied to the device.
///
/// Errors: [`crate::Error::InvalidArgument`] where the kernel does not apply (see
/// [`flash_paged_applies`]; blocks of another shape or dtype, a table too short for
/// `kv_len`, fewer positions than queries); the driver's errors.
pub fn flash_attention_paged(
    q: &Tensor,
    k_blocks: &Tensor,
    v_blocks: &Tensor,
    table: &[u32],
    kv_len: usize,
    scale: f32,
) -> Result<Tensor> {
    use candle_core::DType;
    let bad = |what: &str| {
        Err(crate::Error::InvalidArgument(format!(
            "paged flash attention: {what} (q {:?}, blocks {:?} {:?}, {} block ids, {kv_len} positions)",
            q.dims(),
            k_blocks.dims(),
            k_blocks.dtype(),
            table.len()
        )))
    };
    let Device::Cuda(dev) = q.device() else {
        return bad("not on CUDA");
    };
    if !flash_paged_applies(q) {
        return bad("queries the kernel does not take");
    }
    let (_, heads, s, d) = q.dims4()?;
    let Ok((_, n_kv, block, kd)) = k_blocks.dims4() else {
        return bad("blocks are not 4-dimensional");
    };
    if block != crate::kv_pool::BLOCK
        || kd != d
        || v_blocks.dims() != k_blocks.dims()
        || v_blocks.dtype() != k_blocks.dtype()
        || !matches!(k_blocks.dtype(), DType::F32 | DType::F16)
        || !k_blocks.is_contiguous()
        || !v_blocks.is_contiguous()
        || n_kv == 0
        || heads % n_kv != 0
    {
        return bad("blocks of another shape or dtype");
    }
    if kv_len < s || table.len() < kv_len.div_ceil(block) {
        return bad("too few positions or block ids");
    }
    let ids: Vec<i32> = table.iter().map(|&b| b as i32).collect();
    let stream = dev.cuda_stream();
    let ids = stream.clone_htod(&ids).w()?;
    let tp = ids.device_ptr(&stream).0;
    let shape = FlashShape {
        s,
        heads,
        n_kv,
        kv_len,
        d,
    };
    let kv = (
        raw_address(k_blocks)?,
        raw_address(v_blocks)?,
        k_blocks.dtype(),
    );
    launch_flash(dev, q, kv, (0, tp), &shape, scale, flash_pipelined())
}
