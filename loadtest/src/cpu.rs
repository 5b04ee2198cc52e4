//! CPU time spent by a process over a phase, from `/proc/{pid}/stat` (Linux): user + system
//! time, so a figure says what the server spent per round trip whatever else the machine ran.
//! The server's pid is the child this run started, or the process listening on the port
//! (`/proc/net/tcp*` -> socket inode -> `/proc/{pid}/fd`).

use std::time::Instant;

/// A process's user + system CPU time so far, seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// This process's user + system CPU time so far, seconds.
pub fn own_cpu_seconds() -> Option<f64> {
    stat_seconds(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// utime + stime of a `/proc/{pid}/stat` line, in seconds.
fn stat_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second();
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

/// The pid of the process listening on TCP `port` (IPv4 or IPv6), if this user can see it.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening = *state == "0A";
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if listening && local_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// CPU spent over a window: the server's (if its pid is known) and this load generator's.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// Server CPU seconds over the window (`None`: pid unknown or unreadable).
    pub server_s: Option<f64>,
    /// This process's CPU seconds over the window.
    pub own_s: Option<f64>,
    /// Wall-clock seconds of the window.
    pub wall_s: f64,
}

impl CpuUse {
    /// Server CPU per round trip, µs.
    pub fn server_us_per(&self, round_trips: u64) -> Option<f64> {
        self.server_s.map(|s| s * 1e6 / round_trips.max(1) as f64)
    }

    /// Cores the server kept busy on average.
    pub fn server_cores(&self) -> Option<f64> {
        self.server_s.map(|s| s / self.wall_s.max(1e-9))
    }

    /// Cores this load generator kept busy on average.
    pub fn own_cores(&self) -> Option<f64> {
        self.own_s.map(|s| s / self.wall_s.max(1e-9))
    }
}

/// A window being measured.
pub struct CpuWindow {
    pid: Option<u32>,
    server: Option<f64>,
    own: Option<f64>,
    began: Instant,
}

impl CpuWindow {
    /// Starts measuring (the server `pid`, if known, and this process).
    pub fn start(pid: Option<u32>) -> CpuWindow {
        CpuWindow {
            pid,
            server: pid.and_then(cpu_seconds),
            own: own_cpu_seconds(),
            began: Instant::now(),
        }
    }

    /// What was spent since the start.
    pub fn finish(self) -> CpuUse {
        let server_now = self.pid.and_then(cpu_seconds);
        CpuUse {
            server_s: self.server.zip(server_now).map(|(a, b)| b - a),
            own_s: self.own.zip(own_cpu_seconds()).map(|(a, b)| b - a),
            wall_s: self.began.elapsed().as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_user_plus_system_time_whatever_the_name() {
        // The name holds spaces and a ')'.
        let line = "4242 (thing hub) x) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 8 0 100 1 1";
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        assert_eq!(stat_seconds(line), Some(400.0 / ticks));
        assert_eq!(stat_seconds("garbage"), None);
    }

    #[test]
    fn this_process_is_found_by_the_port_it_listens_on_and_spends_cpu() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert_eq!(pid_listening_on(port), Some(std::process::id()));
        let window = CpuWindow::start(Some(std::process::id()));
        let mut x = 0u64;
        let until = Instant::now() + std::time::Duration::from_millis(50);
        while Instant::now() < until {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let used = window.finish();
        assert!(used.server_s.is_some() && used.own_s.is_some(), "{used:?}");
        assert!(used.wall_s >= 0.05, "{used:?}");
    }
}
