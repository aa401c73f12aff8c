//! The first admin: `mirage-manager create-admin`, and the random admin password printed once at
//! the first start of an empty database. There is no default password.

use sqlx::PgPool;

use crate::{
    auth::{Role, normalize_username, password, validate_username},
    db::{self, audit_log::Actor, users::Changes, users::User},
};

/// The username of the admin created at first start.
pub const FIRST_ADMIN: &str = "admin";

/// Errors creating an admin.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The username or password is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The user exists and no reset was asked for.
    #[error("user `{0}` exists; pass --reset to make it an enabled admin with a new password")]
    Exists(String),
    /// Hashing failed.
    #[error(transparent)]
    Hash(#[from] password::HashError),
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

/// The admin created or reset, and the password when it was generated (to show once).
#[derive(Debug)]
pub struct CreatedAdmin {
    /// The user.
    pub user: User,
    /// The generated password, if none was given.
    pub generated_password: Option<String>,
}

/// Creates admin `username` with `password` (or a generated one). With `reset`, an existing user
/// of that name becomes an enabled admin with the new password, and its sessions end.
pub async fn create_admin(
    pool: &PgPool,
    username: &str,
    password: Option<String>,
    reset: bool,
) -> Result<CreatedAdmin, AdminError> {
    let username = normalize_username(username);
    validate_username(&username).map_err(AdminError::Invalid)?;
    let (password, generated) = match password {
        Some(p) => {
            password::validate(&p).map_err(AdminError::Invalid)?;
            (p, false)
        }
        None => (password::generate(), true),
    };
    let hash = password::hash_async(password.clone()).await?;
    let mut tx = pool.begin().await?;
    let existing = db::users::find_with_hash(&mut *tx, &username).await?;
    let user = match existing {
        None => db::users::insert(&mut *tx, &username, &hash, Role::Admin).await?,
        Some(_) if !reset => return Err(AdminError::Exists(username)),
        Some((user, _)) => {
            let changes = Changes {
                role: Some(Role::Admin),
                disabled: Some(false),
                password_hash: Some(hash),
            };
            db::sessions::delete_for_user(&mut *tx, user.id).await?;
            db::users::update(&mut *tx, user.id, &changes)
                .await?
                .ok_or_else(|| AdminError::Database(sqlx::Error::RowNotFound))?
        }
    };
    let action = if reset {
        "user.reset_admin"
    } else {
        "user.create"
    };
    db::audit_log::record(
        &mut *tx,
        &Actor::cli(),
        action,
        Some(&format!("user:{username}")),
        serde_json::json!({ "id": user.id, "role": "admin" }),
    )
    .await?;
    tx.commit().await?;
    Ok(CreatedAdmin {
        user,
        generated_password: generated.then_some(password),
    })
}

/// When the database has no user at all, creates admin [`FIRST_ADMIN`] with a random password
/// and returns it (for the caller to print once; only its hash is stored). `None` when there are
/// users already, or another replica created the first admin at the same moment.
pub async fn bootstrap_admin(pool: &PgPool) -> Result<Option<(User, String)>, AdminError> {
    if db::users::count(pool).await? > 0 {
        return Ok(None);
    }
    let password = password::generate();
    let hash = password::hash_async(password.clone()).await?;
    let mut tx = pool.begin().await?;
    let Some(user) = db::users::insert_first_admin(&mut *tx, FIRST_ADMIN, &hash).await? else {
        return Ok(None);
    };
    db::audit_log::record(
        &mut *tx,
        &Actor::system(),
        "user.create",
        Some(&format!("user:{FIRST_ADMIN}")),
        serde_json::json!({ "id": user.id, "role": "admin", "first_start": true }),
    )
    .await?;
    tx.commit().await?;
    Ok(Some((user, password)))
}
