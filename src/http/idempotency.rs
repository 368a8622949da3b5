//! Idempotency keys: the same key with the same request is executed once,
//! and every retry gets the first response again.
//!
//! Keys are scoped to the signed-in user (anonymous requests are not
//! deduplicated). A fingerprint of the request catches a key reused for a
//! different request. The first request holds a lease while it runs; a retry
//! meanwhile waits briefly for it and then answers 409; a retry after the
//! lease expired (the first attempt died) runs again, which is safe because
//! commands are idempotent by ids derived from the key. Server errors are
//! not stored, so they can be retried. A checkout's key is claimed by the
//! checkout committer, in the transaction that stores the checkout (see
//! `CLAIMED_BY_HANDLER`).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use actix_web::body::{self, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::InternalError;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{FromRequest, HttpMessage, HttpResponse};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use self::ledger::{ClaimResult, KeyId, KeyLedger, StoredKey};
use super::problem::ApiError;
use crate::auth::AuthUser;
use crate::state::AppState;

pub mod ledger;

pub const IDEMPOTENCY_KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Routes that refuse to run without a key.
const KEY_REQUIRED: [&str; 3] = [
    "/api/v1/checkout/",
    "/api/v1/checkout/create-payment-intent",
    "/api/v1/checkout/confirm-payment",
];
const LEASE: Duration = Duration::from_secs(30);
const WAIT_FOR_FIRST: Duration = Duration::from_millis(2_000);
/// Keys are kept at least 24 hours (API.md); they are swept after this.
pub const RETENTION: Duration = Duration::from_secs(48 * 3600);

/// The validated key of the current request, for handlers that derive ids
/// from it and record it in event metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(pub String);

impl FromRequest for IdempotencyKey {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(
        request: &actix_web::HttpRequest,
        _: &mut actix_web::dev::Payload,
    ) -> Self::Future {
        std::future::ready(
            request
                .extensions()
                .get::<IdempotencyKey>()
                .cloned()
                .ok_or_else(|| {
                    ApiError::bad_field("Idempotency-Key", "this route requires the header")
                }),
        )
    }
}

impl IdempotencyKey {
    /// A stable id for something this request creates (an order), so that a
    /// retry after a crash finds it instead of making a second one.
    pub fn derive_id(&self, user_id: Uuid, purpose: &str) -> Uuid {
        let name = format!("{purpose}:{user_id}:{}", self.0);
        Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
    }
}

fn parse_key(value: &HeaderValue) -> Result<IdempotencyKey, ApiError> {
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_field("Idempotency-Key", "must be printable ASCII"))?;
    let valid = (1..=255).contains(&text.len()) && text.bytes().all(|b| (0x20..0x7f).contains(&b));
    if valid {
        Ok(IdempotencyKey(text.to_owned()))
    } else {
        Err(ApiError::bad_field(
            "Idempotency-Key",
            "must be 1 to 255 printable ASCII characters",
        ))
    }
}

enum Claim {
    /// This request runs.
    Run,
    /// It does not; the middleware answers in its place.
    Refused(Refusal),
}

enum Refusal {
    /// The first request finished; answer with its response.
    Replay {
        status: u16,
        content_type: Option<String>,
        body: Vec<u8>,
    },
    /// The key was used for a different request.
    Reused,
    /// The first request is still running.
    InProgress,
}

pub async fn idempotency(
    mut request: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let pattern = super::middleware::route_pattern(&request);
    let on_route = |routes: &[&str]| pattern.as_deref().is_some_and(|p| routes.contains(&p));
    let required = on_route(&KEY_REQUIRED);
    let header = request.headers().get(IDEMPOTENCY_KEY_HEADER).cloned();
    let applies = request.method() == Method::POST && (required || header.is_some());
    if !applies {
        return next.call(request).await;
    }
    // Refusals are responses, not errors, so that the middlewares outside
    // (security headers, the request id, metrics) see them as any answer.
    let key = match header.as_ref().map(parse_key) {
        Some(Ok(key)) => key,
        Some(Err(refusal)) => return Ok(request.error_response(refusal)),
        None => {
            let refusal = ApiError::bad_field("Idempotency-Key", "this route requires the header");
            return Ok(request.error_response(refusal));
        }
    };
    let Some(user) = request.extensions().get::<AuthUser>().copied() else {
        // Anonymous requests have no scope to deduplicate in.
        return next.call(request).await;
    };
    let (pool, ledger) = match request.app_data::<web::Data<AppState>>() {
        Some(state) => (state.pool.clone(), state.idempotency_keys.clone()),
        None => {
            return Err(ApiError::internal(anyhow::anyhow!("application state missing")).into())
        }
    };

    // A body over the limit, or one that breaks off, is refused as any
    // other bad request: a response, with its problem body added outside.
    let body = match request.extract::<Bytes>().await {
        Ok(body) => body,
        Err(refusal) => return Ok(request.error_response(refusal)),
    };
    let (fingerprint, fingerprint_as_sent) = fingerprints(&request, &body);
    request.set_payload(actix_web::dev::Payload::from(body));
    request.extensions_mut().insert(key.clone());
    let keyed = Keyed {
        pool,
        ledger,
        user_id: user.id,
        key: key.0,
        relaxed: required,
        fingerprint_as_sent,
    };
    if on_route(&CLAIMED_BY_HANDLER) {
        let claim = Arc::new(HandlerClaim {
            claim: keyed.claim_of(fingerprint.clone()),
            state: Mutex::new(HandlerClaimState::Pending),
        });
        request
            .extensions_mut()
            .insert(KeyClaim(Some(Arc::clone(&claim))));
        let response = next.call(request).await;
        let state = *claim.lock();
        return keyed.settle(state, &fingerprint, response).await;
    }
    match keyed.claim(&fingerprint).await? {
        Claim::Run => keyed.finish(next.call(request).await).await,
        Claim::Refused(refusal) => Ok(request.into_response(refusal.answer()?)),
    }
}

/// Routes whose handler has its key claimed where it changes something
/// (the checkout: by the committer, with the other keys of its batch, so
/// that a key costs no statement of its own and no round trip before the
/// checkout is decided), and whose key the middleware claims after the
/// answer when the handler changed nothing. Such a handler must change
/// nothing but through [`KeyClaim::for_commit`].
const CLAIMED_BY_HANDLER: [&str; 1] = ["/api/v1/checkout/"];

/// The key of a request on a route that claims it in its handler (see
/// `CLAIMED_BY_HANDLER`); elsewhere the middleware claimed the key before
/// the handler started, and there is nothing to do.
#[derive(Clone)]
pub struct KeyClaim(Option<Arc<HandlerClaim>>);

struct HandlerClaim {
    claim: ledger::Claim,
    state: Mutex<HandlerClaimState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandlerClaimState {
    /// Nobody has claimed the key.
    Pending,
    /// Handed to the committer, which has not said that it claimed it.
    Delegated,
    /// Claimed: this request runs, and its answer is recorded.
    Claimed,
    /// The committer found the key taken; the middleware looks again.
    Taken,
}

impl HandlerClaim {
    fn lock(&self) -> MutexGuard<'_, HandlerClaimState> {
        // The state is a plain value: a panic elsewhere cannot leave it
        // half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl KeyClaim {
    /// The claim for the committer to make, the first time only: once the
    /// key is claimed, later commits of the same request need none.
    pub fn for_commit(&self) -> Option<ledger::Claim> {
        let claim = self.0.as_ref()?;
        let mut state = claim.lock();
        (*state == HandlerClaimState::Pending).then(|| {
            *state = HandlerClaimState::Delegated;
            claim.claim.clone()
        })
    }

    /// The committer claimed the key.
    pub fn claimed_by_commit(&self) {
        if let Some(claim) = &self.0 {
            *claim.lock() = HandlerClaimState::Claimed;
        }
    }

    /// The committer found the key taken. The error returned is a
    /// placeholder: the middleware answers in its place (a replay, a reuse,
    /// or a request still in progress).
    pub fn taken(&self) -> ApiError {
        if let Some(claim) = &self.0 {
            *claim.lock() = HandlerClaimState::Taken;
        }
        ApiError::IdempotencyInProgress
    }
}

impl FromRequest for KeyClaim {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(
        request: &actix_web::HttpRequest,
        _: &mut actix_web::dev::Payload,
    ) -> Self::Future {
        let claim = request.extensions().get::<KeyClaim>().cloned();
        std::future::ready(Ok(claim.unwrap_or(KeyClaim(None))))
    }
}

impl Refusal {
    fn answer(self) -> Result<HttpResponse, ApiError> {
        match self {
            Refusal::Replay {
                status,
                content_type,
                body,
            } => Ok(replay(status, content_type, body)),
            Refusal::Reused => Err(ApiError::IdempotencyKeyReused),
            Refusal::InProgress => Err(ApiError::IdempotencyInProgress),
        }
    }
}

/// A signed-in user's key on the request under way.
struct Keyed {
    pool: PgPool,
    ledger: KeyLedger,
    user_id: Uuid,
    key: String,
    relaxed: bool,
    /// The request's byte-for-byte fingerprint, where it differs from the
    /// one claimed (see [`fingerprints`]): a stored key with it is this
    /// request's too.
    fingerprint_as_sent: Option<Vec<u8>>,
}

impl Keyed {
    /// Claims the key, waiting a little for a first request still running.
    async fn claim(&self, fingerprint: &[u8]) -> Result<Claim, ApiError> {
        let deadline = tokio::time::Instant::now() + WAIT_FOR_FIRST;
        loop {
            match self.claim_once(fingerprint).await? {
                Claim::Refused(Refusal::InProgress) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                claim => return Ok(claim),
            }
        }
    }

    /// The claim of this key, for a handler to have made (see
    /// `CLAIMED_BY_HANDLER`).
    fn claim_of(&self, fingerprint: Vec<u8>) -> ledger::Claim {
        ledger::Claim {
            key: KeyId {
                user_id: self.user_id,
                key: self.key.clone(),
            },
            fingerprint,
            lease_seconds: LEASE.as_secs_f64(),
            relaxed: self.relaxed,
        }
    }

    /// Answers a request whose handler was to claim its key, by what became
    /// of the claim.
    async fn settle(
        self,
        state: HandlerClaimState,
        fingerprint: &[u8],
        response: Result<ServiceResponse<BoxBody>, actix_web::Error>,
    ) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
        let changed_nothing = match state {
            HandlerClaimState::Claimed => return self.finish(response).await,
            // The committer did not say whether it claimed the key (its
            // claim failed, or the answer was lost): the key is left as it
            // is, and a retry finds it or not.
            HandlerClaimState::Delegated => return response,
            HandlerClaimState::Pending => true,
            HandlerClaimState::Taken => false,
        };
        let failed = match &response {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        if changed_nothing && failed {
            // A failure that changed nothing: nothing to record either.
            return response;
        }
        let refusal = match self.claim(fingerprint).await {
            Ok(Claim::Refused(refusal)) => refusal,
            // The handler changed nothing: its answer is this request's,
            // recorded as any other.
            Ok(Claim::Run) if changed_nothing => return self.finish(response).await,
            // The committer found the key taken and it has gone since (its
            // request failed on our side): this request did nothing, so
            // the client retries.
            Ok(Claim::Run) => {
                release(&self.pool, self.user_id, &self.key).await;
                Refusal::InProgress
            }
            Err(error) => return Err(error.into()),
        };
        let answer = refusal.answer()?;
        match response {
            Ok(response) => Ok(response.into_response(answer)),
            Err(_) => Err(InternalError::from_response("replayed", answer).into()),
        }
    }

    /// Stores the response of a request that ran, or forgets the key when
    /// it failed on our side.
    async fn finish(
        self,
        response: Result<ServiceResponse<BoxBody>, actix_web::Error>,
    ) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                release(&self.pool, self.user_id, &self.key).await;
                return Err(error);
            }
        };
        let status = response.status();
        if status.is_server_error() {
            release(&self.pool, self.user_id, &self.key).await;
            return Ok(response);
        }
        let (request, response) = response.into_parts();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (response, body) = response.into_parts();
        let bytes = body::to_bytes(body).await.map_err(|_| {
            ApiError::internal(anyhow::anyhow!(
                "response body could not be read for storing"
            ))
        })?;
        let record = ledger::Record {
            key: KeyId {
                user_id: self.user_id,
                key: self.key,
            },
            status: status.as_u16() as i16,
            content_type,
            body: bytes.to_vec(),
            relaxed: self.relaxed,
        };
        if self.relaxed {
            // See `claim`. A retry that comes before the record lands finds
            // the lease alive and waits for it; one to this instance queues
            // behind it.
            self.ledger
                .record_later(record)
                .await
                .map_err(ApiError::internal)?;
        } else {
            self.ledger
                .record(record)
                .await
                .map_err(ApiError::internal)?;
        }
        Ok(ServiceResponse::new(
            request,
            response.set_body(bytes.boxed()),
        ))
    }
}

/// What "the same request" means for a key: method, path, query and body,
/// where a JSON body counts as the document it is (its objects' keys
/// sorted, no spacing), so that a retry whose client wrote the same JSON
/// differently is a replay, not a reused key. Anything else counts byte
/// for byte. Also returns the byte-for-byte fingerprint when it differs,
/// which is what keys claimed before JSON bodies were compared as
/// documents hold.
fn fingerprints(request: &ServiceRequest, body: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    let as_sent = fingerprint_of(request, body);
    match canonical_json(body).filter(|canonical| canonical[..] != *body) {
        Some(canonical) => (fingerprint_of(request, &canonical), Some(as_sent)),
        None => (as_sent, None),
    }
}

fn fingerprint_of(request: &ServiceRequest, body: &[u8]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(request.method().as_str().as_bytes());
    hasher.update([0]);
    hasher.update(request.path().as_bytes());
    hasher.update([0]);
    hasher.update(request.query_string().as_bytes());
    hasher.update([0]);
    hasher.update(body);
    hasher.finalize().to_vec()
}

/// The body as compact JSON with sorted object keys (serde_json's maps are
/// ordered by key), or `None` when it is not JSON.
fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let document: serde_json::Value = serde_json::from_slice(body).ok()?;
    serde_json::to_vec(&document).ok()
}

fn replay(status: u16, content_type: Option<String>, body: Vec<u8>) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = HttpResponse::build(status);
    if let Some(content_type) = content_type {
        response.insert_header((header::CONTENT_TYPE, content_type));
    }
    response.insert_header((REPLAYED_HEADER, HeaderValue::from_static("true")));
    response.body(body)
}

// On the routes that require a key, key records are written with
// `synchronous_commit` off for the statement that writes them when every
// key in it may be (see the ledger), which spares the disk flushes, and
// the answer does not wait for its record. What a crash can lose is a
// record of the last fraction of a second; the retry then runs the handler
// again, and those handlers are idempotent by ids derived from the key
// (order id, intent id, settlement once per order), so the retry gets the
// same outcome. Their business effect is in the event store, committed
// synchronously. A key sent to any other route is recorded durably before
// the answer: its handler may not be idempotent on its own.
impl Keyed {
    /// One try at claiming the key.
    async fn claim_once(&self, fingerprint: &[u8]) -> Result<Claim, ApiError> {
        let Self {
            pool,
            ledger,
            user_id,
            key,
            relaxed,
            fingerprint_as_sent,
        } = self;
        let claim = self.claim_of(fingerprint.to_vec());
        let stored = match ledger.claim(claim).await.map_err(ApiError::internal)? {
            ClaimResult::Inserted => return Ok(Claim::Run),
            // Inserted by a request still running, or released after a server
            // error, since the claim's snapshot: look again.
            ClaimResult::Unseen => return Ok(Claim::Refused(Refusal::InProgress)),
            ClaimResult::Existing(stored) => stored,
        };
        let StoredKey {
            fingerprint: stored_fingerprint,
            status,
            content_type,
            body,
            lease_alive,
        } = stored;
        if stored_fingerprint != fingerprint
            && fingerprint_as_sent.as_deref() != Some(&stored_fingerprint[..])
        {
            return Ok(Claim::Refused(Refusal::Reused));
        }
        if let (Some(status), Some(body)) = (status, body) {
            return Ok(Claim::Refused(Refusal::Replay {
                status: status as u16,
                content_type,
                body,
            }));
        }
        if lease_alive {
            return Ok(Claim::Refused(Refusal::InProgress));
        }
        // The first attempt died holding the lease: take it over, once.
        let taken = sqlx::query(
        "WITH relaxed AS (SELECT set_config('synchronous_commit', \
                           CASE WHEN $4 THEN 'off' ELSE current_setting('synchronous_commit') END, true)) \
         UPDATE idempotency_keys SET leased_until = now() + make_interval(secs => $3) FROM relaxed \
         WHERE user_id = $1 AND key = $2 AND response_status IS NULL \
           AND (leased_until IS NULL OR leased_until <= now())",
    )
    .bind(user_id)
    .bind(key)
    .bind(LEASE.as_secs_f64())
    .bind(relaxed)
    .execute(pool)
    .await?
    .rows_affected();
        Ok(if taken == 1 {
            Claim::Run
        } else {
            Claim::Refused(Refusal::InProgress)
        })
    }
}

/// Forgets a key whose request failed on our side, so the client can retry.
async fn release(pool: &PgPool, user_id: Uuid, key: &str) {
    let result = sqlx::query(
        "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND response_status IS NULL",
    )
    .bind(user_id)
    .bind(key)
    .execute(pool)
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, "could not release an idempotency key");
    }
}

/// Deletes keys past their retention; run by the scheduler.
pub async fn sweep_expired(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(RETENTION.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(deleted)
}
