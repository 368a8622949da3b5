//! Timestamps in response bodies, written as chrono writes them but
//! without the formatting machinery.
//!
//! chrono serializes a `DateTime` through `Display`, a call per character
//! and a padded `write!` for the fraction; one timestamp took 1.4% of the
//! server's CPU in a profile of cart reads. These serializers write the
//! same text from a buffer on the stack: RFC 3339 in UTC, with `Z`, and
//! the fraction in 0, 3, 6 or 9 digits, the fewest that keep it exact
//! (chrono's `SecondsFormat::AutoSi`). Years outside 0 to 9999 and leap
//! seconds, which the buffer does not cover, go through chrono.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serializer;

/// For `#[serde(serialize_with = "..")]` on a `DateTime<Utc>`.
pub fn rfc3339<S: Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    match Text::of(time) {
        Some(text) => serializer.serialize_str(text.as_str()),
        None => serde::Serialize::serialize(time, serializer),
    }
}

/// For `#[serde(serialize_with = "..")]` on an `Option<DateTime<Utc>>`.
pub fn rfc3339_option<S: Serializer>(
    time: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => rfc3339(time, serializer),
        None => serializer.serialize_none(),
    }
}

/// The longest text: `YYYY-MM-DDTHH:MM:SS.fffffffffZ`.
const LONGEST: usize = 30;

struct Text {
    bytes: [u8; LONGEST],
    len: usize,
}

impl Text {
    /// `time` as chrono's serializer writes it; `None` for a year outside
    /// 0 to 9999 or a leap second.
    fn of(time: &DateTime<Utc>) -> Option<Self> {
        // Each field of a `DateTime` converts it to local time first; in
        // UTC that is the naive time, taken once here.
        let time = time.naive_utc();
        let year = u32::try_from(time.year())
            .ok()
            .filter(|year| *year <= 9999)?;
        let nanos = time.nanosecond();
        if nanos >= 1_000_000_000 {
            return None;
        }
        let mut text = Self {
            bytes: [0; LONGEST],
            len: 0,
        };
        text.digits(year, 4);
        text.byte(b'-');
        text.digits(time.month(), 2);
        text.byte(b'-');
        text.digits(time.day(), 2);
        text.byte(b'T');
        text.digits(time.hour(), 2);
        text.byte(b':');
        text.digits(time.minute(), 2);
        text.byte(b':');
        text.digits(time.second(), 2);
        let fraction = match nanos {
            0 => None,
            _ if nanos % 1_000_000 == 0 => Some((nanos / 1_000_000, 3)),
            _ if nanos % 1_000 == 0 => Some((nanos / 1_000, 6)),
            _ => Some((nanos, 9)),
        };
        if let Some((value, count)) = fraction {
            text.byte(b'.');
            text.digits(value, count);
        }
        text.byte(b'Z');
        Some(text)
    }

    fn byte(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    /// `value`'s last `count` decimal digits, zero-padded.
    fn digits(&mut self, value: u32, count: u32) {
        for place in (0..count).rev() {
            // A digit is below 10: the cast keeps it whole.
            self.byte(b'0' + (value / 10u32.pow(place) % 10) as u8);
        }
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits and separators were written.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rand::Rng;

    fn ours(time: &DateTime<Utc>) -> String {
        let mut out = Vec::new();
        rfc3339(time, &mut serde_json::Serializer::new(&mut out)).expect("serializes");
        String::from_utf8(out).expect("utf-8")
    }

    fn chronos(time: &DateTime<Utc>) -> String {
        serde_json::to_string(time).expect("serializes")
    }

    #[test]
    fn writes_what_chrono_writes_for_every_fraction_length() {
        let second = Utc.with_ymd_and_hms(2026, 12, 6, 21, 5, 9).unwrap();
        for nanos in [
            0,
            1,
            10,
            999,
            1_000,
            120_000,
            999_999,
            1_000_000,
            5_000_000,
            123_456_789,
            999_999_999,
        ] {
            let time = second + chrono::Duration::nanoseconds(nanos);
            assert_eq!(ours(&time), chronos(&time), "{nanos} ns");
        }
        assert_eq!(ours(&second), "\"2026-12-06T21:05:09Z\"");
    }

    #[test]
    fn writes_what_chrono_writes_across_the_years_it_covers() {
        let mut rng = rand::rng();
        let first = Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap().timestamp();
        let last = Utc
            .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
            .unwrap()
            .timestamp();
        for _ in 0..20_000 {
            let seconds = rng.random_range(first..=last);
            let nanos = match rng.random_range(0..4) {
                0 => 0,
                1 => rng.random_range(0..1_000) * 1_000_000,
                2 => rng.random_range(0..1_000_000) * 1_000,
                _ => rng.random_range(0..1_000_000_000),
            };
            let time = Utc.timestamp_opt(seconds, nanos).unwrap();
            assert_eq!(ours(&time), chronos(&time));
        }
    }

    #[test]
    fn leaves_years_outside_four_digits_and_leap_seconds_to_chrono() {
        let far = Utc.with_ymd_and_hms(12_345, 1, 1, 0, 0, 0).unwrap();
        let before = Utc.with_ymd_and_hms(-1, 6, 1, 0, 0, 0).unwrap();
        let leap = Utc.timestamp_opt(1_483_228_799, 1_500_000_000).unwrap();
        for time in [far, before, leap] {
            assert_eq!(ours(&time), chronos(&time));
            assert!(Text::of(&time).is_none());
        }
    }

    #[test]
    fn an_absent_time_is_null() {
        let mut out = Vec::new();
        rfc3339_option(&None, &mut serde_json::Serializer::new(&mut out)).expect("serializes");
        assert_eq!(out, b"null");
    }
}
