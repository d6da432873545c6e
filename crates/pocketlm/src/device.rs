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
            Self::Cuda(n) => Ok(Device::new_cuda(n)?),
            Self::Metal => Ok(Device::new_metal(0)?),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
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
