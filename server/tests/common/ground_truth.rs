//! The corpus ground truth (`corpus/MANIFEST.md`, "Ground truth per service"), shared by the
//! server's tests and `bench-detect` (which includes this file by path).

/// (service, files, attackers that must be flagged). From MANIFEST.md "Ground truth per service".
pub const CASES: &[(&str, &[&str], &[&str])] = &[
    (
        "sshd",
        &[
            "sshd/auth.log",
            "sshd/sshd-E-info.log",
            "sshd/sshd-E-verbose.log",
        ],
        &["fd77::66", "10.77.0.67"],
    ),
    (
        "vsftpd",
        &[
            "vsftpd/vsftpd.log",
            "vsftpd/xferlog",
            "vsftpd/syslog-vsftpd.log",
        ],
        &["fd77::66", "10.77.0.67"],
    ),
    ("rsync", &["rsync/rsyncd.log"], &["10.77.0.66"]),
    (
        "mysql",
        &["mysql/general.log", "mysql/error.log"],
        &["10.77.0.67"],
    ),
    (
        "redis",
        &["redis/redis.log", "redis/monitor.log", "redis/acl-log.txt"],
        &["10.77.0.66", "10.77.0.67"],
    ),
    (
        "web",
        &["nginx/access.log", "nginx/error.log"],
        &["10.77.0.66", "10.77.0.67"],
    ),
];

/// Legitimate client addresses in every form the daemons print them.
pub const LEGIT: &[&str] = &["10.77.0.20", "fd77::20", "::ffff:10.77.0.20"];
