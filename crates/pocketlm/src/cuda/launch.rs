//! Kernel launches of the decode step through `cuLaunchKernelEx`, with programmatic dependent
//! launch (PDL; CUDA programming guide, "Programmatic Dependent Launch and Synchronization") on
//! GPUs of compute capability 9.0 and later: the next kernel in the stream may be scheduled
//! while the one before it finishes, which hides the launch gap between the decode step's ~7
//! small kernels a layer (in a CUDA graph as well: stream capture keeps the attribute as a
//! programmatic edge). Each kernel launched this way calls `pdl_enter()` (qmatrix.cu) before it
//! reads or writes anything its predecessor may write (what does not depend on it, such as
//! weights, it may load or prefetch before), so it still sees everything its predecessor wrote.
//! `POCKETLM_PDL=0` launches without the attribute.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaStream, LaunchConfig};
use candle_core::cuda_backend::WrapErr;

use crate::Result;

/// A kernel parameter: a device address, an `int` or a `float` of the kernel's signature.
pub(crate) trait KernelArg: Copy {
    /// The value's bytes at the start of an 8-byte slot (little-endian, as the GPU reads them).
    fn slot(self) -> [u8; 8];
}

impl KernelArg for u64 {
    fn slot(self) -> [u8; 8] {
        self.to_le_bytes()
    }
}

impl KernelArg for i32 {
    fn slot(self) -> [u8; 8] {
        let mut s = [0u8; 8];
        s[..4].copy_from_slice(&self.to_le_bytes());
        s
    }
}

impl KernelArg for f32 {
    fn slot(self) -> [u8; 8] {
        let mut s = [0u8; 8];
        s[..4].copy_from_slice(&self.to_le_bytes());
        s
    }
}

/// The arguments of one launch of `func`, in the order of its signature.
pub(crate) struct Launch<'a> {
    func: &'a CudaFunction,
    slots: Vec<[u8; 8]>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(func: &'a CudaFunction) -> Self {
        Self {
            func,
            slots: Vec::with_capacity(20),
        }
    }

    /// Appends the next parameter.
    pub(crate) fn arg(&mut self, v: impl KernelArg) -> &mut Self {
        self.slots.push(v.slot());
        self
    }

    /// Launches on `stream` (captured when the stream is capturing), with the PDL attribute
    /// where [`pdl_enabled`].
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and every
    /// address must be valid for what the kernel reads and writes; a kernel launched with PDL
    /// must call `pdl_enter()` before it touches memory its predecessor may write.
    ///
    /// Errors: the driver's launch error.
    pub(crate) unsafe fn launch(&mut self, stream: &CudaStream, cfg: LaunchConfig) -> Result<()> {
        stream.context().bind_to_thread().w()?;
        let mut params: Vec<*mut c_void> = self
            .slots
            .iter_mut()
            .map(|s| s.as_mut_ptr() as *mut c_void)
            .collect();
        let mut value: sys::CUlaunchAttributeValue = std::mem::zeroed();
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(pdl_enabled(stream)),
        };
        sys::cuLaunchKernelEx(
            &config,
            self.func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
        .w()?;
        Ok(())
    }
}

/// Whether launches take the PDL attribute: compute capability 9.0 or later (Hopper), and
/// `POCKETLM_PDL` is not `0`. Decided once per process (one GPU kind per process).
fn pdl_enabled(stream: &CudaStream) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let off = crate::switches::switched_off("POCKETLM_PDL");
        let major = stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .unwrap_or(0);
        !off && major >= 9
    })
}
