//! `include/pocketlm.h` is what cbindgen makes of `src/lib.rs` today.

use std::path::Path;

/// Regenerates the header and compares it with the committed one; with `POCKETLM_BLESS=1` it
/// writes the new header instead.
#[test]
fn header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen runs on src/lib.rs")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = crate_dir.join("include/pocketlm.h");
    if std::env::var_os("POCKETLM_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing include/pocketlm.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date with src/lib.rs: run `POCKETLM_BLESS=1 cargo test --profile ci -p \
         pocketlm-capi --test it header` and commit it",
        path.display()
    );
}
