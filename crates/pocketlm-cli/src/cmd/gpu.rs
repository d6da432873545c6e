//! Hidden checks for GPU builds: `pocketlm agree` (CPU vs another device, greedy tokens and
//! logits) and `pocketlm gpu-selftest` (each CUDA kernel against its CPU reference).

use anyhow::Result;
use clap::Args;
use pocketlm::bench::{compare_batched, compare_devices};

use super::model::ModelArgs;

/// Arguments of `agree`.
#[derive(Args, Debug)]
pub struct AgreeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts (each one a run); five fixed prompts when none is given.
    #[arg(long = "prompt", short = 'p')]
    pub prompts: Vec<String>,
    /// Greedy steps per prompt.
    #[arg(short = 'n', long, default_value_t = 32)]
    pub steps: usize,
    /// Dequantize every weight to f32 at load on both devices (isolates the quantized kernels).
    #[arg(long)]
    pub dequantize: bool,
    /// Also decode all prompts together on the other device (batched decode, each step one
    /// forward pass over every prompt) and compare each with the reference again.
    #[arg(long)]
    pub batch: bool,
    /// The device that decodes one prompt at a time as the reference. `--reference-device
    /// cuda --batch` checks a GPU's batched decode against its own one-sequence decode.
    #[arg(long, default_value = "cpu")]
    pub reference_device: String,
    /// With --batch: decode all prompts together once more with the other device's KV caches
    /// paged in one block pool (as `serve --kv-memory` keeps them; on CUDA the fused step reads
    /// and appends the blocks through their block tables).
    #[arg(long)]
    pub paged: bool,
}

const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one paragraph.",
    "1, 2, 3, 5, 8, 13,",
];

/// Runs `agree`: the model on `--reference-device` (the CPU by default) and on `--device`, in
/// lockstep.
pub fn run_agree(args: AgreeArgs) -> Result<()> {
    let mut ref_args = args.model.clone();
    ref_args.device = args.reference_device.clone();
    let load = |m: &super::model::ModelArgs| -> Result<pocketlm::loader::LoadedModel> {
        let path = super::model::resolve(m.model.as_deref())?;
        let opts = pocketlm::loader::LoadOptions {
            device: m.device.parse()?,
            dequantize: args.dequantize,
            ..Default::default()
        };
        Ok(pocketlm::loader::load(&path, &opts)?)
    };
    let a = load(&ref_args)?;
    let b = load(&args.model)?;
    let prompts: Vec<String> = if args.prompts.is_empty() {
        PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        args.prompts.clone()
    };
    println!(
        "reference: {}; other: {}",
        pocketlm::device::device_name(a.model.device()),
        pocketlm::device::device_name(b.model.device())
    );
    let mut all = true;
    for p in &prompts {
        let ids = a.encode(&pocketlm::loader::Prompt::Text(p.clone()))?;
        let r = compare_devices(a.model.as_ref(), b.model.as_ref(), &ids, args.steps)?;
        all &= report("", &r, p);
    }
    if args.batch {
        let ids = prompts
            .iter()
            .map(|p| a.encode(&pocketlm::loader::Prompt::Text(p.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let layouts: &[bool] = if args.paged { &[false, true] } else { &[false] };
        for &paged in layouts {
            let (a, b) = (a.model.as_ref(), b.model.as_ref());
            let rs = compare_batched(a, b, &ids, args.steps, paged)?;
            let label = format!(
                "batched {}{}: ",
                prompts.len(),
                if paged { " paged" } else { "" }
            );
            for (r, p) in rs.iter().zip(&prompts) {
                all &= report(&label, r, p);
            }
        }
    }
    println!("all equal: {all}");
    Ok(())
}

/// Prints one prompt's agreement after `label`; whether every step agreed.
fn report(label: &str, r: &pocketlm::bench::Agreement, prompt: &str) -> bool {
    println!(
        "{label}{:>2}/{} tokens equal | max |dlogit| {:.3e} (max |logit| {:.2}){} | {prompt:?}",
        r.equal_steps,
        r.steps,
        r.max_abs_logit_diff,
        r.max_abs_logit,
        r.top2_gap_at_difference
            .map(|g| format!(" | first difference where the reference's top-2 gap is {g:.3e}"))
            .unwrap_or_default(),
    );
    r.equal_steps == r.steps
}

/// Runs `gpu-selftest`: every CUDA kernel against the CPU reference over many shapes.
#[cfg(feature = "cuda")]
pub fn run_selftest(device: &str) -> Result<()> {
    let spec: pocketlm::device::DeviceSpec = device.parse()?;
    let dev = spec.open()?;
    anyhow::ensure!(
        dev.is_cuda(),
        "gpu-selftest needs a CUDA device, got {device}"
    );
    let (lines, ok) = pocketlm::cuda::selftest(&dev)?;
    for l in &lines {
        println!("{l}");
    }
    println!("{} cases, all passed: {ok}", lines.len());
    anyhow::ensure!(ok, "some GPU kernel disagrees with its CPU reference");
    Ok(())
}
