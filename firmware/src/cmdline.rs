//! Command line options: whitespace-separated `key=value` tokens.
//!
//! | key    | values          | default |
//! |--------|-----------------|---------|
//! | `run`  | `info`, `echo`, `panic`, `fault`, `conformance` | `info` |
//! | `exit` | `0`..=`255`     | `0`     |
//!
//! Unknown keys (and tokens without `=`) are reported and ignored; a known
//! key with a bad value is reported and ignored. A repeated key: the last
//! one wins.

/// What to do after the information lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Nothing more.
    Info,
    /// Read one line from the serial port and print it back.
    Echo,
    /// Self-test of the panic path: panic (exit status 125).
    Panic,
    /// Self-test of the exception path: execute `ud2` at CPL3 (#UD, exit
    /// status 128 + 6 = 134 through the ring-0 handler).
    Fault,
    /// Run the vGPU conformance suite.
    Conformance,
}

/// Parsed options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub run: RunMode,
    pub exit_status: u8,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            run: RunMode::Info,
            exit_status: 0,
        }
    }
}

/// A token the parser ignored.
#[derive(Clone, Copy, Debug)]
pub enum Ignored<'a> {
    /// The key is not known.
    UnknownOption(&'a [u8]),
    /// The key is known but the value is not valid for it.
    InvalidValue(&'a [u8]),
}

fn parse_u8(digits: &[u8]) -> Option<u8> {
    if digits.is_empty() || digits.len() > 3 {
        return None;
    }
    let mut value: u32 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(d - b'0');
    }
    u8::try_from(value).ok()
}

/// Parse `cmdline`, calling `ignored` for every token that has no effect.
pub fn parse<'a>(cmdline: &'a [u8], mut ignored: impl FnMut(Ignored<'a>)) -> Options {
    let mut opts = Options::default();
    for token in cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
    {
        let Some(eq) = token.iter().position(|&b| b == b'=') else {
            ignored(Ignored::UnknownOption(token));
            continue;
        };
        let (key, value) = (&token[..eq], &token[eq + 1..]);
        match key {
            b"run" => match value {
                b"info" => opts.run = RunMode::Info,
                b"echo" => opts.run = RunMode::Echo,
                b"panic" => opts.run = RunMode::Panic,
                b"fault" => opts.run = RunMode::Fault,
                b"conformance" => opts.run = RunMode::Conformance,
                _ => ignored(Ignored::InvalidValue(token)),
            },
            b"exit" => match parse_u8(value) {
                Some(status) => opts.exit_status = status,
                None => ignored(Ignored::InvalidValue(token)),
            },
            _ => ignored(Ignored::UnknownOption(token)),
        }
    }
    opts
}
