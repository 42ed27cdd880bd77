//! The physical floor: fdatasync of a 4 KiB write, on a pre-zeroed file (pure overwrite of
//! initialized blocks: no metadata to journal) and as an append that grows the file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{Result, ctx};

const BLOCK: usize = 4096;
const OVERWRITE_FILE_BYTES: u64 = 16 << 20;

#[derive(Clone, Copy)]
pub enum Mode {
    Overwrite,
    Append,
}

/// Creates the pre-zeroed file for [`Mode::Overwrite`] once (kept across runs).
pub fn prepare(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(ctx(format!("create {}", dir.display())))?;
    let path = dir.join("overwrite.dat");
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == OVERWRITE_FILE_BYTES) {
        return Ok(());
    }
    let mut f = File::create(&path).map_err(ctx(format!("create {}", path.display())))?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(OVERWRITE_FILE_BYTES >> 20) {
        f.write_all(&zeros).map_err(ctx("zero-fill floor file"))?;
    }
    f.sync_all().map_err(ctx("fsync floor file"))?;
    crate::engines::fsync_dir(dir)
}

/// Writes 4 KiB and fdatasyncs it, closed loop, for `secs`: per-op latencies (ns) and the time.
pub fn run(dir: &Path, mode: Mode, secs: f64) -> Result<(Vec<u64>, Duration)> {
    let (f, wrap) = match mode {
        Mode::Overwrite => {
            let path = dir.join("overwrite.dat");
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(ctx(format!("open {}", path.display())))?;
            (f, OVERWRITE_FILE_BYTES)
        }
        Mode::Append => {
            let path = dir.join("append.dat");
            let f = File::create(&path).map_err(ctx(format!("create {}", path.display())))?;
            crate::engines::fsync_dir(dir)?;
            (f, u64::MAX)
        }
    };
    let block = vec![0xA5u8; BLOCK];
    let mut off = 0u64;
    let mut lat = Vec::with_capacity(1 << 16);
    let limit = Duration::from_secs_f64(secs);
    let start = Instant::now();
    while start.elapsed() < limit || lat.len() < 20 {
        let t = Instant::now();
        f.write_all_at(&block, off).map_err(ctx("floor pwrite"))?;
        f.sync_data().map_err(ctx("floor fdatasync"))?;
        lat.push(t.elapsed().as_nanos() as u64);
        off = (off + BLOCK as u64) % wrap;
    }
    let elapsed = start.elapsed();
    if let Mode::Append = mode {
        // Leave nothing large behind; the next run starts from an empty file again.
        f.set_len(0).map_err(ctx("truncate append file"))?;
    }
    Ok((lat, elapsed))
}
