//! The `mirage-manager` binary: `create-admin` against a test database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use manager::{
    db,
    test_util::{TestDb, temp_dir},
};

const BIN: &str = env!("CARGO_BIN_EXE_mirage-manager");
const PASSWORD: &str = "a long enough password";

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("manager.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn create_admin(config: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(BIN)
        .arg("create-admin")
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

async fn password_matches(pool: &sqlx::PgPool, username: &str, password: &str) -> bool {
    let (_, hash) = db::users::find_with_hash(pool, username)
        .await
        .unwrap()
        .unwrap();
    manager::auth::password::verify(password, &hash)
}

#[tokio::test]
async fn create_admin_reads_stdin_or_prints_a_generated_password() {
    let db = TestDb::new().await;
    let dir = temp_dir();
    let config = write_config(dir.path(), &format!("database_url = \"{}\"\n", db.url));

    let out = create_admin(
        &config,
        &["--username", "ops", "--password-stdin"],
        Some(&format!("{PASSWORD}\n")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "admin `ops` ready"
    );
    assert!(password_matches(&db.pool, "ops", PASSWORD).await);

    let out = create_admin(&config, &["--username", "gen"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let generated = stdout.trim().rsplit(' ').next().unwrap();
    assert!(stdout.contains("shown once"), "{stdout}");
    assert!(password_matches(&db.pool, "gen", generated).await);

    let out = create_admin(
        &config,
        &["--username", "ops", "--password-stdin"],
        Some(&format!("{PASSWORD}\n")),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reset"));
    let out = create_admin(&config, &["--username", "x", "--password-stdin"], Some(""));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no password on standard input"));
}
