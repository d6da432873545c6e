//! With the `cuda` feature, compiles our CUDA kernels (src/cuda/*.cu) to PTX for compute
//! capability `CUDA_COMPUTE_CAP` (default 90) with `nvcc`; without it, does nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    const KERNELS: &[&str] = &["qmatrix", "sample"];
    for name in KERNELS {
        let src = format!("src/cuda/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = std::process::Command::new("nvcc")
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .expect("running nvcc (source a CUDA toolchain; see README, Building with CUDA)");
        assert!(status.success(), "nvcc failed on {src}");
    }
}
