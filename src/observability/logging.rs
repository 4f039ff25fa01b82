//! Logging set-up: a readable console (coloured only on a terminal, and only if `log_color`) and
//! JSON lines in `log_file_path`, rotated by size (`logs.jsonl` → `logs.jsonl.1` …) with the last
//! few files kept.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::Settings;

/// Rotated JSON log files kept besides the current one.
pub const RETAINED_FILES: usize = 5;
/// Size at which the JSON log file is rotated.
pub const ROTATE_BYTES: u64 = 50 * 1024 * 1024;

/// A file that rotates itself when it grows past a size: `path` → `path.1` → … → `path.N`.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes,
            keep,
        })
    }

    fn numbered(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let _ = std::fs::remove_file(self.numbered(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.numbered(n);
            if from.exists() {
                std::fs::rename(&from, self.numbered(n + 1))?;
            }
        }
        if self.keep > 0 {
            std::fs::rename(&self.path, self.numbered(1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn level(settings: &Settings) -> &'static str {
    match settings.log_level.trim().to_ascii_uppercase().as_str() {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "WARN" | "WARNING" => "warn",
        "ERROR" | "CRITICAL" => "error",
        _ => "info",
    }
}

/// Installs the global subscriber. The guard must live as long as the process logs.
pub fn init(settings: &Settings) -> Result<Option<WorkerGuard>, String> {
    let level = level(settings);
    let filter = || {
        EnvFilter::try_from_env("CLAUDE_BALANCER_LOG")
            .unwrap_or_else(|_| EnvFilter::new(format!("claude_balancer={level},warn")))
    };
    let color = settings.log_color && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let console = tracing_subscriber::fmt::layer()
        .with_ansi(color)
        .with_writer(std::io::stderr)
        .with_filter(filter());
    let (file_layer, guard) = if settings.log_file_path.trim().is_empty() {
        (None, None)
    } else {
        let path = Path::new(&settings.log_file_path);
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the log folder {}: {e}", dir.display()))?;
        let appender = RotatingFile::open(path, ROTATE_BYTES, RETAINED_FILES)
            .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
        let (writer, guard) = tracing_appender::non_blocking(appender);
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter());
        (Some(layer), Some(guard))
    };
    tracing_subscriber::registry()
        .with(console)
        .with(file_layer)
        .try_init()
        .map_err(|e| format!("cannot install logging: {e}"))?;
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_rotates_by_size_and_keeps_a_few() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs.jsonl");
        let mut f = RotatingFile::open(&path, 100, 2).unwrap();
        for i in 0..10 {
            writeln!(f, "{{\"line\":{i},\"pad\":\"{}\"}}", "x".repeat(40)).unwrap();
        }
        f.flush().unwrap();
        assert!(path.exists());
        assert!(dir.path().join("logs.jsonl.1").exists());
        assert!(dir.path().join("logs.jsonl.2").exists());
        assert!(!dir.path().join("logs.jsonl.3").exists());
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.contains("\"line\":9"));
    }
}
