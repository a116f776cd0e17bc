//! MNIST's IDX format (images and labels, each raw or gzipped) and the 10,000-image MNIST
//! subset embedded in the binary, so that a range test on real images needs no download.

use std::borrow::Cow;
use std::io::Read;

use super::{DataError, Dataset, Features, Targets};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Far above any real IDX file (all of MNIST is 55 MB): a limit that only a decompression
/// bomb reaches.
const MAX_DECODED_BYTES: u64 = 1 << 30;

static MNIST10K_IMAGES: &[u8] = include_bytes!("../../../data/mnist10k-images-idx3-ubyte.gz");
static MNIST10K_LABELS: &[u8] = include_bytes!("../../../data/mnist10k-labels-idx1-ubyte.gz");

/// Reads an IDX image file (u8 pixels, scaled to [0, 1], sample shape [1, rows, cols]) and
/// its label file (classes = largest label + 1). Each part may be gzipped.
pub fn read_idx(images: &[u8], labels: &[u8]) -> Result<Dataset, DataError> {
    let images = gunzip_if_compressed("images", images, MAX_DECODED_BYTES)?;
    let labels = gunzip_if_compressed("labels", labels, MAX_DECODED_BYTES)?;

    let (image_dims, pixels) = split_header("images", &images, IMAGES_MAGIC, 3)?;
    let [count, height, width] = [image_dims[0], image_dims[1], image_dims[2]];
    if count == 0 {
        return Err(DataError::invalid("images", "the file holds zero images"));
    }
    if height == 0 || width == 0 {
        return Err(DataError::invalid(
            "images",
            format!("the header declares empty {height}x{width} images"),
        ));
    }
    let (label_dims, label_bytes) = split_header("labels", &labels, LABELS_MAGIC, 1)?;
    if label_dims[0] != count {
        return Err(DataError::invalid(
            "labels",
            format!("{} labels for {count} images", label_dims[0]),
        ));
    }
    let classes = label_bytes.iter().copied().max().map_or(0, usize::from) + 1;
    Ok(Dataset {
        features: Features::Dense {
            values: pixels.iter().map(|&p| f32::from(p) / 255.0).collect(),
            sample_shape: vec![1, height, width],
        },
        targets: Targets::Classes {
            labels: label_bytes.iter().map(|&l| u32::from(l)).collect(),
            classes,
        },
    })
}

/// The first 10,000 MNIST test images, embedded: 10 classes, sample shape [1, 28, 28].
pub fn mnist10k() -> Dataset {
    read_idx(MNIST10K_IMAGES, MNIST10K_LABELS)
        .expect("the embedded MNIST subset is valid IDX (checked by the tests)")
}

/// Checks the magic number, reads `rank` big-endian u32 dimensions, and returns them with the
/// payload, which must hold exactly the bytes they promise: checked before anything is
/// allocated for the values.
fn split_header<'a>(
    part: &str,
    bytes: &'a [u8],
    magic: u32,
    rank: usize,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let header_len = 4 * (rank + 1);
    let word = |index: usize| {
        let start = index * 4;
        u32::from_be_bytes([
            bytes[start],
            bytes[start + 1],
            bytes[start + 2],
            bytes[start + 3],
        ])
    };
    // The magic first: a labels file passed as images is short, and "truncated" would mislead.
    if bytes.len() >= 4 && word(0) != magic {
        return Err(DataError::invalid(
            part,
            format!(
                "wrong magic number 0x{:08x}; expected 0x{magic:08x} (an IDX {part} file)",
                word(0)
            ),
        ));
    }
    if bytes.len() < header_len {
        return Err(DataError::invalid(
            part,
            format!(
                "truncated: {} bytes, shorter than the {header_len}-byte IDX header",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = (1..=rank).map(|index| word(index) as usize).collect();
    let promised = dims
        .iter()
        .try_fold(1usize, |total, &dim| total.checked_mul(dim))
        .ok_or_else(|| DataError::invalid(part, format!("header dimensions {dims:?} overflow")))?;
    let payload = &bytes[header_len..];
    if payload.len() < promised {
        return Err(DataError::invalid(
            part,
            format!(
                "truncated: the header promises {promised} bytes of data, found {}",
                payload.len()
            ),
        ));
    }
    if payload.len() > promised {
        return Err(DataError::invalid(
            part,
            format!(
                "{} bytes after the {promised} bytes the header promises",
                payload.len() - promised
            ),
        ));
    }
    Ok((dims, payload))
}

/// Decodes a gzipped part (recognised by its magic bytes) or passes a raw one through.
fn gunzip_if_compressed<'a>(
    part: &str,
    bytes: &'a [u8],
    max_decoded: u64,
) -> Result<Cow<'a, [u8]>, DataError> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(Cow::Borrowed(bytes));
    }
    // The gzip trailer's last 4 bytes are the decoded size (mod 2^32): reserve it up front
    // instead of growing and copying, but never more than the limit or 256 MiB on its word.
    let claimed = bytes
        .last_chunk::<4>()
        .map_or(0, |size| u64::from(u32::from_le_bytes(*size)));
    let mut decoded = Vec::with_capacity(claimed.min(max_decoded + 1).min(1 << 28) as usize);
    // One byte past the limit tells "exactly at the limit" from "over it".
    flate2::read::MultiGzDecoder::new(bytes)
        .take(max_decoded + 1)
        .read_to_end(&mut decoded)
        .map_err(|e| DataError::invalid(part, format!("corrupt gzip data: {e}")))?;
    if decoded.len() as u64 > max_decoded {
        return Err(DataError::invalid(
            part,
            format!("decompresses to more than {max_decoded} bytes; refusing to go on"),
        ));
    }
    Ok(Cow::Owned(decoded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut bytes = magic.to_be_bytes().to_vec();
        for dim in dims {
            bytes.extend(dim.to_be_bytes());
        }
        bytes.extend(payload);
        bytes
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).expect("writes to memory");
        encoder.finish().expect("writes to memory")
    }

    /// Two 2x3 images and their labels.
    fn small_pair() -> (Vec<u8>, Vec<u8>) {
        let pixels = [0, 51, 102, 153, 204, 255, 255, 0, 0, 0, 0, 0];
        (
            idx(IMAGES_MAGIC, &[2, 2, 3], &pixels),
            idx(LABELS_MAGIC, &[2], &[3, 1]),
        )
    }

    fn expected_small() -> Dataset {
        Dataset {
            features: Features::Dense {
                values: vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                sample_shape: vec![1, 2, 3],
            },
            targets: Targets::Classes {
                labels: vec![3, 1],
                classes: 4,
            },
        }
    }

    #[test]
    fn raw_and_gzipped_files_give_the_same_scaled_dataset() {
        let (images, labels) = small_pair();
        assert_eq!(read_idx(&images, &labels).expect("raw"), expected_small());
        assert_eq!(
            read_idx(&gzip(&images), &gzip(&labels)).expect("gzipped"),
            expected_small()
        );
        assert_eq!(
            read_idx(&gzip(&images), &labels).expect("mixed"),
            expected_small()
        );
    }

    fn error_text(images: &[u8], labels: &[u8]) -> String {
        read_idx(images, labels).expect_err("invalid").to_string()
    }

    #[test]
    fn a_wrong_magic_number_names_the_part() {
        let (images, labels) = small_pair();
        assert_eq!(
            error_text(&labels, &labels),
            "images: wrong magic number 0x00000801; expected 0x00000803 (an IDX images file)"
        );
        assert!(error_text(&images, &images).starts_with("labels: wrong magic number"));
    }

    #[test]
    fn truncated_or_padded_data_is_rejected_before_allocating() {
        let (images, labels) = small_pair();
        assert_eq!(
            error_text(&images[..images.len() - 1], &labels),
            "images: truncated: the header promises 12 bytes of data, found 11"
        );
        assert_eq!(
            error_text(&images[..10], &labels),
            "images: truncated: 10 bytes, shorter than the 16-byte IDX header"
        );
        assert!(error_text(&images[..2], &labels).contains("shorter than the 16-byte"));
        // A header promising 4 billion huge images must fail on the length check alone.
        let bomb = idx(IMAGES_MAGIC, &[u32::MAX, 60_000, 60_000], &[]);
        assert!(error_text(&bomb, &labels).starts_with("images:"));
        let mut padded = labels.clone();
        padded.push(0);
        assert_eq!(
            error_text(&images, &padded),
            "labels: 1 bytes after the 2 bytes the header promises"
        );
        assert!(error_text(&gzip(&images)[..20], &labels).contains("corrupt gzip"));
    }

    #[test]
    fn counts_must_match_and_be_positive() {
        let (images, _) = small_pair();
        let three_labels = idx(LABELS_MAGIC, &[3], &[0, 1, 2]);
        assert_eq!(
            error_text(&images, &three_labels),
            "labels: 3 labels for 2 images"
        );
        let empty_images = idx(IMAGES_MAGIC, &[0, 28, 28], &[]);
        let empty_labels = idx(LABELS_MAGIC, &[0], &[]);
        assert_eq!(
            error_text(&empty_images, &empty_labels),
            "images: the file holds zero images"
        );
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        let (images, _) = small_pair();
        let compressed = gzip(&images);
        let error = gunzip_if_compressed("images", &compressed, 27).unwrap_err();
        assert_eq!(
            error.to_string(),
            "images: decompresses to more than 27 bytes; refusing to go on"
        );
        let decoded = gunzip_if_compressed("images", &compressed, 28).expect("at the limit");
        assert_eq!(decoded.as_ref(), images.as_slice());
    }

    #[test]
    fn the_embedded_mnist_subset_has_the_known_class_counts() {
        let data = mnist10k();
        assert_eq!(data.rows(), 10_000);
        assert_eq!(data.sample_shape(), vec![1, 28, 28]);
        assert_eq!(data.output_dim(), 10);
        let Targets::Classes { labels, .. } = &data.targets else {
            panic!("MNIST is classification");
        };
        let mut counts = [0usize; 10];
        for &label in labels {
            counts[label as usize] += 1;
        }
        assert_eq!(
            counts,
            [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
        );
        let Features::Dense { values, .. } = &data.features else {
            panic!("MNIST is dense");
        };
        assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(values.iter().copied().fold(0.0f32, f32::max), 1.0);
    }
}
