//! Keyset paging shared by the list endpoints: `limit` and `cursor` in, `next_cursor` out.

use super::ApiError;

/// The page sizes a list endpoint serves; `limit` outside them is a 400 naming it.
pub const LIMITS: std::ops::RangeInclusive<u32> = 1..=100;

/// The page size when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 20;

/// The page size (1..=100, default 20) and the sequence number to continue below, from a
/// list endpoint's query.
pub fn page(limit: Option<u32>, cursor: Option<&str>) -> Result<(i64, Option<i64>), ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !LIMITS.contains(&limit) {
        return Err(ApiError::bad_parameter(
            "limit",
            format!(
                "limit: must be {} to {}, got {limit}",
                LIMITS.start(),
                LIMITS.end()
            ),
        ));
    }
    let before = cursor
        .map(|cursor| {
            cursor
                .parse::<i64>()
                .map_err(|_| ApiError::bad_request("cursor: not a cursor this server gave"))
        })
        .transpose()?;
    Ok((i64::from(limit), before))
}

/// The cursor of the next (older) page: the last row's sequence number when the page is
/// full, nothing on the last page.
pub fn next_cursor(rows: usize, limit: i64, last_seq: Option<i64>) -> Option<String> {
    (rows as i64 == limit)
        .then(|| last_seq.map(|seq| seq.to_string()))
        .flatten()
}
