//! Page parameters and the `page` object of every listing.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::problem::ApiError;

pub const DEFAULT_PER_PAGE: u32 = 20;
pub const MAX_PER_PAGE: u32 = 100;
/// Deep offsets are refused rather than scanned.
const MAX_PAGE: u32 = 100_000;

/// `page` starts at 1; `per_page` defaults to 20 and is capped at 100.
#[derive(Debug, Clone, Copy, Deserialize, IntoParams)]
pub struct PageQuery {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

/// Validated paging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub page: u32,
    pub per_page: u32,
}

impl TryFrom<PageQuery> for Paging {
    type Error = ApiError;

    fn try_from(query: PageQuery) -> Result<Self, ApiError> {
        let page = query.page.unwrap_or(1);
        if page == 0 || page > MAX_PAGE {
            return Err(ApiError::bad_field(
                "page",
                format!("must be from 1 to {MAX_PAGE}"),
            ));
        }
        let per_page = match query.per_page {
            None => DEFAULT_PER_PAGE,
            Some(0) => return Err(ApiError::bad_field("per_page", "must be at least 1")),
            Some(n) => n.min(MAX_PER_PAGE),
        };
        Ok(Self { page, per_page })
    }
}

impl Paging {
    pub fn limit(&self) -> i64 {
        i64::from(self.per_page)
    }

    pub fn offset(&self) -> i64 {
        i64::from(self.page - 1) * i64::from(self.per_page)
    }

    pub fn meta(&self, total: u64) -> PageMeta {
        let total_pages = total.div_ceil(u64::from(self.per_page));
        PageMeta {
            page: self.page,
            per_page: self.per_page,
            total,
            total_pages,
            has_next: u64::from(self.page) < total_pages,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PageMeta {
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
    pub total_pages: u64,
    pub has_next: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_caps_and_refusals() {
        let paging = Paging::try_from(PageQuery {
            page: None,
            per_page: None,
        })
        .unwrap();
        assert_eq!((paging.page, paging.per_page), (1, 20));
        let capped = Paging::try_from(PageQuery {
            page: Some(2),
            per_page: Some(500),
        })
        .unwrap();
        assert_eq!((capped.per_page, capped.offset()), (100, 100));
        assert!(Paging::try_from(PageQuery {
            page: Some(0),
            per_page: None
        })
        .is_err());
        assert!(Paging::try_from(PageQuery {
            page: None,
            per_page: Some(0)
        })
        .is_err());
    }

    #[test]
    fn page_meta_counts_pages() {
        let paging = Paging {
            page: 2,
            per_page: 20,
        };
        let meta = paging.meta(153);
        assert_eq!((meta.total_pages, meta.has_next), (8, true));
        assert!(
            !Paging {
                page: 8,
                per_page: 20
            }
            .meta(153)
            .has_next
        );
        assert_eq!(paging.meta(0).total_pages, 0);
    }
}
