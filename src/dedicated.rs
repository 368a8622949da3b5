//! Runs the latency-critical loops on a thread of their own.
//!
//! The checkout committer and the idempotency key writer are serial stages
//! every checkout waits on. On the shared runtime their wake-ups queue
//! behind whatever its workers are running (a projection decoding a batch
//! of events holds a worker for milliseconds, and tokio has no priorities);
//! on a thread of their own the operating system schedules them, and a
//! thread that mostly sleeps is run soon after it wakes. The two share one
//! such thread: they seldom have work at the same moment, and one thread
//! fewer to wake per instance left more of two cores to the rest (README,
//! "The serial stages have a thread of their own").

use futures_util::future::BoxFuture;

/// Spawns `tasks` on a new thread named `name`, each a task of a
/// single-threaded runtime that ends once they all have.
pub fn spawn(name: &str, tasks: Vec<BoxFuture<'static, ()>>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                // Tasks of their own, each woken alone (a `join!` would poll
                // every loop whenever one of them is woken).
                let running: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
                for task in running {
                    if let Err(error) = task.await {
                        tracing::error!(%error, "a serial stage ended abnormally");
                    }
                }
            })
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tasks_run_on_one_named_thread_with_timers_and_io() {
        let (sender, receiver) = std::sync::mpsc::channel();
        let (handed, taken) = tokio::sync::oneshot::channel::<()>();
        let first = sender.clone();
        spawn(
            "dedicated-test",
            vec![
                Box::pin(async move {
                    // Waits on the other task: both must be running.
                    let answered = taken.await.is_ok();
                    let name = std::thread::current().name().map(str::to_owned);
                    let _ = first.send((name, answered));
                }),
                Box::pin(async move {
                    // Timers and sockets need the runtime's drivers enabled.
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    let bound = tokio::net::TcpListener::bind("127.0.0.1:0").await.is_ok();
                    let _ = handed.send(());
                    let name = std::thread::current().name().map(str::to_owned);
                    let _ = sender.send((name, bound));
                }),
            ],
        )
        .expect("the thread starts");
        for _ in 0..2 {
            let (name, ok) = receiver
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("both tasks ran");
            assert_eq!(name.as_deref(), Some("dedicated-test"));
            assert!(ok, "timers, sockets and the other task's signal work");
        }
    }
}
