//! SmartREST CSV, as Cumulocity's MQTT devices speak it: one row per line, fields separated
//! by commas; a field holding a comma, a double quote, a line break, or leading or trailing
//! spaces is written between double quotes, with a double quote inside escaped by a
//! backslash (`\"`, Cumulocity's rule, both ways); `""` inside quotes is read as one quote
//! too (plain CSV). A backslash before anything else is itself. A message may hold several
//! rows (`\n` or `\r\n` between them); empty lines are skipped.
//!
//! Cumulocity's escaping has no escape for a backslash, so a quoted field cannot end with
//! one (`"a\"` is an escaped quote): such a value does not survive a round trip.
//!
//! Pure: text in, rows out (and back). Errors name the row and column.

use std::fmt;

/// Longest message the parser reads, bytes (Cumulocity's own limit; a longer one is refused,
/// not truncated).
pub const MESSAGE_BYTES_MAX: usize = 16_184;
/// Most rows in one message (each is a durable write).
pub const ROWS_MAX: usize = 100;
/// Most fields in one row.
pub const FIELDS_MAX: usize = 256;

/// Why a message is not valid CSV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvError {
    /// 1-based row (line) where the problem is.
    pub row: usize,
    /// 1-based column (character) in that line.
    pub column: usize,
    /// What is wrong.
    pub what: CsvProblem,
}

/// What is wrong with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsvProblem {
    /// A quoted field is not closed before the message ends.
    UnterminatedQuote,
    /// Something other than a comma or a line break follows a closing quote.
    TextAfterQuote,
    /// The message is longer than [`MESSAGE_BYTES_MAX`].
    TooLong,
    /// More rows than [`ROWS_MAX`].
    TooManyRows,
    /// More fields than [`FIELDS_MAX`] in a row.
    TooManyFields,
}

impl fmt::Display for CsvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.what {
            CsvProblem::UnterminatedQuote => "a quoted field is not closed".to_owned(),
            CsvProblem::TextAfterQuote => {
                "only a comma or a line break may follow a closing quote".to_owned()
            }
            CsvProblem::TooLong => format!("the message is longer than {MESSAGE_BYTES_MAX} bytes"),
            CsvProblem::TooManyRows => format!("more than {ROWS_MAX} rows in one message"),
            CsvProblem::TooManyFields => format!("more than {FIELDS_MAX} fields in a row"),
        };
        write!(f, "row {}, column {}: {what}", self.row, self.column)
    }
}

impl std::error::Error for CsvError {}

/// Parses a message into rows of fields.
pub fn parse(text: &str) -> Result<Vec<Vec<String>>, CsvError> {
    if text.len() > MESSAGE_BYTES_MAX {
        return Err(CsvError {
            row: 1,
            column: 1,
            what: CsvProblem::TooLong,
        });
    }
    let mut rows = Vec::new();
    let mut row: Vec<String> = Vec::new();
    let mut field = String::new();
    // Whether the current row has anything (a field separator or a character): an empty line
    // is skipped, a line holding `""` is one empty field.
    let mut row_started = false;
    let (mut line, mut column) = (1usize, 0usize);
    let mut chars = text.chars().peekable();
    let error = |line, column, what| CsvError {
        row: line,
        column,
        what,
    };
    while let Some(c) = chars.next() {
        column += 1;
        match c {
            '"' if field.is_empty() => {
                // A quoted field, to its closing quote.
                row_started = true;
                let (start_line, start_column) = (line, column);
                loop {
                    match chars.next() {
                        None => {
                            return Err(error(
                                start_line,
                                start_column,
                                CsvProblem::UnterminatedQuote,
                            ))
                        }
                        Some('"') => {
                            column += 1;
                            if chars.peek() == Some(&'"') {
                                chars.next();
                                column += 1;
                                field.push('"');
                            } else {
                                break;
                            }
                        }
                        Some('\\') if chars.peek() == Some(&'"') => {
                            chars.next();
                            column += 2;
                            field.push('"');
                        }
                        Some('\n') => {
                            line += 1;
                            column = 0;
                            field.push('\n');
                        }
                        Some(other) => {
                            column += 1;
                            field.push(other);
                        }
                    }
                }
                match chars.peek() {
                    None | Some(',') | Some('\n') => {}
                    Some('\r') => {}
                    Some(_) => return Err(error(line, column + 1, CsvProblem::TextAfterQuote)),
                }
                // A quoted field is a field even when empty.
                push_field(&mut row, &mut field, line, column)?;
                match chars.next() {
                    Some(',') => {
                        column += 1;
                        // The next field starts (possibly empty at the end of the line).
                        if matches!(chars.peek(), None | Some('\n') | Some('\r')) {
                            push_field(&mut row, &mut field, line, column)?;
                        }
                    }
                    Some('\r') => {
                        if chars.peek() == Some(&'\n') {
                            chars.next();
                        }
                        end_row(&mut rows, &mut row, &mut row_started, line, column)?;
                        line += 1;
                        column = 0;
                    }
                    Some('\n') => {
                        end_row(&mut rows, &mut row, &mut row_started, line, column)?;
                        line += 1;
                        column = 0;
                    }
                    _ => {}
                }
            }
            ',' => {
                row_started = true;
                push_field(&mut row, &mut field, line, column)?;
                if matches!(chars.peek(), None | Some('\n') | Some('\r')) {
                    push_field(&mut row, &mut field, line, column)?;
                }
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' => {
                if !field.is_empty() {
                    push_field(&mut row, &mut field, line, column)?;
                }
                end_row(&mut rows, &mut row, &mut row_started, line, column)?;
                line += 1;
                column = 0;
            }
            other => {
                row_started = true;
                field.push(other);
            }
        }
    }
    if !field.is_empty() {
        push_field(&mut row, &mut field, line, column)?;
    }
    end_row(&mut rows, &mut row, &mut row_started, line, column)?;
    Ok(rows)
}

fn push_field(
    row: &mut Vec<String>,
    field: &mut String,
    line: usize,
    column: usize,
) -> Result<(), CsvError> {
    if row.len() >= FIELDS_MAX {
        return Err(CsvError {
            row: line,
            column,
            what: CsvProblem::TooManyFields,
        });
    }
    row.push(std::mem::take(field));
    Ok(())
}

fn end_row(
    rows: &mut Vec<Vec<String>>,
    row: &mut Vec<String>,
    row_started: &mut bool,
    line: usize,
    column: usize,
) -> Result<(), CsvError> {
    if *row_started || !row.is_empty() {
        if rows.len() >= ROWS_MAX {
            return Err(CsvError {
                row: line,
                column,
                what: CsvProblem::TooManyRows,
            });
        }
        rows.push(std::mem::take(row));
    }
    *row_started = false;
    Ok(())
}

/// Whether `field` needs quotes (alone in its row, `alone`).
fn needs_quotes(field: &str, alone: bool) -> bool {
    field.is_empty() && alone
        || field.contains([',', '"', '\n', '\r'])
        || field.starts_with(' ')
        || field.ends_with(' ')
}

/// Whether `field` survives [`write_row`] and [`parse`]: all but a value that needs quotes
/// and ends with a backslash (see the module).
pub fn representable(field: &str) -> bool {
    !(field.ends_with('\\') && needs_quotes(field, false))
}

/// Writes one row (no line break), quoting the fields that need it.
pub fn write_row<S: AsRef<str>>(fields: &[S]) -> String {
    let mut out = String::new();
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let field = field.as_ref();
        if needs_quotes(field, fields.len() == 1) {
            out.push('"');
            out.push_str(&field.replace('"', "\\\""));
            out.push('"');
        } else {
            out.push_str(field);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rows(text: &str) -> Vec<Vec<String>> {
        parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn rows_fields_and_quoting_as_cumulocity_writes_them() {
        assert_eq!(
            rows("100,My Device,c8y_Linux"),
            [["100", "My Device", "c8y_Linux"]]
        );
        assert_eq!(
            rows("200,c8y_Temperature,T,25\r\n400,c8y_Event,\"Door, front\"\n"),
            vec![
                vec!["200", "c8y_Temperature", "T", "25"],
                vec!["400", "c8y_Event", "Door, front"],
            ]
        );
        assert_eq!(
            rows("511,dev,\"echo \"\"hi\"\"\nls\""),
            [["511", "dev", "echo \"hi\"\nls"]]
        );
        assert_eq!(
            rows("511,dev,\"execute this\nand \\\"this\\\"\""),
            [["511", "dev", "execute this\nand \"this\""]],
            "Cumulocity's backslash escape"
        );
        assert_eq!(
            rows("400,t,\"C:\\dir\\\"x\\\"\""),
            [["400", "t", "C:\\dir\"x\""]],
            "a backslash before anything else is itself; before a quote, the escape"
        );
        assert_eq!(
            write_row(&["511", "dev", "say \"hi\", then\nexit"]),
            "511,dev,\"say \\\"hi\\\", then\nexit\""
        );
        assert_eq!(rows("301,,\"\""), [["301", "", ""]], "empty fields");
        assert_eq!(rows("500,"), [["500", ""]], "a trailing empty field");
        assert_eq!(rows("\n\n500\n\n"), [["500"]], "empty lines are skipped");
        assert_eq!(rows("\"\""), [[""]], "a lone quoted empty field is a row");
        assert!(rows("").is_empty());
    }

    #[test]
    fn malformed_messages_name_the_row_and_column() {
        let err = parse("100,a\n400,\"open").expect_err("unterminated");
        assert_eq!(
            (err.row, err.column, err.what),
            (2, 5, CsvProblem::UnterminatedQuote)
        );
        let err = parse("400,\"x\"y").expect_err("text after quote");
        assert_eq!(
            (err.row, err.column, err.what),
            (1, 8, CsvProblem::TextAfterQuote)
        );
        assert!(err.to_string().contains("row 1, column 8"), "{err}");
        let long = "a".repeat(MESSAGE_BYTES_MAX + 1);
        assert_eq!(parse(&long).expect_err("long").what, CsvProblem::TooLong);
        let many = "1\n".repeat(ROWS_MAX + 1);
        assert_eq!(
            parse(&many).expect_err("rows").what,
            CsvProblem::TooManyRows
        );
        let wide = ",".repeat(FIELDS_MAX + 1);
        assert_eq!(
            parse(&wide).expect_err("fields").what,
            CsvProblem::TooManyFields
        );
    }

    fn field() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9_.:-]{0,8}",
            prop::collection::vec(
                prop_oneof![
                    Just(','),
                    Just('"'),
                    Just('\n'),
                    Just(' '),
                    Just('a'),
                    Just('é'),
                    Just('\r'),
                    Just('\\'),
                ],
                0..8
            )
            .prop_map(|chars| chars.into_iter().collect::<String>())
            // A quoted field cannot end with a backslash in Cumulocity's escaping (see the
            // module): the one value the law leaves out.
            .prop_filter("representable", |f| representable(f)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the fields hold, writing rows and parsing them gives them back.
        #[test]
        fn written_rows_parse_back(rows in prop::collection::vec(
            prop::collection::vec(field(), 1..6), 1..5)
        ) {
            let text: Vec<String> = rows.iter().map(|r| write_row(r)).collect();
            let parsed = parse(&text.join("\n"));
            prop_assert_eq!(parsed, Ok(rows));
        }

        /// Any text parses or fails with a position inside it; never a panic.
        #[test]
        fn any_text_parses_or_names_where_it_fails(text in "[\\PC\n\r\",]{0,64}") {
            match parse(&text) {
                Ok(rows) => prop_assert!(rows.len() <= 1 + text.matches(['\n', '\r']).count()),
                Err(e) => prop_assert!(e.row >= 1 && e.column >= 1),
            }
        }
    }
}
