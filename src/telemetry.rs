//! Tracing set-up: `RUST_LOG` filters, `LOG_FORMAT` picks text or JSON lines; `LOG_REDACT_KEYS`
//! hashes cache keys and paths before they reach a log line. Lines are written to stdout in
//! batches by a thread of their own (see [`BufferedLog`]): one `write(2)` per access-log line cost a
//! sixth of a cache hit, and a blocked stdout must never stop a request.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// A batch is written once it holds this much (nginx's `access_log ... buffer=` works the same way).
const BATCH_BYTES: usize = 32 * 1024;
/// A line waits at most about this long before it reaches stdout.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The process's log output, kept so [`flush`] can empty it at exit.
static STDOUT_LOG: OnceLock<BufferedLog> = OnceLock::new();
/// The format of access lines, which [`access`] writes itself (see there).
static ACCESS_FORMAT: OnceLock<LogFormat> = OnceLock::new();

thread_local! {
    /// One access line being built, and the timestamp's date-and-second part with the second it is for.
    static ACCESS_SCRATCH: std::cell::RefCell<(Vec<u8>, u64, String)> =
        std::cell::RefCell::new((Vec::with_capacity(256), u64::MAX, String::new()));
}

pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal; log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let log = STDOUT_LOG
        .get_or_init(|| BufferedLog::new(std::io::stdout()))
        .clone();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi)
        .with_writer(log.clone());
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Err(error) = result {
        eprintln!("strata: logging already initialised: {error}");
        return;
    }
    let _ = ACCESS_FORMAT.set(format);
    // A plain thread: it keeps flushing while the runtime starts and after it stops.
    let spawned = std::thread::Builder::new()
        .name("strata-log-flush".into())
        .spawn(move || loop {
            std::thread::sleep(FLUSH_INTERVAL);
            log.flush_batch();
        });
    if let Err(error) = spawned {
        eprintln!("strata: cannot start the log flusher, lines wait for a full batch: {error}");
    }
}

/// Writes out what the log holds (call before the process exits); waits for a blocked stdout for
/// a moment at most.
pub fn flush() {
    if let Some(log) = STDOUT_LOG.get() {
        log.sync(Duration::from_secs(2));
    }
}

/// One request's access-log facts.
pub struct AccessRecord<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub x_cache: &'static str,
    /// Time to the response headers.
    pub duration: Duration,
}

/// Writes one access line (target `strata::access`, level INFO; the caller checks that the filter
/// lets it through). Once [`init`] ran, the line is formatted here, byte for byte as
/// tracing-subscriber would format the same event, straight into the log batch: the generic
/// formatter cost a cache hit as much as everything Strata itself does for it. Without [`init`]
/// (Strata as a library), it is an ordinary tracing event.
pub fn access(record: &AccessRecord<'_>) {
    let (Some(format), Some(log)) = (ACCESS_FORMAT.get(), STDOUT_LOG.get()) else {
        tracing::info!(
            target: "strata::access",
            method = record.method,
            host = record.host,
            path = record.path,
            status = record.status,
            x_cache = record.x_cache,
            duration_ms = record.duration.as_micros() as f64 / 1000.0,
        );
        return;
    };
    ACCESS_SCRATCH.with(|scratch| {
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            return;
        };
        let (line, second, prefix) = &mut *scratch;
        line.clear();
        let now = std::time::SystemTime::now();
        let since_epoch = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if since_epoch.as_secs() != *second {
            *second = since_epoch.as_secs();
            // `2026-11-24T12:43:57Z` without its `Z`: the microseconds go between.
            *prefix = humantime::format_rfc3339_seconds(now).to_string();
            prefix.pop();
        }
        let subsec_micros = since_epoch.subsec_micros();
        let prefix = &*prefix;
        let push_stamp = |line: &mut Vec<u8>| {
            line.extend_from_slice(prefix.as_bytes());
            line.push(b'.');
            // Six digits, zero-padded: the leading 1 is dropped.
            let mut micros = itoa::Buffer::new();
            line.extend_from_slice(&micros.format(1_000_000 + subsec_micros).as_bytes()[1..]);
            line.push(b'Z');
        };
        let micros = record.duration.as_micros();
        let push_duration_ms = |line: &mut Vec<u8>| {
            line.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
            line.push(b'.');
            // Three digits, zero-padded: the leading 1 is dropped.
            line.extend_from_slice(
                &itoa::Buffer::new().format(1000 + micros % 1000).as_bytes()[1..],
            );
        };
        let mut number = itoa::Buffer::new();
        match format {
            LogFormat::Text => {
                push_stamp(line);
                line.extend_from_slice(b"  INFO strata::access: method=");
                line.extend_from_slice(record.method.as_bytes());
                line.extend_from_slice(b" host=");
                push_debug_str(line, record.host);
                line.extend_from_slice(b" path=");
                line.extend_from_slice(record.path.as_bytes());
                line.extend_from_slice(b" status=");
                line.extend_from_slice(number.format(record.status).as_bytes());
                line.extend_from_slice(b" x_cache=\"");
                line.extend_from_slice(record.x_cache.as_bytes());
                line.extend_from_slice(b"\" duration_ms=");
                push_duration_ms(line);
                line.push(b'\n');
            }
            LogFormat::Json => {
                line.extend_from_slice(b"{\"timestamp\":\"");
                push_stamp(line);
                line.extend_from_slice(b"\",\"level\":\"INFO\",\"method\":");
                push_json_str(line, record.method);
                line.extend_from_slice(b",\"host\":");
                push_json_str(line, record.host);
                line.extend_from_slice(b",\"path\":");
                push_json_str(line, record.path);
                line.extend_from_slice(b",\"status\":");
                line.extend_from_slice(number.format(record.status).as_bytes());
                line.extend_from_slice(b",\"x_cache\":\"");
                line.extend_from_slice(record.x_cache.as_bytes());
                line.extend_from_slice(b"\",\"duration_ms\":");
                push_duration_ms(line);
                line.extend_from_slice(b",\"target\":\"strata::access\"}\n");
            }
        }
        log.append(line, false);
    });
}

/// `text` as Rust's `{:?}` writes it (what tracing-subscriber's text format does for a `&str`).
fn push_debug_str(line: &mut Vec<u8>, text: &str) {
    if text
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ')
    {
        line.push(b'"');
        line.extend_from_slice(text.as_bytes());
        line.push(b'"');
    } else {
        line.extend_from_slice(format!("{text:?}").as_bytes());
    }
}

/// `text` as a JSON string.
fn push_json_str(line: &mut Vec<u8>, text: &str) {
    if serde_json::to_writer(&mut *line, text).is_err() {
        line.extend_from_slice(b"\"\"");
    }
}

/// Log lines gathered in memory and handed in batches to a thread that writes them to `sink`: when a
/// batch passes [`BATCH_BYTES`], every [`FLUSH_INTERVAL`], and at once (with everything before it,
/// in order) for a warning or an error, which an operator may be waiting for.
///
/// Nothing that logs ever waits for `sink`: a stdout that blocks (a stalled log collector, a full
/// pipe) would otherwise stop every runtime worker at its next warning, and the proxy with them.
/// Past [`QUEUE_BYTES`] (or [`QUEUE_BATCHES`]) waiting for the writer, batches are dropped,
/// counted, and reported by the first batch that gets through.
pub struct BufferedLog {
    shared: Arc<Shared>,
}

struct Shared {
    /// The batch being gathered. std Mutex: held to append or take it, never while writing.
    lines: Mutex<Vec<u8>>,
    to_writer: SyncSender<ToWriter>,
    /// Bytes handed to the writer and not written yet.
    queued: Arc<AtomicUsize>,
    /// Lines dropped since a batch last said so.
    dropped: AtomicU64,
}

enum ToWriter {
    Lines(Vec<u8>),
    /// Answered once everything sent before it is written.
    Synced(std::sync::mpsc::Sender<()>),
}

/// Bytes of lines waiting for the writer thread at most.
const QUEUE_BYTES: usize = 2 * 1024 * 1024;
/// Batches waiting for the writer thread at most (each warning is one).
const QUEUE_BATCHES: usize = 4096;

impl Clone for BufferedLog {
    fn clone(&self) -> Self {
        BufferedLog {
            shared: self.shared.clone(),
        }
    }
}

impl BufferedLog {
    pub fn new<W: Write + Send + 'static>(sink: W) -> Self {
        let (to_writer, from_loggers) = std::sync::mpsc::sync_channel(QUEUE_BATCHES);
        let queued = Arc::new(AtomicUsize::new(0));
        let written = queued.clone();
        let spawned = std::thread::Builder::new()
            .name("strata-log-write".into())
            .spawn(move || write_batches(sink, &from_loggers, &written));
        if let Err(error) = spawned {
            // Every batch is then dropped (the channel has no receiver); the proxy still serves.
            eprintln!("strata: cannot start the log writer, log lines are lost: {error}");
        }
        BufferedLog {
            shared: Arc::new(Shared {
                lines: Mutex::new(Vec::with_capacity(BATCH_BYTES + 4096)),
                to_writer,
                queued,
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Hands what was gathered to the writer.
    pub fn flush_batch(&self) {
        let mut lines = self
            .shared
            .lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.send(&mut lines);
    }

    /// Hands what was gathered to the writer and waits, at most `limit`, until it is written.
    pub fn sync(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        self.flush_batch();
        let (done, written) = std::sync::mpsc::channel();
        let mut ask = ToWriter::Synced(done);
        // The queue may be full behind a blocked output: no blocking send, a bounded wait.
        loop {
            match self.shared.to_writer.try_send(ask) {
                Ok(()) => break,
                Err(TrySendError::Full(again)) if std::time::Instant::now() < deadline => {
                    ask = again;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }

    fn append(&self, line: &[u8], urgent: bool) {
        let mut lines = self
            .shared
            .lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        lines.extend_from_slice(line);
        if urgent || lines.len() >= BATCH_BYTES {
            self.send(&mut lines);
        }
    }

    /// Sends the gathered lines to the writer, or drops them if it is too far behind.
    fn send(&self, lines: &mut Vec<u8>) {
        if lines.is_empty() {
            return;
        }
        // A full batch changes hands; a short one (a warning) is copied out, so that a queue of
        // warnings holds their bytes and not a batch's worth of capacity each.
        let mut batch = if lines.len() >= BATCH_BYTES / 2 {
            std::mem::replace(lines, Vec::with_capacity(BATCH_BYTES + 4096))
        } else {
            let copy = lines.clone();
            lines.clear();
            copy
        };
        // The first batch through after a loss says so, where the gap is.
        let lost = self.shared.dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            batch.splice(0..0, dropped_notice(lost));
        }
        let size = batch.len();
        let room = self.shared.queued.load(Ordering::Relaxed) + size <= QUEUE_BYTES;
        let refused = if room {
            self.shared.queued.fetch_add(size, Ordering::Relaxed);
            match self.shared.to_writer.try_send(ToWriter::Lines(batch)) {
                Ok(()) => None,
                Err(TrySendError::Full(message) | TrySendError::Disconnected(message)) => {
                    self.shared.queued.fetch_sub(size, Ordering::Relaxed);
                    match message {
                        ToWriter::Lines(batch) => Some(batch),
                        ToWriter::Synced(_) => None,
                    }
                }
            }
        } else {
            Some(batch)
        };
        if let Some(batch) = refused {
            let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
            // The notice's own line was not a log line.
            let count = lines - u64::from(lost > 0) + lost;
            self.shared.dropped.fetch_add(count, Ordering::Relaxed);
        }
    }
}

/// The writer thread: writes each batch in order.
fn write_batches<W: Write>(mut sink: W, batches: &Receiver<ToWriter>, queued: &AtomicUsize) {
    for message in batches {
        match message {
            ToWriter::Lines(lines) => {
                // A log that cannot be written (stdout closed) must not take the proxy down.
                let _ = sink.write_all(&lines);
                let _ = sink.flush();
                queued.fetch_sub(lines.len(), Ordering::Relaxed);
            }
            ToWriter::Synced(done) => {
                let _ = sink.flush();
                let _ = done.send(());
            }
        }
    }
}

/// The line that reports `lost` dropped lines, in the log's format.
fn dropped_notice(lost: u64) -> Vec<u8> {
    let message = format!("{lost} log lines were dropped: the log output did not keep up");
    let stamp = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    match ACCESS_FORMAT.get() {
        Some(LogFormat::Json) => format!(
            "{{\"timestamp\":\"{stamp}\",\"level\":\"WARN\",\"message\":\"{message}\",\"target\":\"strata::telemetry\"}}\n"
        ),
        _ => format!("{stamp}  WARN strata::telemetry: {message}\n"),
    }
    .into_bytes()
}

/// One event's writer: tracing-subscriber formats the whole line, then writes it here once.
pub struct LogLine<'a> {
    log: &'a BufferedLog,
    urgent: bool,
}

impl Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.log.append(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedLog {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine {
            log: self,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LogLine {
            log: self,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

/// A short, stable stand-in for a cache key or path (`h:` + 12 hex digits), so log lines about the
/// same URL still correlate without showing it. SipHash with fixed keys: stable across restarts of
/// one build.
pub fn redact(text: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    format!("h:{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

/// `text` itself, or its [`redact`]ed form.
pub fn loggable(text: &str, redact_keys: bool) -> std::borrow::Cow<'_, str> {
    if redact_keys {
        std::borrow::Cow::Owned(redact(text))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_is_short_stable_and_hides_the_text() {
        let a = redact("/users/42/secret");
        assert_eq!(a, redact("/users/42/secret"));
        assert_ne!(a, redact("/users/43/secret"));
        assert!(a.starts_with("h:") && a.len() == 14, "{a}");
        assert_eq!(loggable("/x", false), "/x");
    }

    /// A sink the test can read while the log still owns it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn written(sink: &Shared) -> String {
        String::from_utf8_lossy(&sink.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// Long enough for the writer thread on a loaded machine; the tests wait for its answer.
    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn info_lines_wait_for_a_batch_warnings_take_everything_out_in_order() -> std::io::Result<()> {
        let sink = Shared::default();
        let log = BufferedLog::new(sink.clone());
        let line =
            |text: &str, urgent: bool| LogLine { log: &log, urgent }.write_all(text.as_bytes());
        line("access 1\n", false)?;
        line("access 2\n", false)?;
        assert_eq!(written(&sink), "", "info lines are batched");
        line("warning\n", true)?;
        // Written by the writer thread: `sync` with an empty batch waits for it alone.
        log.sync(WAIT);
        assert_eq!(written(&sink), "access 1\naccess 2\nwarning\n");
        line("access 3\n", false)?;
        log.sync(WAIT);
        assert_eq!(written(&sink), "access 1\naccess 2\nwarning\naccess 3\n");
        Ok(())
    }

    #[test]
    fn a_full_batch_is_written_without_waiting() -> std::io::Result<()> {
        let sink = Shared::default();
        let log = BufferedLog::new(sink.clone());
        let text = "x".repeat(1023) + "\n";
        let lines = BATCH_BYTES / text.len();
        for _ in 0..lines {
            LogLine {
                log: &log,
                urgent: false,
            }
            .write_all(text.as_bytes())?;
        }
        let (done, written_out) = std::sync::mpsc::channel();
        // Not `sync`, which would hand over the batch itself: the writer is only asked when done.
        let _ = log.shared.to_writer.send(ToWriter::Synced(done));
        let _ = written_out.recv_timeout(WAIT);
        assert_eq!(written(&sink).len(), lines * text.len());
        Ok(())
    }

    /// A sink that blocks every write until it is opened, as a stalled pipe does.
    #[derive(Clone, Default)]
    struct Stalled {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        out: Shared,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.open;
            let mut is_open = open.lock().unwrap_or_else(PoisonError::into_inner);
            while !*is_open {
                is_open = opened.wait(is_open).unwrap_or_else(PoisonError::into_inner);
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_drops_lines_instead_of_blocking_the_logger() -> std::io::Result<()> {
        let sink = Stalled::default();
        let log = BufferedLog::new(sink.clone());
        // Every warning is a batch of its own, 16 KiB here: the queue holds 2 MiB of them.
        let long = "w".repeat(16 * 1024 - 1);
        let warnings = 4 * QUEUE_BYTES / long.len();
        for _ in 0..warnings {
            LogLine {
                log: &log,
                urgent: true,
            }
            .write_all(format!("{long}\n").as_bytes())?;
        }
        let dropped = log.shared.dropped.load(Ordering::Relaxed);
        assert!(
            dropped as usize >= warnings - QUEUE_BYTES / long.len() - 1,
            "{dropped}"
        );
        {
            let (open, opened) = &*sink.open;
            *open.lock().unwrap_or_else(PoisonError::into_inner) = true;
            opened.notify_all();
        }
        // The writer catches up with what it had queued; the next line says what was lost.
        log.sync(WAIT);
        LogLine {
            log: &log,
            urgent: true,
        }
        .write_all(b"after\n")?;
        log.sync(WAIT);
        let text = written(&sink.out);
        let lines: Vec<&str> = text.lines().collect();
        // Those the writer took before it blocked, then the notice where the gap is, then the rest.
        let kept = lines.len() - 2;
        assert_eq!(kept as u64 + dropped, warnings as u64, "{text}");
        assert!(lines[..kept].iter().all(|line| *line == long));
        assert!(
            lines[kept].ends_with(&format!("WARN strata::telemetry: {dropped} log lines were dropped: the log output did not keep up")),
            "{text}"
        );
        assert_eq!(lines[kept + 1], "after");
        Ok(())
    }
}
