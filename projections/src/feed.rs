//! One read of the event store for all of an instance's projections.
//!
//! Every projection tails the same events. Read separately, each event of
//! a flash sale was fetched and decoded five times: nearly a fifth of the
//! statement time Postgres spent during a sale. The feed keeps the latest
//! final events in a window: a runner whose checkpoint lies inside it takes
//! its batch from there, and only events no runner has asked for yet are
//! read from Postgres. A runner whose checkpoint lies before the window
//! (just started, or far behind) reads the store itself, as it always
//! could.
//!
//! The window only ever holds events below some visibility horizon, which
//! are final; so whichever connection read them, every event between two of
//! them in the global order is there too.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::runner::read_events;
use crate::stored_event::{GlobalPosition, StoredEvent};

/// Events kept for runners that are behind the newest ones, at most.
const WINDOW: usize = 4096;
/// Events read from the store at once, at most.
const READ_LIMIT: i64 = 1000;
/// A window read this recently is served as it is when it has events for
/// the asking runner; later, the runner's step first reads what is new.
/// Runners step at their own times: without this, each would find the
/// window as its predecessor left it and lag one step behind it.
const FRESH: Duration = Duration::from_millis(5);

pub(crate) struct EventFeed {
    pool: PgPool,
    window: Mutex<Option<Window>>,
}

/// Every final event after `start` up to `end`, in global order.
struct Window {
    start: GlobalPosition,
    end: GlobalPosition,
    events: VecDeque<Arc<StoredEvent>>,
    read_at: Option<Instant>,
}

impl Window {
    fn starting_at(position: GlobalPosition) -> Self {
        Self {
            start: position,
            end: position,
            events: VecDeque::new(),
            read_at: None,
        }
    }

    /// The index of the first event after `after`.
    fn first_after(&self, after: GlobalPosition) -> usize {
        self.events
            .partition_point(|event| event.global_position() <= after)
    }

    fn extend(&mut self, events: Vec<StoredEvent>) {
        if let Some(last) = events.last() {
            self.end = last.global_position();
        }
        self.events.extend(events.into_iter().map(Arc::new));
        while self.events.len() > WINDOW {
            if let Some(dropped) = self.events.pop_front() {
                self.start = dropped.global_position();
            }
        }
        self.read_at = Some(Instant::now());
    }
}

impl EventFeed {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            window: Mutex::new(None),
        }
    }

    /// Up to `limit` final events after `after`, in global order; `None`
    /// when `after` lies before the window and the caller must read the
    /// store itself.
    pub(crate) async fn events_after(
        &self,
        after: GlobalPosition,
        limit: usize,
    ) -> Result<Option<Vec<Arc<StoredEvent>>>, sqlx::Error> {
        let mut guard = self.window.lock().await;
        let window = match guard.as_mut() {
            Some(window) if after < window.start => return Ok(None),
            Some(window) if after <= window.end => window,
            // The first step, or another instance applied events this one
            // has not read: start from there.
            _ => guard.insert(Window::starting_at(after)),
        };
        let stale = window
            .read_at
            .is_none_or(|read_at| read_at.elapsed() >= FRESH);
        if stale || window.first_after(after) == window.events.len() {
            let mut connection = self.pool.acquire().await?;
            let read = read_events(&mut connection, window.end, None, READ_LIMIT, &[]).await?;
            window.extend(read);
            if after < window.start {
                return Ok(None);
            }
        }
        let first = window.first_after(after);
        Ok(Some(
            window.events.range(first..).take(limit).cloned().collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(txid: i64, position: i64) -> StoredEvent {
        StoredEvent {
            position,
            txid,
            aggregate_type: "Test".into(),
            aggregate_id: "a".into(),
            sequence: position,
            event_type: "Happened".into(),
            event_version: "1".into(),
            payload: serde_json::value::to_raw_value(&()).unwrap(),
            metadata: serde_json::value::to_raw_value(&()).unwrap(),
            recorded_at: chrono::Utc::now(),
        }
    }

    fn at(txid: i64, position: i64) -> GlobalPosition {
        GlobalPosition { txid, position }
    }

    #[test]
    fn finds_the_first_event_after_a_position_in_global_order() {
        let mut window = Window::starting_at(at(1, 1));
        // Global order is by txid first: position 9 of txid 2 comes before
        // position 3 of txid 5.
        window.extend(vec![event(2, 9), event(5, 3), event(5, 4)]);
        assert_eq!(window.first_after(at(1, 1)), 0);
        assert_eq!(window.first_after(at(2, 9)), 1);
        assert_eq!(window.first_after(at(5, 3)), 2);
        assert_eq!(window.first_after(at(5, 4)), 3);
        assert_eq!(window.end, at(5, 4));
    }

    #[test]
    fn drops_the_oldest_events_past_the_window_and_moves_its_start() {
        let mut window = Window::starting_at(GlobalPosition::START);
        let events = (1..=WINDOW as i64 + 10).map(|p| event(p, p)).collect();
        window.extend(events);
        assert_eq!(window.events.len(), WINDOW);
        assert_eq!(window.start, at(10, 10));
        assert_eq!(window.first_after(window.start), 0);
    }
}
