//! Placement of GGUF `IQ4_NL` / `IQ4_XS` tensors (which only our CPU kernels read): layers,
//! embeddings and expert stacks on the kernels, or dequantized, checked against gguf-py's
//! dequantization (the golden file of `crate::gguf`'s tests).

use candle_core::{Device, Tensor};

use crate::gguf::tests::{bits, f32s, iq4_golden, write_gguf, IQ4_TENSORS};
use crate::gguf::GgufFile;
use crate::kernels::{GgufMatrix, GgufType, WeightBytes};
use crate::nn::{Embedding, Linear};
use crate::weights::{Placement, Stored};

#[test]
fn iq4_tensors_are_placed_on_the_cpu_kernels_or_dequantized() {
    let f = GgufFile::open(iq4_golden()).unwrap();
    let cpu = Device::Cpu;
    for (name, deq, shape, ty) in IQ4_TENSORS {
        let want = f32s(&f.tensor_f32(deq, &shape, &cpu).unwrap());
        for (dequantize, repack) in [(false, true), (false, false), (true, true)] {
            let p = Placement {
                device: cpu.clone(),
                dequantize,
                repack,
            };
            let stored = || Stored::Gguf {
                file: &f,
                name,
                shape,
            };
            let l = p.linear(stored(), None).unwrap();
            match &l {
                Linear::Kernel { weight, .. } => {
                    assert!(!dequantize);
                    assert_eq!(weight.dtype(), ty);
                }
                Linear::Dense(_) => assert!(dequantize),
                _ => panic!("{name}: unexpected layer"),
            }
            let w = f32s(&l.dequantized_weight().unwrap());
            assert_eq!(bits(&w), bits(&want), "{name} {dequantize}");
            let e = p.embedding(stored()).unwrap();
            assert_eq!(matches!(e, Embedding::Kernel { .. }), !dequantize);
            let ids = Tensor::new(&[2u32, 1], &cpu).unwrap();
            let rows = f32s(&e.forward(&ids).unwrap());
            let k = shape[1];
            assert_eq!(bits(&rows[..k]), bits(&want[2 * k..3 * k]), "{name}");
            // A product on the kernels against the dense one.
            let x = Tensor::ones((1, k), candle_core::DType::F32, &cpu).unwrap();
            let y = f32s(&l.forward(&x).unwrap());
            for (r, got) in y.iter().enumerate() {
                let exact: f64 = want[r * k..(r + 1) * k].iter().map(|&v| v as f64).sum();
                let mag: f64 = want[r * k..(r + 1) * k]
                    .iter()
                    .map(|v| v.abs() as f64)
                    .sum();
                assert!(
                    (*got as f64 - exact).abs() <= 2e-3 * mag,
                    "{name} row {r}: {got} vs {exact}"
                );
            }
        }
    }
}

#[test]
fn iq4_expert_stacks_and_mixed_files_read_in_place() {
    // Random IQ4_XS / IQ4_NL bytes with finite f16 scales (every other bit pattern is a
    // valid block), next to a Q8_0 tensor that candle reads.
    let blocks = |ty: GgufType, n: usize, seed: u8| -> Vec<u8> {
        let mut v: Vec<u8> = (0..n * ty.type_size())
            .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed) ^ (i >> 5) as u8)
            .collect();
        for (i, blk) in v.chunks_exact_mut(ty.type_size()).enumerate() {
            let d = half::f16::from_f32(0.01 * (i as f32 - 3.0));
            blk[..2].copy_from_slice(&d.to_le_bytes());
        }
        v
    };
    let xs = blocks(GgufType::Iq4Xs, 2 * 3, 1);
    let nl = blocks(GgufType::Iq4Nl, 2 * 3 * 2, 2);
    let q8 = blocks(GgufType::Q8_0, 4, 3);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mixed.gguf");
    write_gguf(
        &p,
        &[
            ("a.q8", &[2, 64], 8, &q8),
            ("b.xs", &[2, 3, 256], 23, &xs),
            ("c.nl", &[2, 3, 64], 20, &nl),
        ],
    );
    let f = GgufFile::open(&p).unwrap();
    let cpu = Device::Cpu;
    for (name, ty, bytes, cols) in [
        ("b.xs", GgufType::Iq4Xs, &xs, 256),
        ("c.nl", GgufType::Iq4Nl, &nl, 64),
    ] {
        let shape = [2, 3, cols];
        let whole = GgufMatrix::new(name, WeightBytes::owned(bytes.clone()), ty, 6, cols)
            .unwrap()
            .dequantize();
        let t = f32s(&f.tensor_f32(name, &shape, &cpu).unwrap());
        assert_eq!(bits(&t), bits(&whole), "{name}");
        for e in 0..2 {
            let m = f.expert_matrix(name, shape, e).unwrap();
            assert_eq!((m.rows(), m.cols(), m.dtype()), (3, cols, ty));
            let part = &whole[e * 3 * cols..(e + 1) * 3 * cols];
            assert_eq!(bits(&m.dequantize()), bits(part), "{name}[{e}]");
        }
        let err = f.expert_matrix(name, shape, 2).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
        let err = f.matrix(name, &[6, cols]).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
        for dequantize in [false, true] {
            let p = Placement {
                device: cpu.clone(),
                dequantize,
                repack: true,
            };
            let layers = p.gguf_experts(&f, name, shape).unwrap();
            assert_eq!(layers.len(), 2);
            for (e, l) in layers.iter().enumerate() {
                assert_eq!(matches!(l, Linear::Kernel { .. }), !dequantize);
                let w = f32s(&l.dequantized_weight().unwrap());
                assert_eq!(bits(&w), bits(&whole[e * 3 * cols..(e + 1) * 3 * cols]));
            }
        }
    }
    // The candle-read tensor beside them is unchanged.
    let q = f.matrix("a.q8", &[2, 64]).unwrap();
    let want = GgufMatrix::new("q", WeightBytes::owned(q8.clone()), GgufType::Q8_0, 2, 64)
        .unwrap()
        .dequantize();
    assert_eq!(q.dequantize(), want);
    assert_eq!(f32s(&f.tensor_f32("a.q8", &[2, 64], &cpu).unwrap()), want);
}

/// An `IQ4_NL` / `IQ4_XS` layer of whole 16-row groups is repacked where this CPU has the packed
/// kernels and repacking is asked for (`--no-repack` keeps GGUF's layout), and gives the
/// products of the unpacked layer to rounding; its embedding table keeps GGUF's rows.
#[test]
fn iq4_layers_are_repacked_where_the_cpu_packs() {
    let (n, k) = (32, 512);
    let blocks = |ty: GgufType, seed: u8| -> Vec<u8> {
        let mut v: Vec<u8> = (0..n * k / ty.block_size() * ty.type_size())
            .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 7) as u8)
            .collect();
        for (i, blk) in v.chunks_exact_mut(ty.type_size()).enumerate() {
            let d = half::f16::from_f32(0.002 * ((i % 11) as f32 - 5.0));
            blk[..2].copy_from_slice(&d.to_le_bytes());
        }
        v
    };
    let (nl, xs) = (blocks(GgufType::Iq4Nl, 5), blocks(GgufType::Iq4Xs, 6));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq4_32.gguf");
    write_gguf(&path, &[("nl", &[n, k], 20, &nl), ("xs", &[n, k], 23, &xs)]);
    let f = GgufFile::open(&path).unwrap();
    let cpu = Device::Cpu;
    let x = Tensor::from_vec(
        (0..3 * k)
            .map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0)
            .collect(),
        (3, k),
        &cpu,
    )
    .unwrap();
    for (name, ty) in [("nl", GgufType::Iq4Nl), ("xs", GgufType::Iq4Xs)] {
        let stored = || Stored::Gguf {
            file: &f,
            name,
            shape: [n, k],
        };
        let mut outs = Vec::new();
        for repack in [false, true] {
            let p = Placement {
                device: cpu.clone(),
                dequantize: false,
                repack,
            };
            let l = p.linear(stored(), None).unwrap();
            let Linear::Kernel { weight, .. } = &l else {
                panic!("{name}: not on the CPU kernels");
            };
            assert_eq!(weight.dtype(), ty);
            assert_eq!(
                weight.is_packed(),
                repack && GgufMatrix::packed_kernels_here(),
                "{name} repack {repack}"
            );
            let e = p.embedding(stored()).unwrap();
            let Embedding::Kernel { table, .. } = &e else {
                panic!("{name}: embedding not on the CPU kernels");
            };
            assert!(!table.is_packed());
            outs.push(f32s(&l.forward(&x).unwrap()));
            assert_eq!(
                bits(&f32s(&l.dequantized_weight().unwrap())),
                bits(&f.matrix(name, &[n, k]).unwrap().dequantize()),
                "{name}"
            );
        }
        let scale = outs[0].iter().fold(1f32, |a, v| a.max(v.abs()));
        for (a, b) in outs[1].iter().zip(&outs[0]) {
            assert!((a - b).abs() <= 1e-5 * scale, "{name}: {a} vs unpacked {b}");
        }
    }
}
