//! A UTF-8 corpus as a character language-model dataset: the vocabulary is the sorted set of
//! distinct characters, and each row is a window of `context` ids predicting the next ones.

use std::collections::BTreeSet;

use super::{DataError, Dataset, Features, Targets};

/// The corpus cut into windows of `context + 1` characters with stride `context`: features are
/// the first `context` ids of each window, targets the last `context`. Use
/// `read_text_with_vocab` when the id-to-character table is needed too (to print samples).
pub fn read_text(bytes: &[u8], context: usize) -> Result<Dataset, DataError> {
    read_text_with_vocab(bytes, context).map(|(data, _)| data)
}

/// `read_text`, also returning the vocabulary: token id i is the character `vocab[i]`.
pub fn read_text_with_vocab(
    bytes: &[u8],
    context: usize,
) -> Result<(Dataset, Vec<char>), DataError> {
    if context == 0 {
        return Err(DataError::invalid(
            "text",
            "the context must be at least 1 character",
        ));
    }
    let text = decode(bytes)?;
    let vocab: Vec<char> = text
        .chars()
        .collect::<BTreeSet<char>>()
        .into_iter()
        .collect();
    let ids: Vec<u32> = text
        .chars()
        .map(|c| {
            vocab
                .binary_search(&c)
                .map(|index| index as u32)
                .unwrap_or_default()
        })
        .collect();
    let windows = text_windows(ids.len(), context)?;
    let mut inputs = Vec::with_capacity(windows * context);
    let mut targets = Vec::with_capacity(windows * context);
    for window in 0..windows {
        let start = window * context;
        inputs.extend_from_slice(&ids[start..start + context]);
        targets.extend_from_slice(&ids[start + 1..start + context + 1]);
    }
    let data = Dataset {
        features: Features::Tokens {
            ids: inputs,
            context,
        },
        targets: Targets::Tokens {
            ids: targets,
            vocab: vocab.len(),
        },
    };
    Ok((data, vocab))
}

/// The windows (rows) a corpus of `characters` makes with this context; at least 2 are
/// needed. Known before the corpus is read, so a job's cost is checked at submit from it.
pub fn text_windows(characters: usize, context: usize) -> Result<usize, DataError> {
    // The last window needs one character past its inputs for its final target.
    let windows = characters.saturating_sub(1) / context.max(1);
    if windows < 2 {
        return Err(DataError::invalid(
            "text",
            format!(
                "{characters} characters make {windows} windows; a context of {context} needs at least {} characters for 2",
                context.saturating_mul(2).saturating_add(1)
            ),
        ));
    }
    Ok(windows)
}

/// The sorted distinct characters of a corpus: the same table `read_text_with_vocab` returns.
pub fn text_vocabulary(bytes: &[u8]) -> Result<Vec<char>, DataError> {
    let text = decode(bytes)?;
    Ok(text
        .chars()
        .collect::<BTreeSet<char>>()
        .into_iter()
        .collect())
}

fn decode(bytes: &[u8]) -> Result<&str, DataError> {
    std::str::from_utf8(bytes).map_err(|e| {
        DataError::invalid(
            "text",
            format!("not UTF-8: invalid byte at offset {}", e.valid_up_to()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::data::Task;

    #[test]
    fn the_corpus_is_cut_into_shifted_windows() {
        // Vocabulary: ' ' a b c -> ids 0 1 2 3. "abc abca" is 8 chars: (8 - 1) / 3 = 2 windows.
        let (data, vocab) = read_text_with_vocab(b"abc abca", 3).expect("valid text");
        assert_eq!(vocab, vec![' ', 'a', 'b', 'c']);
        assert_eq!(
            data.features,
            Features::Tokens {
                ids: vec![1, 2, 3, 0, 1, 2],
                context: 3,
            }
        );
        assert_eq!(
            data.targets,
            Targets::Tokens {
                ids: vec![2, 3, 0, 1, 2, 3],
                vocab: 4,
            }
        );
        assert_eq!(data.rows(), 2);
        assert_eq!(data.task(), Task::LanguageModel);
        assert_eq!(data.output_dim(), 4);
        assert_eq!(read_text(b"abc abca", 3).expect("valid text"), data);
    }

    #[test]
    fn characters_beyond_ascii_are_single_tokens() {
        let vocab = text_vocabulary("héé€h".as_bytes()).expect("valid text");
        assert_eq!(vocab, vec!['h', 'é', '€']);
        let data = read_text("héé€h".as_bytes(), 2).expect("valid text");
        assert_eq!(
            data.features,
            Features::Tokens {
                ids: vec![0, 1, 1, 2],
                context: 2,
            }
        );
    }

    #[test]
    fn short_text_says_how_many_characters_are_needed() {
        let error = read_text(b"abcdef", 3).unwrap_err();
        assert_eq!(
            error.to_string(),
            "text: 6 characters make 1 windows; a context of 3 needs at least 7 characters for 2"
        );
        assert!(read_text(b"abcdefg", 3).is_ok());
        assert!(read_text(b"", 1).is_err());
        assert!(read_text(b"abc", 0).is_err());
    }

    #[test]
    fn invalid_utf8_names_the_byte_offset() {
        let error = read_text(b"abc\xffdef", 1).unwrap_err();
        assert_eq!(
            error.to_string(),
            "text: not UTF-8: invalid byte at offset 3"
        );
        assert!(text_vocabulary(b"\xc3").is_err());
    }
}
