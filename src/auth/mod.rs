//! Identity and access: accounts, passwords, sessions and tokens.

pub mod accounts;
pub mod password;
pub mod routes;
pub mod sessions;
pub mod tokens;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::http::problem::ApiError;

/// What a signed-in user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "customer" => Some(Self::Customer),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The signed-in caller, put in the request by the access middleware.
/// On public routes, extract `Option<AuthUser>`: present when a valid token
/// came with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser {
    pub id: Uuid,
    pub role: Role,
    pub session_id: Uuid,
}

impl FromRequest for AuthUser {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(
            request
                .extensions()
                .get::<AuthUser>()
                .copied()
                .ok_or_else(|| ApiError::Unauthorized("sign in first".into())),
        )
    }
}
