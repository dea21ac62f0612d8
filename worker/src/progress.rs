//! Progress of the long commands (`gen-data`, `train --standalone`, `eval`, `predict`): a bar
//! with position, rate and ETA when stderr is a terminal; otherwise a plain log line every
//! tenth of the work or every [`PLAIN_EVERY`], whichever comes first, so that logs in files
//! and pipes (a launcher's, a test's) stay readable. While a bar is drawn, log lines and
//! tables written to stderr go above it ([`StderrWriter`], [`suspend`]).
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// At most this long between two plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// The bar being drawn, if any: the stderr writer draws around it.
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Progress of one piece of work of known size.
pub(crate) struct Progress {
    what: &'static str,
    unit: &'static str,
    total: u64,
    kind: Kind,
}

enum Kind {
    Bar(ProgressBar),
    Plain {
        /// Position and time of the start, for the rate.
        start: (u64, Instant),
        /// Position and time of the last line.
        logged: (u64, Instant),
    },
}

impl Progress {
    /// `total` `unit`s of `what` (e.g. "generating", "images"), starting at `position`.
    pub(crate) fn new(what: &'static str, unit: &'static str, total: u64, position: u64) -> Self {
        let now = Instant::now();
        let kind = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {pos}/{len} {prefix} ({rate}, {elapsed} elapsed, ETA {eta})",
                    )
                    .expect("a valid template")
                    .with_key("rate", |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                        let _ = write!(out, "{:.1}/s", state.per_sec());
                    })
                    .progress_chars("=> "),
                )
                .with_message(what)
                .with_prefix(unit)
                .with_position(position);
            bar.reset_eta();
            *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
            Kind::Bar(bar)
        } else {
            Kind::Plain { start: (position, now), logged: (position, now) }
        };
        Self { what, unit, total, kind }
    }

    /// `done` of the total are done.
    pub(crate) fn set(&mut self, done: u64) {
        match &mut self.kind {
            Kind::Bar(bar) => bar.set_position(done),
            Kind::Plain { start, logged } => {
                let now = Instant::now();
                let tenth = |n: u64| n.saturating_mul(10) / self.total.max(1);
                if done >= self.total || tenth(done) > tenth(logged.0) || now - logged.1 >= PLAIN_EVERY {
                    *logged = (done, now);
                    log_plain(self.what, self.unit, done, self.total, *start, now);
                }
            }
        }
    }
}

/// The work is over (done or failed): the bar stays on screen as it is.
impl Drop for Progress {
    fn drop(&mut self) {
        if let Kind::Bar(bar) = &self.kind {
            bar.abandon();
            *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

fn log_plain(what: &str, unit: &str, done: u64, total: u64, start: (u64, Instant), now: Instant) {
    let seconds = (now - start.1).as_secs_f64();
    let rate = if seconds > 0.0 { done.saturating_sub(start.0) as f64 / seconds } else { 0.0 };
    // None (not logged) until there is a rate to extrapolate.
    let eta_s = (rate > 0.0).then(|| (total.saturating_sub(done) as f64 / rate).round() as u64);
    let percent = done.saturating_mul(100) / total.max(1);
    let per_s = (rate * 10.0).round() / 10.0;
    tracing::info!(done, total, percent, per_s, eta_s, "{what}: {done}/{total} {unit}");
}

/// Runs `f`, which writes to stderr, with the bar (if any) cleared while it does.
pub(crate) fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match active {
        Some(bar) => bar.suspend(f),
        None => f(),
    }
}

/// The tracing writer: stderr, above the bar being drawn.
pub(crate) struct StderrWriter;

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        suspend(|| std::io::stderr().write(buf))
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        suspend(|| std::io::stderr().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
