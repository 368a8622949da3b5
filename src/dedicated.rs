//! Runs a latency-critical loop on a thread of its own.
//!
//! The checkout committer and the idempotency key writer are serial stages
//! every checkout waits on. On the shared runtime their wake-ups queue
//! behind whatever its workers are running (a projection decoding a batch
//! of events holds a worker for milliseconds, and tokio has no priorities);
//! on a thread of their own the operating system schedules them, and a
//! thread that mostly sleeps is run soon after it wakes.

use std::future::Future;

/// Spawns `task` on a new thread named `name`, on a single-threaded
/// runtime that ends with it.
pub fn spawn<F>(name: &str, task: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || runtime.block_on(task))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_runs_on_its_own_named_thread_with_timers_and_io() {
        let (sender, receiver) = std::sync::mpsc::channel();
        spawn("dedicated-test", async move {
            // Timers and sockets need the runtime's drivers enabled.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let bound = tokio::net::TcpListener::bind("127.0.0.1:0").await.is_ok();
            let name = std::thread::current().name().map(str::to_owned);
            let _ = sender.send((name, bound));
        })
        .expect("the thread starts");
        let (name, bound) = receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the task ran");
        assert_eq!(name.as_deref(), Some("dedicated-test"));
        assert!(bound, "the runtime can open sockets");
    }
}
