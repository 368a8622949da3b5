//! The payment providers: Stripe through the real async-stripe client
//! against a fake Stripe server, and the fake provider on a real database.

use std::sync::Arc;

use commerce::config::{PaymentProviderKind, Settings};
use commerce::payments::{
    provider_from_settings, FakeProvider, IntentStatus, PaymentError, PaymentProvider,
    RefundStatus, SettleOutcome, StripeProvider, WebhookEventKind,
};
use domain::values::Currency;
use secrecy::SecretString;
use uuid::Uuid;

use crate::fake_stripe::{
    event_json, stripe_signature, FakeStripe, TEST_SECRET_KEY, TEST_WEBHOOK_SECRET,
};
use crate::helpers::{spawn_app, test_settings};

fn usd() -> Currency {
    Currency::try_from("USD".to_owned()).expect("valid currency")
}

fn stripe_settings(api_base: &str) -> Settings {
    let mut settings = test_settings();
    settings.payment_provider = PaymentProviderKind::Stripe;
    settings.stripe_secret_key = Some(SecretString::from(TEST_SECRET_KEY));
    settings.stripe_webhook_secret = Some(SecretString::from(TEST_WEBHOOK_SECRET));
    settings.stripe_api_base = Some(api_base.to_owned());
    settings
}

/// A Stripe provider talking to `fake`. The base is given without its
/// trailing slash, as an operator might write it.
fn stripe_for(fake: &FakeStripe) -> StripeProvider {
    StripeProvider::from_settings(&stripe_settings(fake.base_url.trim_end_matches('/')))
        .expect("Stripe provider builds")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

// ---- Stripe: payment intents ----------------------------------------------

#[tokio::test]
async fn stripe_creates_an_intent_for_the_order_amount_and_currency() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let order_id = Uuid::new_v4();

    let intent = stripe
        .create_intent(order_id, 1999, &usd(), &format!("order-{order_id}"))
        .await
        .expect("intent created");

    assert!(intent.id.starts_with("pi_"), "{intent:?}");
    assert!(intent.client_secret.is_some());
    assert_eq!(intent.status, IntentStatus::RequiresPaymentMethod);
    assert_eq!(intent.amount_cents, 1999);
    assert_eq!(intent.currency, usd());
    assert_eq!(intent.order_id, Some(order_id));

    let calls = fake.calls_to("POST", "/v1/payment_intents");
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.param("amount"), Some("1999"));
    assert_eq!(call.param("currency"), Some("usd"));
    assert_eq!(
        call.param("metadata[order_id]"),
        Some(order_id.to_string().as_str())
    );
    assert_eq!(
        call.param("automatic_payment_methods[enabled]"),
        Some("true")
    );
    assert_eq!(
        call.idempotency_key.as_deref(),
        Some(format!("order-{order_id}").as_str())
    );
}

#[tokio::test]
async fn stripe_returns_the_same_intent_for_the_same_idempotency_key() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let order_id = Uuid::new_v4();
    let key = format!("order-{order_id}");

    let first = stripe
        .create_intent(order_id, 500, &usd(), &key)
        .await
        .unwrap();
    let second = stripe
        .create_intent(order_id, 500, &usd(), &key)
        .await
        .unwrap();

    assert_eq!(first, second);
    assert_eq!(fake.intent_count(), 1);
    assert_eq!(fake.calls_to("POST", "/v1/payment_intents").len(), 2);
}

#[tokio::test]
async fn stripe_refuses_an_idempotency_key_reused_with_another_amount() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let order_id = Uuid::new_v4();
    stripe
        .create_intent(order_id, 500, &usd(), "key-1")
        .await
        .unwrap();

    let reused = stripe.create_intent(order_id, 700, &usd(), "key-1").await;

    assert!(
        matches!(reused, Err(PaymentError::Rejected(_))),
        "{reused:?}"
    );
    assert_eq!(fake.intent_count(), 1);
}

#[tokio::test]
async fn stripe_retrieve_sees_the_customer_pay() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let order_id = Uuid::new_v4();
    let created = stripe
        .create_intent(order_id, 1250, &usd(), "pay-1")
        .await
        .unwrap();

    fake.set_status(&created.id, "processing");
    let processing = stripe.retrieve_intent(&created.id).await.unwrap();
    assert_eq!(processing.status, IntentStatus::Processing);

    fake.pay(&created.id);
    let paid = stripe.retrieve_intent(&created.id).await.unwrap();

    assert_eq!(paid.status, IntentStatus::Succeeded);
    assert_eq!(paid.order_id, Some(order_id));
    assert_eq!(paid.amount_cents, 1250);
    assert_eq!(
        fake.calls_to("GET", &format!("/v1/payment_intents/{}", created.id))
            .len(),
        2
    );
}

#[tokio::test]
async fn stripe_reports_unknown_and_implausible_intents_as_not_found() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);

    let unknown = stripe.retrieve_intent("pi_doesnotexist").await;
    assert!(
        matches!(unknown, Err(PaymentError::NotFound)),
        "{unknown:?}"
    );

    // An id that would change the URL is never sent.
    let before = fake.calls().len();
    for id in ["pi_1/cancel", "pi_1?expand[]=customer", ""] {
        let result = stripe.retrieve_intent(id).await;
        assert!(matches!(result, Err(PaymentError::NotFound)), "{id:?}");
        let result = stripe.cancel_intent(id).await;
        assert!(matches!(result, Err(PaymentError::NotFound)), "{id:?}");
    }
    assert_eq!(fake.calls().len(), before);
}

#[tokio::test]
async fn stripe_cancels_an_intent_and_cancelling_again_is_fine() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let intent = stripe
        .create_intent(Uuid::new_v4(), 900, &usd(), "cancel-1")
        .await
        .unwrap();

    let cancelled = stripe.cancel_intent(&intent.id).await.unwrap();
    let again = stripe.cancel_intent(&intent.id).await.unwrap();

    assert_eq!(cancelled.status, IntentStatus::Canceled);
    assert_eq!(again.status, IntentStatus::Canceled);
    let cancel_path = format!("/v1/payment_intents/{}/cancel", intent.id);
    assert_eq!(fake.calls_to("POST", &cancel_path).len(), 2);
    assert_eq!(
        fake.intent(&intent.id).expect("intent kept")["status"],
        "canceled"
    );
}

#[tokio::test]
async fn stripe_refuses_to_cancel_a_paid_intent() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let intent = stripe
        .create_intent(Uuid::new_v4(), 900, &usd(), "cancel-paid")
        .await
        .unwrap();
    fake.pay(&intent.id);

    let result = stripe.cancel_intent(&intent.id).await;

    assert!(
        matches!(result, Err(PaymentError::Rejected(_))),
        "{result:?}"
    );
    assert_eq!(fake.intent(&intent.id).unwrap()["status"], "succeeded");
}

#[tokio::test]
async fn stripe_refunds_a_paid_intent_once_per_idempotency_key() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let intent = stripe
        .create_intent(Uuid::new_v4(), 4200, &usd(), "refund-order")
        .await
        .unwrap();
    fake.pay(&intent.id);

    let refund = stripe.refund(&intent.id, 4200, "refund-1").await.unwrap();
    let repeated = stripe.refund(&intent.id, 4200, "refund-1").await.unwrap();

    assert!(refund.id.starts_with("re_"), "{refund:?}");
    assert_eq!(refund.status, RefundStatus::Succeeded);
    assert_eq!(repeated, refund);
    assert_eq!(fake.refunds().len(), 1);
    let calls = fake.calls_to("POST", "/v1/refunds");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].param("payment_intent"), Some(intent.id.as_str()));
    assert_eq!(calls[0].param("amount"), Some("4200"));
    assert_eq!(calls[0].idempotency_key.as_deref(), Some("refund-1"));
}

#[tokio::test]
async fn stripe_refuses_to_refund_an_unpaid_intent_or_more_than_was_paid() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let intent = stripe
        .create_intent(Uuid::new_v4(), 1000, &usd(), "refund-unpaid")
        .await
        .unwrap();

    let unpaid = stripe.refund(&intent.id, 1000, "refund-a").await;
    assert!(
        matches!(unpaid, Err(PaymentError::Rejected(_))),
        "{unpaid:?}"
    );

    fake.pay(&intent.id);
    let too_much = stripe.refund(&intent.id, 1001, "refund-b").await;
    assert!(
        matches!(too_much, Err(PaymentError::Rejected(_))),
        "{too_much:?}"
    );

    let missing = stripe.refund("pi_doesnotexist", 10, "refund-c").await;
    assert!(
        matches!(missing, Err(PaymentError::NotFound)),
        "{missing:?}"
    );
    assert!(fake.refunds().is_empty());
}

#[tokio::test]
async fn stripe_server_errors_and_unreachable_hosts_are_provider_failures() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let intent = stripe
        .create_intent(Uuid::new_v4(), 300, &usd(), "flaky")
        .await
        .unwrap();

    fake.fail_next_request(500);
    let failed = stripe.retrieve_intent(&intent.id).await;
    assert!(
        matches!(failed, Err(PaymentError::Provider(_))),
        "{failed:?}"
    );
    // The next request is answered normally again.
    assert!(stripe.retrieve_intent(&intent.id).await.is_ok());

    // Nothing listens on port 1.
    let unreachable = StripeProvider::from_settings(&stripe_settings("http://127.0.0.1:1/"))
        .expect("provider builds");
    let result = unreachable.retrieve_intent(&intent.id).await;
    assert!(
        matches!(result, Err(PaymentError::Provider(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn stripe_with_a_wrong_api_key_is_refused_not_unavailable() {
    let fake = FakeStripe::start().await;
    let mut settings = stripe_settings(&fake.base_url);
    settings.stripe_secret_key = Some(SecretString::from("sk_test_someone_else"));
    let stripe = StripeProvider::from_settings(&settings).unwrap();

    let result = stripe
        .create_intent(Uuid::new_v4(), 100, &usd(), "wrong-key")
        .await;

    assert!(
        matches!(result, Err(PaymentError::Rejected(_))),
        "{result:?}"
    );
}

// ---- Stripe: webhooks -----------------------------------------------------

#[tokio::test]
async fn stripe_webhooks_with_a_good_signature_become_events() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let order_id = Uuid::new_v4();
    let intent = stripe
        .create_intent(order_id, 2500, &usd(), "webhook-1")
        .await
        .unwrap();
    fake.pay(&intent.id);

    for (event_type, kind) in [
        (
            "payment_intent.succeeded",
            WebhookEventKind::PaymentSucceeded,
        ),
        (
            "payment_intent.payment_failed",
            WebhookEventKind::PaymentFailed,
        ),
        ("payment_intent.canceled", WebhookEventKind::PaymentCanceled),
        (
            "payment_intent.processing",
            WebhookEventKind::Other("payment_intent.processing".into()),
        ),
    ] {
        let webhook = fake.signed_event(event_type, &intent.id, TEST_WEBHOOK_SECRET);

        let event = stripe
            .parse_webhook(webhook.body.as_bytes(), Some(&webhook.signature))
            .unwrap_or_else(|error| panic!("{event_type}: {error:?}"));

        assert!(event.id.starts_with("evt_"), "{event:?}");
        assert_eq!(event.kind, kind);
        let about = event.intent.expect("the event carries its intent");
        assert_eq!(about.id, intent.id);
        assert_eq!(about.order_id, Some(order_id));
        assert_eq!(about.amount_cents, 2500);
        assert_eq!(about.currency, usd());
        assert_eq!(about.status, IntentStatus::Succeeded);
    }
}

#[tokio::test]
async fn stripe_webhook_for_a_declined_card_reports_the_failure() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let intent = stripe
        .create_intent(Uuid::new_v4(), 2500, &usd(), "declined")
        .await
        .unwrap();
    fake.decline(&intent.id);
    let webhook = fake.signed_event(
        "payment_intent.payment_failed",
        &intent.id,
        TEST_WEBHOOK_SECRET,
    );

    let event = stripe
        .parse_webhook(webhook.body.as_bytes(), Some(&webhook.signature))
        .expect("signed event accepted");

    assert_eq!(event.kind, WebhookEventKind::PaymentFailed);
    assert_eq!(
        event.intent.map(|intent| intent.status),
        Some(IntentStatus::RequiresPaymentMethod)
    );
    fake.stop().await;
}

#[tokio::test]
async fn stripe_webhooks_about_other_objects_are_acknowledged_as_other() {
    let stripe = stripe_for(&FakeStripe::start().await);
    let body = event_json(
        "customer.created",
        serde_json::json!({ "id": "cus_1", "object": "customer" }),
    )
    .to_string();
    let signature = stripe_signature(&body, TEST_WEBHOOK_SECRET, now());

    let event = stripe
        .parse_webhook(body.as_bytes(), Some(&signature))
        .expect("a genuine event is accepted");

    assert_eq!(
        event.kind,
        WebhookEventKind::Other("customer.created".into())
    );
    assert_eq!(event.intent, None);
}

#[tokio::test]
async fn stripe_webhooks_we_act_on_must_carry_a_readable_intent() {
    let stripe = stripe_for(&FakeStripe::start().await);
    let body = event_json(
        "payment_intent.succeeded",
        serde_json::json!({ "id": "pi_1", "object": "payment_intent" }),
    )
    .to_string();
    let signature = stripe_signature(&body, TEST_WEBHOOK_SECRET, now());

    let result = stripe.parse_webhook(body.as_bytes(), Some(&signature));

    assert!(
        matches!(result, Err(PaymentError::InvalidEvent(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn stripe_refuses_webhooks_that_are_tampered_stale_missigned_or_unsigned() {
    let fake = FakeStripe::start().await;
    let stripe = stripe_for(&fake);
    let intent = stripe
        .create_intent(Uuid::new_v4(), 2500, &usd(), "webhook-bad")
        .await
        .unwrap();
    let body = fake.event_body("payment_intent.succeeded", &intent.id);
    let good = stripe_signature(&body, TEST_WEBHOOK_SECRET, now());
    assert!(stripe.parse_webhook(body.as_bytes(), Some(&good)).is_ok());
    let recent = stripe_signature(&body, TEST_WEBHOOK_SECRET, now() - 240);
    assert!(stripe.parse_webhook(body.as_bytes(), Some(&recent)).is_ok());

    let tampered = body.replace("2500", "1");
    let cases = [
        ("tampered body", tampered.as_str(), Some(good.clone())),
        (
            "another secret",
            body.as_str(),
            Some(stripe_signature(&body, "whsec_someone_else", now())),
        ),
        // Stripe's tolerance is 300 s either way; a margin keeps the clock's
        // tick between signing and checking from mattering.
        (
            "stale timestamp",
            body.as_str(),
            Some(stripe_signature(&body, TEST_WEBHOOK_SECRET, now() - 360)),
        ),
        (
            "future timestamp",
            body.as_str(),
            Some(stripe_signature(&body, TEST_WEBHOOK_SECRET, now() + 360)),
        ),
        ("missing header", body.as_str(), None),
        ("empty header", body.as_str(), Some(String::new())),
        ("garbage header", body.as_str(), Some("t=abc,v1=zz".into())),
        (
            "timestamp only",
            body.as_str(),
            Some(format!("t={}", now())),
        ),
    ];
    for (case, payload, signature) in cases {
        let result = stripe.parse_webhook(payload.as_bytes(), signature.as_deref());
        assert!(
            matches!(result, Err(PaymentError::BadSignature)),
            "{case}: {result:?}"
        );
    }
}

#[tokio::test]
async fn stripe_refuses_every_webhook_without_a_webhook_secret() {
    let fake = FakeStripe::start().await;
    let mut settings = stripe_settings(&fake.base_url);
    settings.stripe_webhook_secret = None;
    let stripe = StripeProvider::from_settings(&settings).unwrap();
    let body = event_json(
        "customer.created",
        serde_json::json!({ "id": "cus_1", "object": "customer" }),
    )
    .to_string();
    // Not even a body signed with an empty secret gets through.
    for secret in [TEST_WEBHOOK_SECRET, ""] {
        let signature = stripe_signature(&body, secret, now());
        let result = stripe.parse_webhook(body.as_bytes(), Some(&signature));
        assert!(
            matches!(result, Err(PaymentError::BadSignature)),
            "{result:?}"
        );
    }
}

#[tokio::test]
async fn our_signature_scheme_matches_async_stripes() {
    let body = r#"{"id":"evt_1","object":"event"}"#;
    let timestamp = 1_700_000_000;
    assert_eq!(
        stripe_signature(body, TEST_WEBHOOK_SECRET, timestamp),
        stripe_webhook::Webhook::generate_test_header(body, TEST_WEBHOOK_SECRET, Some(timestamp))
    );
    // Keys longer than a SHA-256 block are hashed first.
    let long_secret = "k".repeat(100);
    assert_eq!(
        stripe_signature(body, &long_secret, timestamp),
        stripe_webhook::Webhook::generate_test_header(body, &long_secret, Some(timestamp))
    );
}

// ---- The fake provider ----------------------------------------------------

#[tokio::test]
async fn fake_intents_are_shared_by_every_instance_on_the_database() {
    let app = spawn_app().await;
    let one = FakeProvider::new(app.pool.clone());
    let other = FakeProvider::new(app.pool.clone());
    let order_id = Uuid::new_v4();

    let created = one
        .create_intent(order_id, 1999, &usd(), &format!("order-{order_id}"))
        .await
        .unwrap();
    let seen = other.retrieve_intent(&created.id).await.unwrap();

    assert!(created.id.starts_with("pi_fake_"), "{created:?}");
    assert!(created.client_secret.is_some());
    assert_eq!(created.status, IntentStatus::RequiresPaymentMethod);
    assert_eq!(created.amount_cents, 1999);
    assert_eq!(created.currency, usd());
    assert_eq!(created.order_id, Some(order_id));
    assert_eq!(seen, created);

    let unknown = other.retrieve_intent("pi_fake_unknown").await;
    assert!(
        matches!(unknown, Err(PaymentError::NotFound)),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn fake_returns_the_same_intent_for_the_same_idempotency_key() {
    let app = spawn_app().await;
    let fake = FakeProvider::new(app.pool.clone());
    let order_id = Uuid::new_v4();

    let first = fake
        .create_intent(order_id, 800, &usd(), "same")
        .await
        .unwrap();
    let second = fake
        .create_intent(order_id, 800, &usd(), "same")
        .await
        .unwrap();
    let reused = fake.create_intent(order_id, 900, &usd(), "same").await;

    assert_eq!(first, second);
    assert!(
        matches!(reused, Err(PaymentError::Rejected(_))),
        "{reused:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM fake_payment_intents")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_concurrent_creates_with_one_key_make_one_intent() {
    let app = spawn_app().await;
    let fake = Arc::new(FakeProvider::new(app.pool.clone()));
    let order_id = Uuid::new_v4();

    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let fake = fake.clone();
            tokio::spawn(async move { fake.create_intent(order_id, 800, &usd(), "race").await })
        })
        .collect();
    let mut ids = Vec::new();
    for attempt in attempts {
        ids.push(attempt.await.unwrap().expect("every attempt answers").id);
    }

    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
}

#[tokio::test]
async fn fake_settle_pays_an_intent_and_returns_the_webhook_event() {
    let app = spawn_app().await;
    let fake = FakeProvider::new(app.pool.clone());
    let order_id = Uuid::new_v4();
    let intent = fake
        .create_intent(order_id, 1500, &usd(), "settle")
        .await
        .unwrap();

    let event = fake
        .settle(&intent.id, SettleOutcome::Succeeded)
        .await
        .unwrap();

    assert!(event.id.starts_with("evt_fake_"), "{event:?}");
    assert_eq!(event.kind, WebhookEventKind::PaymentSucceeded);
    let paid = event.intent.expect("event carries the intent");
    assert_eq!(paid.status, IntentStatus::Succeeded);
    assert_eq!(paid.order_id, Some(order_id));
    assert_eq!(
        fake.retrieve_intent(&intent.id).await.unwrap().status,
        IntentStatus::Succeeded
    );

    // Paying twice changes nothing; failing or cancelling a paid intent is refused.
    let again = fake
        .settle(&intent.id, SettleOutcome::Succeeded)
        .await
        .unwrap();
    assert_eq!(again.kind, WebhookEventKind::PaymentSucceeded);
    let failed = fake.settle(&intent.id, SettleOutcome::Failed).await;
    assert!(
        matches!(failed, Err(PaymentError::Rejected(_))),
        "{failed:?}"
    );
    let cancelled = fake.cancel_intent(&intent.id).await;
    assert!(
        matches!(cancelled, Err(PaymentError::Rejected(_))),
        "{cancelled:?}"
    );
}

#[tokio::test]
async fn fake_failed_payment_leaves_the_intent_payable() {
    let app = spawn_app().await;
    let fake = FakeProvider::new(app.pool.clone());
    let intent = fake
        .create_intent(Uuid::new_v4(), 1500, &usd(), "decline")
        .await
        .unwrap();

    let event = fake
        .settle(&intent.id, SettleOutcome::Failed)
        .await
        .unwrap();

    assert_eq!(event.kind, WebhookEventKind::PaymentFailed);
    assert_eq!(
        event.intent.map(|intent| intent.status),
        Some(IntentStatus::RequiresPaymentMethod)
    );
    let retried = fake
        .settle(&intent.id, SettleOutcome::Succeeded)
        .await
        .unwrap();
    assert_eq!(
        retried.intent.map(|intent| intent.status),
        Some(IntentStatus::Succeeded)
    );
}

#[tokio::test]
async fn fake_cancel_is_idempotent_and_a_cancelled_intent_cannot_be_paid() {
    let app = spawn_app().await;
    let fake = FakeProvider::new(app.pool.clone());
    let intent = fake
        .create_intent(Uuid::new_v4(), 1500, &usd(), "cancel")
        .await
        .unwrap();

    let cancelled = fake.cancel_intent(&intent.id).await.unwrap();
    let again = fake.cancel_intent(&intent.id).await.unwrap();
    let paid = fake.settle(&intent.id, SettleOutcome::Succeeded).await;

    assert_eq!(cancelled.status, IntentStatus::Canceled);
    assert_eq!(again, cancelled);
    assert!(matches!(paid, Err(PaymentError::Rejected(_))), "{paid:?}");
    let unknown = fake.cancel_intent("pi_fake_unknown").await;
    assert!(
        matches!(unknown, Err(PaymentError::NotFound)),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn fake_refunds_once_per_key_and_never_more_than_was_paid() {
    let app = spawn_app().await;
    let fake = FakeProvider::new(app.pool.clone());
    let intent = fake
        .create_intent(Uuid::new_v4(), 1000, &usd(), "refund")
        .await
        .unwrap();

    let unpaid = fake.refund(&intent.id, 1000, "refund-early").await;
    assert!(
        matches!(unpaid, Err(PaymentError::Rejected(_))),
        "{unpaid:?}"
    );

    fake.settle(&intent.id, SettleOutcome::Succeeded)
        .await
        .unwrap();
    let refund = fake.refund(&intent.id, 600, "refund-1").await.unwrap();
    let repeated = fake.refund(&intent.id, 600, "refund-1").await.unwrap();
    let too_much = fake.refund(&intent.id, 500, "refund-2").await;
    let rest = fake.refund(&intent.id, 400, "refund-3").await.unwrap();

    assert!(refund.id.starts_with("re_fake_"), "{refund:?}");
    assert_eq!(refund.status, RefundStatus::Succeeded);
    assert_eq!(repeated, refund);
    assert!(
        matches!(too_much, Err(PaymentError::Rejected(_))),
        "{too_much:?}"
    );
    assert_ne!(rest.id, refund.id);
    let refunded: i64 = sqlx::query_scalar(
        "SELECT sum(amount_cents)::bigint FROM fake_refunds WHERE payment_intent_id = $1",
    )
    .bind(&intent.id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(refunded, 1000);

    let missing = fake.refund("pi_fake_unknown", 10, "refund-4").await;
    assert!(
        matches!(missing, Err(PaymentError::NotFound)),
        "{missing:?}"
    );
}

#[tokio::test]
async fn fake_provider_refuses_every_webhook() {
    let app = spawn_app().await;
    let fake = FakeProvider::new(app.pool.clone());
    let body = r#"{"id":"evt_1"}"#;
    let signature = stripe_signature(body, TEST_WEBHOOK_SECRET, now());

    let result = fake.parse_webhook(body.as_bytes(), Some(&signature));

    assert!(
        matches!(result, Err(PaymentError::BadSignature)),
        "{result:?}"
    );
}

#[tokio::test]
async fn the_provider_is_chosen_by_the_settings() {
    let app = spawn_app().await;

    let fake = provider_from_settings(&app.settings, app.pool.clone()).unwrap();
    assert_eq!(fake.kind(), PaymentProviderKind::Fake);
    assert!(fake.as_fake().is_some());

    let stripe_server = FakeStripe::start().await;
    let stripe =
        provider_from_settings(&stripe_settings(&stripe_server.base_url), app.pool.clone())
            .unwrap();
    assert_eq!(stripe.kind(), PaymentProviderKind::Stripe);
    assert!(stripe.as_fake().is_none());
    let intent = stripe
        .create_intent(Uuid::new_v4(), 100, &usd(), "chosen")
        .await
        .unwrap();
    assert!(stripe_server.intent(&intent.id).is_some());
}
