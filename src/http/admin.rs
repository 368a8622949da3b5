//! The admin dashboard at `/admin`: one static page and its assets, compiled
//! into the binary so that `commerce serve` needs nothing beside it.
//!
//! The page is public. It signs in through `POST /api/v1/auth/login` and
//! reads the sales and audit API like any other client, so the data behind
//! it is guarded by the same access table as everywhere else. The chart
//! library in `admin/vendor/` comes from the npm registry (`admin/vendor.sh`,
//! pinned by `admin/package-lock.json`); a test checks it byte for byte.

use std::sync::LazyLock;

use actix_web::body::MessageBody;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{get, web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

use super::problem::ApiError;

struct Asset {
    /// The path below `/admin/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("admin/dashboard.js"),
    },
    Asset {
        name: "dashboard.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("admin/dashboard.css"),
    },
    Asset {
        name: "vendor/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("admin/vendor/uPlot.iife.min.js"),
    },
    Asset {
        name: "vendor/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("admin/vendor/uPlot.min.css"),
    },
    Asset {
        name: "vendor/LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("admin/vendor/LICENSE"),
    },
];

const INDEX_HTML: &str = include_str!("admin/index.html");

/// The page links every asset as `/admin/NAME?v=VERSION`, where the version
/// is a hash of the asset: a browser may then keep an asset for good, and a
/// new build's page asks for the new one. The page itself is revalidated on
/// every load (it is small, and it is what names the versions).
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const REVALIDATE: &str = "no-cache";

struct Versioned {
    html: String,
    html_etag: String,
    asset_versions: Vec<String>,
}

static VERSIONED: LazyLock<Versioned> = LazyLock::new(|| {
    let asset_versions: Vec<String> = ASSETS.iter().map(|asset| version(asset.body)).collect();
    let html =
        ASSETS
            .iter()
            .zip(&asset_versions)
            .fold(INDEX_HTML.to_owned(), |html, (asset, version)| {
                html.replace(
                    &format!("\"/admin/{}\"", asset.name),
                    &format!("\"/admin/{}?v={version}\"", asset.name),
                )
            });
    let html_etag = format!("\"{}\"", version(html.as_bytes()));
    Versioned {
        html,
        html_etag,
        asset_versions,
    }
});

/// 16 hex digits of SHA-256: enough to tell two builds of a file apart.
fn version(body: &[u8]) -> String {
    Sha256::digest(body)[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn not_modified(request: &HttpRequest, etag: &str) -> bool {
    request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag))
}

fn respond(
    request: &HttpRequest,
    etag: &str,
    cache_control: &'static str,
    content_type: &'static str,
    body: impl MessageBody + 'static,
) -> HttpResponse {
    let mut response = if not_modified(request, etag) {
        HttpResponse::NotModified().finish()
    } else {
        HttpResponse::Ok().content_type(content_type).body(body)
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    if let Ok(etag) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, etag);
    }
    response
}

/// The dashboard page.
#[get("/admin")]
pub async fn dashboard_page(request: HttpRequest) -> HttpResponse {
    let versioned = &*VERSIONED;
    respond(
        &request,
        &versioned.html_etag,
        REVALIDATE,
        "text/html; charset=utf-8",
        versioned.html.clone(),
    )
}

/// The page's scripts, styles and the chart library's licence.
#[get("/admin/{asset:.*}")]
pub async fn dashboard_asset(
    request: HttpRequest,
    asset: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = asset.into_inner();
    if name.is_empty() {
        return Ok(HttpResponse::PermanentRedirect()
            .insert_header((header::LOCATION, "/admin"))
            .finish());
    }
    let versioned = &*VERSIONED;
    let (asset, version) = ASSETS
        .iter()
        .zip(&versioned.asset_versions)
        .find(|(asset, _)| asset.name == name)
        .ok_or_else(|| ApiError::not_found("dashboard file"))?;
    // Only the URL that names this very build may be kept for good; any
    // other (an old page, a hand-typed URL) must come back and ask.
    let asks_for_this_build = form_urlencoded::parse(request.query_string().as_bytes())
        .any(|(key, value)| key == "v" && value == version.as_str());
    let cache_control = if asks_for_this_build {
        IMMUTABLE
    } else {
        REVALIDATE
    };
    Ok(respond(
        &request,
        &format!("\"{version}\""),
        cache_control,
        asset.content_type,
        asset.body,
    ))
}

pub fn configure(config: &mut web::ServiceConfig) {
    config.service(dashboard_page).service(dashboard_asset);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_every_script_and_stylesheet_by_its_version() {
        let versioned = &*VERSIONED;
        for (asset, version) in ASSETS.iter().zip(&versioned.asset_versions) {
            if asset.name.ends_with(".js") || asset.name.ends_with(".css") {
                let link = format!("\"/admin/{}?v={version}\"", asset.name);
                assert!(versioned.html.contains(&link), "{link} missing");
            }
        }
    }

    #[test]
    fn versions_differ_when_the_bytes_do() {
        assert_eq!(version(b"a").len(), 16);
        assert_ne!(version(b"a"), version(b"b"));
    }
}
