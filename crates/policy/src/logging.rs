//! One `log` backend and one timestamp format for all binaries.
//!
//! Each line is `TIMESTAMP LEVEL program[pid]: message`, written with a single `write` so
//! concurrent writers do not interleave, to stderr (what `kubectl logs` and runtimes capture)
//! or to an append-only file. Never stdout: the plugin's stdout carries only the CNI result.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

struct Logger {
    program: &'static str,
    file: Option<Mutex<std::fs::File>>,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!(
            "{} {:<5} {}[{}]: {}\n",
            rfc3339(SystemTime::now()),
            r.level(),
            self.program,
            std::process::id(),
            r.args()
        );
        match &self.file {
            Some(f) => {
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }
    fn flush(&self) {}
}

/// Installs the logger once; later calls (tests) keep the first and only change the level.
/// A log file that cannot be opened falls back to stderr: logging must never fail a command.
/// So does a log file that is our own stdout (`/proc/self/fd/1`, `/dev/stdout`, the file the
/// runtime reads the result from): a log line there would corrupt the CNI result.
pub fn init(program: &'static str, level: log::LevelFilter, file: Option<&str>) {
    let mut refused = None;
    let file = file.and_then(|p| match open_log(p) {
        Ok(f) => Some(Mutex::new(f)),
        Err(why) => {
            refused = Some(format!("logFile {p:?}: {why}; logging to stderr"));
            None
        }
    });
    let _ = log::set_boxed_logger(Box::new(Logger { program, file }));
    log::set_max_level(level);
    if let Some(r) = refused {
        log::warn!("{r}");
    }
}

/// Opens a log file for appending without ever blocking (a FIFO with no reader fails with
/// ENXIO instead of waiting) and refuses the file that is our stdout.
fn open_log(path: &str) -> Result<std::fs::File, String> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    let m = f.metadata().map_err(|e| e.to_string())?;
    let stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata());
    if let Ok(out) = stdout {
        if m.dev() == out.dev() && m.ino() == out.ino() {
            return Err("this is our stdout, which carries only the CNI result".into());
        }
    }
    Ok(f)
}

/// RFC 3339 UTC with milliseconds (`2026-11-23T02:24:01.123Z`), like Envoy's `%START_TIME%`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Gregorian date of a day count since 1970-01-01, by counting 400-year eras from 0000-03-01
/// (putting February last makes leap days fall at the end of each year).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st
    let mp = (5 * doy + 2) / 153; // month index from March
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_millis(951_782_400_123);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_401_296);
        assert_eq!(rfc3339(t), "2026-11-23T02:34:56.000Z");
        let end = UNIX_EPOCH + Duration::from_secs(4_107_542_399);
        assert_eq!(rfc3339(end), "2100-02-28T23:59:59.000Z");
    }
}
