//! Logging set-up: a readable console (coloured only on a terminal, and only if `log_color`) and
//! JSON lines in `log_file_path`, rotated by size (`logs.jsonl` → `logs.jsonl.1` …) with the last
//! few files kept.
//!
//! Lines for the file, and for the console, go into shared buffers that a flusher thread writes
//! out every [`FLUSH_EVERY`] (and at exit; the appending thread itself past 4 MB), so a request
//! costs no system call and no thread wake-up for its log lines. The per-request summary line is written by hand
//! ([`request_line`]), not through `tracing`'s field formatters, which cost more than the rest of
//! the request.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::Settings;

/// Rotated JSON log files kept besides the current one.
pub const RETAINED_FILES: usize = 5;
/// Size at which the JSON log file is rotated.
pub const ROTATE_BYTES: u64 = 50 * 1024 * 1024;
/// How often buffered log lines are written out.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Buffered bytes that the appending thread writes out itself, rather than wait for the flusher.
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// A log output (the JSON file, the console) behind a shared buffer: appending only takes the
/// buffer's lock; the write happens outside it, so a request never waits for the disk or a terminal.
#[derive(Clone)]
pub struct LogOutput(Arc<LogShared>);

struct LogShared {
    pending: Mutex<Vec<u8>>,
    out: Mutex<Box<dyn Write + Send>>,
}

impl LogOutput {
    fn new(out: impl Write + Send + 'static) -> Self {
        Self(Arc::new(LogShared {
            pending: Mutex::new(Vec::with_capacity(16 * 1024)),
            out: Mutex::new(Box::new(out)),
        }))
    }

    /// Appends whole lines (`bytes` ends with a newline).
    pub fn append(&self, bytes: &[u8]) {
        let full = {
            let mut pending = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.extend_from_slice(bytes);
            pending.len() >= MAX_PENDING
        };
        if full {
            self.flush();
        }
    }

    /// Writes out what is buffered. The output's lock is taken first, so batches reach it in the
    /// order they were taken.
    pub fn flush(&self) {
        let mut out = self.0.out.lock().unwrap_or_else(|e| e.into_inner());
        let batch = std::mem::take(&mut *self.0.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
            let _ = out.flush();
        }
    }

    /// [`LogOutput::flush`] unless a lock is held (from a panic hook: the panicking thread may be
    /// the one holding it).
    fn try_flush(&self) {
        let Ok(mut out) = self.0.out.try_lock() else {
            return;
        };
        let Ok(mut pending) = self.0.pending.try_lock() else {
            return;
        };
        let batch = std::mem::take(&mut *pending);
        drop(pending);
        let _ = out.write_all(&batch);
        let _ = out.flush();
    }
}

/// A `tracing` writer into the shared buffer: collects one event, appends it when dropped.
pub struct EventWriter {
    output: LogOutput,
    line: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        self.output.append(&self.line);
    }
}

impl<'a> MakeWriter<'a> for LogOutput {
    type Writer = EventWriter;
    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            output: self.clone(),
            line: Vec::with_capacity(256),
        }
    }
}

/// Keeps the flusher running; dropping it writes out what is buffered.
pub struct LogGuard {
    outputs: Vec<LogOutput>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for output in &self.outputs {
            output.flush();
        }
    }
}

fn start_flusher(outputs: Vec<LogOutput>) -> LogGuard {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("log-flusher".into())
        .spawn({
            let outputs = outputs.clone();
            move || {
                // `recv_timeout` is the tick; a message or a hang-up ends the loop.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_EVERY) {
                    for output in &outputs {
                        output.flush();
                    }
                }
            }
        })
        .ok();
    LogGuard {
        outputs,
        stop: Some(stop),
        thread,
    }
}

/// Where request summary lines go, set by [`init`]. Without it (tests in one process), none is
/// written.
struct Sink {
    console: LogOutput,
    file: Option<LogOutput>,
    color: bool,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// The fields of one request's summary line.
#[derive(Debug, serde::Serialize)]
pub struct RequestLine<'a> {
    pub request_id: &'a str,
    /// `messages` or `count_tokens`.
    pub endpoint: &'a str,
    /// The API the request came in by: `anthropic`, `openai_chat` or `openai_responses`.
    pub front: &'a str,
    pub session_id: &'a str,
    /// The named client's name (empty for requests of no named client).
    pub client: &'a str,
    pub model: &'a str,
    pub route: &'a str,
    pub provider: &'a str,
    /// The attempts as a JSON array, carried as a string (one flat line for log tools).
    pub attempts: &'a str,
    pub stream: bool,
    pub status: u16,
    pub ttfb_ms: f64,
    pub total_ms: f64,
    pub overhead_ms: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache: &'a str,
}

/// Writes a request's summary: a JSON line to the file and a readable line to the console, when
/// the `claude_balancer::request` target is enabled at INFO.
pub fn request_line(line: &RequestLine<'_>) {
    let Some(sink) = SINK.get() else {
        return;
    };
    if !tracing::enabled!(target: "claude_balancer::request", tracing::Level::INFO) {
        return;
    }
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    if let Some(file) = &sink.file {
        let mut out = Vec::with_capacity(512);
        let _ = write!(
            out,
            "{{\"timestamp\":\"{now}\",\"level\":\"INFO\",\"message\":\"request\",\"target\":\"claude_balancer::request\","
        );
        let fields = out.len();
        if serde_json::to_writer(&mut out, line).is_ok() && out.get(fields) == Some(&b'{') {
            // `{...fields}`: drop the fields' own opening brace, keep their closing one.
            out.remove(fields);
            out.push(b'\n');
            file.append(&out);
        }
    }
    let (dim, bold, reset) = if sink.color {
        ("\x1b[2m", "\x1b[1m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    let status = match (sink.color, line.status) {
        (false, s) => s.to_string(),
        (true, s @ 200..=299) => format!("\x1b[32m{s}\x1b[0m"),
        (true, s @ 400..=499) => format!("\x1b[33m{s}\x1b[0m"),
        (true, s) => format!("\x1b[31m{s}\x1b[0m"),
    };
    let text = format!(
        "{dim}{now}{reset}  INFO {bold}request{reset} {} {status} {}{} -> {} {}{}ms (ttfb {}ms, overhead {}ms) tokens {}/{} cache={} attempts={}\n",
        line.request_id,
        if line.client.is_empty() {
            String::new()
        } else {
            format!("[{}] ", line.client)
        },
        line.model,
        if line.provider.is_empty() {
            "-"
        } else {
            line.provider
        },
        match (line.stream, line.front) {
            (true, "anthropic") => "stream ".to_owned(),
            (false, "anthropic") => String::new(),
            (true, front) => format!("{front} stream "),
            (false, front) => format!("{front} "),
        },
        line.total_ms,
        line.ttfb_ms,
        line.overhead_ms,
        line.input_tokens,
        line.output_tokens,
        line.cache,
        line.attempts,
    );
    sink.console.append(text.as_bytes());
}

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
pub fn init(settings: &Settings) -> Result<LogGuard, String> {
    let level = level(settings);
    let filter = || {
        EnvFilter::try_from_env("CLAUDE_BALANCER_LOG")
            .unwrap_or_else(|_| EnvFilter::new(format!("claude_balancer={level},warn")))
    };
    let color = settings.log_color && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let console_output = LogOutput::new(std::io::stderr());
    let console = tracing_subscriber::fmt::layer()
        .with_ansi(color)
        .with_writer(console_output.clone())
        .with_filter(filter());
    let file = if settings.log_file_path.trim().is_empty() {
        None
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
        Some(LogOutput::new(appender))
    };
    let file_layer = file.clone().map(|writer| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter())
    });
    tracing_subscriber::registry()
        .with(console)
        .with(file_layer)
        .try_init()
        .map_err(|e| format!("cannot install logging: {e}"))?;
    let outputs = std::iter::once(console_output.clone())
        .chain(file.clone())
        .collect();
    let guard = start_flusher(outputs);
    // A panic's message goes straight to stderr: the console lines buffered before it go first.
    let default_hook = std::panic::take_hook();
    let console_before_panic = console_output.clone();
    std::panic::set_hook(Box::new(move |info| {
        console_before_panic.try_flush();
        default_hook(info);
    }));
    let _ = SINK.set(Sink {
        console: console_output,
        file,
        color,
    });
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_lines_reach_the_file_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs.jsonl");
        let log = LogOutput::new(RotatingFile::open(&path, ROTATE_BYTES, 1).unwrap());
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        log.append(format!("{{\"t\":{t},\"i\":{i}}}\n").as_bytes());
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        // Nothing is written before a flush (below the inline threshold)…
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut next = [0u64; 4];
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let t = v["t"].as_u64().unwrap() as usize;
            assert_eq!(
                v["i"].as_u64().unwrap(),
                next[t],
                "lines of one writer stay in order"
            );
            next[t] += 1;
        }
        assert_eq!(next, [500; 4]);
        // …and past the threshold the appending thread writes out itself.
        log.append(&vec![b'x'; MAX_PENDING]);
        assert!(std::fs::metadata(&path).unwrap().len() > MAX_PENDING as u64);
    }

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
