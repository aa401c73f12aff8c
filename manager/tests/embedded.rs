//! The embedded PostgreSQL cluster on its own: first start, restart on the same directory,
//! stale `postmaster.pid`, a second process attaching, and clean stops. Each test has its own
//! cluster in its own temporary directory.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{fs, os::unix::fs::MetadataExt as _, path::Path};

use manager::test_util::{start_cluster, temp_dir};
use sqlx::{Connection as _, Executor as _, PgConnection};

async fn connect(pg: &manager::db::embedded::EmbeddedPostgres) -> PgConnection {
    PgConnection::connect_with(&pg.connect_options("postgres"))
        .await
        .unwrap()
}

fn postmaster_pid(dir: &Path) -> Option<u32> {
    let text = fs::read_to_string(dir.join("postgres/data/postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Whether `pid` runs (a zombie, which an init that does not reap leaves behind, does not).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

#[tokio::test]
async fn restart_keeps_data_without_a_second_initdb() {
    let dir = temp_dir();
    let pg = start_cluster(dir.path());
    assert!(pg.is_owner());
    let mut conn = connect(&pg).await;
    conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
        .await
        .unwrap();
    conn.close().await.unwrap();
    let version = dir.path().join("postgres/data/PG_VERSION");
    let (inode, password) = (
        fs::metadata(&version).unwrap().ino(),
        fs::read_to_string(dir.path().join("postgres/password")).unwrap(),
    );
    let pid = postmaster_pid(dir.path()).unwrap();
    drop(pg);
    assert!(postmaster_pid(dir.path()).is_none(), "stopped cleanly");
    assert!(!alive(pid));

    let pg = start_cluster(dir.path());
    assert_eq!(
        fs::metadata(&version).unwrap().ino(),
        inode,
        "no second initdb"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("postgres/password")).unwrap(),
        password
    );
    let mut conn = connect(&pg).await;
    let v: String = sqlx::query_scalar("SELECT v FROM kept")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "still here");
    conn.close().await.unwrap();
}

#[tokio::test]
async fn files_are_private_and_tcp_is_off() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = temp_dir();
    let pg = start_cluster(dir.path());
    let mode = |p: &str| {
        fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("postgres"), 0o711);
    assert_eq!(mode("postgres/data"), 0o700);
    assert_eq!(mode("postgres/run"), 0o700);
    assert_eq!(mode("postgres/password"), 0o600);
    let mut conn = connect(&pg).await;
    let listen: String = sqlx::query_scalar("SHOW listen_addresses")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(listen, "");
    // Password authentication is on: a wrong password is refused even through the socket.
    let wrong = pg.connect_options("postgres").password("wrong");
    assert!(PgConnection::connect_with(&wrong).await.is_err());
    conn.close().await.unwrap();
}

#[tokio::test]
async fn stale_postmaster_pid_is_removed() {
    let dir = temp_dir();
    drop(start_cluster(dir.path()));
    // A crash leaves postmaster.pid behind; after a reboot its PID may belong to anything, here
    // PID 1, which PostgreSQL alone would take for a live server.
    let pid_file = dir.path().join("postgres/data/postmaster.pid");
    fs::write(&pid_file, "1\n/nowhere\n0\n5432\n\n\n0 0\nready\n").unwrap();
    let pg = start_cluster(dir.path());
    assert_ne!(postmaster_pid(dir.path()), Some(1));
    connect(&pg).await.close().await.unwrap();
}

#[tokio::test]
async fn a_second_process_attaches_and_leaves_the_cluster_running() {
    let dir = temp_dir();
    let owner = start_cluster(dir.path());
    let pid = postmaster_pid(dir.path()).unwrap();
    // Another open of the lock file conflicts just as another process's would.
    let attached = start_cluster(dir.path());
    assert!(!attached.is_owner());
    connect(&attached).await.close().await.unwrap();
    drop(attached);
    assert!(
        alive(pid),
        "the attached handle does not stop the owner's cluster"
    );
    connect(&owner).await.close().await.unwrap();
    drop(owner);
    assert!(!alive(pid));
}
