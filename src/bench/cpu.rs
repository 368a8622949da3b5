//! How busy the machine's cores were while the sale still had stock, and
//! who kept them busy.
//!
//! Everything the bench measures shares one machine, so "CPU-bound" is a
//! claim about the whole machine: the kernel's idle counter (`/proc/stat`)
//! says how much of the cores' time nobody used, and each process's own
//! counters (`/proc/<pid>/stat`) say who used the rest. Sampled through the
//! sale and cut at the sell-out, because the refusals after it are cheaper
//! and would dilute the figures. CPU time per successful checkout moves
//! less from run to run than checkouts per second do, so it is the figure
//! to compare two builds by.

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Sampling interval: the sale with stock lasts a second or two.
const EVERY: Duration = Duration::from_millis(50);
/// Clock ticks per second in `/proc` (`USER_HZ`, fixed at 100 by the
/// kernel's ABI on every architecture Linux reports to user space).
const TICKS_PER_SECOND: f64 = 100.0;

/// The kernel's cumulative CPU counters, in clock ticks, over all cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Time no process wanted (`idle` + `iowait`).
    pub idle: u64,
    /// Time the hypervisor gave to other machines while this one had work
    /// (`steal`): on a busy host, a run's figures drop with it.
    pub stolen: u64,
    pub total: u64,
}

impl CpuTimes {
    /// Parses the first (`cpu`, all cores) line of `/proc/stat`.
    pub fn parse(proc_stat: &str) -> Option<Self> {
        let line = proc_stat.lines().find(|line| line.starts_with("cpu "))?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]:
        // guest time is already counted in user and nice.
        let counted = ticks.get(..8)?;
        Some(Self {
            idle: counted[3] + counted[4],
            stolen: counted[7],
            total: counted.iter().sum(),
        })
    }

    fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }
}

/// The processes the machine's CPU time is split between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Processes named `commerce`: the server instances.
    Server,
    Postgres,
    Redis,
    /// This process: the load generator.
    Bench,
}

impl Group {
    pub const ALL: [Self; 4] = [Self::Server, Self::Postgres, Self::Redis, Self::Bench];

    pub fn label(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Postgres => "Postgres",
            Self::Redis => "Redis",
            Self::Bench => "bench",
        }
    }

    fn of(pid: u32, command: &str) -> Option<Self> {
        if pid == std::process::id() {
            return Some(Self::Bench);
        }
        match command {
            "commerce" => Some(Self::Server),
            "postgres" => Some(Self::Postgres),
            "redis-server" => Some(Self::Redis),
            _ => None,
        }
    }
}

/// Clock ticks used so far by each `Group`'s live processes (user and
/// system time of all their threads), in `Group::ALL` order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupTimes(pub [u64; 4]);

impl GroupTimes {
    /// Parses one `/proc/<pid>/stat` line into its command name and its
    /// user plus system ticks. The name sits in parentheses and may hold
    /// spaces or parentheses itself, so the fields are counted from the
    /// last `)`.
    pub fn parse_process(stat: &str) -> Option<(&str, u64)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let command = stat.get(open + 1..close)?;
        // After the name: state (field 3), ..., utime (14), stime (15).
        let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
        let user: u64 = fields.next()?.parse().ok()?;
        let system: u64 = fields.next()?.parse().ok()?;
        Some((command, user + system))
    }

    /// The groups' ticks, and each Postgres process's own, by pid.
    fn read() -> (Self, Vec<(u32, u64)>) {
        let mut times = Self::default();
        let mut postgres = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return (times, postgres);
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // A process may end between the listing and the read.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((command, ticks)) = Self::parse_process(&stat) else {
                continue;
            };
            if let Some(group) = Group::of(pid, command) {
                times.0[group as usize] += ticks;
                if group == Group::Postgres {
                    postgres.push((pid, ticks));
                }
            }
        }
        postgres.sort_unstable();
        (times, postgres)
    }
}

/// One sample: the machine's counters and the groups' counters.
#[derive(Debug, Clone)]
struct Sample {
    at: Duration,
    machine: CpuTimes,
    groups: GroupTimes,
    /// Each Postgres process's ticks, sorted by pid.
    postgres: Vec<(u32, u64)>,
}

/// Counters taken through a phase.
#[derive(Debug, Default)]
pub struct CpuSamples(Vec<Sample>);

/// Where the machine's CPU time went over a stretch of the sale.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSplit {
    /// Shares of the machine's time (all cores), in `Group::ALL` order.
    pub groups: [f64; 4],
    /// Used by processes outside the groups, or by ones that ended.
    pub other: f64,
    /// Taken by the hypervisor (see [`CpuTimes::stolen`]).
    pub stolen: f64,
    pub idle: f64,
    /// How many cores the machine has, as its counters tell.
    pub cores: f64,
    /// Each Postgres process's share of the machine's time, by pid (a
    /// backend that started after the first sample counts from zero).
    pub postgres_processes: Vec<(u32, f64)>,
}

/// "server 31%, Postgres 41%, ..., idle 10%": each share of the machine's
/// time, in whole percent.
impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (group, share) in Group::ALL.iter().zip(self.groups) {
            write!(f, "{} {:.0}%, ", group.label(), share * 100.0)?;
        }
        write!(
            f,
            "other {:.0}%, stolen by the hypervisor {:.0}%, idle {:.0}%",
            self.other * 100.0,
            self.stolen * 100.0,
            self.idle * 100.0
        )
    }
}

impl CpuSplit {
    /// Each group's CPU time per one of `count` things done in `span`
    /// (successful checkouts until the sell-out, say), in microseconds, in
    /// `Group::ALL` order. The samples cover a little less than `span`, so
    /// the rates they give are applied to all of it.
    pub fn micros_per(&self, count: usize, span: Duration) -> Option<[f64; 4]> {
        if count == 0 {
            return None;
        }
        Some(
            self.groups
                .map(|share| self.share_in_micros(share, span) / count as f64),
        )
    }

    /// The Postgres processes' CPU time per one of `count` things done in
    /// `span`, in microseconds, split by the role each pid is given in
    /// `roles` (`pid`, role); pids without one add up under `rest`. The
    /// roles come in their order of first appearance in `roles`.
    pub fn postgres_micros_by_role<'a>(
        &self,
        roles: &'a [(u32, String)],
        rest: &'a str,
        count: usize,
        span: Duration,
    ) -> Option<Vec<(&'a str, f64)>> {
        if count == 0 {
            return None;
        }
        let mut split: Vec<(&str, f64)> = Vec::new();
        for (pid, share) in &self.postgres_processes {
            let role = roles
                .iter()
                .find(|(known, _)| known == pid)
                .map_or(rest, |(_, role)| role.as_str());
            let micros = self.share_in_micros(*share, span) / count as f64;
            match split.iter_mut().find(|(named, _)| *named == role) {
                Some((_, total)) => *total += micros,
                None => split.push((role, micros)),
            }
        }
        let order = |role: &str| {
            roles
                .iter()
                .position(|(_, named)| named == role)
                .unwrap_or(usize::MAX)
        };
        split.sort_by_key(|(role, _)| order(role));
        Some(split)
    }

    fn share_in_micros(&self, share: f64, span: Duration) -> f64 {
        share * self.cores * span.as_secs_f64() * 1e6
    }
}

impl CpuSamples {
    /// Samples until `stop` turns true (or its sender is dropped); empty
    /// where `/proc/stat` cannot be read.
    pub async fn collect(mut stop: watch::Receiver<bool>) -> Self {
        let started = Instant::now();
        let mut samples = Vec::new();
        loop {
            match CpuTimes::read() {
                Some(machine) => {
                    let (groups, postgres) = GroupTimes::read();
                    samples.push(Sample {
                        at: started.elapsed(),
                        machine,
                        groups,
                        postgres,
                    });
                }
                None => return Self::default(),
            }
            if *stop.borrow() {
                return Self(samples);
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                changed = stop.changed() => if changed.is_err() { return Self(samples) },
            }
        }
    }

    /// Where the time went from the first sample to the last one taken at
    /// or before `until`; `None` with fewer than two.
    pub fn split_until(&self, until: Duration) -> Option<CpuSplit> {
        let first = self.0.first()?;
        let last = self.0.iter().rev().find(|sample| sample.at <= until)?;
        let total = last
            .machine
            .total
            .checked_sub(first.machine.total)
            .filter(|t| *t > 0)?;
        let covered = last.at.checked_sub(first.at).filter(|d| !d.is_zero())?;
        let share = |ticks: u64| ticks as f64 / total as f64;
        let groups: [f64; 4] =
            std::array::from_fn(|i| share(last.groups.0[i].saturating_sub(first.groups.0[i])));
        let postgres_processes = last
            .postgres
            .iter()
            .map(|(pid, ticks)| {
                let before = first
                    .postgres
                    .binary_search_by_key(pid, |(pid, _)| *pid)
                    .map_or(0, |at| first.postgres[at].1);
                (*pid, share(ticks.saturating_sub(before)))
            })
            .collect();
        let idle = share(last.machine.idle.saturating_sub(first.machine.idle));
        let stolen = share(last.machine.stolen.saturating_sub(first.machine.stolen));
        Some(CpuSplit {
            groups,
            other: (1.0 - idle - stolen - groups.iter().sum::<f64>()).max(0.0),
            stolen,
            idle,
            cores: total as f64 / TICKS_PER_SECOND / covered.as_secs_f64(),
            postgres_processes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_all_cores_line_counting_iowait_as_idle_and_steal_apart() {
        let stat = "cpu  100 5 50 800 20 3 2 10 7 0\ncpu0 50 2 25 400 10 1 1 5 3 0\n";
        assert_eq!(
            CpuTimes::parse(stat),
            Some(CpuTimes {
                idle: 820,
                stolen: 10,
                total: 990
            })
        );
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 x 4 5 6 7 8\n"), None);
    }

    #[test]
    fn parses_a_process_line_whose_name_holds_parentheses_and_spaces() {
        let stat = "4242 (odd ) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    170 30 0 0 20 0 9 0 12345 1000000 200 18446744073709551615";
        assert_eq!(GroupTimes::parse_process(stat), Some(("odd ) name", 200)));
        assert_eq!(
            GroupTimes::parse_process("7 (postgres) S 1 2 3"),
            None,
            "a line cut short gives nothing"
        );
    }

    #[test]
    fn the_split_stops_at_the_last_sample_before_the_cut() {
        let at =
            |ms: u64, idle: u64, total: u64, groups: [u64; 2], processes: &[(u32, u64)]| Sample {
                at: Duration::from_millis(ms),
                machine: CpuTimes {
                    idle,
                    stolen: total / 100,
                    total,
                },
                groups: GroupTimes([groups[0], groups[1], 0, 0]),
                postgres: processes.to_vec(),
            };
        // Postgres process 10 runs throughout, 20 starts after the first
        // sample, 30 ends before the cut (the group's ticks are given
        // apart: a process that ends leaves its group's sum).
        let samples = CpuSamples(vec![
            at(0, 1_000, 10_000, [500, 700], &[(10, 600), (30, 100)]),
            at(
                50,
                1_010,
                10_100,
                [540, 740],
                &[(10, 630), (20, 10), (30, 100)],
            ),
            at(100, 1_030, 10_200, [580, 780], &[(10, 660), (20, 20)]),
            at(150, 1_130, 10_300, [580, 780], &[(10, 660), (20, 20)]),
        ]);
        let split = samples.split_until(Duration::from_millis(120)).unwrap();
        assert_eq!(split.idle, 0.15);
        assert_eq!(split.groups, [0.4, 0.4, 0.0, 0.0]);
        // 2 of 200 ticks stolen, the rest of the 5% unclaimed by the groups.
        assert!((split.stolen - 0.01).abs() < 1e-9);
        assert!((split.other - 0.04).abs() < 1e-9);
        assert_eq!(
            split.to_string(),
            "server 40%, Postgres 40%, Redis 0%, bench 0%, other 4%, \
             stolen by the hypervisor 1%, idle 15%"
        );
        // 200 ticks in 100 ms: 20 cores.
        assert!((split.cores - 20.0).abs() < 1e-9);
        // 0.4 of 20 cores for 0.1 s over 100 checkouts: 8 ms each.
        let per = split.micros_per(100, Duration::from_millis(100)).unwrap();
        assert!((per[0] - 8_000.0).abs() < 1e-6);
        assert_eq!(split.micros_per(0, Duration::from_secs(1)), None);

        assert_eq!(split.postgres_processes, vec![(10, 0.3), (20, 0.1)]);
        let roles = [(20, "committer".to_owned()), (99, "keys".to_owned())];
        let by_role = split
            .postgres_micros_by_role(&roles, "the rest", 100, Duration::from_millis(100))
            .unwrap();
        let names: Vec<&str> = by_role.iter().map(|(role, _)| *role).collect();
        assert_eq!(
            names,
            ["committer", "the rest"],
            "roles first, no empty ones"
        );
        assert!((by_role[0].1 - 2_000.0).abs() < 1e-6);
        assert!((by_role[1].1 - 6_000.0).abs() < 1e-6);
        assert_eq!(
            split.postgres_micros_by_role(&roles, "the rest", 0, Duration::from_secs(1)),
            None
        );

        let whole = samples.split_until(Duration::from_millis(500)).unwrap();
        assert_eq!(whole.idle, 0.43333333333333335);
        assert_eq!(samples.split_until(Duration::ZERO), None);
        assert_eq!(CpuSamples::default().split_until(Duration::MAX), None);
    }
}
