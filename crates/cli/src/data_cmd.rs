//! `tessera data prepare`: tokenizes text files into a token dataset (binary shards + meta.json)
//! that `tessera train --data` reads.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub cmd: DataCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCmd {
    /// Tokenize text files into train/val token shards.
    Prepare(PrepareArgs),
}

#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// UTF-8 text files, concatenated in the order given.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// An HF tokenizer.json (copied into the dataset, so training and export carry it along).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Fraction of the tokens (the end of the text) held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
}

/// The largest tokenizer.json read (the largest real ones are tens of MB).
const MAX_TOKENIZER_BYTES: u64 = 1 << 30;
/// The most text given to the tokenizer in one call: paragraphs longer than this are split at line
/// boundaries, lines longer than this at a whitespace (or, without one, a character boundary).
const MAX_PIECE: usize = 1 << 16;
/// Paragraphs are gathered into pieces of at least this many bytes before a blank line ends one.
const MIN_PIECE: usize = 4096;
const READ_BLOCK: usize = 1 << 16;

/// The fewest tokens a training split may hold: a sample of a few positions and its target.
const MIN_TRAIN_TOKENS: usize = 16;

pub fn run(a: DataArgs) -> Result<()> {
    match a.cmd {
        DataCmd::Prepare(p) => prepare(p),
    }
}

fn prepare(a: PrepareArgs) -> Result<()> {
    if !(a.val_fraction > 0.0 && a.val_fraction < 1.0) {
        bail!("--val-fraction must be in (0, 1), got {}", a.val_fraction);
    }
    crate::out_paths::fresh_dir(&a.out, "--out")?;
    // Only regular files: a device (/dev/zero) or fifo would be read without end.
    for p in &a.input {
        regular_file(p, "--input")?;
    }
    let tok_len = regular_file(&a.tokenizer, "--tokenizer")?;
    if tok_len > MAX_TOKENIZER_BYTES {
        bail!(
            "--tokenizer {} is {tok_len} bytes, more than the {MAX_TOKENIZER_BYTES} a tokenizer.json may have",
            a.tokenizer.display()
        );
    }
    let tok = tokenizers::Tokenizer::from_file(&a.tokenizer)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", a.tokenizer.display()))?;
    // The text is streamed: read in blocks, checked as UTF-8 line by line, tokenized in bounded
    // pieces, so memory stays bounded whatever the layout of the text.
    let mut pieces = Pieces::new(&tok);
    let mut block = vec![0u8; READ_BLOCK];
    for p in &a.input {
        let mut f =
            std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
        loop {
            let n = match f.read(&mut block) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", p.display())),
            };
            pieces.feed(&block[..n], p)?;
        }
        pieces.last_file = Some(p.clone());
    }
    let (ids, _) = pieces.finish()?;
    if ids.len() < 16 {
        bail!(
            "the input holds only {} tokens; training needs more text",
            ids.len()
        );
    }
    // The vocabulary must exceed every id the tokenizer can emit (a WordLevel vocab may have
    // gaps: ids {0, 1, 70000} are 3 entries), and every id written.
    let vocab = tok
        .get_vocab(true)
        .values()
        .chain(ids.iter())
        .map(|&i| i as usize + 1)
        .max()
        .unwrap_or(0)
        .max(tok.get_vocab_size(true));
    let n_val = ((ids.len() as f64 * a.val_fraction) as usize).max(1);
    let split = ids.len() - n_val;
    if split < MIN_TRAIN_TOKENS {
        bail!(
            "--val-fraction {} leaves {split} of the input's {} tokens for training (at least {MIN_TRAIN_TOKENS} needed); a smaller fraction or more text",
            a.val_fraction,
            ids.len()
        );
    }
    let meta = tessera_train::data::write_dataset(
        &a.out,
        &ids[..split],
        &ids[split..],
        vocab,
        Some(&a.tokenizer),
    )?;
    errln!(
        "wrote {}: {} train + {} val tokens ({}), vocabulary {}",
        a.out.display(),
        meta.train.tokens,
        meta.val.tokens,
        meta.dtype,
        vocab
    );
    Ok(())
}

/// The size of `p`, which must be a regular file (through symlinks).
fn regular_file(p: &Path, flag: &str) -> Result<u64> {
    let md = std::fs::metadata(p).with_context(|| format!("cannot read {flag} {}", p.display()))?;
    if !md.is_file() {
        bail!(
            "{flag} {} is not a regular file (a directory, device or fifo); give a file",
            p.display()
        );
    }
    Ok(md.len())
}

/// Text to token ids, in pieces: paragraphs (ended by a blank line) gathered to at least
/// [`MIN_PIECE`] bytes, none larger than [`MAX_PIECE`]. Bytes arrive in blocks; a line is checked
/// as UTF-8 once it is whole (or once it is longer than a piece).
struct Pieces<'a> {
    tok: &'a tokenizers::Tokenizer,
    /// Bytes of the line being read, not yet ended by a newline.
    pending: Vec<u8>,
    piece: String,
    ids: Vec<u32>,
    /// The input the pending bytes came from, for errors at the end.
    last_file: Option<PathBuf>,
    /// The largest piece given to the tokenizer, in bytes.
    largest: usize,
    /// The most ids held (half of the host memory available when it began).
    max_ids: usize,
}

impl<'a> Pieces<'a> {
    fn new(tok: &'a tokenizers::Tokenizer) -> Self {
        Pieces {
            tok,
            pending: Vec::new(),
            piece: String::new(),
            ids: Vec::new(),
            last_file: None,
            largest: 0,
            max_ids: tessera_train::data::available_memory().map_or(usize::MAX, |m| {
                usize::try_from(tessera_train::data::token_room(m)).unwrap_or(usize::MAX)
            }),
        }
    }

    fn feed(&mut self, bytes: &[u8], src: &Path) -> Result<()> {
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        while let Some(nl) = self.pending[at..].iter().position(|&b| b == b'\n') {
            let end = at + nl + 1;
            let line = std::mem::take(&mut self.pending);
            let r = match std::str::from_utf8(&line[at..end]) {
                Ok(l) => self.line(l),
                Err(_) => Err(not_utf8(src)),
            };
            self.pending = line;
            r?;
            at = end;
        }
        self.pending.drain(..at);
        // A line longer than a piece goes in parts, cut at a whitespace.
        while self.pending.len() > MAX_PIECE {
            let head = match std::str::from_utf8(&self.pending[..MAX_PIECE]) {
                Ok(s) => s,
                // A character cut at the end of the window: the valid text before it.
                Err(e) if e.error_len().is_none() => {
                    std::str::from_utf8(&self.pending[..e.valid_up_to()]).expect("valid prefix")
                }
                Err(_) => return Err(not_utf8(src)),
            };
            let cut = cut_point(head);
            let part = head[..cut].to_string();
            self.line(&part)?;
            self.pending.drain(..cut);
        }
        Ok(())
    }

    /// A line (or part of one) of at most [`MAX_PIECE`] bytes.
    fn line(&mut self, line: &str) -> Result<()> {
        if self.piece.len() + line.len() > MAX_PIECE {
            self.flush()?;
        }
        self.piece.push_str(line);
        if line.trim().is_empty() && self.piece.len() > MIN_PIECE {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.piece.is_empty() {
            self.largest = self.largest.max(self.piece.len());
            let enc = self
                .tok
                .encode(self.piece.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
            if self.ids.len() + enc.get_ids().len() > self.max_ids {
                bail!(
                    "the input holds more tokens than half of the host memory available can hold ({} at 4 bytes each); give less text",
                    self.max_ids
                );
            }
            self.ids.extend_from_slice(enc.get_ids());
            self.piece.clear();
        }
        Ok(())
    }

    /// The ids of all the text, and the largest piece tokenized.
    fn finish(mut self) -> Result<(Vec<u32>, usize)> {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            let src = self.last_file.clone().unwrap_or_default();
            let l = std::str::from_utf8(&rest).map_err(|_| not_utf8(&src))?;
            self.line(l)?;
        }
        self.flush()?;
        Ok((self.ids, self.largest))
    }
}

fn not_utf8(p: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot read {} as UTF-8 text: it holds bytes that are not UTF-8",
        p.display()
    )
}

/// Where to cut `head` (all of a piece's worth of one long line): before its last whitespace (so a
/// word and the space before it stay together, as byte-level tokenizers pair them), else at its
/// end, a character boundary. Never 0.
fn cut_point(head: &str) -> usize {
    head.char_indices()
        .rev()
        .find(|&(i, c)| i > 0 && c.is_whitespace())
        .map(|(i, _)| i)
        .unwrap_or(head.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(p: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(p)
    }

    fn tokenizer() -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_file(repo("tests/fixtures/hf/llama/tokenizer.json")).unwrap()
    }

    /// `text` through [`Pieces`] in blocks of `block` bytes: the ids and the largest piece.
    fn run(tok: &tokenizers::Tokenizer, text: &[u8], block: usize) -> Result<(Vec<u32>, usize)> {
        let mut p = Pieces::new(tok);
        for b in text.chunks(block) {
            p.feed(b, Path::new("in.txt"))?;
        }
        p.last_file = Some("in.txt".into());
        p.finish()
    }

    /// The split before pieces were bounded: paragraphs gathered to 4 KiB, whatever their size.
    fn old_split(tok: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
        let mut ids = vec![];
        let mut piece = String::new();
        let mut flush = |piece: &mut String| {
            if !piece.is_empty() {
                ids.extend_from_slice(tok.encode(piece.as_str(), false).unwrap().get_ids());
                piece.clear();
            }
        };
        for line in text.split_inclusive('\n') {
            piece.push_str(line);
            if line.trim().is_empty() && piece.len() > 4096 {
                flush(&mut piece);
            }
        }
        flush(&mut piece);
        ids
    }

    #[test]
    fn paragraphed_text_tokenizes_as_before_in_any_block_size() {
        let tok = tokenizer();
        let text = std::fs::read_to_string(repo("data/shakespeare/slice.txt")).unwrap();
        let cut = text.char_indices().nth(200_000).map_or(text.len(), |c| c.0);
        let text = &text[..cut];
        let want = old_split(&tok, text);
        for block in [1, 7, 4096, READ_BLOCK] {
            let (ids, largest) = run(&tok, text.as_bytes(), block).unwrap();
            assert_eq!(ids, want, "block {block}");
            assert!(largest <= MAX_PIECE);
        }
    }

    #[test]
    fn long_lines_and_paragraphs_go_in_bounded_pieces() {
        let tok = tokenizer();
        // One line of words, one paragraph of many lines, one line without a space (multi-byte
        // characters, so a cut may fall inside one).
        let words = "the quick brown fox ".repeat(20_000);
        let lines = "one sentence on its line.\n".repeat(20_000);
        let glyphs = "\u{e9}\u{4e2d}\u{1f600}".repeat(40_000);
        for text in [&words, &lines, &glyphs] {
            let (ids, largest) = run(&tok, text.as_bytes(), 5000).unwrap();
            assert!(largest <= MAX_PIECE, "{largest}");
            assert!(!ids.is_empty());
            let decoded = tok.decode(&ids, false).unwrap();
            assert_eq!(
                decoded.split_whitespace().count(),
                text.split_whitespace().count()
            );
        }
        // Cut before a whitespace, words keep their tokens.
        let (ids, _) = run(&tok, words.as_bytes(), READ_BLOCK).unwrap();
        let whole = tok.encode(words.as_str(), false).unwrap();
        assert_eq!(ids, whole.get_ids());
    }

    #[test]
    fn text_that_is_not_utf8_is_an_error() {
        let tok = tokenizer();
        let mut bad = b"fine line\n".repeat(10);
        bad.extend_from_slice(&[0xff, 0xfe, b'\n']);
        let e = run(&tok, &bad, 3).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        let mut long = vec![b'a'; MAX_PIECE + 10];
        long[100] = 0xc3;
        assert!(run(&tok, &long, READ_BLOCK).is_err());
        // A character cut at the end of the input.
        assert!(run(&tok, "ab\u{e9}".as_bytes().split_last().unwrap().1, 1).is_err());
        assert_eq!(cut_point("ab cd"), 2);
        assert_eq!(cut_point(" abcd"), 5);
        assert_eq!(cut_point("abcd"), 4);
    }
}
