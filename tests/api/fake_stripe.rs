//! A fake Stripe API inside the test process, for driving the real
//! async-stripe client: payment intents (create, retrieve, cancel) and
//! refunds, form-encoded requests and Stripe-shaped JSON answers, with
//! `Idempotency-Key` honoured as Stripe does. Tests play the customer
//! (`pay`, `decline`), inspect the calls made, and sign webhooks with
//! Stripe's real scheme.

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::{Mutex, MutexGuard};

use actix_web::dev::ServerHandle;
use actix_web::http::{Method, StatusCode};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The API key the provider under test is given; the fake refuses others.
pub const TEST_SECRET_KEY: &str = "sk_test_fake_stripe_key";
/// The webhook signing secret the provider under test is given.
pub const TEST_WEBHOOK_SECRET: &str = "whsec_test_fake_stripe_secret";

/// Statuses from which Stripe lets an intent be cancelled.
const CANCELABLE: [&str; 5] = [
    "requires_payment_method",
    "requires_capture",
    "requires_confirmation",
    "requires_action",
    "processing",
];

pub struct FakeStripe {
    /// The root URL with its trailing slash, as `STRIPE_API_BASE` takes it.
    pub base_url: String,
    ledger: web::Data<Mutex<Ledger>>,
    server: ServerHandle,
}

/// One request the fake received, decoded.
#[derive(Debug, Clone)]
pub struct RecordedCall {
    pub method: String,
    /// Without the query string, e.g. `/v1/payment_intents/pi_1/cancel`.
    pub path: String,
    pub idempotency_key: Option<String>,
    /// Form fields (POST) or query parameters (GET), brackets decoded:
    /// `metadata[order_id]`.
    pub params: Vec<(String, String)>,
}

impl RecordedCall {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A webhook as Stripe would deliver it.
pub struct SignedWebhook {
    pub body: String,
    /// The `Stripe-Signature` header value.
    pub signature: String,
}

#[derive(Default)]
struct Ledger {
    intents: HashMap<String, Value>,
    refunds: Vec<Value>,
    /// First answer per idempotency key, with the request it answered.
    idempotent: HashMap<String, StoredAnswer>,
    calls: Vec<RecordedCall>,
    /// Statuses to answer the next requests with instead of handling them.
    injected_failures: VecDeque<u16>,
}

struct StoredAnswer {
    request_fingerprint: String,
    status: StatusCode,
    body: Value,
}

impl FakeStripe {
    /// Starts the fake on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        let ledger = web::Data::new(Mutex::new(Ledger::default()));
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port for fake Stripe");
        let port = listener.local_addr().expect("bound address").port();
        let app_ledger = ledger.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_ledger.clone())
                .default_service(web::to(answer))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .expect("fake Stripe listens")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            base_url: format!("http://127.0.0.1:{port}/"),
            ledger,
            server: handle,
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("fake Stripe ledger lock")
    }

    /// The customer paid: the intent succeeded and the money was received.
    pub fn pay(&self, intent_id: &str) {
        self.update_intent(intent_id, |intent| {
            intent["status"] = json!("succeeded");
            intent["amount_received"] = intent["amount"].clone();
            intent["last_payment_error"] = Value::Null;
        });
    }

    /// The customer's card was declined: as on Stripe, the intent goes back
    /// to `requires_payment_method` and records the error.
    pub fn decline(&self, intent_id: &str) {
        self.update_intent(intent_id, |intent| {
            intent["status"] = json!("requires_payment_method");
            intent["last_payment_error"] = json!({
                "type": "card_error",
                "code": "card_declined",
                "decline_code": "generic_decline",
                "message": "Your card was declined."
            });
        });
    }

    /// Sets any status, e.g. `processing` or `requires_action`.
    pub fn set_status(&self, intent_id: &str, status: &str) {
        self.update_intent(intent_id, |intent| intent["status"] = json!(status));
    }

    fn update_intent(&self, intent_id: &str, change: impl FnOnce(&mut Value)) {
        let mut ledger = self.ledger();
        let intent = ledger
            .intents
            .get_mut(intent_id)
            .unwrap_or_else(|| panic!("fake Stripe has no intent {intent_id}"));
        change(intent);
    }

    /// The intent as Stripe would return it now.
    pub fn intent(&self, intent_id: &str) -> Option<Value> {
        self.ledger().intents.get(intent_id).cloned()
    }

    pub fn intent_count(&self) -> usize {
        self.ledger().intents.len()
    }

    pub fn refunds(&self) -> Vec<Value> {
        self.ledger().refunds.clone()
    }

    /// Every request received, oldest first.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.ledger().calls.clone()
    }

    /// The requests with this method and path.
    pub fn calls_to(&self, method: &str, path: &str) -> Vec<RecordedCall> {
        self.calls()
            .into_iter()
            .filter(|call| call.method == method && call.path == path)
            .collect()
    }

    /// The next request is answered with `status` (e.g. 500) and a Stripe
    /// `api_error` body instead of being handled.
    pub fn fail_next_request(&self, status: u16) {
        self.ledger().injected_failures.push_back(status);
    }

    /// The JSON body of an event of `event_type` (e.g.
    /// `payment_intent.succeeded`) about the intent as it stands now.
    pub fn event_body(&self, event_type: &str, intent_id: &str) -> String {
        let intent = self
            .intent(intent_id)
            .unwrap_or_else(|| panic!("fake Stripe has no intent {intent_id}"));
        event_json(event_type, intent).to_string()
    }

    /// An event about the intent, signed now with `secret`.
    pub fn signed_event(&self, event_type: &str, intent_id: &str, secret: &str) -> SignedWebhook {
        let body = self.event_body(event_type, intent_id);
        let signature = stripe_signature(&body, secret, chrono::Utc::now().timestamp());
        SignedWebhook { body, signature }
    }

    /// Stops the server; dropping the fake does the same without waiting.
    pub async fn stop(self) {
        self.server.stop(false).await;
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        // `stop` sends the command at once; the returned future only waits
        // for completion, which a drop cannot do.
        let stopping = self.server.stop(false);
        drop(stopping);
    }
}

/// A Stripe event envelope around `object`.
pub fn event_json(event_type: &str, object: Value) -> Value {
    json!({
        "id": format!("evt_fake_{}", Uuid::new_v4().simple()),
        "object": "event",
        "api_version": null,
        "created": chrono::Utc::now().timestamp(),
        "data": { "object": object },
        "livemode": false,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "type": event_type
    })
}

/// The `Stripe-Signature` header for `payload` signed at `timestamp`
/// (Unix seconds): `t=<timestamp>,v1=<hex HMAC-SHA256 of "t.payload">`.
/// Written here from Stripe's documentation rather than taken from
/// async-stripe, so the tests check the library against the scheme.
pub fn stripe_signature(payload: &str, secret: &str, timestamp: i64) -> String {
    let signed = format!("{timestamp}.{payload}");
    let mac = hmac_sha256(secret.as_bytes(), signed.as_bytes());
    let hex: String = mac.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// HMAC as in RFC 2104, over SHA-256 (64-byte blocks).
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK_BYTES: usize = 64;
    let mut block = [0u8; BLOCK_BYTES];
    if key.len() > BLOCK_BYTES {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|byte| byte ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(block.map(|byte| byte ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

async fn answer(
    request: HttpRequest,
    body: web::Bytes,
    ledger: web::Data<Mutex<Ledger>>,
) -> HttpResponse {
    let params: Vec<(String, String)> = if request.method() == Method::GET {
        form_urlencoded::parse(request.query_string().as_bytes())
            .into_owned()
            .collect()
    } else {
        form_urlencoded::parse(&body).into_owned().collect()
    };
    let idempotency_key = request
        .headers()
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let call = RecordedCall {
        method: request.method().to_string(),
        path: request.path().to_owned(),
        idempotency_key: idempotency_key.clone(),
        params,
    };

    let mut ledger = match ledger.lock() {
        Ok(ledger) => ledger,
        Err(_) => return HttpResponse::InternalServerError().finish(),
    };
    ledger.calls.push(call.clone());

    let authorised = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        == Some(&format!("Bearer {TEST_SECRET_KEY}"));
    if !authorised {
        return stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "Invalid API Key provided",
        );
    }
    if let Some(status) = ledger.injected_failures.pop_front() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return stripe_error(status, "api_error", None, "injected failure");
    }

    // Stripe keeps the first answer to a keyed POST and replays it; the
    // same key with other parameters is an error.
    let fingerprint = format!(
        "{} {} {}",
        call.method,
        call.path,
        String::from_utf8_lossy(&body)
    );
    let keyed = idempotency_key.filter(|_| request.method() == Method::POST);
    if let Some(key) = &keyed {
        if let Some(stored) = ledger.idempotent.get(key) {
            if stored.request_fingerprint != fingerprint {
                return stripe_error(
                    StatusCode::BAD_REQUEST,
                    "idempotency_error",
                    None,
                    "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                );
            }
            return HttpResponse::build(stored.status)
                .insert_header(("Idempotent-Replayed", "true"))
                .json(&stored.body);
        }
    }

    let (status, answer) = route(&mut ledger, &call);
    if let Some(key) = keyed {
        if !status.is_server_error() {
            ledger.idempotent.insert(
                key,
                StoredAnswer {
                    request_fingerprint: fingerprint,
                    status,
                    body: answer.clone(),
                },
            );
        }
    }
    HttpResponse::build(status).json(answer)
}

fn route(ledger: &mut Ledger, call: &RecordedCall) -> (StatusCode, Value) {
    let segments: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
    match (call.method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "payment_intents"]) => create_intent(ledger, call),
        ("GET", ["v1", "payment_intents", id]) => match ledger.intents.get(*id) {
            Some(intent) => (StatusCode::OK, intent.clone()),
            None => no_such_intent(id),
        },
        ("POST", ["v1", "payment_intents", id, "cancel"]) => cancel_intent(ledger, id, call),
        ("POST", ["v1", "refunds"]) => create_refund(ledger, call),
        _ => error_body(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            None,
            &format!("Unrecognized request URL ({} {})", call.method, call.path),
        ),
    }
}

fn create_intent(ledger: &mut Ledger, call: &RecordedCall) -> (StatusCode, Value) {
    let amount = match call.param("amount").map(str::parse::<i64>) {
        Some(Ok(amount)) if amount > 0 => amount,
        Some(_) => return invalid_param("amount", "Invalid positive integer"),
        None => return invalid_param("amount", "Missing required param: amount."),
    };
    let Some(currency) = call.param("currency") else {
        return invalid_param("currency", "Missing required param: currency.");
    };
    let metadata: Map<String, Value> = call
        .params
        .iter()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((name.to_owned(), json!(value)))
        })
        .collect();
    let automatic_payment_methods = match call.param("automatic_payment_methods[enabled]") {
        Some("true") => json!({ "enabled": true, "allow_redirects": "always" }),
        _ => Value::Null,
    };
    let id = format!("pi_fake{}", Uuid::new_v4().simple());
    let intent = json!({
        "id": id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_details": null,
        "amount_received": 0,
        "application": null,
        "application_fee_amount": null,
        "automatic_payment_methods": automatic_payment_methods,
        "canceled_at": null,
        "cancellation_reason": null,
        "capture_method": "automatic_async",
        "client_secret": format!("{id}_secret_{}", Uuid::new_v4().simple()),
        "confirmation_method": "automatic",
        "created": chrono::Utc::now().timestamp(),
        "currency": currency,
        "customer": null,
        "description": null,
        "last_payment_error": null,
        "latest_charge": null,
        "livemode": false,
        "metadata": metadata,
        "next_action": null,
        "on_behalf_of": null,
        "payment_method": null,
        "payment_method_options": null,
        "payment_method_types": ["card"],
        "processing": null,
        "receipt_email": null,
        "review": null,
        "setup_future_usage": null,
        "shipping": null,
        "source": null,
        "statement_descriptor": null,
        "statement_descriptor_suffix": null,
        "status": "requires_payment_method",
        "transfer_data": null,
        "transfer_group": null
    });
    ledger.intents.insert(id, intent.clone());
    (StatusCode::OK, intent)
}

fn cancel_intent(ledger: &mut Ledger, id: &str, call: &RecordedCall) -> (StatusCode, Value) {
    let Some(intent) = ledger.intents.get_mut(id) else {
        return no_such_intent(id);
    };
    let status = intent["status"].as_str().unwrap_or_default().to_owned();
    if !CANCELABLE.contains(&status.as_str()) {
        return error_body(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("payment_intent_unexpected_state"),
            &format!(
                "You cannot cancel this PaymentIntent because it has a status of {status}. \
                 Only a PaymentIntent with one of the following statuses may be canceled: {}.",
                CANCELABLE.join(", ")
            ),
        );
    }
    intent["status"] = json!("canceled");
    intent["canceled_at"] = json!(chrono::Utc::now().timestamp());
    intent["cancellation_reason"] = call
        .param("cancellation_reason")
        .map_or(Value::Null, |reason| json!(reason));
    (StatusCode::OK, intent.clone())
}

fn create_refund(ledger: &mut Ledger, call: &RecordedCall) -> (StatusCode, Value) {
    let Some(intent_id) = call.param("payment_intent") else {
        return invalid_param(
            "payment_intent",
            "One of the following params should be provided for this request: payment_intent or charge.",
        );
    };
    let Some(intent) = ledger.intents.get(intent_id) else {
        return error_body(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("resource_missing"),
            &format!("No such payment_intent: '{intent_id}'"),
        );
    };
    if intent["status"] != "succeeded" {
        return error_body(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("charge_not_refundable"),
            &format!(
                "This PaymentIntent ({intent_id}) does not have a successful charge to refund."
            ),
        );
    }
    let paid = intent["amount"].as_i64().unwrap_or_default();
    let currency = intent["currency"].clone();
    let already_refunded: i64 = ledger
        .refunds
        .iter()
        .filter(|refund| refund["payment_intent"] == intent_id)
        .filter_map(|refund| refund["amount"].as_i64())
        .sum();
    let remaining = paid - already_refunded;
    let amount = match call.param("amount").map(str::parse::<i64>) {
        None => remaining,
        Some(Ok(amount)) if amount > 0 => amount,
        Some(_) => return invalid_param("amount", "Invalid positive integer"),
    };
    if amount > remaining {
        return error_body(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("amount_too_large"),
            &format!("Refund amount ({amount}) is greater than unrefunded amount ({remaining})."),
        );
    }
    let refund = json!({
        "id": format!("re_fake{}", Uuid::new_v4().simple()),
        "object": "refund",
        "amount": amount,
        "balance_transaction": null,
        "charge": null,
        "created": chrono::Utc::now().timestamp(),
        "currency": currency,
        "metadata": {},
        "payment_intent": intent_id,
        "reason": null,
        "receipt_number": null,
        "source_transfer_reversal": null,
        "status": "succeeded",
        "transfer_reversal": null
    });
    ledger.refunds.push(refund.clone());
    (StatusCode::OK, refund)
}

fn no_such_intent(id: &str) -> (StatusCode, Value) {
    error_body(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("resource_missing"),
        &format!("No such payment_intent: '{id}'"),
    )
}

fn invalid_param(param: &str, message: &str) -> (StatusCode, Value) {
    let (status, mut body) = error_body(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("parameter_missing"),
        message,
    );
    body["error"]["param"] = json!(param);
    (status, body)
}

fn error_body(
    status: StatusCode,
    error_type: &str,
    code: Option<&str>,
    message: &str,
) -> (StatusCode, Value) {
    (
        status,
        json!({ "error": { "type": error_type, "code": code, "message": message } }),
    )
}

fn stripe_error(
    status: StatusCode,
    error_type: &str,
    code: Option<&str>,
    message: &str,
) -> HttpResponse {
    let (status, body) = error_body(status, error_type, code, message);
    HttpResponse::build(status).json(body)
}
