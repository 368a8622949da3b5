//! The sales API (admin): what sold and when, over a time range, as totals,
//! as a series of hours or days, and per product, read from the sales
//! projection's hourly rows.
//!
//! Ranges: `from` and `to` are RFC 3339 instants; `to` defaults to now and
//! `from` to 30 days before `to`. Figures have hourly resolution, so `from`
//! is rounded down to the start of its UTC hour, and an hour counts when it
//! starts at or after that and before `to`. Days are UTC days, each the sum
//! of its hours inside the range, so the points of a series always add up
//! to the summary of the same range. Money is in the shop's currency
//! (`SHOP_CURRENCY`); orders in any other currency are not counted.

use actix_web::{get, web, HttpResponse};
use chrono::{DateTime, Duration as TimeDelta, Utc};
use projections::sales::{day_start, hour_start};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::http::extract::Query;
use crate::http::problem::ApiError;
use crate::state::AppState;

/// The most points one series may have (about 14 months of hours).
pub const MAX_POINTS: i64 = 10_000;
const DEFAULT_RANGE_DAYS: i64 = 30;
const DEFAULT_TOP_PRODUCTS: u32 = 10;
const MAX_TOP_PRODUCTS: u32 = 100;

#[derive(Debug, Deserialize, IntoParams)]
pub struct RangeQuery {
    /// RFC 3339 (a `+` in an offset must be sent as `%2B`); rounded down to
    /// the start of its UTC hour. Default: 30 days before `to`.
    pub from: Option<String>,
    /// RFC 3339, exclusive. Default: now.
    pub to: Option<String>,
}

/// The width of one point of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    Hour,
    Day,
}

impl Interval {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct TimeseriesQuery {
    /// `hour` or `day` (the default).
    #[param(inline)]
    pub interval: Option<Interval>,
    /// As in `summary`.
    pub from: Option<String>,
    /// As in `summary`.
    pub to: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct TopProductsQuery {
    /// 1 to 100; default 10.
    pub limit: Option<u32>,
    /// As in `summary`.
    pub from: Option<String>,
    /// As in `summary`.
    pub to: Option<String>,
}

/// Sales over a range. Counts are of events in the range: an order that
/// expired and was then paid late counts as expired and as paid.
#[derive(Debug, Serialize, ToSchema)]
pub struct SalesSummary {
    /// The range as applied: `from` rounded down to its hour.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Payments less refunds of paid orders, in minor units.
    pub revenue_cents: i64,
    pub currency: String,
    pub orders_paid: i64,
    pub units_sold: i64,
    /// `revenue_cents / orders_paid`, rounded to the nearest cent; 0 with
    /// no paid orders.
    pub average_order_cents: i64,
    /// Cancelled for any reason but expiry (payment failed, customer...).
    pub orders_cancelled: i64,
    /// Cancelled because the hold ran out unpaid.
    pub orders_expired: i64,
    /// Paid orders refunded in the range, and the amount taken off revenue.
    pub orders_refunded: i64,
    pub refunded_cents: i64,
    /// Holds (each order holds its stock from checkout) placed in the range.
    pub holds_placed: i64,
    /// Of those holds, the ones paid before they ran out.
    pub holds_converted: i64,
    /// Of those holds, the ones that ran out unpaid.
    pub holds_expired: i64,
    /// `holds_converted / holds_placed` (a ratio from 0 to 1, not money);
    /// 0 when no hold was placed.
    pub conversion_rate: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SalesPoint {
    /// The start of the hour or UTC day.
    pub bucket_start: DateTime<Utc>,
    pub revenue_cents: i64,
    pub orders_paid: i64,
    pub units_sold: i64,
}

/// One point per hour or day from the first bucket of the range to the last,
/// empty ones included (all figures 0), so that a chart's axis is even.
#[derive(Debug, Serialize, ToSchema)]
pub struct SalesTimeseries {
    pub interval: Interval,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub currency: String,
    pub points: Vec<SalesPoint>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopProduct {
    pub product_id: Uuid,
    /// The name on the product's latest sale in the range.
    pub name: String,
    pub units_sold: i64,
    /// Net of refunds, which are shared among an order's products in
    /// proportion to their line totals.
    pub revenue_cents: i64,
}

/// Products by units sold (then revenue), most first.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopProducts {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub currency: String,
    pub items: Vec<TopProduct>,
}

/// The `[start, stop)` of one point of a series.
pub type Bucket = (DateTime<Utc>, DateTime<Utc>);

/// A validated range: hour buckets starting in `start..end` count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SalesRange {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl SalesRange {
    /// Reads `from` and `to`; `now` stands in for a missing `to`.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Self, ApiError> {
        let end = match to {
            Some(text) => parse_instant("to", text)?,
            None => now,
        };
        let from = match from {
            Some(text) => parse_instant("from", text)?,
            None => end
                .checked_sub_signed(TimeDelta::days(DEFAULT_RANGE_DAYS))
                .ok_or_else(|| ApiError::bad_field("to", "too early for the default range"))?,
        };
        if from > end {
            return Err(ApiError::invalid_field("from", "must not be after to"));
        }
        Ok(Self {
            start: hour_start(from),
            end,
        })
    }

    /// The `[start, stop)` of each point of a series over this range.
    pub fn points(&self, interval: Interval) -> Result<Vec<Bucket>, ApiError> {
        let (first, step) = match interval {
            Interval::Hour => (self.start, TimeDelta::hours(1)),
            Interval::Day => (day_start(self.start), TimeDelta::days(1)),
        };
        let span = self.end.signed_duration_since(first);
        let step_seconds = step.num_seconds();
        let partial_second = i64::from(span.subsec_nanos() > 0);
        let count = if span <= TimeDelta::zero() {
            0
        } else {
            (span.num_seconds() + partial_second + step_seconds - 1) / step_seconds
        };
        if count > MAX_POINTS {
            return Err(ApiError::bad_field(
                "interval",
                format!(
                    "the range holds {count} {} points, more than {MAX_POINTS}: \
                     narrow it or use a wider interval",
                    interval.as_str()
                ),
            ));
        }
        Ok((0..count)
            .filter_map(|index| {
                let start = first.checked_add_signed(step * i32::try_from(index).ok()?)?;
                Some((start, start.checked_add_signed(step)?))
            })
            .collect())
    }
}

fn parse_instant(field: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|instant| instant.with_timezone(&Utc))
        .map_err(|error| {
            let hint = if text.contains(' ') {
                " (a '+' in a query string must be sent as %2B)"
            } else {
                ""
            };
            ApiError::bad_field(
                field,
                format!("expected an RFC 3339 time such as 2025-01-31T00:00:00Z: {error}{hint}"),
            )
        })
}

/// `numerator / denominator` rounded to the nearest whole number, halves
/// away from zero; 0 when dividing by 0.
fn rounded_ratio(numerator: i64, denominator: i64) -> i64 {
    if denominator == 0 {
        return 0;
    }
    let (numerator, denominator) = (i128::from(numerator), i128::from(denominator));
    let quotient = numerator / denominator;
    let remainder = numerator % denominator;
    let rounded = if 2 * remainder.abs() >= denominator.abs() {
        quotient + numerator.signum() * denominator.signum()
    } else {
        quotient
    };
    i64::try_from(rounded).unwrap_or(i64::MAX)
}

#[derive(sqlx::FromRow)]
struct Totals {
    revenue_cents: i64,
    orders_paid: i64,
    units_sold: i64,
    orders_cancelled: i64,
    orders_expired: i64,
    orders_refunded: i64,
    refunded_cents: i64,
    holds_placed: i64,
    holds_converted: i64,
    holds_expired: i64,
}

/// Revenue, orders, units and holds over a range.
#[utoipa::path(tag = "sales", params(RangeQuery), security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = SalesSummary),
    (status = 400, body = crate::http::problem::Problem, description = "a malformed time"),
    (status = 401, body = crate::http::problem::Problem), (status = 403, body = crate::http::problem::Problem),
    (status = 422, body = crate::http::problem::Problem, description = "from is after to"),
))]
#[get("/api/v1/sales/summary")]
pub async fn sales_summary(
    state: web::Data<AppState>,
    query: Query<RangeQuery>,
) -> Result<HttpResponse, ApiError> {
    let range = SalesRange::parse(query.0.from.as_deref(), query.0.to.as_deref(), Utc::now())?;
    let currency = state.settings.shop_currency.as_str();
    let totals: Totals = sqlx::query_as(
        "SELECT coalesce(sum(revenue_cents), 0)::bigint AS revenue_cents, \
                coalesce(sum(orders_paid), 0)::bigint AS orders_paid, \
                coalesce(sum(units_sold), 0)::bigint AS units_sold, \
                coalesce(sum(orders_cancelled), 0)::bigint AS orders_cancelled, \
                coalesce(sum(orders_expired), 0)::bigint AS orders_expired, \
                coalesce(sum(orders_refunded), 0)::bigint AS orders_refunded, \
                coalesce(sum(refunded_cents), 0)::bigint AS refunded_cents, \
                coalesce(sum(holds_placed), 0)::bigint AS holds_placed, \
                coalesce(sum(holds_converted), 0)::bigint AS holds_converted, \
                coalesce(sum(holds_expired), 0)::bigint AS holds_expired \
         FROM sales_hourly WHERE currency = $1 AND bucket_start >= $2 AND bucket_start < $3",
    )
    .bind(currency)
    .bind(range.start)
    .bind(range.end)
    .fetch_one(&state.pool)
    .await?;
    let conversion_rate = if totals.holds_placed > 0 {
        totals.holds_converted as f64 / totals.holds_placed as f64
    } else {
        0.0
    };
    Ok(HttpResponse::Ok().json(SalesSummary {
        from: range.start,
        to: range.end,
        revenue_cents: totals.revenue_cents,
        currency: currency.to_owned(),
        orders_paid: totals.orders_paid,
        units_sold: totals.units_sold,
        average_order_cents: rounded_ratio(totals.revenue_cents, totals.orders_paid),
        orders_cancelled: totals.orders_cancelled,
        orders_expired: totals.orders_expired,
        orders_refunded: totals.orders_refunded,
        refunded_cents: totals.refunded_cents,
        holds_placed: totals.holds_placed,
        holds_converted: totals.holds_converted,
        holds_expired: totals.holds_expired,
        conversion_rate,
    }))
}

/// Revenue, paid orders and units per hour or UTC day.
#[utoipa::path(tag = "sales", params(TimeseriesQuery), security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = SalesTimeseries),
    (status = 400, body = crate::http::problem::Problem,
        description = "a malformed time, an unknown interval, or more than 10,000 points"),
    (status = 401, body = crate::http::problem::Problem), (status = 403, body = crate::http::problem::Problem),
    (status = 422, body = crate::http::problem::Problem, description = "from is after to"),
))]
#[get("/api/v1/sales/timeseries")]
pub async fn sales_timeseries(
    state: web::Data<AppState>,
    query: Query<TimeseriesQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.0;
    let interval = query.interval.unwrap_or(Interval::Day);
    let range = SalesRange::parse(query.from.as_deref(), query.to.as_deref(), Utc::now())?;
    let points = range.points(interval)?;
    let currency = state.settings.shop_currency.as_str();
    let (starts, stops): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) = points.into_iter().unzip();
    // Each point sums the hours that lie both in the point and in the range.
    let rows: Vec<(DateTime<Utc>, i64, i64, i64)> = sqlx::query_as(
        "SELECT p.start, coalesce(sum(h.revenue_cents), 0)::bigint, \
                coalesce(sum(h.orders_paid), 0)::bigint, coalesce(sum(h.units_sold), 0)::bigint \
         FROM UNNEST($1::timestamptz[], $2::timestamptz[]) AS p(start, stop) \
         LEFT JOIN sales_hourly h ON h.currency = $3 \
              AND h.bucket_start >= greatest(p.start, $4) AND h.bucket_start < least(p.stop, $5) \
         GROUP BY p.start ORDER BY p.start",
    )
    .bind(&starts)
    .bind(&stops)
    .bind(currency)
    .bind(range.start)
    .bind(range.end)
    .fetch_all(&state.pool)
    .await?;
    let points = rows
        .into_iter()
        .map(
            |(bucket_start, revenue_cents, orders_paid, units_sold)| SalesPoint {
                bucket_start,
                revenue_cents,
                orders_paid,
                units_sold,
            },
        )
        .collect();
    Ok(HttpResponse::Ok().json(SalesTimeseries {
        interval,
        from: range.start,
        to: range.end,
        currency: currency.to_owned(),
        points,
    }))
}

/// The products that sold most units in a range.
#[utoipa::path(tag = "sales", params(TopProductsQuery), security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = TopProducts),
    (status = 400, body = crate::http::problem::Problem, description = "a malformed time or limit"),
    (status = 401, body = crate::http::problem::Problem), (status = 403, body = crate::http::problem::Problem),
    (status = 422, body = crate::http::problem::Problem, description = "from is after to"),
))]
#[get("/api/v1/sales/top-products")]
pub async fn sales_top_products(
    state: web::Data<AppState>,
    query: Query<TopProductsQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.0;
    let limit = query.limit.unwrap_or(DEFAULT_TOP_PRODUCTS);
    if !(1..=MAX_TOP_PRODUCTS).contains(&limit) {
        return Err(ApiError::bad_field(
            "limit",
            format!("must be from 1 to {MAX_TOP_PRODUCTS}"),
        ));
    }
    let range = SalesRange::parse(query.from.as_deref(), query.to.as_deref(), Utc::now())?;
    let currency = state.settings.shop_currency.as_str();
    let rows: Vec<(Uuid, String, i64, i64)> = sqlx::query_as(
        "SELECT product_id, (array_agg(name ORDER BY bucket_start DESC))[1], \
                sum(units_sold)::bigint AS units, sum(revenue_cents)::bigint AS revenue \
         FROM sales_product_hourly \
         WHERE currency = $1 AND bucket_start >= $2 AND bucket_start < $3 \
         GROUP BY product_id ORDER BY units DESC, revenue DESC, product_id LIMIT $4",
    )
    .bind(currency)
    .bind(range.start)
    .bind(range.end)
    .bind(i64::from(limit))
    .fetch_all(&state.pool)
    .await?;
    let items = rows
        .into_iter()
        .map(|(product_id, name, units_sold, revenue_cents)| TopProduct {
            product_id,
            name,
            units_sold,
            revenue_cents,
        })
        .collect();
    Ok(HttpResponse::Ok().json(TopProducts {
        from: range.start,
        to: range.end,
        currency: currency.to_owned(),
        items,
    }))
}

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .service(sales_summary)
        .service(sales_timeseries)
        .service(sales_top_products);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("a valid test time")
            .with_timezone(&Utc)
    }

    #[test]
    fn a_range_starts_at_the_hour_of_from_and_defaults_to_thirty_days_before_now() {
        let now = at("2025-02-10T12:34:56Z");
        let range = SalesRange::parse(Some("2025-02-01T10:30:00+01:00"), None, now).unwrap();
        assert_eq!(range.start, at("2025-02-01T09:00:00Z"));
        assert_eq!(range.end, now);
        let default = SalesRange::parse(None, None, now).unwrap();
        assert_eq!(default.start, at("2025-01-11T12:00:00Z"));
    }

    #[test]
    fn a_range_backwards_or_malformed_is_refused() {
        let now = at("2025-02-10T00:00:00Z");
        let backwards = SalesRange::parse(
            Some("2025-02-02T00:00:00Z"),
            Some("2025-02-01T00:00:00Z"),
            now,
        );
        assert!(matches!(backwards, Err(ApiError::Validation { .. })));
        let malformed = SalesRange::parse(Some("yesterday"), None, now);
        assert!(matches!(malformed, Err(ApiError::BadRequest { .. })));
        let spaced = SalesRange::parse(Some("2025-02-01T00:00:00 01:00"), None, now);
        assert!(
            matches!(spaced, Err(ApiError::BadRequest { detail, .. }) if detail.contains("%2B"))
        );
    }

    #[test]
    fn points_cover_every_bucket_the_range_touches_and_no_more() {
        let range = SalesRange::parse(
            Some("2025-02-01T10:15:00Z"),
            Some("2025-02-01T13:00:00Z"),
            Utc::now(),
        )
        .unwrap();
        let hours: Vec<_> = range
            .points(Interval::Hour)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            hours,
            vec![
                at("2025-02-01T10:00:00Z"),
                at("2025-02-01T11:00:00Z"),
                at("2025-02-01T12:00:00Z")
            ]
        );
        let range = SalesRange::parse(
            Some("2025-02-01T12:00:00Z"),
            Some("2025-02-03T00:00:01Z"),
            Utc::now(),
        )
        .unwrap();
        let days: Vec<_> = range
            .points(Interval::Day)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            days,
            vec![
                at("2025-02-01T00:00:00Z"),
                at("2025-02-02T00:00:00Z"),
                at("2025-02-03T00:00:00Z")
            ]
        );
        let empty = SalesRange::parse(
            Some("2025-02-01T10:00:00Z"),
            Some("2025-02-01T10:00:00Z"),
            Utc::now(),
        )
        .unwrap();
        assert!(empty.points(Interval::Hour).unwrap().is_empty());
    }

    #[test]
    fn more_than_ten_thousand_points_is_refused() {
        let range = SalesRange::parse(
            Some("2020-01-01T00:00:00Z"),
            Some("2022-01-01T00:00:00Z"),
            Utc::now(),
        )
        .unwrap();
        assert!(range.points(Interval::Hour).is_err());
        assert_eq!(range.points(Interval::Day).unwrap().len(), 731);
        let exactly = SalesRange::parse(
            Some("2020-01-01T00:00:00Z"),
            Some("2021-02-20T16:00:00Z"),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(exactly.points(Interval::Hour).unwrap().len(), 10_000);
    }

    #[test]
    fn the_average_rounds_to_the_nearest_cent() {
        assert_eq!(rounded_ratio(10, 4), 3);
        assert_eq!(rounded_ratio(9, 4), 2);
        assert_eq!(rounded_ratio(-10, 4), -3);
        assert_eq!(rounded_ratio(5, 0), 0);
    }
}
