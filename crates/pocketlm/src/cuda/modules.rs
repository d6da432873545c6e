//! Our kernel modules (`src/cuda/*.cu`), embedded as the fat binaries build.rs makes (machine
//! code for the build's compute capability and PTX for newer GPUs), loaded once per CUDA
//! context. candle's `get_or_load_custom_func` takes PTX text only, which the driver compiles
//! at each process's first load unless its cache (`~/.nv/ComputeCache`) already holds it: on a
//! fresh machine or container, 52 of the 74 s a server's warm-up spent on an H100.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchArgs,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, WrapErr};

use crate::Result;

/// One of our modules: a name for errors and its fat binary.
pub(crate) struct Module {
    name: &'static str,
    image: &'static [u8],
}

/// `src/cuda/qmatrix.cu`: the quantized products, the decode step's kernels, attention.
pub(crate) static QMATRIX: Module = Module {
    name: "qmatrix",
    image: include_bytes!(concat!(env!("OUT_DIR"), "/qmatrix.fatbin")),
};

/// `src/cuda/sample.cu`: token sampling.
pub(crate) static SAMPLE: Module = Module {
    name: "sample",
    image: include_bytes!(concat!(env!("OUT_DIR"), "/sample.fatbin")),
};

/// Modules loaded so far: (context, module name, module). A loaded module keeps its context
/// alive, so a context's address is not reused while it is listed.
static LOADED: Mutex<Vec<(usize, &'static str, Arc<CudaModule>)>> = Mutex::new(Vec::new());

/// A kernel of one of our modules and the stream it launches on (as candle's `CudaFunc`).
pub(crate) struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl std::ops::Deref for Kernel {
    type Target = CudaFunction;

    fn deref(&self) -> &CudaFunction {
        &self.func
    }
}

impl Kernel {
    /// Arguments of one launch on the device's stream (cudarc's builder).
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// The kernel `name` of `module` on `dev`, loading the module into the device's context at
/// its first use there.
///
/// Errors: the driver's, loading the module (an image for another GPU without PTX it can
/// compile) or finding the kernel.
pub(crate) fn kernel(dev: &CudaDevice, module: &'static Module, name: &str) -> Result<Kernel> {
    let stream = dev.cuda_stream();
    let ctx: &Arc<CudaContext> = stream.context();
    let key = Arc::as_ptr(ctx) as usize;
    let loaded = {
        let mut list = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        match list.iter().find(|(c, m, _)| *c == key && *m == module.name) {
            Some((_, _, m)) => m.clone(),
            None => {
                // The driver wants the image aligned: a fresh allocation is, `include_bytes!`
                // need not be.
                let m = ctx
                    .load_module(Ptx::from_binary(module.image.to_vec()))
                    .w()?;
                list.push((key, module.name, m.clone()));
                m
            }
        }
    };
    let func = loaded.load_function(name).w()?;
    Ok(Kernel { func, stream })
}
