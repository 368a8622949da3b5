//! Server instances started by the benchmark: the `commerce` binary next to
//! the benchmark's own, on free loopback ports, sharing one database and one
//! Redis. Children are stopped at the end and killed if the benchmark dies.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::process::{Child, Command};

use super::client::{Call, Endpoint, Worker};
use crate::config::available_cores;

/// How long an instance may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an instance may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The server's HTTP workers and tokio's runtime workers; each is one per
/// core unless set.
const THREAD_SETTINGS: [&str; 2] = ["HTTP_WORKERS", "TOKIO_WORKER_THREADS"];

/// Threads of each kind for one of `count` instances sharing this machine:
/// its share of the cores, at least one. Three instances each sized for the
/// whole machine spent more CPU per checkout on switching between their
/// threads than on anything they gained from them.
fn thread_share(count: usize) -> usize {
    (available_cores() / count.max(1)).max(1)
}

/// How to run the `commerce` binary: where it is and the environment every
/// instance and subcommand shares.
#[derive(Debug, Clone)]
pub struct Commerce {
    pub binary: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Commerce {
    /// The `commerce` binary in the same directory as the running one.
    pub fn sibling_binary() -> anyhow::Result<PathBuf> {
        let me = std::env::current_exe().context("locating the benchmark binary")?;
        let dir = me
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", me.display()))?;
        let binary = dir.join(format!("commerce{}", std::env::consts::EXE_SUFFIX));
        if !binary.exists() {
            bail!(
                "{} not found: build it first (cargo build --release --bin commerce)",
                binary.display()
            );
        }
        if let (Ok(bench), Ok(server)) = (me.metadata(), binary.metadata()) {
            if let (Ok(bench), Ok(server)) = (bench.modified(), server.modified()) {
                if server + Duration::from_secs(60) < bench {
                    eprintln!(
                        "warning: {} is older than the benchmark; rebuild it (cargo build --release --bin commerce)",
                        binary.display()
                    );
                }
            }
        }
        Ok(binary)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    /// Runs a `commerce` subcommand to the end (at most `timeout`); returns
    /// its standard output.
    pub async fn run(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let mut command = self.command();
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(timeout, command.output())
            .await
            .map_err(|_| anyhow!("commerce {} took longer than {timeout:?}", args[0]))?
            .with_context(|| format!("running {}", self.binary.display()))?;
        if !output.status.success() {
            bail!(
                "commerce {} failed ({}): {}",
                args[0],
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// A running instance.
struct Instance {
    child: Child,
    endpoint: Endpoint,
    log: PathBuf,
}

/// The instances the benchmark started. Dropping this kills any still running.
pub struct Instances {
    running: Vec<Instance>,
}

impl Instances {
    /// Starts `count` instances on free ports and waits until each is ready.
    /// Their logs go to `log_dir`.
    pub async fn start(commerce: &Commerce, count: usize, log_dir: &Path) -> anyhow::Result<Self> {
        let mut instances = Self {
            running: Vec::new(),
        };
        let threads = thread_share(count).to_string();
        for number in 0..count {
            let port = free_port()?;
            let log = log_dir.join(format!("instance-{number}.log"));
            let file = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let mut command = commerce.command();
            for name in THREAD_SETTINGS {
                // What the operator set for the benchmark wins.
                if std::env::var_os(name).is_none() {
                    command.env(name, &threads);
                }
            }
            let child = command
                .arg("serve")
                .env("BIND_ADDR", format!("127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", commerce.binary.display()))?;
            instances.running.push(Instance {
                child,
                endpoint: Endpoint::new(([127, 0, 0, 1], port).into()),
                log,
            });
        }
        for instance in &mut instances.running {
            wait_until_ready(instance).await?;
        }
        Ok(instances)
    }

    pub fn urls(&self) -> Vec<String> {
        self.running
            .iter()
            .map(|instance| instance.endpoint.url())
            .collect()
    }

    pub fn logs(&self) -> Vec<PathBuf> {
        self.running
            .iter()
            .map(|instance| instance.log.clone())
            .collect()
    }

    /// SIGTERM to each (a graceful stop), then SIGKILL to any that is still
    /// running after `STOP_TIMEOUT`.
    pub async fn stop(mut self) {
        for instance in &self.running {
            if let Some(pid) = instance.child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for instance in &mut self.running {
            if tokio::time::timeout(STOP_TIMEOUT, instance.child.wait())
                .await
                .is_err()
            {
                let _ = instance.child.kill().await;
            }
        }
        self.running.clear();
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for instance in &mut self.running {
            let _ = instance.child.start_kill();
        }
    }
}

/// A port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

async fn wait_until_ready(instance: &mut Instance) -> anyhow::Result<()> {
    let started = Instant::now();
    let endpoints: std::sync::Arc<[Endpoint]> = vec![instance.endpoint.clone()].into();
    let mut worker = Worker::new(endpoints);
    loop {
        if let Some(status) = instance.child.try_wait()? {
            bail!(
                "instance {} exited ({status}) before it was ready; its log:\n{}",
                instance.endpoint.url(),
                tail(&instance.log)
            );
        }
        if let Ok(answer) = worker.send(0, &Call::get("/readyz")).await {
            if answer.status == 200 {
                return Ok(());
            }
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "instance {} not ready within {READY_TIMEOUT:?}; its log:\n{}",
                instance.endpoint.url(),
                tail(&instance.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_share_the_cores_and_each_gets_at_least_one_thread() {
        let cores = available_cores();
        assert_eq!(thread_share(1), cores);
        assert_eq!(thread_share(cores), 1);
        assert_eq!(thread_share(cores * 4), 1);
        assert_eq!(thread_share(0), cores);
    }
}
