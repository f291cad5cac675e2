//! Shared measurement helpers: order statistics, `/proc` readings of a
//! process (RSS, CPU time, disk writes), and the machine description printed
//! at the top of every run.
#![allow(dead_code)] // not every scenario uses every helper

use std::time::Duration;

/// Median, spread and percentiles of a sample (sorted copy inside).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub p95: f64,
    pub p99: f64,
}

/// The `q`-quantile (0..=1) of sorted `v`, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Summary of `v` (NaN fields for an empty sample).
pub fn summarize(v: &[f64]) -> Summary {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    s.sort_by(f64::total_cmp);
    Summary {
        n: s.len(),
        min: s.first().copied().unwrap_or(f64::NAN),
        median: quantile(&s, 0.5),
        max: s.last().copied().unwrap_or(f64::NAN),
        p95: quantile(&s, 0.95),
        p99: quantile(&s, 0.99),
    }
}

/// What `/proc/PID` says about a process at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// Resident set, bytes.
    pub rss: u64,
    /// Peak resident set, bytes.
    pub hwm: u64,
    /// User + system CPU time, clock ticks.
    pub cpu_ticks: u64,
    /// Bytes the process caused to be written to storage.
    pub write_bytes: u64,
}

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ; 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

/// Reads `/proc/PID/{status,stat,io}`; None when the process is gone.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parens.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; index 11 and 12 here.
    let cpu_ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let write_bytes = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find(|l| l.starts_with("write_bytes:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    Some(ProcSample {
        rss: kb("VmRSS:"),
        hwm: kb("VmHWM:"),
        cpu_ticks,
        write_bytes,
    })
}

/// CPU use between two samples over `wall`, in percent of one core.
pub fn cpu_percent(a: &ProcSample, b: &ProcSample, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs <= 0.0 {
        return f64::NAN;
    }
    (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / TICKS_PER_SEC / secs * 100.0
}

/// Prints the machine (nproc, CPU model, load) and the date, once per run.
pub fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%MZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "# machine: nproc={cpus} cpu=\"{model}\" loadavg=\"{}\" date={date}",
        load.trim()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&v);
        assert_eq!(
            (s.min, s.median, s.p95, s.p99, s.max),
            (1.0, 50.0, 95.0, 99.0, 100.0)
        );
        assert!(summarize(&[]).median.is_nan());
    }
}
