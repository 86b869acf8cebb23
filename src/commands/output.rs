//! Standard output as a reader may close it early (`status | head`): a
//! write that finds the pipe closed is remembered, so that `main` ends
//! quietly instead of reporting an error (or panicking, as `println!` does).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Standard output, noting when its reader went away.
pub struct Stdout;

/// Where commands print their results.
pub fn stdout() -> Stdout {
    Stdout
}

/// Whether a write found standard output closed by its reader.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

fn note(result: io::Result<()>) -> io::Result<()> {
    if let Err(e) = &result {
        if e.kind() == io::ErrorKind::BrokenPipe {
            CLOSED.store(true, Ordering::Relaxed);
        }
    }
    result
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut written = 0;
        note(io::stdout().write(buf).map(|n| written = n))?;
        Ok(written)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        note(io::stdout().lock().write_all(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        note(io::stdout().flush())
    }
}
