//! The C API's embeddings called directly: all-MiniLM-L6-v2's vectors equal the library's,
//! the parameters (normalize, dimensions, batch size, truncation), and every bad argument
//! refused with its status and a message naming it, `out` left untouched.

use std::ffi::{c_char, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::OnceLock;

use pocketlm::embed::EmbedOptions;
use pocketlm_capi::*;

fn last_error() -> Option<String> {
    let p = pocketlm_last_error();
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// all-MiniLM-L6-v2's handle, loaded once per test process (handles are thread-safe).
struct Shared(*mut PocketlmEmbeddingModel);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn model() -> *const PocketlmEmbeddingModel {
    static MODEL: OnceLock<Shared> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = CString::new(
                pocketlm_testutil::minilm_path()
                    .to_str()
                    .expect("UTF-8 path"),
            )
            .expect("no NUL");
            let device = CString::new("cpu").expect("no NUL");
            let opts = PocketlmEmbeddingLoadOptions {
                device: device.as_ptr(),
                max_tokens: 0,
            };
            let mut m = null_mut();
            let s = unsafe { pocketlm_embedding_model_load(path.as_ptr(), &opts, &mut m) };
            assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
            assert!(!m.is_null());
            Shared(m)
        })
        .0
}

const TEXTS: [&str; 3] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A monkey is playing drums.",
];

fn c_texts(texts: &[&str]) -> (Vec<CString>, Vec<*const c_char>) {
    let owned: Vec<CString> = texts
        .iter()
        .map(|t| CString::new(*t).expect("no NUL"))
        .collect();
    let ptrs = owned.iter().map(|c| c.as_ptr()).collect();
    (owned, ptrs)
}

fn params(normalize: i32, dimensions: u32) -> PocketlmEmbedParams {
    PocketlmEmbedParams {
        normalize,
        dimensions,
        batch_size: 0,
        no_truncate: false,
    }
}

/// `pocketlm_embed` of `texts` into a buffer of exactly `n * d` floats.
fn embed(texts: &[&str], p: Option<&PocketlmEmbedParams>, d: usize) -> Vec<Vec<f32>> {
    let (_owned, ptrs) = c_texts(texts);
    let mut out = vec![f32::NAN; texts.len() * d];
    let s = unsafe {
        pocketlm_embed(
            model(),
            ptrs.as_ptr(),
            ptrs.len(),
            p.map_or(null(), |p| p as *const _),
            out.as_mut_ptr(),
            out.len(),
        )
    };
    assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
    assert_eq!(last_error(), None);
    out.chunks(d).map(<[f32]>::to_vec).collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn embeddings_equal_the_librarys() {
    assert_eq!(unsafe { pocketlm_embedding_dimension(model()) }, 384);
    let lib = pocketlm_testutil::minilm()
        .embed(&TEXTS, &EmbedOptions::default())
        .expect("the library's embeddings");
    // NULL params and zeroed params are the defaults; the batch size does not matter.
    let by_null = embed(&TEXTS, None, 384);
    let zeroed = embed(&TEXTS, Some(&params(POCKETLM_NORMALIZE_DEFAULT, 0)), 384);
    let mut one_by_one = params(POCKETLM_NORMALIZE_DEFAULT, 384);
    one_by_one.batch_size = 1;
    let by_one = embed(&TEXTS, Some(&one_by_one), 384);
    for (i, want) in lib.iter().enumerate() {
        assert_eq!(&by_null[i], want, "row {i}");
        assert_eq!(&zeroed[i], want, "row {i}");
        let d = by_one[i]
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-5, "row {i}: batch size 1 differs by {d}");
        assert!((norm(want) - 1.0).abs() < 1e-5);
    }
    // A larger buffer is fine; only n * d floats are written.
    let (_owned, ptrs) = c_texts(&TEXTS[..1]);
    let mut out = vec![f32::NAN; 400];
    let s = unsafe { pocketlm_embed(model(), ptrs.as_ptr(), 1, null(), out.as_mut_ptr(), 400) };
    assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
    assert_eq!(out[..384], lib[0][..]);
    assert!(out[384..].iter().all(|x| x.is_nan()));
    // No texts: nothing to do, and NULL pointers are fine.
    let s = unsafe { pocketlm_embed(model(), null(), 0, null(), null_mut(), 0) };
    assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
}

#[test]
fn normalize_off_and_on() {
    let on = embed(&TEXTS, Some(&params(POCKETLM_NORMALIZE_ON, 0)), 384);
    let off = embed(&TEXTS, Some(&params(POCKETLM_NORMALIZE_OFF, 0)), 384);
    for (a, b) in on.iter().zip(&off) {
        let n = norm(b);
        assert!(
            (n - 1.0).abs() > 0.01,
            "an unnormalized MiniLM vector has norm {n}"
        );
        // The same direction: off / |off| is on.
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - (*y as f64 / n) as f32).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-6, "{d}");
    }
}

/// Calls `pocketlm_embed` expecting `status`; checks the message contains `needle` and `out`
/// was not touched.
fn refused(
    model: *const PocketlmEmbeddingModel,
    texts: *const *const c_char,
    n: usize,
    p: Option<&PocketlmEmbedParams>,
    out_len: usize,
    status: PocketlmStatus,
    needle: &str,
) {
    let mut out = vec![7.0f32; out_len];
    let out_ptr = if out_len == 0 {
        null_mut()
    } else {
        out.as_mut_ptr()
    };
    let s = unsafe {
        pocketlm_embed(
            model,
            texts,
            n,
            p.map_or(null(), |p| p as *const _),
            out_ptr,
            out_len,
        )
    };
    let msg = last_error().unwrap_or_default();
    assert_eq!(s, status, "{msg}");
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    assert!(out.iter().all(|&x| x == 7.0), "out was written");
}

#[test]
fn bad_arguments_are_refused_by_name() {
    use PocketlmStatus as S;
    let (_owned, ptrs) = c_texts(&TEXTS);
    let p = ptrs.as_ptr();
    refused(
        null(),
        p,
        3,
        None,
        3 * 384,
        S::NullArgument,
        "`model` is NULL",
    );
    refused(
        model(),
        null(),
        3,
        None,
        3 * 384,
        S::NullArgument,
        "`texts` is NULL",
    );
    refused(model(), p, 3, None, 0, S::NullArgument, "`out` is NULL");
    let with_null = [ptrs[0], null()];
    refused(
        model(),
        with_null.as_ptr(),
        2,
        None,
        2 * 384,
        S::NullArgument,
        "`texts[1]` is NULL",
    );
    let bad = b"caf\xe9\0";
    let with_bad = [ptrs[0], bad.as_ptr().cast()];
    refused(
        model(),
        with_bad.as_ptr(),
        2,
        None,
        2 * 384,
        S::InvalidUtf8,
        "`texts[1]` is not valid UTF-8 (at byte 3)",
    );
    refused(
        model(),
        p,
        3,
        None,
        3 * 384 - 1,
        S::InvalidArgument,
        "`out_len` is 1151, but 3 text(s) of 384 dimensions need 1152 floats",
    );
    refused(
        model(),
        p,
        3,
        Some(&params(7, 0)),
        3 * 384,
        S::InvalidArgument,
        "`params.normalize` is 7",
    );
    // all-MiniLM-L6-v2 was not trained for shortened embeddings (Matryoshka).
    refused(
        model(),
        p,
        3,
        Some(&params(0, 100)),
        3 * 100,
        S::InvalidArgument,
        "`params.dimensions`: dimensions 100",
    );
    refused(
        model(),
        p,
        3,
        Some(&params(0, 385)),
        3 * 385,
        S::InvalidArgument,
        "`params.dimensions`: dimensions 385: must be 1..=384",
    );
    let long = ["word ".repeat(400)];
    let (_l, long_ptrs) = c_texts(&[long[0].as_str()]);
    let mut strict = params(0, 0);
    strict.no_truncate = true;
    refused(
        model(),
        long_ptrs.as_ptr(),
        1,
        Some(&strict),
        384,
        S::InvalidArgument,
        "input[0] has 402 tokens, more than the model's 256",
    );
    // Truncated by default.
    assert_eq!(embed(&[long[0].as_str()], None, 384).len(), 1);
}

#[test]
fn loading_errors_name_what_is_wrong() {
    let mut m = null_mut();
    let path = CString::new("/nonexistent/dir/embedder").expect("no NUL");
    let s = unsafe { pocketlm_embedding_model_load(path.as_ptr(), null(), &mut m) };
    assert_eq!(s, PocketlmStatus::NotFound, "{:?}", last_error());
    assert!(m.is_null(), "no handle on failure");
    assert!(last_error()
        .expect("a message")
        .contains("/nonexistent/dir/embedder"));

    // A chat model's file is not an embedding model.
    let gguf = CString::new(
        pocketlm_testutil::default_model_path()
            .to_str()
            .expect("UTF-8"),
    )
    .expect("no NUL");
    let s = unsafe { pocketlm_embedding_model_load(gguf.as_ptr(), null(), &mut m) };
    assert_eq!(s, PocketlmStatus::Model, "{:?}", last_error());
    assert!(m.is_null());
    let msg = last_error().expect("a message");
    assert!(
        msg.contains("SmolLM2-135M-Instruct.Q4_1.gguf: a file, not an embedding model folder"),
        "{msg}"
    );

    let s = unsafe { pocketlm_embedding_model_load(path.as_ptr(), null(), null_mut()) };
    assert_eq!(s, PocketlmStatus::NullArgument);
    assert_eq!(last_error().as_deref(), Some("`out_model` is NULL"));

    let bad = b"caf\xe9\0";
    let s = unsafe { pocketlm_embedding_model_load(bad.as_ptr().cast(), null(), &mut m) };
    assert_eq!(s, PocketlmStatus::InvalidUtf8);
    assert_eq!(
        last_error().as_deref(),
        Some("`model` is not valid UTF-8 (at byte 3)")
    );

    let device = CString::new("tpu").expect("no NUL");
    let opts = PocketlmEmbeddingLoadOptions {
        device: device.as_ptr(),
        max_tokens: 0,
    };
    let s = unsafe { pocketlm_embedding_model_load(path.as_ptr(), &opts, &mut m) };
    assert_eq!(s, PocketlmStatus::InvalidArgument);
    assert!(last_error()
        .expect("a message")
        .starts_with("`options.device`"));

    let minilm =
        CString::new(pocketlm_testutil::minilm_path().to_str().expect("UTF-8")).expect("no NUL");
    let opts = PocketlmEmbeddingLoadOptions {
        device: null(),
        max_tokens: 100_000,
    };
    let s = unsafe { pocketlm_embedding_model_load(minilm.as_ptr(), &opts, &mut m) };
    assert_eq!(s, PocketlmStatus::InvalidArgument, "{:?}", last_error());
    assert!(last_error()
        .expect("a message")
        .contains("max_tokens 100000"));

    // NULL handles.
    assert_eq!(unsafe { pocketlm_embedding_dimension(null()) }, 0);
    unsafe { pocketlm_embedding_model_free(null_mut()) };
}

#[test]
fn a_handle_loads_embeds_and_frees() {
    let minilm =
        CString::new(pocketlm_testutil::minilm_path().to_str().expect("UTF-8")).expect("no NUL");
    let opts = PocketlmEmbeddingLoadOptions {
        device: null(),
        max_tokens: 16,
    };
    let mut m = null_mut();
    let s = unsafe { pocketlm_embedding_model_load(minilm.as_ptr(), &opts, &mut m) };
    assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
    let (_owned, ptrs) = c_texts(&TEXTS[..1]);
    let mut out = vec![0f32; 384];
    let s = unsafe { pocketlm_embed(m, ptrs.as_ptr(), 1, null(), out.as_mut_ptr(), 384) };
    assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
    assert!((norm(&out) - 1.0).abs() < 1e-5);
    unsafe { pocketlm_embedding_model_free(m) };
}
