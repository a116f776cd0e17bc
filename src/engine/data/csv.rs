//! CSV with a header row: every cell a finite number, one column the target. Errors carry the
//! file's line number and the column name so a user can go straight to the bad cell. Every
//! step is linear in the file's size, however wide the header.

use std::collections::HashSet;

use super::{
    number_label, targets_from_values, DataError, Dataset, DatasetInfo, Features, TargetTally, Task,
};
use crate::engine::quote::quoted;

/// Columns quoted in a message that lists them; the rest are counted, so that a header of
/// 100,000 names does not become a megabyte of error message.
const LISTED_COLUMNS: usize = 20;

/// Reads a CSV file with a header row. `target` names the target column (default: the last
/// column); `task` None detects classification (integer targets with at most 50 distinct
/// values, remapped to 0..k in sorted order) or regression.
pub fn read_csv(
    bytes: &[u8],
    target: Option<&str>,
    task: Option<Task>,
) -> Result<Dataset, DataError> {
    CsvFile::open(bytes)?.read(target, task)
}

/// A CSV file whose header row has been read and whose data rows have not: a caller can refuse
/// a file by its column count before paying for its rows.
pub struct CsvFile<'a> {
    reader: ::csv::Reader<&'a [u8]>,
    header: ::csv::StringRecord,
}

impl<'a> CsvFile<'a> {
    /// Reads the header row only.
    pub fn open(bytes: &'a [u8]) -> Result<CsvFile<'a>, DataError> {
        let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
        let mut reader = ::csv::ReaderBuilder::new()
            .has_headers(true)
            // Ragged rows are reported by us, with the row number and the counts.
            .flexible(true)
            .trim(::csv::Trim::All)
            .from_reader(bytes);
        let header = reader
            .headers()
            .map_err(|e| DataError::invalid("csv", format!("unreadable header row: {e}")))?
            .clone();
        Ok(CsvFile { reader, header })
    }

    /// Cells in the header row of `bytes`, counted without reading them into memory (a
    /// separator inside quotes does not count), so that a header of millions of cells can be
    /// refused before the reader allocates one entry per cell.
    pub fn header_width(bytes: &[u8]) -> usize {
        let mut quoted = false;
        let mut cells = 1;
        for &byte in bytes {
            match byte {
                b'"' => quoted = !quoted,
                b',' if !quoted => cells += 1,
                b'\n' | b'\r' if !quoted => break,
                _ => {}
            }
        }
        cells
    }

    /// Cells in the header row, before any check of their names.
    pub fn column_count(&self) -> usize {
        self.header.len()
    }

    /// Checks the header and reads the data rows, as `read_csv` describes.
    pub fn read(self, target: Option<&str>, task: Option<Task>) -> Result<Dataset, DataError> {
        let mut features = Vec::new();
        let mut target_values = Vec::new();
        // Line numbers of the data rows, to name the row of a bad target found later.
        let mut lines = Vec::new();
        let scanned = self.scan(
            target,
            |value| features.push(value),
            |value, line| {
                target_values.push(value);
                lines.push(line);
            },
        )?;
        let targets = targets_from_values(&target_values, task, "csv", |index| {
            not_a_label(&scanned.target_column, lines[index], target_values[index])
        })?;
        Ok(Dataset {
            features: Features::Dense {
                values: features,
                sample_shape: vec![scanned.feature_count],
            },
            targets,
        })
    }

    /// Every check of [`read`](Self::read), with the same errors, and what the dataset would
    /// hold, keeping neither its features nor its targets: an upload is checked this way, in
    /// little more memory than the file itself.
    pub fn check(self, target: Option<&str>, task: Option<Task>) -> Result<DatasetInfo, DataError> {
        let mut tally = TargetTally::default();
        let scanned = self.scan(target, |_| {}, |value, line| tally.add(value, line))?;
        let (task, classes) = tally.finish(task, "csv", |line, value| {
            not_a_label(&scanned.target_column, line, value)
        })?;
        Ok(DatasetInfo {
            rows: scanned.rows,
            features: scanned.feature_count,
            sample_shape: vec![scanned.feature_count],
            classes,
            task,
        })
    }

    /// Checks the header and every data row, handing each feature value to `feature` and each
    /// target value, with its line, to `target`, in row order.
    fn scan(
        self,
        target: Option<&str>,
        mut feature: impl FnMut(f32),
        mut target_value: impl FnMut(f64, usize),
    ) -> Result<Scanned, DataError> {
        let CsvFile { mut reader, header } = self;
        let mut columns: Vec<String> = header
            .iter()
            .enumerate()
            .map(|(index, name)| {
                if name.is_empty() {
                    format!("(unnamed column {})", index + 1)
                } else {
                    name.to_string()
                }
            })
            .collect();
        if columns.is_empty() || (columns.len() == 1 && header.get(0) == Some("")) {
            return Err(DataError::invalid(
                "csv",
                "the file is empty; a header row is required",
            ));
        }
        if columns.len() < 2 {
            return Err(DataError::invalid(
                "csv",
                format!(
                    "only one column ({}); at least one feature column and a target column are needed",
                    quoted(&columns[0])
                ),
            ));
        }
        // A set: scanning the earlier names for each name is quadratic, 16 s for 100,000.
        let mut seen = HashSet::with_capacity(columns.len());
        if let Some(duplicate) = columns.iter().find(|name| !seen.insert(name.as_str())) {
            return Err(DataError::invalid(
                "csv",
                format!("the header names column {} twice", quoted(duplicate)),
            ));
        }
        let target_index = match target {
            None => columns.len() - 1,
            Some(name) => columns
                .iter()
                .position(|c| c == name.trim())
                .ok_or_else(|| {
                    DataError::invalid(
                        "csv",
                        format!(
                            "no column named {}; the columns are {}",
                            quoted(name),
                            listed(&columns)
                        ),
                    )
                })?,
        };

        let feature_count = columns.len() - 1;
        let mut rows = 0usize;
        let mut record = ::csv::StringRecord::new();
        loop {
            match reader.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => {
                    let row = error.position().map_or(0, |p| p.line() as usize);
                    return Err(DataError::Csv {
                        row,
                        column: String::new(),
                        message: format!("unreadable row: {error}"),
                    });
                }
            }
            let row = record.position().map_or(0, |p| p.line() as usize);
            if record.len() != columns.len() {
                return Err(DataError::Csv {
                    row,
                    column: String::new(),
                    message: format!(
                        "expected {} cells (one per header column), found {}",
                        columns.len(),
                        record.len()
                    ),
                });
            }
            for (index, cell) in record.iter().enumerate() {
                let value = parse_cell(cell).map_err(|message| DataError::Csv {
                    row,
                    column: columns[index].clone(),
                    message,
                })?;
                if index == target_index {
                    target_value(value, row);
                } else {
                    feature(value as f32);
                }
            }
            rows += 1;
        }

        if rows < 2 {
            return Err(DataError::invalid(
                "csv",
                format!("found {rows} data rows; at least 2 are needed"),
            ));
        }
        Ok(Scanned {
            rows,
            feature_count,
            target_column: columns.swap_remove(target_index),
        })
    }
}

/// What a scan of every row found.
struct Scanned {
    rows: usize,
    feature_count: usize,
    target_column: String,
}

/// The error for a classification target on `line` that is not an integer.
fn not_a_label(column: &str, line: usize, value: f64) -> DataError {
    DataError::Csv {
        row: line,
        column: column.to_string(),
        message: format!("{} is not a class label (an integer)", number_label(value)),
    }
}

/// `"a", "b", ... and 99980 more`: the first LISTED_COLUMNS names, quoted.
fn listed(columns: &[String]) -> String {
    let mut text = columns
        .iter()
        .take(LISTED_COLUMNS)
        .map(|name| quoted(name).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if columns.len() > LISTED_COLUMNS {
        text.push_str(&format!(
            ", ... and {} more",
            columns.len() - LISTED_COLUMNS
        ));
    }
    text
}

/// A finite number that also fits an f32 (features are stored as f32).
fn parse_cell(cell: &str) -> Result<f64, String> {
    if cell.is_empty() {
        return Err("empty cell; every cell must be a number".to_string());
    }
    let value: f64 = cell
        .parse()
        .map_err(|_| format!("{} is not a number", quoted(cell)))?;
    if !value.is_finite() {
        return Err(format!("{} is not a finite number", quoted(cell)));
    }
    if !(value as f32).is_finite() {
        return Err(format!("{} is too large for a 32-bit float", quoted(cell)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::data::Targets;

    #[test]
    fn a_check_finds_what_a_read_finds_without_keeping_the_features() {
        let many_classes: String = std::iter::once("a,label\n".to_string())
            .chain((0..60).map(|i| format!("{i},{i}\n")))
            .collect();
        let cases: Vec<(&str, Option<&str>, Option<Task>)> = vec![
            ("a,y\n1,0\n2,1.5\n3,2.5\n", None, Some(Task::Classification)),
            ("a,y\n1,0\n2,1\n", None, Some(Task::LanguageModel)),
            ("a,y\n1,0\n2,1\n", None, Some(Task::Regression)),
            ("a,y\n1,-0\n2,0\n", None, None),
            (&many_classes, None, None),
            (&many_classes, None, Some(Task::Classification)),
            ("a,b,label\n1,2,0\n3,4,1\n5,6,1\n", None, None),
            ("a,b,y\n1,2,0.5\n3,4,1.5\n", None, None),
            (
                "label,a\n1,2\n0,4\n",
                Some("label"),
                Some(Task::Classification),
            ),
            ("a,b,label\n1,2,0\n3,4\n", None, None),
            ("a,b,label\n1,x,0\n3,4,1\n", None, None),
            (
                "a,b,label\n1,2,0\n3,4,0\n",
                None,
                Some(Task::Classification),
            ),
            ("a,b,label\n1,2,0\n", None, None),
            ("a,a,label\n1,2,0\n3,4,1\n", None, None),
        ];
        for (csv, target, task) in cases {
            let read = CsvFile::open(csv.as_bytes())
                .and_then(|file| file.read(target, task))
                .map(|dataset| dataset.info())
                .map_err(|error| error.to_string());
            let checked = CsvFile::open(csv.as_bytes())
                .and_then(|file| file.check(target, task))
                .map_err(|error| error.to_string());
            assert_eq!(checked, read, "{csv:?}");
        }
        let info = CsvFile::open(b"a,b,label\n1,2,0\n3,4,1\n5,6,1\n")
            .and_then(|file| file.check(None, None))
            .unwrap();
        assert_eq!((info.rows, info.features, info.classes), (3, 2, Some(2)));
    }

    fn error_text(csv: &str) -> String {
        read_csv(csv.as_bytes(), None, None)
            .expect_err("the file is invalid")
            .to_string()
    }

    #[test]
    fn a_classification_file_is_read_with_labels_remapped_in_sorted_order() {
        let data = read_csv(
            b"a,b,label\n1,2,10\n3.5,-4,-1\n5,6e1,10\n0,0,3\n",
            None,
            None,
        )
        .expect("valid csv");
        assert_eq!(
            data.features,
            Features::Dense {
                values: vec![1.0, 2.0, 3.5, -4.0, 5.0, 60.0, 0.0, 0.0],
                sample_shape: vec![2],
            }
        );
        // Sorted distinct values -1, 3, 10 become classes 0, 1, 2.
        assert_eq!(
            data.targets,
            Targets::Classes {
                labels: vec![2, 0, 2, 1],
                classes: 3,
            }
        );
        assert_eq!(data.task(), Task::Classification);
    }

    #[test]
    fn a_fractional_target_is_detected_as_regression() {
        let data = read_csv(b"x,y\n1,0.5\n2,1.5\n", None, None).expect("valid csv");
        assert_eq!(
            data.targets,
            Targets::Values {
                values: vec![0.5, 1.5],
                dims: 1,
            }
        );
    }

    #[test]
    fn an_integer_target_with_more_than_50_values_is_detected_as_regression() {
        let mut text = String::from("x,y\n");
        for i in 0..51 {
            text.push_str(&format!("{i},{}\n", i * 2));
        }
        let data = read_csv(text.as_bytes(), None, None).expect("valid csv");
        assert_eq!(data.task(), Task::Regression);
        let text_50: String = text.lines().take(51).map(|l| format!("{l}\n")).collect();
        let data = read_csv(text_50.as_bytes(), None, None).expect("valid csv");
        assert_eq!(data.output_dim(), 50);
    }

    #[test]
    fn an_explicit_task_overrides_detection() {
        let data = read_csv(b"x,y\n1,0\n2,1\n", None, Some(Task::Regression)).expect("valid csv");
        assert_eq!(
            data.targets,
            Targets::Values {
                values: vec![0.0, 1.0],
                dims: 1,
            }
        );
        let error = read_csv(b"x,y\n1,0\n2,1.5\n", None, Some(Task::Classification)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "row 3, column \"y\": 1.5 is not a class label (an integer)"
        );
        let error = read_csv(b"x,y\n1,0\n2,1\n", None, Some(Task::LanguageModel)).unwrap_err();
        assert!(
            matches!(error, DataError::Invalid { ref part, .. } if part == "csv"),
            "{error}"
        );
    }

    #[test]
    fn the_target_column_can_be_named_anywhere() {
        let data =
            read_csv(b"a,target,b\n1,0,2\n3,1,4\n", Some("target"), None).expect("valid csv");
        assert_eq!(
            data.features,
            Features::Dense {
                values: vec![1.0, 2.0, 3.0, 4.0],
                sample_shape: vec![2],
            }
        );
        assert_eq!(data.output_dim(), 2);
    }

    #[test]
    fn a_bom_crlf_line_ends_and_spaces_around_cells_are_accepted() {
        let data = read_csv(
            b"\xef\xbb\xbf x , y \r\n 1 , 2.5\r\n3,4.5\r\n",
            Some("x"),
            None,
        )
        .expect("valid csv");
        assert_eq!(
            data.features,
            Features::Dense {
                values: vec![2.5, 4.5],
                sample_shape: vec![1],
            }
        );
        assert_eq!(data.output_dim(), 2);
    }

    #[test]
    fn a_ragged_row_names_the_row_and_the_counts() {
        assert_eq!(
            error_text("a,b,c\n1,2,3\n1,2\n"),
            "row 3: expected 3 cells (one per header column), found 2"
        );
        assert_eq!(
            error_text("a,b,c\n1,2,3\n4,5,6\n1,2,3,4\n"),
            "row 4: expected 3 cells (one per header column), found 4"
        );
    }

    #[test]
    fn a_bad_cell_names_its_row_and_column() {
        assert_eq!(
            error_text("x1,x2,x3,y\n1,2,3,0\n1,2,3,1\n1,2,3,0\n1,2,abc,1\n"),
            "row 5, column \"x3\": \"abc\" is not a number"
        );
        assert_eq!(
            error_text("x,y\n1,0\nNaN,1\n"),
            "row 3, column \"x\": \"NaN\" is not a finite number"
        );
        assert_eq!(
            error_text("x,y\n1,inf\n2,1\n"),
            "row 2, column \"y\": \"inf\" is not a finite number"
        );
        assert_eq!(
            error_text("x,y\n1,0\n,1\n"),
            "row 3, column \"x\": empty cell; every cell must be a number"
        );
        assert_eq!(
            error_text("x,y\n1e39,0\n2,1\n"),
            "row 2, column \"x\": \"1e39\" is too large for a 32-bit float"
        );
    }

    #[test]
    fn an_unknown_target_lists_the_columns() {
        let error = read_csv(b"a,b\n1,2\n3,4\n", Some("label"), None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "csv: no column named \"label\"; the columns are \"a\", \"b\""
        );
    }

    /// Columns named c0, c1, ...; every cell 0.5 but the last, which alternates 0 and 1.
    fn wide_csv(columns: usize, rows: usize) -> String {
        let names: Vec<String> = (0..columns).map(|column| format!("c{column}")).collect();
        let mut text = names.join(",");
        text.push('\n');
        for row in 0..rows {
            text.push_str(&"0.5,".repeat(columns - 1));
            text.push_str(if row % 2 == 0 { "0\n" } else { "1\n" });
        }
        text
    }

    #[test]
    fn a_csv_with_100000_columns_is_read() {
        let data = read_csv(wide_csv(100_000, 3).as_bytes(), None, None).expect("valid csv");
        assert_eq!(data.feature_count(), 99_999);
        assert_eq!(data.rows(), 3);
        assert_eq!(
            data.targets,
            Targets::Classes {
                labels: vec![0, 1, 0],
                classes: 2,
            }
        );
    }

    #[test]
    fn a_duplicate_name_in_a_wide_header_is_named() {
        let text = wide_csv(100_000, 3).replacen("c99998,", "c5,", 1);
        assert_eq!(
            error_text(&text),
            "csv: the header names column \"c5\" twice"
        );
    }

    #[test]
    fn an_unknown_target_in_a_wide_header_lists_20_names_and_counts_the_rest() {
        let error = read_csv(wide_csv(100_000, 3).as_bytes(), Some("label"), None).unwrap_err();
        let first: Vec<String> = (0..20).map(|column| format!("\"c{column}\"")).collect();
        assert_eq!(
            error.to_string(),
            format!(
                "csv: no column named \"label\"; the columns are {}, ... and 99980 more",
                first.join(", ")
            )
        );
    }

    #[test]
    fn opening_a_file_reads_its_header_and_not_its_rows() {
        let file = CsvFile::open(b"a,b,c\n1,x,3\n").expect("a readable header");
        assert_eq!(file.column_count(), 3);
        assert_eq!(CsvFile::header_width(b"a,b,c\n1,x,3\n"), 3);
        assert_eq!(
            CsvFile::header_width(b"\"a,b\",\"say \"\"hi,\"\"\",c\r\n1,2,3"),
            3
        );
        let quoted = CsvFile::open(b"\"a,b\",\"say \"\"hi,\"\"\",c\r\n1,2,3").unwrap();
        assert_eq!(quoted.column_count(), 3);
        assert_eq!(
            file.read(None, None).unwrap_err().to_string(),
            "row 2, column \"b\": \"x\" is not a number"
        );
    }

    #[test]
    fn too_little_data_is_rejected() {
        assert_eq!(
            error_text("x,y\n1,2\n"),
            "csv: found 1 data rows; at least 2 are needed"
        );
        assert!(error_text("y\n1\n2\n").contains("at least one feature column"));
        assert!(error_text("").contains("header row is required"));
        assert!(error_text("x,x\n1,2\n3,4\n").contains("twice"));
        assert!(error_text("x,y\n1,5\n2,5\n").contains("single class"));
    }
}
