//! Cart answers kept with the cache entries they were rendered from, so a
//! read that finds the very same entries again sends the same bytes instead
//! of building the view and its JSON once more. Carts change far less often
//! than buyers look at them, and the comparison is of the entries' bytes, so
//! a changed cart, price or stock figure is never answered from here.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use actix_web::web::Bytes;
use uuid::Uuid;

/// Answers beyond this many, or this many bytes (entries and answer), are
/// all forgotten at once: memory stays bounded, and the carts read often
/// come back at once.
const MAX_CARTS: usize = 10_000;
const MAX_BYTES: usize = 32 * 1024 * 1024;

/// One cart's last answer, with the entries it came from (the cart's,
/// then those its lines needed): name and body of each.
struct Rendered {
    entries: Vec<(Box<str>, Box<[u8]>)>,
    json: Bytes,
}

impl Rendered {
    fn weight(&self) -> usize {
        self.json.len()
            + self
                .entries
                .iter()
                .map(|(name, body)| name.len() + body.len())
                .sum::<usize>()
    }
}

#[derive(Default)]
struct Answers {
    by_cart: HashMap<Uuid, Rendered>,
    bytes: usize,
}

/// Answers by cart, shared by every HTTP worker of the process.
#[derive(Default)]
pub struct RenderedCarts(Mutex<Answers>);

impl RenderedCarts {
    /// The answer rendered from exactly the entries `body_of` gives
    /// (the body a read found under a name), if it is still here.
    pub fn get<'a>(&self, cart: Uuid, body_of: impl Fn(&str) -> Option<&'a [u8]>) -> Option<Bytes> {
        let answers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let rendered = answers.by_cart.get(&cart)?;
        let same = rendered
            .entries
            .iter()
            .all(|(name, kept)| body_of(name).is_some_and(|read| read == &**kept));
        same.then(|| rendered.json.clone())
    }

    /// Keeps `json` as the answer rendered from `entries` (name, body).
    pub fn put(&self, cart: Uuid, entries: &[(&str, &[u8])], json: Bytes) {
        let rendered = Rendered {
            entries: entries
                .iter()
                .map(|(name, body)| (Box::from(*name), Box::from(*body)))
                .collect(),
            json,
        };
        let weight = rendered.weight();
        let mut answers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if answers.by_cart.len() >= MAX_CARTS || answers.bytes + weight > MAX_BYTES {
            *answers = Answers::default();
        }
        answers.bytes += weight;
        if let Some(replaced) = answers.by_cart.insert(cart, rendered) {
            answers.bytes -= replaced.weight();
        }
    }
}

/// The process's answers.
pub fn carts() -> &'static RenderedCarts {
    static CARTS: OnceLock<RenderedCarts> = OnceLock::new();
    CARTS.get_or_init(RenderedCarts::default)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A read that found `entries`.
    fn read<'a>(entries: &'a [(&'a str, &'a [u8])]) -> impl Fn(&str) -> Option<&'a [u8]> {
        let found: HashMap<&str, &[u8]> = entries.iter().copied().collect();
        move |name| found.get(name).copied()
    }

    #[test]
    fn an_answer_is_given_only_for_the_very_entries_it_came_from() {
        let carts = RenderedCarts::default();
        let cart = Uuid::new_v4();
        let entries: [(&str, &[u8]); 3] = [
            ("cart", b"cart v1"),
            ("product", b"product"),
            ("stock", b"stock 5"),
        ];
        carts.put(cart, &entries, Bytes::from_static(b"{\"answer\":1}"));

        let answer = Some(Bytes::from_static(b"{\"answer\":1}"));
        assert_eq!(carts.get(cart, read(&entries)), answer);
        // Entries the answer did not need change nothing.
        let with_more = [entries[0], entries[1], entries[2], ("other", &b"x"[..])];
        assert_eq!(carts.get(cart, read(&with_more)), answer);

        let stock_moved = [entries[0], entries[1], ("stock", &b"stock 4"[..])];
        assert_eq!(carts.get(cart, read(&stock_moved)), None);
        let cart_changed = [("cart", &b"cart v2"[..]), entries[1], entries[2]];
        assert_eq!(carts.get(cart, read(&cart_changed)), None);
        let stock_missing = [entries[0], entries[1]];
        assert_eq!(carts.get(cart, read(&stock_missing)), None);
        assert_eq!(carts.get(Uuid::new_v4(), read(&entries)), None);
    }

    #[test]
    fn a_new_answer_replaces_the_last_and_memory_stays_bounded() {
        let carts = RenderedCarts::default();
        let cart = Uuid::new_v4();
        carts.put(cart, &[("c", b"old")], Bytes::from_static(b"1"));
        carts.put(cart, &[("c", b"new")], Bytes::from_static(b"2"));
        assert_eq!(carts.get(cart, read(&[("c", b"old")])), None);
        assert_eq!(
            carts.get(cart, read(&[("c", b"new")])),
            Some(Bytes::from_static(b"2"))
        );
        assert_eq!(carts.0.lock().unwrap().bytes, 5);

        for _ in 0..MAX_CARTS {
            carts.put(Uuid::new_v4(), &[("c", b"body")], Bytes::from_static(b"{}"));
        }
        let answers = carts.0.lock().unwrap();
        assert!(answers.by_cart.len() <= MAX_CARTS);
        assert_eq!(answers.bytes, 7 * answers.by_cart.len());
    }
}
