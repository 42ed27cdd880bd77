//! Commands on the connection itself: AUTH, HELLO, CLIENT, SELECT (which keyspace), READONLY,
//! READWRITE and CONSISTENCY (how strongly its requests are confirmed), PING, ECHO, QUIT.

use bytes::Bytes;
use capdb_types::ReadMode;
use capdb_types::mutation::parse_i64_strict;

use super::{Outcome, error_line, syntax};
use crate::resp::Connection;

/// `PING [message]`.
pub(super) fn ping(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    if args.len() > 2 {
        return Err("ERR wrong number of arguments for 'ping' command".into());
    }
    if conn.subscribed_resp2() {
        // Redis answers a subscribed RESP2 client in the shape of a message.
        conn.out.array(2);
        conn.out.bulk(b"pong");
        conn.out.bulk(args.get(1).map_or(&b""[..], |m| &m[..]));
        return Ok(());
    }
    match args.get(1) {
        Some(msg) => conn.out.bulk(msg),
        None => conn.out.simple("PONG"),
    }
    Ok(())
}

/// `ECHO message`.
pub(super) fn echo(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    conn.out.bulk(&args[1]);
    Ok(())
}

/// `QUIT`: answers OK, then the connection closes once its replies are written.
pub(super) fn quit(conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    conn.out.ok();
    conn.quit = true;
    Ok(())
}

/// `AUTH [user] password`.
pub(super) fn auth(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let (user, pass) = match args.len() {
        2 => (None, &args[1]),
        3 => (Some(&args[1]), &args[2]),
        _ => return Err(syntax()),
    };
    authenticate(conn, user, pass)?;
    conn.out.ok();
    Ok(())
}

fn authenticate(conn: &mut Connection, user: Option<&Bytes>, pass: &[u8]) -> Result<(), String> {
    let Some(expected) = &conn.node.config.password else {
        return Err("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?".into());
    };
    let user_ok = user.is_none_or(|u| &u[..] == b"default");
    // Constant-time comparison: the time taken must not reveal how much of the password matched.
    let pass_ok = pass.len() == expected.len()
        && pass
            .iter()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if user_ok && pass_ok {
        conn.authenticated = true;
        Ok(())
    } else {
        Err("WRONGPASS invalid username-password pair or user is disabled.".into())
    }
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`: switches the protocol (2 or 3) and
/// answers the server's description.
pub(super) fn hello(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let mut proto = if conn.out.resp3 { 3 } else { 2 };
    let mut i = 1;
    if let Some(v) = args.get(1) {
        proto = match parse_i64_strict(v) {
            Some(p @ (2 | 3)) => p,
            Some(_) => return Err("NOPROTO unsupported protocol version".into()),
            None => return Err("ERR Protocol version is not an integer or out of range".into()),
        };
        i = 2;
    }
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match &opt[..] {
            b"AUTH" if i + 2 < args.len() => {
                authenticate(conn, Some(&args[i + 1]), &args[i + 2].clone())?;
                i += 3;
            }
            b"SETNAME" if i + 1 < args.len() => {
                set_name(conn, &args[i + 1])?;
                i += 2;
            }
            _ => {
                return Err(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[i])
                ));
            }
        }
    }
    if !conn.authenticated {
        return Err("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time".into());
    }
    conn.out.resp3 = proto == 3;
    conn.out.map(8);
    conn.out.bulk(b"server");
    conn.out.bulk(b"capdb");
    conn.out.bulk(b"version");
    conn.out.bulk(crate::REDIS_COMPAT_VERSION.as_bytes());
    conn.out.bulk(b"proto");
    conn.out.int(proto);
    conn.out.bulk(b"id");
    conn.out.int(conn.id as i64);
    conn.out.bulk(b"mode");
    conn.out.bulk(if conn.cluster_mode {
        b"cluster".as_slice()
    } else {
        b"standalone".as_slice()
    });
    conn.out.bulk(b"role");
    conn.out.bulk(b"master");
    conn.out.bulk(b"modules");
    conn.out.array(0);
    conn.out.bulk(b"capdb_version");
    conn.out.bulk(env!("CARGO_PKG_VERSION").as_bytes());
    Ok(())
}

fn set_name(conn: &mut Connection, name: &Bytes) -> Result<(), String> {
    if name.iter().any(|&b| b <= b' ' || b > b'~') {
        return Err(
            "ERR Client names cannot contain spaces, newlines or special characters.".into(),
        );
    }
    if name.len() > 256 {
        return Err("ERR client name longer than 256 bytes".into());
    }
    conn.name = (!name.is_empty()).then(|| name.clone());
    Ok(())
}

/// `CLIENT SETNAME|GETNAME|ID|SETINFO|INFO|LIST`.
pub(super) fn client(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let sub = args[1].to_ascii_lowercase();
    match (&sub[..], args.len()) {
        (b"setname", 3) => {
            set_name(conn, &args[2])?;
            conn.out.ok();
        }
        (b"getname", 2) => match &conn.name {
            Some(n) => conn.out.bulk(&n.clone()),
            None => conn.out.null(),
        },
        (b"id", 2) => conn.out.int(conn.id as i64),
        (b"setinfo", 4) => {
            let attr = args[2].to_ascii_lowercase();
            match &attr[..] {
                b"lib-name" => conn.lib_name = Some(args[3].clone()),
                b"lib-ver" => {}
                _ => {
                    return Err(format!(
                        "ERR Unrecognized option '{}'",
                        String::from_utf8_lossy(&args[2])
                    ));
                }
            }
            conn.out.ok();
        }
        (b"info", 2) | (b"list", 2) => {
            let line = format!(
                "id={} addr={} name={} db={} lib-name={} resp={}\n",
                conn.id,
                conn.peer,
                conn.name
                    .as_ref()
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default(),
                conn.keyspace.spec.name,
                conn.lib_name
                    .as_ref()
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default(),
                if conn.out.resp3 { 3 } else { 2 },
            );
            conn.out.verbatim(&line);
        }
        (b"setname" | b"getname" | b"id" | b"setinfo" | b"info" | b"list", _) => {
            return Err(format!(
                "ERR wrong number of arguments for 'client|{}' command",
                String::from_utf8_lossy(&sub)
            ));
        }
        _ => {
            return Err(format!(
                "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                String::from_utf8_lossy(&args[1])
            ));
        }
    }
    Ok(())
}

/// `SELECT keyspace`: `0` is the RESP keyspace (`resp_keyspace`), any other name a keyspace of
/// that name (numbers too, so `SELECT 1` works once a keyspace named `1` exists).
pub(super) fn select(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let raw = String::from_utf8_lossy(&args[1]).into_owned();
    let found = if raw == "0" {
        conn.node.resp_keyspace()
    } else {
        conn.node.keyspace(&raw)
    };
    match found {
        Ok(ks) => {
            conn.keyspace = ks;
            conn.out.ok();
        }
        Err(_) if raw.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(format!(
                "ERR DB index is out of range (no keyspace named '{raw}'; create one with that name to select it by number)"
            ));
        }
        Err(e) => return Err(error_line(&e)),
    }
    Ok(())
}

/// `READONLY`: `cp` reads are served stale, by the nearest replica (and, in cluster mode, a
/// replica of this node is not redirected).
pub(super) fn readonly(conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    conn.consistency.cp_read = ReadMode::Stale;
    conn.out.ok();
    Ok(())
}

/// `READWRITE`: back to linearizable `cp` reads.
pub(super) fn readwrite(conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    conn.consistency.cp_read = ReadMode::Linearizable;
    conn.out.ok();
    Ok(())
}

/// `CONSISTENCY [READ|WRITE] [ONE|QUORUM|ALL]`: the levels of `ap` reads and writes on this
/// connection (default ONE for both; QUORUM for both reads your writes). Without a level it
/// reports them; without READ or WRITE it sets both.
pub(super) fn consistency(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    use capdb_ap::Level;
    let upper: Vec<String> = args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
        .collect();
    let parse = |s: &str| -> Result<Level, String> {
        s.parse::<Level>()
            .map_err(|_| format!("ERR consistency level '{s}': expected ONE, QUORUM or ALL"))
    };
    let c = &mut conn.consistency;
    match upper.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => {}
        ["READ", l] => c.ap_read = parse(l)?,
        ["WRITE", l] => c.ap_write = parse(l)?,
        [l] if l != "READ" && l != "WRITE" => {
            let level = parse(l)?;
            c.ap_read = level;
            c.ap_write = level;
        }
        _ => return Err("ERR syntax error: CONSISTENCY [READ|WRITE] [ONE|QUORUM|ALL]".into()),
    }
    if args.len() == 1 {
        let (r, w) = (c.ap_read.as_str(), c.ap_write.as_str());
        conn.out.array(4);
        conn.out.bulk(b"read");
        conn.out.bulk(r.as_bytes());
        conn.out.bulk(b"write");
        conn.out.bulk(w.as_bytes());
    } else {
        conn.out.ok();
    }
    Ok(())
}
