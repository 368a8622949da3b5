//! Value types shared by the aggregates.
//!
//! Every type here has private fields and is built only through a checking
//! constructor (`TryFrom`, `new`, `from_name`), and serde goes through the
//! same checks, so a value that exists is a valid one. Request bodies are
//! parsed into these types before any command is built.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The kind of value a [`ValueError`] is about, for messages and field maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    Quantity,
    Currency,
    Money,
    Sku,
    Slug,
    Name,
}

impl fmt::Display for ValueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Quantity => "quantity",
            Self::Currency => "currency",
            Self::Money => "amount",
            Self::Sku => "sku",
            Self::Slug => "slug",
            Self::Name => "name",
        })
    }
}

/// Why a raw input could not become a value type.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    /// A unit count outside `min..=max`.
    #[error("quantity must be between {min} and {max}, got {got}")]
    QuantityOutOfRange { got: i64, min: u32, max: u32 },
    /// Not three ASCII letters.
    #[error("currency must be three ASCII letters (ISO 4217), got {got:?}")]
    InvalidCurrency { got: String },
    /// Money is never negative.
    #[error("an amount of money cannot be negative, got {amount_cents}")]
    NegativeAmount { amount_cents: i64 },
    /// Two amounts in different currencies were combined.
    #[error("cannot combine an amount in {left} with one in {right}")]
    CurrencyMismatch { left: Currency, right: Currency },
    /// The result does not fit in an `i64` count of minor units.
    #[error("amount of money out of range")]
    AmountOverflow,
    /// Text that is empty after trimming.
    #[error("{kind} must not be empty")]
    Empty { kind: ValueKind },
    /// Text longer than the type allows (counted in characters).
    #[error("{kind} must be at most {max} characters, got {len}")]
    TooLong {
        kind: ValueKind,
        max: usize,
        len: usize,
    },
    /// Text holding a character the type does not allow.
    #[error("{kind} must not contain {character:?}")]
    InvalidCharacter { kind: ValueKind, character: char },
    /// A slug starting or ending with a hyphen, or with two in a row.
    #[error("slug must not start or end with a hyphen or hold two in a row, got {got:?}")]
    MisplacedHyphen { got: String },
    /// A name with no ASCII letter or digit to make a slug from.
    #[error("{name:?} has no ASCII letter or digit to make a slug from")]
    NothingToSlug { name: String },
}

/// A number of units of one variant: a whole number from 1 to 10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "u32")]
pub struct Quantity(u32);

impl Quantity {
    /// The smallest quantity anyone may ask for.
    pub const MIN: u32 = 1;
    /// The largest quantity of one variant in one request, cart line or order line.
    pub const MAX: u32 = 10_000;

    /// Checks that `units` is within `MIN..=MAX`.
    pub fn new(units: u32) -> Result<Self, ValueError> {
        Self::try_from(i64::from(units))
    }

    /// The number of units.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<i64> for Quantity {
    type Error = ValueError;

    fn try_from(units: i64) -> Result<Self, Self::Error> {
        match u32::try_from(units) {
            Ok(n) if (Self::MIN..=Self::MAX).contains(&n) => Ok(Self(n)),
            _ => Err(ValueError::QuantityOutOfRange {
                got: units,
                min: Self::MIN,
                max: Self::MAX,
            }),
        }
    }
}

impl TryFrom<u32> for Quantity {
    type Error = ValueError;

    fn try_from(units: u32) -> Result<Self, Self::Error> {
        Self::new(units)
    }
}

impl From<Quantity> for u32 {
    fn from(quantity: Quantity) -> Self {
        quantity.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Implements the string plumbing shared by the text value types: `as_str`,
/// `TryFrom<&str>`, `From<T> for String`, `AsRef<str>` and `Display`.
/// Each type supplies its own `TryFrom<String>`.
macro_rules! text_value {
    ($type:ident) => {
        impl $type {
            /// The checked text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $type {
            type Error = ValueError;

            fn try_from(raw: &str) -> Result<Self, Self::Error> {
                Self::try_from(raw.to_owned())
            }
        }

        impl From<$type> for String {
            fn from(value: $type) -> Self {
                value.0
            }
        }

        impl AsRef<str> for $type {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// An ISO 4217 currency code such as `USD`: three ASCII letters, kept in
/// upper case (lower-case input is accepted and upper-cased).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(String);

impl TryFrom<String> for Currency {
    type Error = ValueError;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        if raw.len() == 3 && raw.bytes().all(|b| b.is_ascii_alphabetic()) {
            Ok(Self(raw.to_ascii_uppercase()))
        } else {
            Err(ValueError::InvalidCurrency { got: raw })
        }
    }
}

text_value!(Currency);

/// An amount of money: a non-negative whole number of minor units (cents)
/// in one currency. Serialised as `{"amount_cents": 1999, "currency": "USD"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "MoneyParts", into = "MoneyParts")]
pub struct Money {
    amount_cents: i64,
    currency: Currency,
}

// The unchecked wire shape of `Money`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MoneyParts {
    amount_cents: i64,
    currency: Currency,
}

impl Money {
    /// Checks that the amount is not negative.
    pub fn new(amount_cents: i64, currency: Currency) -> Result<Self, ValueError> {
        if amount_cents < 0 {
            return Err(ValueError::NegativeAmount { amount_cents });
        }
        Ok(Self {
            amount_cents,
            currency,
        })
    }

    /// Nothing, in `currency`: the start of a sum.
    pub fn zero(currency: Currency) -> Self {
        Self {
            amount_cents: 0,
            currency,
        }
    }

    /// The amount in minor units (cents).
    pub fn amount_cents(&self) -> i64 {
        self.amount_cents
    }

    /// The currency of the amount.
    pub fn currency(&self) -> &Currency {
        &self.currency
    }

    /// The price of `quantity` units at this unit price.
    pub fn checked_mul(&self, quantity: Quantity) -> Result<Self, ValueError> {
        let amount_cents = self
            .amount_cents
            .checked_mul(i64::from(quantity.get()))
            .ok_or(ValueError::AmountOverflow)?;
        Ok(Self {
            amount_cents,
            currency: self.currency.clone(),
        })
    }

    /// The sum of two amounts in the same currency.
    pub fn checked_add(&self, other: &Money) -> Result<Self, ValueError> {
        if self.currency != other.currency {
            return Err(ValueError::CurrencyMismatch {
                left: self.currency.clone(),
                right: other.currency.clone(),
            });
        }
        let amount_cents = self
            .amount_cents
            .checked_add(other.amount_cents)
            .ok_or(ValueError::AmountOverflow)?;
        Ok(Self {
            amount_cents,
            currency: self.currency.clone(),
        })
    }
}

impl TryFrom<MoneyParts> for Money {
    type Error = ValueError;

    fn try_from(parts: MoneyParts) -> Result<Self, Self::Error> {
        Self::new(parts.amount_cents, parts.currency)
    }
}

impl From<Money> for MoneyParts {
    fn from(money: Money) -> Self {
        Self {
            amount_cents: money.amount_cents,
            currency: money.currency,
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount_cents, self.currency)
    }
}

/// A stock-keeping unit: the merchant's code for one variant, 1 to 64
/// characters of `A-Z a-z 0-9 . _ -`, surrounding whitespace trimmed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    /// The longest SKU accepted.
    pub const MAX_LEN: usize = 64;
}

impl TryFrom<String> for Sku {
    type Error = ValueError;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        let kind = ValueKind::Sku;
        let text = raw.trim();
        if text.is_empty() {
            return Err(ValueError::Empty { kind });
        }
        if let Some(character) = text
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(ValueError::InvalidCharacter { kind, character });
        }
        // Only ASCII is left, so bytes are characters.
        if text.len() > Self::MAX_LEN {
            return Err(ValueError::TooLong {
                kind,
                max: Self::MAX_LEN,
                len: text.len(),
            });
        }
        Ok(Self(text.to_owned()))
    }
}

text_value!(Sku);

/// The URL name of a product or category: 1 to 120 characters of
/// `a-z 0-9 -`, with no hyphen at either end and never two in a row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Slug(String);

impl Slug {
    /// The longest slug accepted.
    pub const MAX_LEN: usize = 120;

    /// Makes a slug from a display name: ASCII letters and digits kept (in
    /// lower case), other letters and digits dropped, and every run of
    /// anything else turned into one hyphen. `"Red Shoe!"` gives `red-shoe`.
    /// Cut to `MAX_LEN`. Fails when nothing is left.
    pub fn from_name(name: &str) -> Result<Self, ValueError> {
        let mut slug = String::new();
        let mut gap = false;
        for c in name.chars() {
            if c.is_ascii_alphanumeric() {
                if gap && !slug.is_empty() {
                    slug.push('-');
                }
                gap = false;
                slug.push(c.to_ascii_lowercase());
            } else if !c.is_alphanumeric() {
                gap = true;
            }
        }
        if slug.is_empty() {
            return Err(ValueError::NothingToSlug {
                name: name.to_owned(),
            });
        }
        slug.truncate(Self::MAX_LEN);
        let slug = slug.trim_end_matches('-').to_owned();
        Ok(Self(slug))
    }

    /// This slug with `-n` appended (`red-shoe-2`), for a slug that is already
    /// taken; the base is shortened when needed to stay within `MAX_LEN`.
    pub fn with_suffix(&self, n: u32) -> Self {
        let suffix = format!("-{n}");
        // `suffix` is at most 11 characters, so at least 109 of the base stay,
        // and the base never starts with a hyphen: it cannot come out empty.
        let keep = self.0.len().min(Self::MAX_LEN - suffix.len());
        let base = self.0.get(..keep).unwrap_or(&self.0).trim_end_matches('-');
        Self(format!("{base}{suffix}"))
    }
}

impl TryFrom<String> for Slug {
    type Error = ValueError;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        let kind = ValueKind::Slug;
        let text = raw.trim();
        if text.is_empty() {
            return Err(ValueError::Empty { kind });
        }
        if let Some(character) = text
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(ValueError::InvalidCharacter { kind, character });
        }
        if text.len() > Self::MAX_LEN {
            return Err(ValueError::TooLong {
                kind,
                max: Self::MAX_LEN,
                len: text.len(),
            });
        }
        if text.starts_with('-') || text.ends_with('-') || text.contains("--") {
            return Err(ValueError::MisplacedHyphen {
                got: text.to_owned(),
            });
        }
        Ok(Self(text.to_owned()))
    }
}

text_value!(Slug);

/// A human-readable name or title (product, variant, category): 1 to 200
/// characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// The longest name accepted, in characters.
    pub const MAX_LEN: usize = 200;
}

impl TryFrom<String> for Name {
    type Error = ValueError;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        let kind = ValueKind::Name;
        let text = raw.trim();
        if text.is_empty() {
            return Err(ValueError::Empty { kind });
        }
        if let Some(character) = text.chars().find(|c| c.is_control()) {
            return Err(ValueError::InvalidCharacter { kind, character });
        }
        let len = text.chars().count();
        if len > Self::MAX_LEN {
            return Err(ValueError::TooLong {
                kind,
                max: Self::MAX_LEN,
                len,
            });
        }
        Ok(Self(text.to_owned()))
    }
}

text_value!(Name);

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::try_from("USD").unwrap()
    }

    fn money(cents: i64) -> Money {
        Money::new(cents, usd()).unwrap()
    }

    #[test]
    fn quantity_accepts_one_to_ten_thousand() {
        assert_eq!(Quantity::new(1).unwrap().get(), 1);
        assert_eq!(Quantity::new(10_000).unwrap().get(), 10_000);
        assert_eq!(Quantity::try_from(7_i64).unwrap().get(), 7);
    }

    #[test]
    fn quantity_refuses_zero_negative_and_too_many() {
        for got in [0_i64, -1, 10_001, i64::from(u32::MAX) + 1] {
            assert_eq!(
                Quantity::try_from(got),
                Err(ValueError::QuantityOutOfRange {
                    got,
                    min: 1,
                    max: 10_000
                })
            );
        }
    }

    #[test]
    fn quantity_deserialises_through_the_check() {
        assert_eq!(
            serde_json::from_str::<Quantity>("3").unwrap(),
            Quantity::new(3).unwrap()
        );
        assert!(serde_json::from_str::<Quantity>("0").is_err());
        assert!(serde_json::from_str::<Quantity>("-2").is_err());
        assert!(serde_json::from_str::<Quantity>("1.5").is_err());
        assert_eq!(
            serde_json::to_string(&Quantity::new(12).unwrap()).unwrap(),
            "12"
        );
    }

    #[test]
    fn currency_is_three_letters_upper_cased() {
        assert_eq!(Currency::try_from("eur").unwrap().as_str(), "EUR");
        assert_eq!(Currency::try_from("Usd").unwrap(), usd());
        for bad in ["", "US", "USDT", "U5D", " USD", "ÜSD"] {
            assert_eq!(
                Currency::try_from(bad),
                Err(ValueError::InvalidCurrency {
                    got: bad.to_owned()
                })
            );
        }
        assert_eq!(serde_json::to_string(&usd()).unwrap(), "\"USD\"");
        assert_eq!(
            serde_json::from_str::<Currency>("\"gbp\"")
                .unwrap()
                .as_str(),
            "GBP"
        );
        assert!(serde_json::from_str::<Currency>("\"pounds\"").is_err());
    }

    #[test]
    fn money_is_never_negative() {
        assert_eq!(money(0).amount_cents(), 0);
        assert_eq!(
            Money::new(-1, usd()),
            Err(ValueError::NegativeAmount { amount_cents: -1 })
        );
        assert!(serde_json::from_str::<Money>(r#"{"amount_cents":-5,"currency":"USD"}"#).is_err());
    }

    #[test]
    fn money_round_trips_through_json() {
        let json = serde_json::to_string(&money(1999)).unwrap();
        assert_eq!(json, r#"{"amount_cents":1999,"currency":"USD"}"#);
        assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), money(1999));
    }

    #[test]
    fn money_multiplies_by_a_quantity() {
        let total = money(1999).checked_mul(Quantity::new(3).unwrap()).unwrap();
        assert_eq!(total, money(5997));
        assert_eq!(
            money(i64::MAX).checked_mul(Quantity::new(2).unwrap()),
            Err(ValueError::AmountOverflow)
        );
    }

    #[test]
    fn money_adds_only_the_same_currency() {
        assert_eq!(money(100).checked_add(&money(250)).unwrap(), money(350));
        let eur = Money::new(1, Currency::try_from("EUR").unwrap()).unwrap();
        assert_eq!(
            money(100).checked_add(&eur),
            Err(ValueError::CurrencyMismatch {
                left: usd(),
                right: Currency::try_from("EUR").unwrap()
            })
        );
        assert_eq!(
            money(i64::MAX).checked_add(&money(1)),
            Err(ValueError::AmountOverflow)
        );
        assert_eq!(Money::zero(usd()).checked_add(&money(5)).unwrap(), money(5));
    }

    #[test]
    fn sku_is_trimmed_and_limited() {
        assert_eq!(
            Sku::try_from("  SHOE-42.red_L ").unwrap().as_str(),
            "SHOE-42.red_L"
        );
        assert_eq!(
            Sku::try_from("   "),
            Err(ValueError::Empty {
                kind: ValueKind::Sku
            })
        );
        assert_eq!(
            Sku::try_from("A B"),
            Err(ValueError::InvalidCharacter {
                kind: ValueKind::Sku,
                character: ' '
            })
        );
        assert!(Sku::try_from("x".repeat(64)).is_ok());
        assert_eq!(
            Sku::try_from("x".repeat(65)),
            Err(ValueError::TooLong {
                kind: ValueKind::Sku,
                max: 64,
                len: 65
            })
        );
        assert!(serde_json::from_str::<Sku>("\"a/b\"").is_err());
    }

    #[test]
    fn slug_accepts_lower_case_words_joined_by_single_hyphens() {
        assert_eq!(Slug::try_from("red-shoe-2").unwrap().as_str(), "red-shoe-2");
        for bad in ["-red", "red-", "red--shoe"] {
            assert_eq!(
                Slug::try_from(bad),
                Err(ValueError::MisplacedHyphen {
                    got: bad.to_owned()
                })
            );
        }
        assert_eq!(
            Slug::try_from("Red"),
            Err(ValueError::InvalidCharacter {
                kind: ValueKind::Slug,
                character: 'R'
            })
        );
        assert_eq!(
            Slug::try_from(""),
            Err(ValueError::Empty {
                kind: ValueKind::Slug
            })
        );
        assert_eq!(
            Slug::try_from("a".repeat(121)),
            Err(ValueError::TooLong {
                kind: ValueKind::Slug,
                max: 120,
                len: 121
            })
        );
    }

    #[test]
    fn slug_from_name_lower_cases_and_collapses_the_rest() {
        let slug = |name: &str| Slug::from_name(name).unwrap().as_str().to_owned();
        assert_eq!(slug("Red Shoe!"), "red-shoe");
        assert_eq!(slug("  --Big   & Tall--  "), "big-tall");
        assert_eq!(slug("Crème Brûlée 2"), "crme-brle-2");
        assert_eq!(slug("ÉTÉ 2024"), "t-2024");
        assert_eq!(
            Slug::from_name("¡¿ !?"),
            Err(ValueError::NothingToSlug {
                name: "¡¿ !?".to_owned()
            })
        );
        assert_eq!(
            Slug::from_name("日本"),
            Err(ValueError::NothingToSlug {
                name: "日本".to_owned()
            })
        );
    }

    #[test]
    fn slug_from_a_long_name_is_cut_to_a_valid_slug() {
        let name = format!("{} tail", "a".repeat(119));
        let slug = Slug::from_name(&name).unwrap();
        assert_eq!(slug.as_str(), "a".repeat(119));
        assert!(Slug::try_from(slug.as_str()).is_ok());
    }

    #[test]
    fn slug_with_suffix_stays_within_the_limit() {
        let slug = Slug::from_name("Red Shoe!").unwrap();
        assert_eq!(slug.with_suffix(2).as_str(), "red-shoe-2");

        let long = Slug::try_from(format!("{}-b", "a".repeat(117))).unwrap();
        let suffixed = long.with_suffix(12);
        assert_eq!(suffixed.as_str(), format!("{}-12", "a".repeat(117)));
        assert!(Slug::try_from(suffixed.as_str()).is_ok());

        let full = Slug::try_from("a".repeat(120)).unwrap();
        let suffixed = full.with_suffix(u32::MAX);
        assert_eq!(suffixed.as_str().len(), 120);
        assert!(Slug::try_from(suffixed.as_str()).is_ok());
    }

    #[test]
    fn name_is_trimmed_non_empty_and_limited() {
        assert_eq!(Name::try_from("  Red Shoe ").unwrap().as_str(), "Red Shoe");
        assert_eq!(
            Name::try_from(" \t "),
            Err(ValueError::Empty {
                kind: ValueKind::Name
            })
        );
        assert_eq!(
            Name::try_from("a\u{0}b"),
            Err(ValueError::InvalidCharacter {
                kind: ValueKind::Name,
                character: '\u{0}'
            })
        );
        assert!(Name::try_from("é".repeat(200)).is_ok());
        assert_eq!(
            Name::try_from("é".repeat(201)),
            Err(ValueError::TooLong {
                kind: ValueKind::Name,
                max: 200,
                len: 201
            })
        );
        assert!(serde_json::from_str::<Name>("\"\"").is_err());
    }
}
