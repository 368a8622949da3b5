//! What a buyer does: the cart, checkout, payment and their orders.

pub mod cart;
pub mod checkout;
pub mod checkout_commit;
pub mod orders;
pub mod payment;

use actix_web::web;

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .configure(cart::configure)
        .service(checkout::checkout)
        .configure(orders::configure)
        .configure(payment::configure);
}
