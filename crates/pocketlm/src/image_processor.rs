//! Images for vision-language models: decoding (PNG, JPEG, WebP with the `image` crate) and the
//! Qwen2-VL image processor, equal to transformers' `Qwen2VLImageProcessor` (the torchvision
//! backend, `image_processing_qwen2_vl.py`):
//!
//! 1. convert to RGB, compositing transparency onto white (transformers `convert_to_rgb`, PIL
//!    `alpha_composite` arithmetic);
//! 2. "smart resize" to multiples of `patch_size * merge_size` (28) within
//!    `[min_pixels, max_pixels]` ([`smart_resize`]);
//! 3. antialiased bicubic resampling of the `uint8` image as torchvision's
//!    `resize(..., BICUBIC, antialias=True)` does on the CPU: PyTorch's native `uint8` path
//!    (`upsample_avx_bilinear_bicubic_uint8`: Keys cubic `a = -0.5`, the support widened by the
//!    downscale factor, weights quantized to `int16` with a shared precision, width pass then
//!    height pass, each rounded and clamped to `uint8`) ([`resize_bicubic`]);
//! 4. `(x - 255 mean) / (255 std)` in f32 (the fused rescale + normalize);
//! 5. patchify into rows of `channels * temporal_patch_size * patch_size^2` values, 2x2 merge
//!    blocks consecutive, each frame repeated `temporal_patch_size` times.

use std::io::Cursor;
use std::path::Path;

use serde::Deserialize;

/// Errors of image decoding and preprocessing.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The bytes are not an image of a supported format, or are corrupt.
    #[error("{what}: cannot decode the image: {msg}")]
    Decode {
        /// The file or source named.
        what: String,
        /// The decoder's message.
        msg: String,
    },
    /// The image is larger than the limits (width, height or decoded bytes).
    #[error("{what}: the image is too large ({msg}); at most {max_side} pixels a side and {max_mb} MB decoded")]
    TooLarge {
        /// The file or source named.
        what: String,
        /// What the decoder reported.
        msg: String,
        /// Largest width or height accepted.
        max_side: u32,
        /// Largest decoded size accepted, in MB.
        max_mb: u64,
    },
    /// The image's shape cannot be processed (empty, or aspect ratio above 200).
    #[error("{what}: {msg}")]
    Shape {
        /// The file or source named.
        what: String,
        /// What is wrong.
        msg: String,
    },
    /// A preprocessor configuration field is missing or invalid.
    #[error("{file}: `{field}`: {msg}")]
    Config {
        /// The configuration file.
        file: String,
        /// The field.
        field: String,
        /// What is wrong.
        msg: String,
    },
}

/// Largest width or height accepted when decoding.
pub const MAX_SIDE: u32 = 16384;
/// Largest decoded size accepted, in bytes (also bounds the decoder's allocations).
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

/// An 8-bit RGB image, rows top to bottom, `data: [height, width, 3]` u8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes, interleaved RGB.
    pub data: Vec<u8>,
}

/// Decodes PNG, JPEG or WebP bytes (format guessed from the content) into RGB; transparency is
/// composited onto white as transformers' `convert_to_rgb` does (PIL `alpha_composite` onto an
/// opaque white background). `what` names the source in errors.
///
/// Errors: [`ImageError::Decode`] for an unknown format or corrupt data,
/// [`ImageError::TooLarge`] beyond [`MAX_SIDE`] / [`MAX_DECODED_BYTES`] (checked before the
/// pixels are allocated), [`ImageError::Shape`] for an empty image.
pub fn decode_image(bytes: &[u8], what: &str) -> Result<RgbImage, ImageError> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode {
            what: what.into(),
            msg: e.to_string(),
        })?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => ImageError::TooLarge {
            what: what.into(),
            msg: l.to_string(),
            max_side: MAX_SIDE,
            max_mb: MAX_DECODED_BYTES >> 20,
        },
        other => ImageError::Decode {
            what: what.into(),
            msg: other.to_string(),
        },
    })?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(ImageError::Shape {
            what: what.into(),
            msg: "the image is empty".into(),
        });
    }
    let data = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = Vec::with_capacity(width * height * 3);
        for p in rgba.pixels() {
            let [r, g, b, a] = p.0;
            out.extend_from_slice(&[over_white(r, a), over_white(g, a), over_white(b, a)]);
        }
        out
    } else {
        img.to_rgb8().into_raw()
    };
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// PIL `ImagingAlphaComposite` of one channel over an opaque white pixel (7-bit precision).
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const PREC: u32 = 7;
    let coef1 = a as u32 * 255 * 255 * (1 << PREC) / (255 * 255);
    let coef2 = 255 * (1 << PREC) - coef1;
    let tmp = c as u32 * coef1 + 255 * coef2 + (0x80 << PREC);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PREC).min(255) as u8
}

/// Reads and decodes an image file ([`decode_image`]).
///
/// Errors: as [`decode_image`], [`ImageError::Decode`] naming the file when it cannot be read.
pub fn load_image(path: &Path) -> Result<RgbImage, ImageError> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| ImageError::Decode {
        what: what.clone(),
        msg: e.to_string(),
    })?;
    if meta.len() > MAX_DECODED_BYTES {
        return Err(ImageError::TooLarge {
            what,
            msg: format!("the file has {} bytes", meta.len()),
            max_side: MAX_SIDE,
            max_mb: MAX_DECODED_BYTES >> 20,
        });
    }
    let bytes = std::fs::read(path).map_err(|e| ImageError::Decode {
        what: what.clone(),
        msg: e.to_string(),
    })?;
    decode_image(&bytes, &what)
}

/// transformers' `smart_resize` (`image_processing_qwen2_vl.py`): the `(height, width)`, both
/// multiples of `factor`, nearest to the input's with `min_pixels <= h * w <= max_pixels`
/// (rounded, then scaled down with floor or up with ceil keeping the aspect ratio).
///
/// Errors: [`ImageError::Shape`] for an empty image or an aspect ratio above 200.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), ImageError> {
    let shape_err = |msg: String| ImageError::Shape {
        what: format!("{width}x{height} image"),
        msg,
    };
    if height == 0 || width == 0 || factor == 0 {
        return Err(shape_err("the image is empty".into()));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(shape_err(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio}"
        )));
    }
    // Python's round() rounds half to even.
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// One output position's taps: first input index and int16-range weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// PyTorch's antialiased bicubic filter (Keys, `a = -0.5`, as PIL).
fn cubic_aa(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Weights of one resampling pass, as PyTorch's `_compute_index_ranges_int16_weights`
/// (`UpSampleKernel.cpp`): f64 weights normalized per output, then scaled by
/// `2^precision` (the largest precision keeping the largest weight below 2^15) and rounded.
fn taps(in_size: usize, out_size: usize) -> (Vec<Taps>, u32) {
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut float = Vec::with_capacity(out_size);
    let mut wmax = 0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
        let mut ws: Vec<f64> = (xmin..xmax.max(xmin))
            .map(|j| cubic_aa((j as f64 - center + 0.5) * invscale))
            .collect();
        let total: f64 = ws.iter().fold(0.0, |a, w| a + w);
        if total != 0.0 {
            ws.iter_mut().for_each(|w| *w /= total);
        }
        wmax = ws.iter().fold(wmax, |m, &w| m.max(w));
        float.push((xmin, ws));
    }
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + wmax * (1u64 << (precision + 1)) as f64) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let k = (1u64 << precision) as f64;
    let taps = float
        .into_iter()
        .map(|(start, ws)| Taps {
            start,
            weights: ws
                .iter()
                .map(|w| {
                    let v = w * k;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i16 as i32
                })
                .collect(),
        })
        .collect();
    (taps, precision)
}

/// One pass along `axis` (0 = height, 1 = width) of an `[h, w, 3]` u8 image.
fn resample_pass(src: &[u8], h: usize, w: usize, axis: usize, out: usize) -> Vec<u8> {
    let (taps, prec) = taps(if axis == 0 { h } else { w }, out);
    let (oh, ow) = if axis == 0 { (out, w) } else { (h, out) };
    let mut dst = vec![0u8; oh * ow * 3];
    let round = 1i32 << prec.saturating_sub(1);
    for y in 0..oh {
        for x in 0..ow {
            let t = &taps[if axis == 0 { y } else { x }];
            for c in 0..3 {
                let mut acc = round;
                for (j, &wt) in t.weights.iter().enumerate() {
                    let (sy, sx) = if axis == 0 {
                        (t.start + j, x)
                    } else {
                        (y, t.start + j)
                    };
                    acc += src[(sy * w + sx) * 3 + c] as i32 * wt;
                }
                dst[(y * ow + x) * 3 + c] = (acc >> prec).clamp(0, 255) as u8;
            }
        }
    }
    dst
}

/// Resizes to `height x width` as torchvision `resize(img, (height, width),
/// InterpolationMode.BICUBIC, antialias=True)` does for a `uint8` CPU tensor (bit-exact: the
/// same integer arithmetic). An unchanged size returns a copy.
pub fn resize_bicubic(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    let mut data = img.data.clone();
    let (mut h, mut w) = (img.height, img.width);
    if w != width {
        data = resample_pass(&data, h, w, 1, width);
        w = width;
    }
    if h != height {
        data = resample_pass(&data, h, w, 0, height);
        h = height;
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

/// The Qwen2-VL image processor's settings (`preprocessor_config.json`, or the
/// `image_processor` object of transformers 5's `processor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Fewest pixels after resizing (`min_pixels` or `size.shortest_edge`); default 56 * 56.
    pub min_pixels: usize,
    /// Most pixels after resizing (`max_pixels` or `size.longest_edge`); default 28 * 28 * 1280.
    pub max_pixels: usize,
    /// Side of a vision patch (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2; a still image is repeated).
    pub temporal_patch_size: usize,
    /// Side of the block of patches merged into one language-model token (2).
    pub merge_size: usize,
    /// Per-channel mean (OpenAI CLIP's by default).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation (OpenAI CLIP's by default).
    pub image_std: [f32; 3],
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }
}

#[derive(Deserialize, Default)]
struct RawConfig {
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    size: Option<RawSize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
}

#[derive(Deserialize, Default)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
}

impl ImageProcessorConfig {
    /// Parses a preprocessor configuration object (`file` names it in errors); absent fields take
    /// transformers' defaults.
    ///
    /// Errors: [`ImageError::Config`] for fields of the wrong type, a mean/std without 3 values,
    /// zero sizes or `min_pixels > max_pixels`.
    pub fn from_json(v: &serde_json::Value, file: &str) -> Result<Self, ImageError> {
        let bad = |field: &str, msg: String| ImageError::Config {
            file: file.into(),
            field: field.into(),
            msg,
        };
        let raw: RawConfig =
            serde_json::from_value(v.clone()).map_err(|e| bad("(object)", e.to_string()))?;
        let d = Self::default();
        let size = raw.size.unwrap_or_default();
        let three =
            |x: Option<Vec<f32>>, f: &str, dflt: [f32; 3]| -> Result<[f32; 3], ImageError> {
                match x {
                    None => Ok(dflt),
                    Some(v) => <[f32; 3]>::try_from(v.as_slice())
                        .map_err(|_| bad(f, format!("expected 3 values, got {}", v.len()))),
                }
            };
        let c = Self {
            min_pixels: raw
                .min_pixels
                .or(size.shortest_edge)
                .or(size.min_pixels)
                .unwrap_or(d.min_pixels),
            max_pixels: raw
                .max_pixels
                .or(size.longest_edge)
                .or(size.max_pixels)
                .unwrap_or(d.max_pixels),
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            image_mean: three(raw.image_mean, "image_mean", d.image_mean)?,
            image_std: three(raw.image_std, "image_std", d.image_std)?,
        };
        for (f, x) in [
            ("patch_size", c.patch_size),
            ("temporal_patch_size", c.temporal_patch_size),
            ("merge_size", c.merge_size),
            ("max_pixels", c.max_pixels),
        ] {
            if x == 0 {
                return Err(bad(f, "must be positive".into()));
            }
        }
        if c.min_pixels > c.max_pixels {
            return Err(bad(
                "min_pixels",
                format!("{} is above max_pixels {}", c.min_pixels, c.max_pixels),
            ));
        }
        if c.image_std.contains(&0.0) {
            return Err(bad("image_std", "has a zero".into()));
        }
        Ok(c)
    }

    /// Reads a model folder's `preprocessor_config.json`, else the `image_processor` object of
    /// `processor_config.json`; `Ok(None)` when it has neither.
    ///
    /// Errors: unreadable or invalid JSON (as [`crate::Error`]), bad fields.
    pub fn from_folder(dir: &Path) -> crate::Result<Option<Self>> {
        let pre = dir.join("preprocessor_config.json");
        if let Some(v) = crate::json_file::read_json(&pre)? {
            return Ok(Some(Self::from_json(&v, &pre.display().to_string())?));
        }
        let proc = dir.join("processor_config.json");
        if let Some(v) = crate::json_file::read_json(&proc)? {
            if let Some(ip) = v.get("image_processor") {
                return Ok(Some(Self::from_json(ip, &proc.display().to_string())?));
            }
        }
        Ok(None)
    }

    /// Values per patch row: `3 * temporal_patch_size * patch_size^2` (1176 for Qwen2-VL).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The `(height, width)` an image is resized to ([`smart_resize`] with factor
    /// `patch_size * merge_size`).
    ///
    /// Errors: as [`smart_resize`].
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize), ImageError> {
        smart_resize(
            height,
            width,
            self.patch_size * self.merge_size,
            self.min_pixels,
            self.max_pixels,
        )
    }

    /// Resizes, normalizes and patchifies one image (see the module docs).
    ///
    /// Errors: as [`smart_resize`].
    pub fn preprocess(&self, img: &RgbImage) -> Result<ProcessedImage, ImageError> {
        let (h, w) = self.target_size(img.height, img.width)?;
        let img = if (h, w) == (img.height, img.width) {
            img.clone()
        } else {
            resize_bicubic(img, h, w)
        };
        let mean: Vec<f32> = self.image_mean.iter().map(|m| m * 255.0).collect();
        let std: Vec<f32> = self.image_std.iter().map(|s| s * 255.0).collect();
        let (p, m, t) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (h / p, w / p);
        let dim = self.patch_dim();
        let mut out = Vec::with_capacity(gh * gw * dim);
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            for _ in 0..t {
                                for py in 0..p {
                                    for px in 0..p {
                                        let v = img.data[((y0 + py) * w + x0 + px) * 3 + c];
                                        out.push((v as f32 - mean[c]) / std[c]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(ProcessedImage {
            pixel_values: out,
            grid_thw: [1, gh, gw],
            patch_dim: dim,
            merge_size: m,
        })
    }
}

/// One preprocessed image: what the vision tower takes.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `[grid_t * grid_h * grid_w, patch_dim]` f32, row-major (transformers' `pixel_values`).
    pub pixel_values: Vec<f32>,
    /// `(t, h, w)` in patches (transformers' `image_grid_thw`).
    pub grid_thw: [usize; 3],
    /// Values per patch row.
    pub patch_dim: usize,
    /// Spatial merge size (patches per token side).
    pub merge_size: usize,
}

impl ProcessedImage {
    /// Number of vision patches, `t * h * w`.
    pub fn n_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Number of `<|image_pad|>` tokens it takes in the prompt: `t * h * w / merge_size^2`.
    pub fn n_tokens(&self) -> usize {
        self.n_patches() / (self.merge_size * self.merge_size).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers() {
        // Values from transformers' smart_resize.
        assert_eq!(smart_resize(192, 192, 28, 3136, 18816).unwrap(), (112, 112));
        assert_eq!(smart_resize(40, 60, 28, 3136, 18816).unwrap(), (56, 84));
        assert_eq!(
            smart_resize(1080, 1920, 28, 3136, 28 * 28 * 1280).unwrap(),
            (728, 1316)
        );
        assert!(smart_resize(1, 500, 28, 3136, 18816).is_err());
        assert!(smart_resize(0, 5, 28, 3136, 18816).is_err());
    }

    #[test]
    fn alpha_composites_onto_white() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(10, 255), 10);
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn garbage_and_huge_images_are_errors() {
        let e = decode_image(b"not an image at all", "x.png").unwrap_err();
        assert!(matches!(e, ImageError::Decode { .. }), "{e}");
        // A PNG header claiming 100000 x 100000 pixels.
        let mut png = Vec::new();
        png.extend_from_slice(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR");
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&[8, 2, 0, 0, 0]);
        let crc = crc32(&png[12..]);
        png.extend_from_slice(&crc.to_be_bytes());
        let e = decode_image(&png, "big.png").unwrap_err();
        assert!(
            matches!(e, ImageError::TooLarge { .. } | ImageError::Decode { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("big.png"), "{e}");
        // Truncated data.
        let e = decode_image(&png[..20], "cut.png").unwrap_err();
        assert!(e.to_string().contains("cut.png"), "{e}");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
}
