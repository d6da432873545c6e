//! The C API called directly: error codes and messages (NULL handles, bad paths, invalid
//! UTF-8, bad parameters), tokenizer round trip, cancelling by callback, chat sessions.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::OnceLock;

use pocketlm_capi::*;

fn last_error() -> Option<String> {
    let p = pocketlm_last_error();
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The default model's handle, loaded once per test process (handles are thread-safe).
struct Shared(*mut PocketlmModel);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn model() -> *const PocketlmModel {
    static MODEL: OnceLock<Shared> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = CString::new(
                pocketlm_testutil::default_model_path()
                    .to_str()
                    .expect("UTF-8 path"),
            )
            .expect("no NUL");
            let mut m = null_mut();
            let s = unsafe { pocketlm_model_load(path.as_ptr(), null(), &mut m) };
            assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
            Shared(m)
        })
        .0
}

fn greedy(max_tokens: u32) -> PocketlmGenerateParams {
    let mut p = std::mem::MaybeUninit::uninit();
    let s = unsafe { pocketlm_generate_params_default(model(), p.as_mut_ptr()) };
    assert_eq!(s, PocketlmStatus::Ok);
    let mut p = unsafe { p.assume_init() };
    p.max_tokens = max_tokens;
    p.temperature = 0.0;
    p.repetition_penalty = 1.0;
    p
}

fn take_string(p: *mut c_char) -> String {
    assert!(!p.is_null());
    let s = unsafe { CStr::from_ptr(p) }
        .to_str()
        .expect("UTF-8")
        .to_string();
    unsafe { pocketlm_string_free(p) };
    s
}

#[test]
fn version_is_the_crates() {
    let v = unsafe { CStr::from_ptr(pocketlm_version()) };
    assert_eq!(v.to_str(), Ok(env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_missing_path_is_not_found_naming_it() {
    let path = CString::new("/nonexistent/dir/model.gguf").expect("no NUL");
    let mut m = null_mut();
    let s = unsafe { pocketlm_model_load(path.as_ptr(), null(), &mut m) };
    assert_eq!(s, PocketlmStatus::NotFound);
    assert!(m.is_null(), "no handle on failure");
    let msg = last_error().expect("a message");
    assert!(msg.contains("/nonexistent/dir/model.gguf"), "{msg}");
    // The next successful call clears it.
    let mut p = std::mem::MaybeUninit::uninit();
    let s = unsafe { pocketlm_generate_params_default(model(), p.as_mut_ptr()) };
    assert_eq!(s, PocketlmStatus::Ok);
    assert_eq!(last_error(), None);
}

#[test]
fn a_malformed_file_is_a_model_error() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let file = dir.join("capi-not-a-model.gguf");
    std::fs::write(&file, b"not a gguf file").expect("write");
    let path = CString::new(file.to_str().expect("UTF-8")).expect("no NUL");
    let mut m = null_mut();
    let s = unsafe { pocketlm_model_load(path.as_ptr(), null(), &mut m) };
    assert_eq!(s, PocketlmStatus::Model, "{:?}", last_error());
    assert!(last_error()
        .expect("a message")
        .contains("capi-not-a-model.gguf"));
}

#[test]
fn null_arguments_are_refused_by_name() {
    let path = CString::new("x.gguf").expect("no NUL");
    let s = unsafe { pocketlm_model_load(path.as_ptr(), null(), null_mut()) };
    assert_eq!(s, PocketlmStatus::NullArgument);
    assert_eq!(last_error().as_deref(), Some("`out_model` is NULL"));

    let text = CString::new("hi").expect("no NUL");
    let (mut ids, mut len) = (null_mut(), 0usize);
    let s = unsafe { pocketlm_tokenize(null(), text.as_ptr(), true, &mut ids, &mut len) };
    assert_eq!(s, PocketlmStatus::NullArgument);
    assert_eq!(last_error().as_deref(), Some("`model` is NULL"));

    let s = unsafe { pocketlm_tokenize(model(), null(), true, &mut ids, &mut len) };
    assert_eq!(s, PocketlmStatus::NullArgument);
    assert_eq!(last_error().as_deref(), Some("`text` is NULL"));

    let s = unsafe {
        pocketlm_generate(
            null(),
            text.as_ptr(),
            null(),
            None,
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(s, PocketlmStatus::NullArgument);
    let s = unsafe {
        pocketlm_chat_send(
            null_mut(),
            text.as_ptr(),
            None,
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(s, PocketlmStatus::NullArgument);
    assert_eq!(last_error().as_deref(), Some("`chat` is NULL"));
    assert_eq!(
        unsafe { pocketlm_chat_reset(null_mut()) },
        PocketlmStatus::NullArgument
    );
    // Freeing NULL is a no-op.
    unsafe {
        pocketlm_model_free(null_mut());
        pocketlm_chat_free(null_mut());
        pocketlm_string_free(null_mut());
        pocketlm_tokens_free(null_mut(), 0);
    }
}

#[test]
fn invalid_utf8_is_refused_by_name() {
    let bad = b"caf\xe9\0";
    let mut m = null_mut();
    let s = unsafe { pocketlm_model_load(bad.as_ptr().cast(), null(), &mut m) };
    assert_eq!(s, PocketlmStatus::InvalidUtf8);
    assert_eq!(
        last_error().as_deref(),
        Some("`model` is not valid UTF-8 (at byte 3)")
    );
    let s = unsafe {
        pocketlm_generate(
            model(),
            bad.as_ptr().cast(),
            null(),
            None,
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(s, PocketlmStatus::InvalidUtf8);
    assert!(last_error().expect("a message").starts_with("`prompt`"));
}

#[test]
fn an_unknown_device_is_an_invalid_argument() {
    let device = CString::new("tpu").expect("no NUL");
    let opts = PocketlmLoadOptions {
        device: device.as_ptr(),
        adapter_path: null(),
        no_repack: false,
        exact_mlx_matmul: false,
    };
    let mut m = null_mut();
    let s = unsafe { pocketlm_model_load(null(), &opts, &mut m) };
    assert_eq!(s, PocketlmStatus::InvalidArgument);
    assert!(last_error()
        .expect("a message")
        .starts_with("`options.device`"));
}

#[test]
fn bad_sampling_values_are_invalid_arguments() {
    let mut p = greedy(4);
    p.temperature = -1.0;
    let prompt = CString::new("Hi").expect("no NUL");
    let s = unsafe {
        pocketlm_generate(
            model(),
            prompt.as_ptr(),
            &p,
            None,
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(s, PocketlmStatus::InvalidArgument, "{:?}", last_error());
    assert!(last_error().expect("a message").contains("temperature"));
}

#[test]
fn tokenize_and_detokenize_round_trip() {
    let text = CString::new("Hello, world! Ünïcödé.").expect("no NUL");
    let (mut ids, mut len) = (null_mut(), 0usize);
    let s = unsafe { pocketlm_tokenize(model(), text.as_ptr(), false, &mut ids, &mut len) };
    assert_eq!(s, PocketlmStatus::Ok);
    assert!(len > 3);
    let mut out = null_mut();
    let s = unsafe { pocketlm_detokenize(model(), ids, len, false, &mut out) };
    assert_eq!(s, PocketlmStatus::Ok);
    assert_eq!(take_string(out), "Hello, world! Ünïcödé.");
    unsafe { pocketlm_tokens_free(ids, len) };
    // An id outside the vocabulary.
    let bad = [u32::MAX];
    let s = unsafe { pocketlm_detokenize(model(), bad.as_ptr(), 1, false, &mut out) };
    assert_eq!(s, PocketlmStatus::Tokenizer, "{:?}", last_error());
}

unsafe extern "C" fn collect(piece: *const c_char, len: usize, user_data: *mut c_void) -> i32 {
    let pieces = &mut *(user_data as *mut Vec<String>);
    let bytes = std::slice::from_raw_parts(piece.cast::<u8>(), len);
    assert_eq!(*piece.add(len), 0, "NUL-terminated");
    pieces.push(String::from_utf8(bytes.to_vec()).expect("UTF-8 piece"));
    0
}

unsafe extern "C" fn stop_after_two(
    piece: *const c_char,
    len: usize,
    user_data: *mut c_void,
) -> i32 {
    collect(piece, len, user_data);
    i32::from((*(user_data as *mut Vec<String>)).len() >= 2)
}

#[test]
fn pieces_concatenate_to_the_text_and_a_callback_cancels() {
    let prompt = CString::new("Write a haiku about the sea.").expect("no NUL");
    let p = greedy(16);
    let mut pieces: Vec<String> = Vec::new();
    let mut stats = std::mem::MaybeUninit::uninit();
    let mut text = null_mut();
    let s = unsafe {
        pocketlm_generate(
            model(),
            prompt.as_ptr(),
            &p,
            Some(collect),
            (&mut pieces as *mut Vec<String>).cast(),
            stats.as_mut_ptr(),
            &mut text,
        )
    };
    assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
    let stats = unsafe { stats.assume_init() };
    assert_eq!(stats.finish_reason, PocketlmFinishReason::MaxTokens);
    assert_eq!(stats.generated_tokens, 16);
    assert!(stats.prompt_tokens > 5);
    assert!(pieces.len() >= 2);
    assert_eq!(pieces.concat(), take_string(text));

    let mut cut: Vec<String> = Vec::new();
    let mut stats = std::mem::MaybeUninit::uninit();
    let s = unsafe {
        pocketlm_generate(
            model(),
            prompt.as_ptr(),
            &p,
            Some(stop_after_two),
            (&mut cut as *mut Vec<String>).cast(),
            stats.as_mut_ptr(),
            null_mut(),
        )
    };
    assert_eq!(s, PocketlmStatus::Ok);
    let stats = unsafe { stats.assume_init() };
    assert_eq!(stats.finish_reason, PocketlmFinishReason::Cancelled);
    assert_eq!(cut, pieces[..2]);
}

#[test]
fn a_chat_session_keeps_the_conversation() {
    let mut chat = null_mut();
    let s = unsafe { pocketlm_chat_new(model(), &greedy(12), &mut chat) };
    assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
    let mut replies = Vec::new();
    let mut prompt_tokens = Vec::new();
    for msg in ["My name is Ada.", "What is my name?"] {
        let msg = CString::new(msg).expect("no NUL");
        let mut reply = null_mut();
        let mut stats = std::mem::MaybeUninit::uninit();
        let s = unsafe {
            pocketlm_chat_send(
                chat,
                msg.as_ptr(),
                None,
                null_mut(),
                stats.as_mut_ptr(),
                &mut reply,
            )
        };
        assert_eq!(s, PocketlmStatus::Ok, "{:?}", last_error());
        replies.push(take_string(reply));
        prompt_tokens.push(unsafe { stats.assume_init() }.prompt_tokens);
    }
    assert!(replies.iter().all(|r| !r.is_empty()), "{replies:?}");
    assert_eq!(unsafe { pocketlm_chat_message_count(chat) }, 4);
    // The second turn prefills only what the cache does not hold (the first turn's prompt
    // includes the template's default system message).
    assert!(
        prompt_tokens[1] < prompt_tokens[0] + 12,
        "{prompt_tokens:?}"
    );
    assert_eq!(unsafe { pocketlm_chat_reset(chat) }, PocketlmStatus::Ok);
    assert_eq!(unsafe { pocketlm_chat_message_count(chat) }, 0);
    unsafe { pocketlm_chat_free(chat) };
}
