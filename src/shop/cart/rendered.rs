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

/// One cart's last answer, with the bodies of the entries (the cart's,
/// then those its lines needed, in the order they were read) it came from.
struct Rendered {
    bodies: Vec<Box<[u8]>>,
    json: Bytes,
}

impl Rendered {
    fn weight(&self) -> usize {
        self.json.len() + self.bodies.iter().map(|body| body.len()).sum::<usize>()
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
    /// The answer rendered from exactly `bodies`, if it is still here.
    pub fn get(&self, cart: Uuid, bodies: &[&[u8]]) -> Option<Bytes> {
        let answers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let rendered = answers.by_cart.get(&cart)?;
        let same = rendered.bodies.len() == bodies.len()
            && rendered
                .bodies
                .iter()
                .zip(bodies)
                .all(|(kept, read)| **kept == **read);
        same.then(|| rendered.json.clone())
    }

    /// Keeps `json` as the answer rendered from `bodies`.
    pub fn put(&self, cart: Uuid, bodies: &[&[u8]], json: Bytes) {
        let rendered = Rendered {
            bodies: bodies.iter().map(|body| Box::from(*body)).collect(),
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
    use super::*;

    #[test]
    fn an_answer_is_given_only_for_the_very_bodies_it_came_from() {
        let carts = RenderedCarts::default();
        let cart = Uuid::new_v4();
        let bodies: [&[u8]; 3] = [b"cart v1", b"product", b"stock 5"];
        carts.put(cart, &bodies, Bytes::from_static(b"{\"answer\":1}"));

        assert_eq!(
            carts.get(cart, &bodies),
            Some(Bytes::from_static(b"{\"answer\":1}"))
        );
        let stock_moved: [&[u8]; 3] = [b"cart v1", b"product", b"stock 4"];
        assert_eq!(carts.get(cart, &stock_moved), None);
        let line_added: [&[u8]; 4] = [b"cart v2", b"product", b"stock 5", b"stock 9"];
        assert_eq!(carts.get(cart, &line_added), None);
        assert_eq!(carts.get(cart, &bodies[..2]), None);
        assert_eq!(carts.get(Uuid::new_v4(), &bodies), None);
    }

    #[test]
    fn a_new_answer_replaces_the_last_and_memory_stays_bounded() {
        let carts = RenderedCarts::default();
        let cart = Uuid::new_v4();
        carts.put(cart, &[b"old"], Bytes::from_static(b"1"));
        carts.put(cart, &[b"new"], Bytes::from_static(b"2"));
        assert_eq!(carts.get(cart, &[b"old"]), None);
        assert_eq!(carts.get(cart, &[b"new"]), Some(Bytes::from_static(b"2")));
        assert_eq!(carts.0.lock().unwrap().bytes, 4);

        for _ in 0..MAX_CARTS {
            carts.put(Uuid::new_v4(), &[b"body"], Bytes::from_static(b"{}"));
        }
        let answers = carts.0.lock().unwrap();
        assert!(answers.by_cart.len() <= MAX_CARTS);
        assert_eq!(answers.bytes, 6 * answers.by_cart.len());
    }
}
