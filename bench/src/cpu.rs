//! CPU accounting from `/proc`: the server process's CPU time, its SQLite writer thread's
//! share, and the whole machine's busy time, sampled when a phase's measured part starts and
//! when it ends.

use std::time::Duration;

/// CPU time of the server process and of its SQLite writer thread, in clock ticks.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    process: u64,
    writer: Option<u64>,
    /// Busy time of the whole machine (every process, the load generator and a local
    /// PostgreSQL included), summed over its CPUs.
    machine: Option<u64>,
}

/// Per-request CPU time, µs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuPer {
    pub(crate) process: f64,
    pub(crate) writer: Option<f64>,
    pub(crate) machine: Option<f64>,
}

/// `/proc` reports CPU time in USER_HZ ticks, which Linux fixes at 100 per second for
/// user space on every architecture it supports.
const TICK_US: f64 = 10_000.0;

/// user + system ticks from a `/proc/…/stat` line (fields 14 and 15; the command name in
/// field 2 may hold spaces, so count from its closing parenthesis).
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let user: u64 = f.get(11)?.parse().ok()?;
    let system: u64 = f.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Busy ticks of all CPUs from `/proc/stat`'s first line: user, nice, system, irq and softirq
/// (not idle, iowait or steal).
fn machine_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?)
}

fn cpu_ticks(pid: u32) -> Option<CpuTicks> {
    let process = stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let writer = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "sqlite-writer")
        })
        .and_then(|t| stat_ticks(&std::fs::read_to_string(t.path().join("stat")).ok()?));
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| machine_ticks(&s));
    Some(CpuTicks {
        process,
        writer,
        machine,
    })
}

/// Samples the server's CPU time when a phase's measured part starts (after its warm-up).
pub(crate) struct CpuWatch(Option<(u32, tokio::task::JoinHandle<Option<CpuTicks>>)>);

impl CpuWatch {
    pub(crate) fn start(pid: Option<u32>, warmup: Duration) -> CpuWatch {
        CpuWatch(pid.map(|pid| {
            let at = tokio::time::Instant::now() + warmup;
            (
                pid,
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    cpu_ticks(pid)
                }),
            )
        }))
    }

    /// CPU per request since the sample, over `requests` requests.
    pub(crate) async fn per(self, requests: u64) -> Option<CpuPer> {
        let (pid, first) = self.0?;
        let a = first.await.ok()??;
        let b = cpu_ticks(pid)?;
        if requests == 0 {
            return None;
        }
        let n = requests as f64;
        Some(CpuPer {
            process: b.process.saturating_sub(a.process) as f64 * TICK_US / n,
            writer: match (a.writer, b.writer) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 * TICK_US / n),
                _ => None,
            },
            machine: match (a.machine, b.machine) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 * TICK_US / n),
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio rt) worker)) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    1234 567 0 0 20 0 6 0 100 0 0";
        assert_eq!(stat_ticks(stat), Some(1234 + 567));
        assert_eq!(stat_ticks("4242 (x) S 1 2"), None, "too few fields");
        assert_eq!(stat_ticks("no parenthesis"), None);
        let me = cpu_ticks(std::process::id()).expect("this process's own stat");
        assert_eq!(
            me.writer, None,
            "no thread of this test is named sqlite-writer"
        );
    }
}
