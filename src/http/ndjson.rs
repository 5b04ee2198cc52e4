//! Splitting a streamed NDJSON body into numbered lines, bounded: a line longer than the bound
//! is reported (and skipped) without being buffered, and blank lines are counted (so numbers
//! match what an editor shows) but not returned.

/// One line of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A non-blank line (without its `\n`), with its 1-based number.
    Entry {
        /// Line number, counting every line of the body.
        number: u64,
        /// The line's bytes.
        bytes: Vec<u8>,
    },
    /// A line longer than the bound (its bytes were dropped as they arrived).
    TooLong {
        /// Line number.
        number: u64,
    },
}

/// Cuts a body arriving in chunks into [`Line`]s.
#[derive(Debug)]
pub struct LineSplitter {
    line_bytes_max: usize,
    pending: Vec<u8>,
    skipping: bool,
    number: u64,
}

impl LineSplitter {
    /// A splitter that refuses lines longer than `line_bytes_max`.
    pub fn new(line_bytes_max: usize) -> LineSplitter {
        LineSplitter {
            line_bytes_max,
            pending: Vec::new(),
            skipping: false,
            number: 0,
        }
    }

    /// The number of the last line completed.
    pub fn line_number(&self) -> u64 {
        self.number
    }

    /// Feeds the next chunk; complete lines are appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Line>) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let (part, complete) = match rest.iter().position(|&b| b == b'\n') {
                Some(at) => (&rest[..at], true),
                None => (rest, false),
            };
            rest = if complete {
                &rest[part.len() + 1..]
            } else {
                &[]
            };
            if !self.skipping {
                self.pending.extend_from_slice(part);
                if self.pending.len() > self.line_bytes_max {
                    self.skipping = true;
                    self.pending = Vec::new();
                }
            }
            if complete {
                self.complete(out);
            }
        }
    }

    /// The body ended: a last line without `\n` is completed.
    pub fn finish(&mut self, out: &mut Vec<Line>) {
        if self.skipping || !self.pending.is_empty() {
            self.complete(out);
        }
    }

    fn complete(&mut self, out: &mut Vec<Line>) {
        self.number += 1;
        let bytes = std::mem::take(&mut self.pending);
        if std::mem::replace(&mut self.skipping, false) {
            out.push(Line::TooLong {
                number: self.number,
            });
        } else if !bytes.iter().all(u8::is_ascii_whitespace) {
            out.push(Line::Entry {
                number: self.number,
                bytes,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<Line> {
        let mut splitter = LineSplitter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut out);
        }
        splitter.finish(&mut out);
        out
    }

    #[test]
    fn lines_are_numbered_as_an_editor_shows_them_whatever_the_chunking() {
        let body: &[u8] = b"a\n\n  \nbb\ntoo-long-line\nc";
        let expected = vec![
            Line::Entry {
                number: 1,
                bytes: b"a".to_vec(),
            },
            Line::Entry {
                number: 4,
                bytes: b"bb".to_vec(),
            },
            Line::TooLong { number: 5 },
            Line::Entry {
                number: 6,
                bytes: b"c".to_vec(),
            },
        ];
        assert_eq!(split(&[body], 5), expected);
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(split(&bytes, 5), expected);
        assert_eq!(split(&[b"x\n"], 5).len(), 1, "a final newline adds no line");
    }
}
