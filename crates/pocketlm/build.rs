//! With the `cuda` feature, compiles our CUDA kernels (src/cuda/*.cu) with `nvcc` into fat
//! binaries for compute capability `CUDA_COMPUTE_CAP` (default 90): machine code (SASS) for
//! that GPU, so it loads without compiling, and PTX for newer ones, which the driver compiles
//! on first use (shipped as PTX only, these two cost a server's warm-up about 52 s on an H100
//! with the driver's cache off); without the feature, does nothing.

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
        let fatbin = out.join(format!("{name}.fatbin"));
        let status = std::process::Command::new("nvcc")
            .args([
                "--fatbin",
                "-O3",
                "-gencode",
                &format!("arch=compute_{cap},code=sm_{cap}"),
                "-gencode",
                &format!("arch=compute_{cap},code=compute_{cap}"),
                "-o",
            ])
            .arg(&fatbin)
            .arg(&src)
            .status()
            .expect("running nvcc (source a CUDA toolchain; see README, Building with CUDA)");
        assert!(status.success(), "nvcc failed on {src}");
    }
}
