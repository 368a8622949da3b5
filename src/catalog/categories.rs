//! Category routes: the public tree and category pages, and the admin's
//! create and update (rename, new slug, move), written as `Category` commands.

use actix_web::{get, post, put, web, HttpRequest, HttpResponse};
use domain::catalog::CategoryCommand;
use domain::values::{Name, Slug};
use projections::cache::keys;
use projections::catalog_queries::{self, CategoryNode, CategoryPage};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::claims::{self, ClaimKind, SlugWish};
use super::{category_rejection, metadata_for, settle, FieldErrors};
use crate::auth::AuthUser;
use crate::http::extract::Json;
use crate::http::idempotency::IdempotencyKey;
use crate::http::problem::ApiError;
use crate::state::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateCategoryRequest {
    pub name: Option<String>,
    /// Made from the name when absent, with a suffix when taken.
    pub slug: Option<String>,
    /// The parent category; a root category when absent. The tree is at
    /// most 64 levels deep.
    pub parent_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateCategoryRequest {
    pub name: Option<String>,
    pub slug: Option<String>,
    /// A new parent; `null` moves the category to the root. Not one whose
    /// children would be 64 levels down.
    #[serde(default, deserialize_with = "super::absent_null_or")]
    #[schema(value_type = Option<Uuid>)]
    pub parent_id: Option<Option<Uuid>>,
}

/// Moves are serialised across instances by this advisory lock, so two
/// concurrent moves cannot each pass the cycle check against a tree the
/// other is about to change.
const TREE_MOVE_LOCK: i64 = 0x6361_745f_7472_6565; // "cat_tree"

/// The whole category tree.
#[utoipa::path(context_path = SCOPE, tag = "categories", responses((status = 200, body = Vec<CategoryNode>)))]
#[get("/tree")]
pub async fn category_tree(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(catalog_queries::category_tree(&state.pool).await?))
}

/// A category with its parent, its path from the root and its children.
#[utoipa::path(context_path = SCOPE, tag = "categories", params(("slug" = String, Path)), responses(
    (status = 200, body = CategoryPage), (status = 404, body = crate::http::problem::Problem),
))]
#[get("/slug/{slug}")]
pub async fn category_by_slug(
    state: web::Data<AppState>,
    slug: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    catalog_queries::category_by_slug(&state.pool, &slug)
        .await?
        .map(|page| HttpResponse::Ok().json(page))
        .ok_or_else(|| ApiError::not_found("category"))
}

/// Adds a category at the root or under a parent.
#[utoipa::path(context_path = SCOPE, tag = "categories", request_body = CreateCategoryRequest,
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 201, body = CategoryPage),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem),
    (status = 409, body = crate::http::problem::Problem, description = "slug taken"),
    (status = 422, body = crate::http::problem::Problem),
))]
#[post("/create-category")]
pub async fn create_category(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    key: Option<IdempotencyKey>,
    body: Json<CreateCategoryRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    let mut errors = FieldErrors::default();
    let name = errors
        .require("name", body.name)
        .and_then(|name| errors.check("name", Name::try_from(name)));
    let slug = body
        .slug
        .and_then(|slug| errors.check("slug", Slug::try_from(slug)));
    let wish = match (slug, &name) {
        (Some(slug), _) => Some(SlugWish::Exactly(slug)),
        (None, Some(name)) => errors
            .check("slug", Slug::from_name(name.as_str()))
            .map(SlugWish::FromName),
        (None, None) => None,
    };
    errors.into_result()?;
    let (Some(name), Some(wish)) = (name, wish) else {
        return Err(ApiError::invalid_field("name", "is required"));
    };
    if let Some(parent_id) = body.parent_id {
        ensure_parent(&state, parent_id).await?;
    }
    let category_id = key.as_ref().map_or_else(Uuid::now_v7, |key| {
        key.derive_id(user.id, "create-category")
    });
    let claimed = claims::claim(
        &state.pool,
        category_id,
        &[],
        Some((ClaimKind::CategorySlug, wish, "slug")),
    )
    .await?;
    let Some(slug) = claimed.slug.clone() else {
        claims::release(&state.pool, category_id, claimed).await;
        return Err(ApiError::internal(anyhow::anyhow!(
            "slug claim returned no slug"
        )));
    };
    let command = CategoryCommand::Create {
        category_id,
        name,
        slug,
        parent_id: body.parent_id,
    };
    let metadata = metadata_for(&request, &user, key.as_ref());
    let executed = match state
        .categories
        .execute(&category_id.to_string(), command, metadata)
        .await
    {
        Ok(executed) => executed,
        Err(error) => {
            claims::release(&state.pool, category_id, claimed).await;
            return Err(ApiError::from_command(error, category_rejection));
        }
    };
    settle(&state, &[(projections::catalog::NAME, executed.position)]).await?;
    let page = category_page(&state, category_id).await?;
    Ok(HttpResponse::Created().json(page))
}

/// Renames a category, gives it a new slug, or moves it (never under itself
/// or one of its descendants: 409).
#[utoipa::path(context_path = SCOPE, tag = "categories", request_body = UpdateCategoryRequest, params(("id" = Uuid, Path)),
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = CategoryPage),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
    (status = 409, body = crate::http::problem::Problem, description = "slug taken, or the move would make a cycle"),
    (status = 422, body = crate::http::problem::Problem),
))]
#[put("/update-category/{id}")]
pub async fn update_category(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    key: Option<IdempotencyKey>,
    category_id: web::Path<Uuid>,
    body: Json<UpdateCategoryRequest>,
) -> Result<HttpResponse, ApiError> {
    let category_id = category_id.into_inner();
    let body = body.0;
    let mut errors = FieldErrors::default();
    let name = body
        .name
        .and_then(|name| errors.check("name", Name::try_from(name)));
    let slug = body
        .slug
        .and_then(|slug| errors.check("slug", Slug::try_from(slug)));
    errors.into_result()?;
    if !catalog_queries::category_exists(&state.pool, category_id).await? {
        return Err(ApiError::not_found("category"));
    }

    // A move holds the tree lock from the cycle check until its projection
    // has applied it; renames need no lock.
    let mut tree_lock = None;
    let mut ancestors_of_new_parent = Vec::new();
    if let Some(Some(parent_id)) = body.parent_id {
        let mut lock = state.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(TREE_MOVE_LOCK)
            .execute(&mut *lock)
            .await?;
        tree_lock = Some(lock);
        ancestors_of_new_parent = ensure_parent(&state, parent_id).await?;
    }

    let slug_claim = slug
        .clone()
        .map(|slug| (ClaimKind::CategorySlug, SlugWish::Exactly(slug), "slug"));
    let claimed = claims::claim(&state.pool, category_id, &[], slug_claim).await?;
    let command = CategoryCommand::Update {
        name,
        slug,
        parent_id: body.parent_id,
        ancestors_of_new_parent,
    };
    let metadata = metadata_for(&request, &user, key.as_ref());
    let executed = match state
        .categories
        .execute(&category_id.to_string(), command, metadata)
        .await
    {
        Ok(executed) => executed,
        Err(error) => {
            claims::release(&state.pool, category_id, claimed).await;
            return Err(ApiError::from_command(error, category_rejection));
        }
    };
    settle(&state, &[(projections::catalog::NAME, executed.position)]).await?;
    if let Some(lock) = tree_lock {
        lock.commit().await?;
    }
    if executed.position.is_some() {
        state
            .caches
            .catalog
            .invalidate(&keys::category(category_id), executed.version)
            .await;
    }
    let page = category_page(&state, category_id).await?;
    Ok(HttpResponse::Ok().json(page))
}

/// Checks that `parent_id` can take a child: it exists, and the child's
/// ancestors stay fewer than the tree's depth limit, so that every list of
/// ancestors read (whole up to that limit) is whole, and a move's cycle
/// check sees every ancestor. Returns the parent's ancestors.
async fn ensure_parent(state: &AppState, parent_id: Uuid) -> Result<Vec<Uuid>, ApiError> {
    ensure_parent_exists(state, parent_id).await?;
    let ancestors = catalog_queries::category_ancestors(&state.pool, parent_id).await?;
    if ancestors.len() + 1 >= catalog_queries::MAX_CATEGORY_DEPTH {
        return Err(ApiError::invalid_field(
            "parent_id",
            format!(
                "the category tree is at most {} levels deep",
                catalog_queries::MAX_CATEGORY_DEPTH
            ),
        ));
    }
    Ok(ancestors)
}

async fn ensure_parent_exists(state: &AppState, parent_id: Uuid) -> Result<(), ApiError> {
    if catalog_queries::category_exists(&state.pool, parent_id).await? {
        Ok(())
    } else {
        Err(ApiError::invalid_field("parent_id", "no such category"))
    }
}

async fn category_page(state: &AppState, category_id: Uuid) -> Result<CategoryPage, ApiError> {
    catalog_queries::category_page(&state.pool, category_id)
        .await?
        .ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!("category {category_id} is not readable"))
        })
}

/// The prefix of this module's routes, registered as one scope (see
/// [`crate::http::configure`]); utoipa's `context_path` adds it back.
const SCOPE: &str = "/api/v1/categories";

pub fn configure(config: &mut web::ServiceConfig) {
    config.service(
        web::scope(SCOPE)
            .service(category_tree)
            .service(category_by_slug)
            .service(create_category)
            .service(update_category),
    );
}
