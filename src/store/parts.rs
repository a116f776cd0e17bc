//! Uploaded bytes (a dataset's `x` and `y`, a weights file) are stored in parts of at most
//! [`PART_BYTES`], each its own row, written in the transaction that inserts their upload
//! and read back in order. A whole 60 MB value bound to one statement was copied by the
//! driver and again into the record the database built from it; in parts, storing an upload
//! holds only the upload itself (and a part) in memory, and so does reading it back.
//!
//! Uploads stored before parts existed keep their bytes inline in their own row; new ones
//! leave the inline value empty, which is how a reader tells the two apart.

use futures_util::{Stream, TryStreamExt};

use super::StoreError;

/// The most bytes in one part.
pub(crate) const PART_BYTES: usize = 1 << 20;

/// The bytes in their parts, with each part's position.
pub(crate) fn split(bytes: &[u8]) -> impl Iterator<Item = (i64, &[u8])> {
    bytes
        .chunks(PART_BYTES)
        .enumerate()
        .map(|(position, part)| (position as i64, part))
}

/// The inline value of a new upload's row: empty, the bytes being in parts. (`None` stays
/// `None`: a dataset without `y`.)
pub(crate) fn inline_placeholder(bytes: Option<&Vec<u8>>) -> Option<Vec<u8>> {
    bytes.map(|_| Vec::new())
}

/// The stored bytes: `inline` when the row holds them (stored before parts), else the parts
/// that `parts` reads in order, gathered into one buffer of `capacity` reserved up front.
pub(crate) async fn gather<S>(
    inline: Vec<u8>,
    parts: S,
    capacity: usize,
) -> Result<Vec<u8>, StoreError>
where
    S: Stream<Item = Result<Vec<u8>, sqlx::Error>>,
{
    if !inline.is_empty() {
        return Ok(inline);
    }
    let mut bytes = Vec::with_capacity(capacity);
    let mut parts = std::pin::pin!(parts);
    while let Some(part) = parts.try_next().await? {
        bytes.extend_from_slice(&part);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_split_into_parts_of_at_most_a_mebibyte_in_order() {
        let bytes: Vec<u8> = (0..(2 * PART_BYTES + 5)).map(|i| (i % 251) as u8).collect();
        let parts: Vec<(i64, &[u8])> = split(&bytes).collect();
        assert_eq!(
            parts.iter().map(|(p, b)| (*p, b.len())).collect::<Vec<_>>(),
            [(0, PART_BYTES), (1, PART_BYTES), (2, 5)]
        );
        let joined: Vec<u8> = parts.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        assert_eq!(joined, bytes);
        assert_eq!(split(&[]).count(), 0);
    }
}
