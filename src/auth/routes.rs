//! Auth endpoints (register, login, logout, refresh-token, change-password).

use actix_web::web;

pub fn configure(_config: &mut web::ServiceConfig) {}
