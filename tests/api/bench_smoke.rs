//! A short run of the flash-sale benchmark against two in-process
//! instances: correctness only (every invariant passes), never timing.

use secrecy::ExposeSecret;

use crate::helpers::{spawn_app, spawn_instance_like};
use crate::users::{unique_email, TEST_PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_benchmark_sells_every_unit_once_across_two_instances_and_proves_it() {
    let app = spawn_app().await;
    let other = spawn_instance_like(&app).await;
    let email = unique_email("bench-admin");
    commerce::cli::create_admin(
        &app.pool,
        app.settings.bcrypt_cost,
        &email,
        TEST_PASSWORD.to_owned(),
        None,
    )
    .await
    .expect("admin created");
    let options = commerce::bench::Options::smoke(
        vec![app.address.clone(), other.address.clone()],
        app.settings.database_url.expose_secret().to_owned(),
        &email,
        TEST_PASSWORD,
    );

    let report = commerce::bench::run(&options)
        .await
        .expect("the bench runs");

    assert!(report.passed(), "{}", report.render());
    assert_eq!(report.checkout.successful, 20, "{}", report.render());
    assert_eq!(report.checkout.run.count(409), 40, "{}", report.render());
    assert_eq!(report.checkout.per_instance, vec![30, 30]);
    assert_eq!(report.hot_row.as_ref().map(|hot| hot.taken), Some(20));
    let reads = report.reads.as_ref().expect("read figures");
    for run in [&reads.healthz, &reads.product, &reads.cart] {
        assert_eq!(run.count(200), 100, "{}", report.render());
    }
}
