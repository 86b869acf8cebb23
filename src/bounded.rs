//! Reading the files a campaign names, with bounds (SPEC §11). A named pipe
//! given as an attachment or a template would block the run forever, and a
//! file of gigabytes would be read whole; both are refused from the open
//! handle's metadata before a byte is read.

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// The largest message hikyaku builds: Gmail refuses bigger ones, and a
/// message of that size is already far beyond what a campaign should carry.
pub const MAX_MESSAGE_BYTES: u64 = 25 * 1024 * 1024;

/// Why a file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is {}, over the limit of {}", human_size(*.size), human_size(*.max))]
    TooLarge { size: u64, max: u64 },
    #[error("is not UTF-8 text")]
    NotUtf8,
}

/// Opens `path` for reading and checks, on the open handle, that it is a
/// regular file of at most `max` bytes. Returns the file and its size.
///
/// The open itself never blocks: a FIFO is opened non-blocking and then
/// refused for what it is.
pub fn open(path: &Path, max: u64) -> Result<(File, u64), FileError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(FileError::NotRegular(kind(&meta.file_type())));
    }
    if meta.len() > max {
        return Err(FileError::TooLarge {
            size: meta.len(),
            max,
        });
    }
    Ok((file, meta.len()))
}

/// Reads a regular file of at most `max` bytes.
pub fn read(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let (file, size) = open(path, max)?;
    read_opened(file, size, max)
}

/// Reads a file that [`open`] checked and measured at `size` bytes.
pub fn read_opened(file: File, size: u64, max: u64) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::with_capacity(usize::try_from(size.min(max)).unwrap_or(0));
    // A file that grows while it is read stops at the bound all the same.
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > max {
        return Err(FileError::TooLarge { size: read, max });
    }
    Ok(bytes)
}

/// Reads a UTF-8 text file of at most `max` bytes.
pub fn read_to_string(path: &Path, max: u64) -> Result<String, FileError> {
    String::from_utf8(read(path, max)?).map_err(|_| FileError::NotUtf8)
}

fn kind(file_type: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a named pipe";
        }
        if file_type.is_socket() {
            return "a socket";
        }
        if file_type.is_block_device() || file_type.is_char_device() {
            return "a device";
        }
    }
    if file_type.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// `512 bytes`, `12 KB`, `25 MB`, `4.0 GB` (powers of 1024, as file
/// managers show them), rounded up: a size just over a limit never reads
/// as the limit itself.
pub fn human_size(bytes: u64) -> String {
    const KB: u64 = 1024;
    const MB: u64 = KB * 1024;
    const GB: u64 = MB * 1024;
    let scaled = |unit: u64| {
        let tenths = if unit == KB || bytes >= 10 * unit {
            1.0
        } else {
            10.0
        };
        (bytes as f64 / unit as f64 * tenths).ceil() / tenths
    };
    match bytes {
        b if b < KB => format!("{b} bytes"),
        b if b < MB => format!("{:.0} KB", scaled(KB)),
        b if b < 10 * MB && b % MB != 0 => format!("{:.1} MB", scaled(MB)),
        b if b < GB => format!("{:.0} MB", scaled(MB)),
        _ => format!("{:.1} GB", scaled(GB)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_say_them() {
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(12 * 1024), "12 KB");
        assert_eq!(human_size(MAX_MESSAGE_BYTES), "25 MB");
        assert_eq!(human_size(1536 * 1024), "1.5 MB");
        assert_eq!(human_size(4 << 30), "4.0 GB");
        assert_eq!(human_size((1 << 20) + 50_000), "1.1 MB");
        assert_eq!(human_size((25 << 20) + 1), "26 MB");
    }

    #[test]
    fn a_file_over_the_bound_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 30).unwrap();
        let err = read(&path, 1024).unwrap_err();
        assert_eq!(err.to_string(), "is 8.0 GB, over the limit of 1 KB");
        std::fs::write(&path, b"ok").unwrap();
        assert_eq!(read_to_string(&path, 1024).unwrap(), "ok");
    }

    #[test]
    fn a_folder_is_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(dir.path(), 1024).unwrap_err();
        assert_eq!(err.to_string(), "is a folder, not a regular file");
    }

    #[cfg(unix)]
    #[test]
    fn a_named_pipe_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pipe");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &path,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        )
        .unwrap();
        let err = read(&path, 1024).unwrap_err();
        assert_eq!(err.to_string(), "is a named pipe, not a regular file");
    }
}
