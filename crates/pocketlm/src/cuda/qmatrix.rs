//! Block-quantized weight matrices on a CUDA device, one layout for GGUF `Q4_0`, `Q4_1`, `Q8_0`
//! and MLX affine 4- and 8-bit weights (layout and formulas in `src/cuda/qmatrix.cu`): integer
//! (dp4a) GEMV against activations quantized to 8 bits per 32 values for decode, an int8
//! tensor-core GEMM for small batches (batched decode, up to 64 rows), and dequantization to f16
//! + a cuBLAS GEMM for prefill.

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Storage, Tensor};

use super::launch::Launch;
use super::modules::{kernel, QMATRIX};
use crate::quant::mlx_affine::{AffineQuantized, GroupParams};
use crate::{Error, Result};

/// Input rows up to which [`CudaQMatrix::forward`] runs the GEMV kernel; above, it dequantizes
/// to f16 and runs a cuBLAS GEMM.
pub const GEMV_MAX_ROWS: usize = 8;
/// Most activation rows the small-batch GEMM takes (`qmmq_*` in qmatrix.cu: up to 8 tiles of 8
/// rows); [`CudaQMatrix::forward`] runs it for 2 to this many rows.
pub const MMQ_MAX_ROWS: usize = 64;
/// Most warps per thread block in the GEMV kernel (`GEMV_MAX_WARPS` in qmatrix.cu).
const GEMV_MAX_WARPS: usize = 16;

/// Weight rows per thread block (1, 2, 4 or 8; at least 2 for SwiGLU, whose block pairs gate
/// and up rows) and warps per block (splitting the columns) of the GEMV launch. The default, 2
/// rows and 2 warps, was the fastest of 8 shapes for decode on the H100 (8B-shaped Q4_0: 347
/// tokens/s against 296-336 for 1-8 rows x 1-2 warps and 226-320 for 4-16 warps; Q8_0 the
/// same order). `POCKETLM_GEMV=R,W` overrides it (W = 0: one warp per 1024 columns, at most
/// 16), and `POCKETLM_GEMV_WIDE=R,W` for matrices of more than 8192 columns (a down
/// projection), for tuning.
fn gemv_shape(epi: Epilogue, cols: usize) -> (usize, usize) {
    type Shape = Option<(usize, usize)>;
    static OVERRIDE: std::sync::OnceLock<[Shape; 2]> = std::sync::OnceLock::new();
    let parse = |var: &str| -> Shape {
        let v = std::env::var(var).ok()?;
        let (r, w) = v.split_once(',')?;
        Some((r.trim().parse().ok()?, w.trim().parse().ok()?))
    };
    let [narrow, wide] =
        *OVERRIDE.get_or_init(|| [parse("POCKETLM_GEMV"), parse("POCKETLM_GEMV_WIDE")]);
    let over = if cols > 8192 { wide.or(narrow) } else { narrow };
    let auto_warps = cols.div_ceil(1024).clamp(1, GEMV_MAX_WARPS);
    let (r, w) = match over {
        Some((r, w)) if matches!(r, 1 | 2 | 4 | 8) => (r, if w == 0 { auto_warps } else { w }),
        _ => (2, 2),
    };
    let r = if epi.gated() { r.max(2) } else { r };
    (r, w.clamp(1, GEMV_MAX_WARPS))
}

/// Warps of a `qmmq_*` block (`MMQ_WARPS` in qmatrix.cu), its weight rows (`MMQ_ROWS`: the
/// outputs of one block, half as many for the gated epilogues) and the 32-value blocks of a
/// chunk it stages (`MMQ_KC`).
const MMQ_WARPS: u32 = 4;
const MMQ_TILE_OUT: usize = 64;
const MMQ_KC: usize = 4;

/// Column splits of a small-batch GEMM launch of `tiles` row tiles over `nblocks` 32-value
/// blocks a row, for `nt` tiles of 8 activation rows: each split keeps at least two chunks, at
/// most 16. Up to 8 activation rows (`nt == 1`) as many as that allows: such a block computes
/// little per byte it loads, and more blocks in flight read the weights faster (H100, 8B
/// Q4_0, 8 sequences: 1,716 aggregate tokens/s with 16 splits everywhere against 1,418 with
/// the rule below; at 32 sequences 16 splits were 2% slower). Beyond, enough blocks for 4 per
/// multiprocessor. `POCKETLM_MMQ_SPLITS=N` sets it (for tuning; 1: no split).
fn mmq_splits(tiles: usize, nblocks: usize, sms: usize, nt: usize) -> usize {
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let over = *OVERRIDE.get_or_init(|| {
        std::env::var("POCKETLM_MMQ_SPLITS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    });
    let most = (nblocks / (2 * MMQ_KC)).clamp(1, 16);
    over.unwrap_or_else(|| {
        if nt == 1 {
            most
        } else {
            (4 * sms).div_ceil(tiles.max(1))
        }
    })
    .clamp(1, most)
}

/// The small-batch GEMM's way of adding its column splits: 0 not read yet, 1 atomically in
/// the order they finish (the default), 2 in split order ([`serial_splits`]).
static SPLIT_MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the small-batch GEMM adds its column splits in split order, one after the other
/// (serial split-K, as CUTLASS's: a launch gives the same bits every run, so a GPU decode is
/// reproducible), instead of atomically in the order they finish: `POCKETLM_MMQ_DETERMINISTIC=1`
/// (read once). Off by default: on an H100 (2026-12-06, 8B-shaped Q4_0, two calls) it cost
/// pp16 22-27%, pp64 28-29%, tg128 x8 45% and x32 31-33% of the tokens/s (the splits of a row
/// tile wait for each other: up to 16 in a chain), one sequence's decode nothing (the GEMV).
pub(crate) fn serial_splits() -> bool {
    use std::sync::atomic::Ordering;
    match SPLIT_MODE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("POCKETLM_MMQ_DETERMINISTIC").is_ok_and(|v| v == "1");
            SPLIT_MODE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        m => m == 2,
    }
}

/// Sets [`serial_splits`] for the launches from now on (the self-test checks both ways);
/// returns the previous setting. CUDA graphs captured before keep the way they captured.
pub(crate) fn set_serial_splits(on: bool) -> bool {
    let was = serial_splits();
    SPLIT_MODE.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
    was
}

/// Tiles of 8 activation rows a `qmmq_*` kernel takes for `m` rows (the kernels are built for
/// 1, 2, 4 and 8).
fn mmq_tiles(m: usize) -> usize {
    match m.div_ceil(8) {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// The device's multiprocessor count (132 on an H100 SXM), read once per process.
fn multiprocessors(dev: &CudaDevice) -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        dev.cuda_stream()
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(132, |n| n.max(1) as usize)
    })
}

/// What the GEMV kernel does with each output value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `y = W x`.
    Write,
    /// `y += W x` (a residual connection).
    Add,
    /// The matrix stacks gate rows then up rows (`2 n` rows): `y[r] = silu(gate_r · x) *
    /// (up_r · x)` for `r < n` (SwiGLU, Shazeer 2020).
    SwiGlu,
    /// As `SwiGlu` with GELU (tanh approximation) in place of SiLU: GeGLU (Gemma).
    GeGlu,
}

impl Epilogue {
    /// Whether the matrix stacks gate and up rows (SwiGLU, GeGLU): half as many outputs.
    pub fn gated(self) -> bool {
        matches!(self, Self::SwiGlu | Self::GeGlu)
    }

    /// The letter of the product kernels' names for this epilogue (`qgemv_w2_*`, `qmmq_s4_*`).
    fn letter(self) -> char {
        match self {
            Self::Write => 'w',
            Self::Add => 'a',
            Self::SwiGlu => 's',
            Self::GeGlu => 'g',
        }
    }
}

/// Device addresses and shapes for [`CudaQMatrix::launch_gemv_rope`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopeArgs {
    /// RoPE tables `[positions, head_dim / 2]` f32.
    pub cos: u64,
    /// See `cos`.
    pub sin: u64,
    /// The decode step's `[position, attended length, cache capacity, 0]` i32.
    pub params: u64,
    /// Per layer the key and value buffer addresses (u64 pairs).
    pub kv: u64,
    /// This layer's index into `kv`.
    pub layer: i32,
    /// Rotated queries `[n_heads, head_dim]` f32.
    pub q_out: u64,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Adjacent pairs (GGUF Llama) rather than halves.
    pub interleaved: bool,
    /// The cache buffers hold f16 (else f32).
    pub kv_half: bool,
    /// The projection's bias `[(n_heads + 2 n_kv_heads) head_dim]` f32, or 0 for none.
    pub bias: u64,
    /// Per-head RMSNorm weights `[head_dim]` f32 of the queries and of the keys, applied
    /// before RoPE (0: none), with epsilon `norm_eps`.
    pub q_norm: u64,
    /// See `q_norm`.
    pub k_norm: u64,
    /// See `q_norm`.
    pub norm_eps: f32,
    /// With a q or k norm, or a batch: room for the projection's `(n_heads + 2 n_kv_heads)
    /// head_dim` f32 outputs of each sequence, finished by a second kernel.
    pub scratch: u64,
    /// Sequences of the step (1: the one-token step); each has its own row of the activations,
    /// of `q_out` and of `scratch`, its own `params` (4 i32) and its own run of `kv_stride`
    /// u64 in `kv`.
    pub batch: usize,
    /// See `batch`.
    pub kv_stride: usize,
}

/// A quantized matrix `[rows, cols]` on a CUDA device (`cols` a multiple of 32).
#[derive(Debug)]
pub struct CudaQMatrix {
    codes: CudaSlice<u8>,
    scales: CudaSlice<u8>,
    biases: Option<CudaSlice<u8>>,
    /// Raw device addresses of the three buffers (0 for no biases), for kernel arguments.
    ptrs: [u64; 3],
    /// Kernel name suffix (`q4_0`, `a4_f16`, ...).
    kernel: &'static str,
    rows: usize,
    cols: usize,
    group: usize,
    dev: CudaDevice,
    /// A counter per row tile of the small-batch GEMM (0 between launches): the order in
    /// which its column splits add their sums under [`serial_splits`] (`turn` of `qmmq_*`).
    turns: CudaSlice<u32>,
}

/// Host-side repacked parts: codes, scales and biases as raw bytes, kernel suffix, group size.
struct Packed {
    codes: Vec<u8>,
    scales: Vec<u8>,
    biases: Option<Vec<u8>>,
    kernel: &'static str,
    group: usize,
}

/// A tensor of shape `dims` over a device buffer that our kernel filled.
pub(crate) fn into_tensor<T: candle_core::cuda_backend::CudaDType>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    dims: impl Into<candle_core::Shape>,
) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        dims,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

fn cuda_dev(dev: &Device) -> Result<&CudaDevice> {
    match dev {
        Device::Cuda(d) => Ok(d),
        other => Err(Error::InvalidArgument(format!(
            "a CUDA matrix needs a CUDA device, got {other:?}"
        ))),
    }
}

fn params_bytes(p: &GroupParams) -> (Vec<u8>, &'static str) {
    let suffix = match p {
        GroupParams::F32(_) => "f32",
        GroupParams::F16(_) => "f16",
        GroupParams::BF16(_) => "bf16",
    };
    (p.as_bytes().to_vec(), suffix)
}

impl CudaQMatrix {
    /// Whether [`Self::from_gguf`] takes weights of this GGUF type.
    pub fn supports_gguf(dtype: GgmlDType, cols: usize) -> bool {
        matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
            && cols.is_multiple_of(32)
    }

    /// Whether [`Self::from_mlx`] takes this MLX matrix (bits 4 or 8, group a multiple of 32).
    pub fn supports_mlx(q: &AffineQuantized) -> bool {
        matches!(q.bits(), 4 | 8)
            && q.group_size().is_multiple_of(32)
            && q.cols().is_multiple_of(32)
    }

    /// Uploads GGUF blocks (`bytes`, ggml's layout for `dtype`, `rows * cols` values).
    ///
    /// Errors: [`Error::InvalidArgument`] for another type, `cols` not a multiple of 32, a byte
    /// length that does not match, or a device that is not CUDA.
    pub fn from_gguf(
        dtype: GgmlDType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        dev: &Device,
    ) -> Result<Self> {
        if !Self::supports_gguf(dtype, cols) {
            return Err(Error::InvalidArgument(format!(
                "no CUDA kernel for GGUF {dtype:?} with {cols} columns"
            )));
        }
        let (block, head) = match dtype {
            GgmlDType::Q4_0 => (18, 2),
            GgmlDType::Q4_1 => (20, 4),
            _ => (34, 2),
        };
        let nblocks = rows * cols / 32;
        if bytes.len() != nblocks * block {
            return Err(Error::InvalidArgument(format!(
                "GGUF {dtype:?} [{rows}x{cols}] takes {} bytes, got {}",
                nblocks * block,
                bytes.len()
            )));
        }
        let mut codes = Vec::with_capacity(nblocks * (block - head));
        let mut scales = Vec::with_capacity(nblocks * 2);
        let mut biases = Vec::new();
        for b in bytes.chunks_exact(block) {
            scales.extend_from_slice(&b[0..2]);
            if dtype == GgmlDType::Q4_1 {
                biases.extend_from_slice(&b[2..4]);
            }
            codes.extend_from_slice(&b[head..]);
        }
        let packed = match dtype {
            GgmlDType::Q4_0 => Packed {
                codes,
                scales,
                biases: None,
                kernel: "q4_0",
                group: 32,
            },
            // Q4_1: w = d * q + m, the affine form with f16 parameters per 32 values.
            GgmlDType::Q4_1 => Packed {
                codes,
                scales,
                biases: Some(biases),
                kernel: "a4_f16",
                group: 32,
            },
            _ => Packed {
                codes,
                scales,
                biases: None,
                kernel: "q8_0",
                group: 32,
            },
        };
        Self::upload(packed, rows, cols, dev)
    }

    /// Uploads an MLX affine matrix (bits 4 or 8), 4-bit codes repacked into ggml's nibble order.
    ///
    /// Errors: [`Error::InvalidArgument`] when [`Self::supports_mlx`] is false or the device is
    /// not CUDA.
    pub fn from_mlx(q: &AffineQuantized, dev: &Device) -> Result<Self> {
        if !Self::supports_mlx(q) {
            return Err(Error::InvalidArgument(format!(
                "no CUDA kernel for MLX {}-bit group {} [{}x{}]",
                q.bits(),
                q.group_size(),
                q.rows(),
                q.cols()
            )));
        }
        let words = q.weight();
        let codes: Vec<u8> = if q.bits() == 8 {
            words.iter().flat_map(|w| w.to_le_bytes()).collect()
        } else {
            // Per 32 values (4 words, 8 codes each, low bits first): byte j = code j | code j+16 << 4.
            let mut out = Vec::with_capacity(words.len() * 4);
            for blk in words.chunks_exact(4) {
                let code = |j: usize| ((blk[j / 8] >> (4 * (j % 8))) & 15) as u8;
                out.extend((0..16).map(|j| code(j) | (code(j + 16) << 4)));
            }
            out
        };
        let (scales, suffix) = params_bytes(q.scales());
        let (biases, _) = params_bytes(q.biases());
        let kernel = match (q.bits(), suffix) {
            (4, "f16") => "a4_f16",
            (4, "bf16") => "a4_bf16",
            (4, _) => "a4_f32",
            (_, "f16") => "a8_f16",
            (_, "bf16") => "a8_bf16",
            _ => "a8_f32",
        };
        let packed = Packed {
            codes,
            scales,
            biases: Some(biases),
            kernel,
            group: q.group_size(),
        };
        Self::upload(packed, q.rows(), q.cols(), dev)
    }

    fn upload(p: Packed, rows: usize, cols: usize, dev: &Device) -> Result<Self> {
        let d = cuda_dev(dev)?.clone();
        let stream = d.cuda_stream();
        let codes = stream.clone_htod(&p.codes).w()?;
        let scales = stream.clone_htod(&p.scales).w()?;
        let biases = match &p.biases {
            Some(b) => Some(stream.clone_htod(b).w()?),
            None => None,
        };
        let ptr = |s: &CudaSlice<u8>| s.device_ptr(&stream).0;
        let ptrs = [
            ptr(&codes),
            ptr(&scales),
            biases.as_ref().map(ptr).unwrap_or(0),
        ];
        // Row tiles of the widest launch: MMQ_TILE_OUT / 2 outputs (gated), else MMQ_TILE_OUT.
        let turns = stream
            .alloc_zeros::<u32>(rows.div_ceil(MMQ_TILE_OUT / 2).max(1))
            .w()?;
        Ok(Self {
            turns,
            codes,
            scales,
            biases,
            ptrs,
            kernel: p.kernel,
            rows,
            cols,
            group: p.group,
            dev: d,
        })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The device addresses of the codes, scales and biases (0 for none).
    pub(crate) fn raw_ptrs(&self) -> [u64; 3] {
        self.ptrs
    }

    /// The kernels' name suffix of this matrix's format (`q4_0`, `a4_f16`, ...).
    pub(crate) fn kernel_name(&self) -> &'static str {
        self.kernel
    }

    /// Values per scale (32 for GGUF blocks, the MLX group size).
    pub(crate) fn group(&self) -> usize {
        self.group
    }

    /// Bytes held on the device.
    pub fn nbytes(&self) -> usize {
        self.codes.len() + self.scales.len() + self.biases.as_ref().map_or(0, |b| b.len())
    }

    /// Launches the GEMV on raw device buffers: for `m` activation rows (`xq: [m, cols]` i8,
    /// `xd: [m, cols / 32]` (d, d·Σq) f32 pairs), writes or adds `y: [m, out]` f32, `out =
    /// rows` (or `rows / 2` for the gated epilogues). Safe to capture in a CUDA graph.
    pub(crate) fn launch_gemv(
        &self,
        epi: Epilogue,
        xq: u64,
        xd: u64,
        y: u64,
        m: usize,
    ) -> Result<()> {
        let (rows_per_block, warps) = gemv_shape(epi, self.cols);
        let out = self.outputs(epi);
        let blocks = out.div_ceil(if epi.gated() {
            rows_per_block / 2
        } else {
            rows_per_block
        });
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, m as u32, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("qgemv_{}{rows_per_block}_{}", epi.letter(), self.kernel);
        self.launch_product(&name, cfg, [xq, xd, y], out, None)
    }

    /// Outputs of a product with epilogue `epi`: the rows, half of them for the gated ones.
    fn outputs(&self, epi: Epilogue) -> usize {
        if epi.gated() {
            self.rows / 2
        } else {
            self.rows
        }
    }

    /// Launches the product kernel `name` (a `qgemv_*` or `qmmq_*` of this matrix's format)
    /// with the parameters both take, in order: the matrix's codes, scales and biases, `xq`,
    /// `xd`, `y`, `out` outputs, the columns and the group size; then `m` activation rows for
    /// the GEMM.
    ///
    /// Errors: the driver's (loading the kernel, launching it).
    fn launch_product(
        &self,
        name: &str,
        cfg: LaunchConfig,
        [xq, xd, y]: [u64; 3],
        out: usize,
        m: Option<usize>,
    ) -> Result<()> {
        let func = kernel(&self.dev, &QMATRIX, name)?;
        let (ri, ci, gi) = (out as i32, self.cols as i32, self.group as i32);
        let mut b = Launch::new(&func);
        b.arg(self.ptrs[0]).arg(self.ptrs[1]).arg(self.ptrs[2]);
        b.arg(xq).arg(xd).arg(y).arg(ri).arg(ci).arg(gi);
        if let Some(m) = m {
            let turn = if serial_splits() {
                self.turns.device_ptr(&self.dev.cuda_stream()).0
            } else {
                0
            };
            b.arg(m as i32).arg(turn);
        }
        // SAFETY: qgemv_*'s and qmmq_*'s parameters, in order (the caller names a kernel of
        // this matrix's format); the matrix and the caller's buffers.
        unsafe { b.launch(&self.dev.cuda_stream(), cfg) }
    }

    /// Launches the small-batch GEMM on the tensor cores (`qmmq_*` in qmatrix.cu) on raw device
    /// buffers: for `m` activation rows (`1 <= m <=` [`MMQ_MAX_ROWS`]; `xq: [m, cols]` i8, `xd:
    /// [m, cols / 32]` (d, d·Σq) f32 pairs), writes or adds `y: [m, out]` f32, `out = rows` (or
    /// `rows / 2` for the gated epilogues), reading each weight block once for all `m` rows.
    /// Matrices with few row tiles split their columns over more blocks, whose results are
    /// added atomically (for [`Epilogue::Write`], into `y` zeroed first), so the sums of such a
    /// launch may differ from run to run in the last bits; with [`serial_splits`] in split
    /// order instead (the same bits every run, slower), which needs the launches of one matrix
    /// not to overlap (they share its split counters): one stream, as candle's device has.
    /// Safe to capture in a CUDA graph.
    ///
    /// Errors: [`Error::InvalidArgument`] for `m` out of range; the driver's launch errors.
    pub(crate) fn launch_mmq(
        &self,
        epi: Epilogue,
        xq: u64,
        xd: u64,
        y: u64,
        m: usize,
    ) -> Result<()> {
        let splits = if epi.gated() {
            1
        } else {
            let sms = multiprocessors(&self.dev);
            mmq_splits(self.mmq_row_tiles(epi), self.cols / 32, sms, mmq_tiles(m))
        };
        self.launch_mmq_split(epi, [xq, xd, y], m, splits)
    }

    /// Blocks of a `qmmq_*` launch along the outputs: `MMQ_TILE_OUT` outputs a block, half as
    /// many for the gated epilogues.
    fn mmq_row_tiles(&self, epi: Epilogue) -> usize {
        let per = if epi.gated() {
            MMQ_TILE_OUT / 2
        } else {
            MMQ_TILE_OUT
        };
        self.outputs(epi).div_ceil(per)
    }

    /// Column splits for a gated product of `m` activation rows taken unfused
    /// ([`Self::launch_gated_split`]), or 1 to take the fused gated epilogue: 1 for one row
    /// (the GEMV), else 4. The fused epilogue keeps a block's whole row of columns, 448 blocks
    /// for Llama-3-8B's gate/up: too few in flight. H200, 8B Q4_0, tg128 after 128 tokens,
    /// aggregate tokens/s at 8 / 16 / 32 / 64 sequences: fused 1,885 / 2,883 / 4,327 / 5,174,
    /// 4 splits 1,893 / 3,115 / 4,415 / 5,278 (tg64 at 8 / 32: 2 splits 1,995 / 4,103, 8 splits
    /// 1,968 / 4,318). For tuning, `POCKETLM_MMQ_GATED_SPLITS=N` sets it (0 and 1: fused).
    pub(crate) fn gated_splits(&self, m: usize) -> usize {
        static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
        let over = *OVERRIDE.get_or_init(|| {
            std::env::var("POCKETLM_MMQ_GATED_SPLITS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
        });
        if !(2..=MMQ_MAX_ROWS).contains(&m) {
            return 1;
        }
        let most = (self.cols / 32 / (2 * MMQ_KC)).clamp(1, 16);
        over.unwrap_or(4).clamp(1, most)
    }

    /// A gated product (this matrix stacks the gate rows, then the up rows) of `m` activation
    /// rows split over `splits` column shares: the plain product into `scratch: [m, rows]` f32
    /// (the shares added as [`Self::launch_mmq`]'s are), then `glu_q8` (SiLU, or GELU-tanh with
    /// `gelu`, of the gate times the up value) quantized into `xq: [m, rows / 2]` i8 and `xd`
    /// (d, d·Σq) pairs, as [`Epilogue::SwiGlu`] / [`Epilogue::GeGlu`] followed by
    /// [`quantize_q8`] give up to the summation order. Safe to capture in a CUDA graph.
    ///
    /// Errors: [`Error::InvalidArgument`] for `m` out of range; the driver's launch errors.
    pub(crate) fn launch_gated_split(
        &self,
        gelu: bool,
        [xq, xd, scratch]: [u64; 3],
        m: usize,
        splits: usize,
    ) -> Result<()> {
        self.launch_mmq_split(Epilogue::Write, [xq, xd, scratch], m, splits)?;
        let n = self.rows / 2;
        let func = kernel(&self.dev, &QMATRIX, "glu_q8")?;
        let cfg = super::grid_1d((m * n).max(1));
        let mut b = Launch::new(&func);
        b.arg(scratch).arg(xq).arg(xd);
        b.arg(m as i32).arg(n as i32).arg(gelu as i32);
        // SAFETY: glu_q8's parameters, in order; scratch holds m * rows f32, xq m * n i8 and xd
        // m * n / 32 pairs (the caller's buffers).
        unsafe { b.launch(&self.dev.cuda_stream(), cfg) }
    }

    /// [`Self::launch_mmq`] with the column splits given.
    fn launch_mmq_split(
        &self,
        epi: Epilogue,
        [xq, xd, y]: [u64; 3],
        m: usize,
        splits: usize,
    ) -> Result<()> {
        if m == 0 || m > MMQ_MAX_ROWS || (epi.gated() && splits > 1) {
            return Err(Error::InvalidArgument(format!(
                "small-batch GEMM of {m} rows (1..={MMQ_MAX_ROWS}) in {splits} splits"
            )));
        }
        let (nt, out, tiles) = (mmq_tiles(m), self.outputs(epi), self.mmq_row_tiles(epi));
        let stream = self.dev.cuda_stream();
        if splits > 1 && epi == Epilogue::Write && !serial_splits() {
            // SAFETY: y holds m * out f32 (the caller's buffer); the stream is the launch's.
            unsafe {
                sys::cuMemsetD32Async(y, 0, m * out, stream.cu_stream())
                    .result()
                    .w()?;
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, splits as u32, 1),
            block_dim: (32 * MMQ_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("qmmq_{}{nt}_{}", epi.letter(), self.kernel);
        self.launch_product(&name, cfg, [xq, xd, y], out, Some(m))
    }

    /// Launches the decode step's q/k/v GEMV with RoPE and the KV-cache append in its epilogue
    /// (`qgemv_rope` in qmatrix.cu): this matrix stacks `[q; k; v]` rows of `rope.n_heads`,
    /// `rope.n_kv_heads`, `rope.n_kv_heads` heads; one activation row a sequence. With a q or k
    /// norm, a plain GEMV into `rope.scratch` and `qkv_post` (norms, RoPE, append) instead; for
    /// a batch ([`RopeArgs::batch`] > 1) the small-batch GEMM and `qkv_post` over every
    /// sequence. Safe to capture in a CUDA graph.
    pub(crate) fn launch_gemv_rope(&self, xq: u64, xd: u64, rope: &RopeArgs) -> Result<()> {
        // The arguments both kernels end with, in order: tables, params, cache table, layer,
        // q_out, shapes, flags.
        let tail = |b: &mut Launch<'_>| {
            b.arg(rope.cos)
                .arg(rope.sin)
                .arg(rope.params)
                .arg(rope.kv)
                .arg(rope.layer);
            b.arg(rope.q_out)
                .arg(rope.n_heads as i32)
                .arg(rope.n_kv_heads as i32)
                .arg(rope.head_dim as i32)
                .arg(rope.interleaved as i32)
                .arg(rope.kv_half as i32);
        };
        if rope.q_norm != 0 || rope.k_norm != 0 || rope.batch > 1 {
            if rope.batch > 1 {
                self.launch_mmq(Epilogue::Write, xq, xd, rope.scratch, rope.batch)?;
            } else {
                self.launch_gemv(Epilogue::Write, xq, xd, rope.scratch, 1)?;
            }
            let func = kernel(&self.dev, &QMATRIX, "qkv_post")?;
            let threads = (rope.head_dim / 2).div_ceil(32) * 32;
            let cfg = LaunchConfig {
                grid_dim: (
                    (rope.n_heads + 2 * rope.n_kv_heads) as u32,
                    rope.batch as u32,
                    1,
                ),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = Launch::new(&func);
            b.arg(rope.scratch)
                .arg(rope.bias)
                .arg(rope.q_norm)
                .arg(rope.k_norm);
            b.arg(rope.norm_eps);
            tail(&mut b);
            b.arg(rope.kv_stride as i32);
            // SAFETY: qkv_post's parameters, in order; the decoder's buffers.
            return unsafe { b.launch(&self.dev.cuda_stream(), cfg) };
        }
        let func = kernel(&self.dev, &QMATRIX, &format!("qgemv_rope_{}", self.kernel))?;
        let half = rope.head_dim / 2;
        let blocks = (rope.n_heads + 2 * rope.n_kv_heads) * half;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ci, gi) = (self.cols as i32, self.group as i32);
        let mut b = Launch::new(&func);
        b.arg(self.ptrs[0]).arg(self.ptrs[1]).arg(self.ptrs[2]);
        b.arg(xq).arg(xd).arg(ci).arg(gi);
        tail(&mut b);
        b.arg(rope.bias);
        // SAFETY: qgemv_rope_*'s parameters, in order; the decoder's buffers.
        unsafe { b.launch(&self.dev.cuda_stream(), cfg) }
    }

    /// `x: [.., cols]` (any float dtype) -> `[.., rows]` f32: the GEMV kernel for one row of
    /// `x`, the small-batch GEMM for up to [`MMQ_MAX_ROWS`], else dequantize to f16 + cuBLAS.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let k = dims.pop().unwrap_or(0);
        if k != self.cols {
            return Err(Error::InvalidArgument(format!(
                "quantized linear layer takes {} input features, got {k}",
                self.cols
            )));
        }
        let m: usize = dims.iter().product();
        dims.push(self.rows);
        let x2 = x.to_dtype(DType::F32)?.reshape((m, k))?.contiguous()?;
        let y = if m <= MMQ_MAX_ROWS {
            self.gemv(&x2)?
        } else {
            let w = self.dequantize_f16()?;
            x2.to_dtype(DType::F16)?
                .matmul(&w.t()?)?
                .to_dtype(DType::F32)?
        };
        Ok(y.reshape(dims)?)
    }

    /// `x: [m, cols]` f32 contiguous, `1 <= m <=` [`MMQ_MAX_ROWS`] -> `[m, rows]` f32
    /// (activations quantized to 8 bits per 32 values first): the GEMV kernel for one row, the
    /// small-batch GEMM ([`Self::launch_mmq`]) for more.
    pub fn gemv(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if m == 0 || m > MMQ_MAX_ROWS || k != self.cols || x.dtype() != DType::F32 {
            return Err(Error::InvalidArgument(format!(
                "quantized GEMV of {:?} {:?} with a [{}, {}] matrix",
                x.dims(),
                x.dtype(),
                self.rows,
                self.cols
            )));
        }
        let stream = self.dev.cuda_stream();
        let xq = unsafe { self.dev.alloc::<i8>(m * k) }?;
        let xd = unsafe { self.dev.alloc::<f32>(m * k / 16) }?;
        let out = unsafe { self.dev.alloc::<f32>(m * self.rows) }?;
        {
            let (xs, xl) = x.storage_and_layout();
            let Storage::Cuda(xs) = &*xs else {
                return Err(Error::InvalidArgument("GEMV input is not on CUDA".into()));
            };
            let xv = xs.as_cuda_slice::<f32>()?.slice(xl.start_offset()..);
            let xp = xv.device_ptr(&stream).0;
            quantize_q8(
                &self.dev,
                xp,
                xq.device_ptr(&stream).0,
                xd.device_ptr(&stream).0,
                m * k,
            )?;
            let (xqp, xdp, op) = (
                xq.device_ptr(&stream).0,
                xd.device_ptr(&stream).0,
                out.device_ptr(&stream).0,
            );
            if m == 1 {
                self.launch_gemv(Epilogue::Write, xqp, xdp, op, 1)?;
            } else {
                self.launch_mmq(Epilogue::Write, xqp, xdp, op, m)?;
            }
        }
        Ok(into_tensor(out, &self.dev, (m, self.rows)))
    }

    /// Rows `ids: [..]` (u32 on this device) as an embedding table: `[.., cols]` f32. MLX
    /// matrices give what [`AffineQuantized::dequantize_row`] gives (`mx.dequantize` in the
    /// scales' dtype), GGUF ones ggml's dequantization.
    ///
    /// Errors: [`Error::InvalidArgument`] for ids off this device or not u32. Ids past the last
    /// row are the caller's to exclude (the tokenizer's vocabulary is the table's).
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        if ids.dtype() != DType::U32 || !ids.device().is_cuda() {
            return Err(Error::InvalidArgument(format!(
                "embedding ids must be u32 on CUDA, got {:?} on {:?}",
                ids.dtype(),
                ids.device()
            )));
        }
        let flat = ids.flatten_all()?.contiguous()?;
        let n = flat.elem_count();
        let func = kernel(&self.dev, &QMATRIX, &format!("qembed_{}", self.kernel))?;
        let out = unsafe { self.dev.alloc::<f32>(n * self.cols) }?;
        {
            let stream = self.dev.cuda_stream();
            let (s, l) = flat.storage_and_layout();
            let Storage::Cuda(s) = &*s else {
                return Err(Error::InvalidArgument(
                    "embedding ids are not on CUDA".into(),
                ));
            };
            let iv = s.as_cuda_slice::<u32>()?.slice(l.start_offset()..);
            let (ip, _s1) = iv.device_ptr(&stream);
            let (op, _s2) = out.device_ptr(&stream);
            let cfg = super::grid_1d(n * self.cols);
            let (ni, ci, gi) = (n as i32, self.cols as i32, self.group as i32);
            let mut b = func.builder();
            b.arg(&self.ptrs[0]);
            b.arg(&self.ptrs[1]);
            b.arg(&self.ptrs[2]);
            b.arg(&ip);
            b.arg(&op);
            b.arg(&ni);
            b.arg(&ci);
            b.arg(&gi);
            unsafe { b.launch(cfg) }.w()?;
        }
        let mut dims = ids.dims().to_vec();
        dims.push(self.cols);
        Ok(into_tensor(out, &self.dev, dims))
    }

    /// The whole matrix `[rows, cols]` in f16 (each value formed in f32, rounded once).
    pub fn dequantize_f16(&self) -> Result<Tensor> {
        let func = kernel(&self.dev, &QMATRIX, &format!("qdequant_{}", self.kernel))?;
        let n = self.rows * self.cols;
        let out = unsafe { self.dev.alloc::<half::f16>(n) }?;
        {
            let stream = self.dev.cuda_stream();
            let op = out.device_ptr(&stream).0;
            let threads = 256u32;
            let cfg = LaunchConfig {
                grid_dim: (((n / 8) as u32).div_ceil(threads), 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let (ri, ci, gi) = (self.rows as i32, self.cols as i32, self.group as i32);
            let mut b = func.builder();
            b.arg(&self.ptrs[0]);
            b.arg(&self.ptrs[1]);
            b.arg(&self.ptrs[2]);
            b.arg(&op);
            b.arg(&ri);
            b.arg(&ci);
            b.arg(&gi);
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(into_tensor(out, &self.dev, (self.rows, self.cols)))
    }
}

/// Quantizes `n` f32 values at `x` (n a multiple of 32) to 8-bit codes at `xq` and per-32
/// `(d, d·Σq)` pairs at `xd` (ggml's `quantize_row_q8_1` on the CPU, parameters rounded to f16).
pub(crate) fn quantize_q8(dev: &CudaDevice, x: u64, xq: u64, xd: u64, n: usize) -> Result<()> {
    let func = kernel(dev, &QMATRIX, "quantize_q8")?;
    let nb = (n / 32) as i32;
    let cfg = super::grid_1d(n);
    let mut b = Launch::new(&func);
    b.arg(x).arg(xq).arg(xd).arg(nb);
    // SAFETY: quantize_q8's parameters, in order; the caller's buffers of n values.
    unsafe { b.launch(&dev.cuda_stream(), cfg) }
}

/// The CPU mirror of the GEMV kernel for tests: `x` is quantized as [`quantize_q8`] does and
/// each row dotted with the dequantized-by-formula weights of `w` (`[rows, cols]` f32 values
/// of the matrix) in f64, block by block: `s·d·Σ(q·x_q) + b·d·Σx_q` exactly as the kernel.
/// `w_affine(r, block)` gives `(codes[32], scale, bias)` of a block.
pub(crate) fn reference_gemv(
    x: &[f32],
    m: usize,
    rows: usize,
    cols: usize,
    block: impl Fn(usize, usize) -> ([i32; 32], f32, f32),
) -> Vec<f32> {
    let mut y = vec![0f32; m * rows];
    for i in 0..m {
        let xr = &x[i * cols..(i + 1) * cols];
        let qx: Vec<([i32; 32], f32, f32)> = xr
            .chunks_exact(32)
            .map(|c| {
                let amax = c.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let mut q = [0i32; 32];
                for (qj, v) in q.iter_mut().zip(c) {
                    *qj = (v * id).round_ties_even() as i32;
                }
                let s: i32 = q.iter().sum();
                let r16 = |v: f32| half::f16::from_f32(v).to_f32();
                (q, r16(d), r16(s as f32 * d))
            })
            .collect();
        for r in 0..rows {
            let mut acc = 0f64;
            for (b, (xq, d, s)) in qx.iter().enumerate() {
                let (wq, sc, bias) = block(r, b);
                let isum: i64 = wq
                    .iter()
                    .zip(xq)
                    .map(|(a, b)| (*a as i64) * (*b as i64))
                    .sum();
                acc += sc as f64 * *d as f64 * isum as f64 + bias as f64 * *s as f64;
            }
            y[i * rows + r] = acc as f32;
        }
    }
    y
}

/// For the self-test: [`CudaQMatrix::launch_gated_split`] of `x: [m, cols]` in `splits` shares,
/// its 8-bit output read back and dequantized (code times `d`): `[m, rows / 2]`.
pub(crate) fn run_gated_split(
    g: &CudaQMatrix,
    gelu: bool,
    x: &[f32],
    dev: &Device,
    m: usize,
    splits: usize,
) -> Result<Vec<f32>> {
    let d = cuda_dev(dev)?;
    let stream = d.cuda_stream();
    let n = g.rows / 2;
    let xs = stream.clone_htod(x).w()?;
    let xq = d.alloc_zeros::<i8>(x.len().max(m * n))?;
    let xd = d.alloc_zeros::<f32>(x.len().max(m * n) / 16)?;
    let scratch = d.alloc_zeros::<f32>(m * g.rows)?;
    {
        let (xp, xqp, xdp, sp) = (
            xs.device_ptr(&stream).0,
            xq.device_ptr(&stream).0,
            xd.device_ptr(&stream).0,
            scratch.device_ptr(&stream).0,
        );
        quantize_q8(d, xp, xqp, xdp, x.len())?;
        g.launch_gated_split(gelu, [xqp, xdp, sp], m, splits)?;
    }
    let (codes, dd) = (stream.clone_dtoh(&xq).w()?, stream.clone_dtoh(&xd).w()?);
    Ok((0..m * n)
        .map(|i| codes[i] as f32 * dd[2 * (i / 32)])
        .collect())
}

/// Test helper: runs the GEMV with epilogue `epi` on `x: [cols]`, starting from `y0` (the
/// output's initial contents), and returns the output.
pub(crate) fn run_epilogue(
    g: &CudaQMatrix,
    epi: Epilogue,
    x: &[f32],
    y0: &[f32],
    dev: &Device,
    mmq_rows: Option<usize>,
) -> Result<Vec<f32>> {
    let d = cuda_dev(dev)?;
    let stream = d.cuda_stream();
    let xs = stream.clone_htod(x).w()?;
    let mut y = stream.clone_htod(y0).w()?;
    let xq = unsafe { d.alloc::<i8>(x.len()) }?;
    let xd = unsafe { d.alloc::<f32>(x.len() / 16) }?;
    {
        let (xp, xqp, xdp) = (
            xs.device_ptr(&stream).0,
            xq.device_ptr(&stream).0,
            xd.device_ptr(&stream).0,
        );
        quantize_q8(d, xp, xqp, xdp, x.len())?;
        let yp = y.device_ptr_mut(&stream).0;
        match mmq_rows {
            Some(m) => g.launch_mmq(epi, xqp, xdp, yp, m)?,
            None => g.launch_gemv(epi, xqp, xdp, yp, 1)?,
        }
    }
    Ok(stream.clone_dtoh(&y).w()?)
}
