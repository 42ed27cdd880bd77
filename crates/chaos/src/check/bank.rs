//! The bank workload's checker: money moves between accounts but is never made or lost.
//!
//! The history holds one setup record (`write` of `{"accounts": N, "balance": B}`, written
//! before the clock starts, so the total is `N * B`), transfers (`WATCH a b`, `GET a`, `GET b`,
//! then `MULTI`, `DECRBY a x`, `INCRBY b x`, `EXEC`) and reads of every account in one
//! `MULTI`/`EXEC`. A transfer moves money from one account to another atomically or not at
//! all, and a read sees one state of the whole bank, so under snapshot isolation or anything
//! stronger **every successful read sums to the total**; since a transfer is only sent when the
//! balance read under `WATCH` allows it, and `WATCH` aborts it if that balance changed before
//! `EXEC`, **no balance is ever negative**. The final read, made after every fault healed, must
//! succeed and pass both checks too (a cluster that lost money at rest fails even when no read
//! during the run happened to catch it).
//!
//! What this needs no outcome for: the checks look only at reads, so a transfer whose outcome
//! is unknown (`info`: `-UNCERTAIN`, a timeout after `EXEC` was sent) is harmless whichever way
//! it went. Transfer outcomes are counted for the report, not judged.
//!
//! What it does not catch, and why that is acceptable: a read that returns an old but
//! consistent state (a stale read) sums correctly, and two transfers serialised in an order
//! real time forbids leave no trace in sums. Those are the list-append checker's job
//! (`check::append`); the bank is the classic, cheap detector of torn transactions (a read
//! that sees half a transfer) and of lost `WATCH` conflicts (an overdrawn account).

use serde::Serialize;
use serde_json::{Value as Json, json};

use crate::history::{F, Op, Stage};

/// Bad reads reported in full at most; the rest are counted.
const BAD_READS_SHOWN_MAX: usize = 20;

/// What one read of the whole bank got wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadRead {
    pub process: u64,
    pub node: u32,
    pub invoke_ns: u64,
    pub complete_ns: Option<u64>,
    pub final_read: bool,
    /// The balances read, account by account (`null`: the account was missing).
    pub balances: Json,
    /// Their sum (missing accounts count 0).
    pub sum: i64,
    /// Why it is wrong, e.g. `sums to 158, not 160` or `bank:3 is -4`.
    pub reasons: Vec<String>,
}

/// How the transfers ended, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Transfers {
    /// EXEC committed the transfer.
    pub committed: usize,
    /// The balance read under WATCH was too small: nothing was sent.
    pub declined: usize,
    /// Certainly not applied (EXEC nil after a watched key changed, or an error before EXEC).
    pub failed: usize,
    /// Unknown outcome (an error or a timeout after EXEC was sent).
    pub uncertain: usize,
}

/// The checker's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BankResult {
    pub accounts: usize,
    pub total: i64,
    /// Successful reads checked (final reads included).
    pub reads: usize,
    pub transfers: Transfers,
    /// Whether a final read succeeded.
    pub final_read: bool,
    /// Reads that broke an invariant: the first [`BAD_READS_SHOWN_MAX`] of them.
    pub bad_reads: Vec<BadRead>,
    /// How many reads broke an invariant in all.
    pub bad_reads_total: usize,
}

impl BankResult {
    pub fn valid(&self) -> bool {
        self.bad_reads_total == 0 && self.final_read
    }

    /// One line per problem, for people.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(first) = self.bad_reads.first() {
            let more = if self.bad_reads_total > 1 {
                format!(" ({} bad reads in all)", self.bad_reads_total)
            } else {
                String::new()
            };
            out.push(format!(
                "bank: a {}read (process {} via node {}) saw {}: {}{more}",
                if first.final_read { "final " } else { "" },
                first.process,
                first.node,
                first.balances,
                first.reasons.join(", ")
            ));
        }
        if let Some(last) = self.bad_reads.iter().rev().find(|r| r.final_read)
            && !self.bad_reads.first().is_some_and(|f| f.final_read)
        {
            out.push(format!(
                "bank: the final read saw {}: {}",
                last.balances,
                last.reasons.join(", ")
            ));
        }
        if !self.final_read {
            out.push(
                "bank: no final read succeeded after the heal (the cluster did not recover)".into(),
            );
        }
        out
    }
}

/// The bank's shape as the setup record gives it.
struct Setup {
    accounts: usize,
    balance: i64,
}

/// Checks the `bank` workload's operations. Errors are malformed histories (no setup record,
/// a read of the wrong shape), not violations.
pub fn check(ops: &[&Op]) -> Result<BankResult, String> {
    let setup = setup(ops)?;
    let total = setup.balance * setup.accounts as i64;
    let mut result = BankResult {
        accounts: setup.accounts,
        total,
        reads: 0,
        transfers: Transfers::default(),
        final_read: false,
        bad_reads: Vec::new(),
        bad_reads_total: 0,
    };
    for op in ops {
        match (op.f, op.outcome) {
            (F::Read, Stage::Ok) => {
                result.reads += 1;
                result.final_read |= op.final_read;
                if let Some(bad) = judge_read(op, setup.accounts, total)? {
                    result.bad_reads_total += 1;
                    if result.bad_reads.len() < BAD_READS_SHOWN_MAX || bad.final_read {
                        result.bad_reads.push(bad);
                    }
                }
            }
            (F::Transfer, Stage::Ok) if op.result == json!(true) => result.transfers.committed += 1,
            (F::Transfer, Stage::Ok) => result.transfers.declined += 1,
            (F::Transfer, Stage::Fail) => result.transfers.failed += 1,
            (F::Transfer, _) => result.transfers.uncertain += 1,
            _ => {}
        }
    }
    Ok(result)
}

/// The one successful setup record.
fn setup(ops: &[&Op]) -> Result<Setup, String> {
    let mut setups = ops
        .iter()
        .filter(|o| o.f == F::Write && o.outcome == Stage::Ok);
    let Some(op) = setups.next() else {
        return Err("bank: no successful setup record (write of the initial balances)".into());
    };
    if setups.next().is_some() {
        return Err("bank: more than one setup record".into());
    }
    let accounts = op.value["accounts"].as_u64().filter(|n| *n >= 2);
    let balance = op.value["balance"].as_i64().filter(|b| *b >= 0);
    match (accounts, balance) {
        (Some(accounts), Some(balance)) => Ok(Setup {
            accounts: accounts as usize,
            balance,
        }),
        _ => Err(format!(
            "bank: malformed setup record {} (want {{\"accounts\": N >= 2, \"balance\": B >= 0}})",
            op.value
        )),
    }
}

/// A successful read's problems, if it has any.
fn judge_read(op: &Op, accounts: usize, total: i64) -> Result<Option<BadRead>, String> {
    let balances = op
        .result
        .as_array()
        .filter(|b| b.len() == accounts)
        .ok_or_else(|| {
            format!(
                "bank: a read (process {}) returned {}, not {accounts} balances",
                op.process, op.result
            )
        })?;
    let mut reasons = Vec::new();
    let mut sum: i64 = 0;
    for (account, b) in balances.iter().enumerate() {
        match b {
            Json::Null => reasons.push(format!("bank:{account} is missing")),
            b => match b.as_i64() {
                Some(v) => {
                    sum = sum.saturating_add(v);
                    if v < 0 {
                        reasons.push(format!("bank:{account} is {v}"));
                    }
                }
                None => reasons.push(format!("bank:{account} holds {b}, not an integer")),
            },
        }
    }
    if sum != total {
        reasons.insert(0, format!("sums to {sum}, not {total}"));
    }
    if reasons.is_empty() {
        return Ok(None);
    }
    Ok(Some(BadRead {
        process: op.process,
        node: op.node,
        invoke_ns: op.invoke_ns,
        complete_ns: op.complete_ns,
        final_read: op.final_read,
        balances: op.result.clone(),
        sum,
        reasons,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Workload;

    fn op(f: F, value: Json, outcome: Stage, result: Json) -> Op {
        Op {
            process: 1,
            node: 2,
            role: None,
            workload: Workload::Bank,
            f,
            key: "bank".into(),
            value,
            invoke_ns: 0,
            complete_ns: Some(1),
            outcome,
            result,
            error: None,
            final_read: false,
        }
    }

    /// Three accounts of 10 each: the total is 30.
    fn setup() -> Op {
        op(
            F::Write,
            json!({"accounts": 3, "balance": 10}),
            Stage::Ok,
            Json::Null,
        )
    }

    fn read(balances: Json) -> Op {
        op(F::Read, Json::Null, Stage::Ok, balances)
    }

    fn final_read(balances: Json) -> Op {
        Op {
            final_read: true,
            ..read(balances)
        }
    }

    fn transfer(outcome: Stage, result: Json) -> Op {
        op(
            F::Transfer,
            json!({"from": 0, "to": 1, "amount": 4}),
            outcome,
            result,
        )
    }

    fn run(ops: &[Op]) -> BankResult {
        check(&ops.iter().collect::<Vec<_>>()).expect("well-formed history")
    }

    #[test]
    fn reads_that_always_sum_to_the_total_are_valid() {
        let r = run(&[
            setup(),
            read(json!([10, 10, 10])),
            transfer(Stage::Ok, json!(true)),
            read(json!([6, 14, 10])),
            transfer(Stage::Ok, json!(false)),
            transfer(Stage::Fail, Json::Null),
            transfer(Stage::Info, Json::Null),
            final_read(json!([0, 14, 16])),
        ]);
        assert!(r.valid(), "{:?}", r.problems());
        assert_eq!(r.total, 30);
        assert_eq!(r.reads, 3);
        assert_eq!(
            r.transfers,
            Transfers {
                committed: 1,
                declined: 1,
                failed: 1,
                uncertain: 1
            }
        );
    }

    #[test]
    fn a_read_that_sees_half_a_transfer_is_caught() {
        // The DECRBY applied, the INCRBY not yet: 4 missing.
        let r = run(&[
            setup(),
            read(json!([6, 10, 10])),
            final_read(json!([6, 14, 10])),
        ]);
        assert!(!r.valid());
        assert_eq!(r.bad_reads_total, 1);
        assert_eq!(r.bad_reads[0].sum, 26);
        assert_eq!(
            r.problems(),
            vec!["bank: a read (process 1 via node 2) saw [6,10,10]: sums to 26, not 30"]
        );
    }

    #[test]
    fn an_overdrawn_account_is_caught_even_when_the_sum_is_right() {
        // Two transfers of 8 out of account 0 both passed their balance check: WATCH lost.
        let r = run(&[setup(), final_read(json!([-6, 18, 18]))]);
        assert!(!r.valid());
        assert_eq!(
            r.problems(),
            vec!["bank: a final read (process 1 via node 2) saw [-6,18,18]: bank:0 is -6"]
        );
    }

    #[test]
    fn a_missing_account_is_caught() {
        let r = run(&[setup(), final_read(json!([10, null, 10]))]);
        assert!(!r.valid());
        assert_eq!(
            r.bad_reads[0].reasons,
            vec!["sums to 20, not 30", "bank:1 is missing"]
        );
    }

    #[test]
    fn a_bad_final_read_is_named_after_the_first_bad_read() {
        let r = run(&[
            setup(),
            read(json!([9, 10, 10])),
            read(json!([9, 10, 10])),
            final_read(json!([9, 10, 10])),
        ]);
        assert_eq!(r.bad_reads_total, 3);
        assert_eq!(
            r.problems(),
            vec![
                "bank: a read (process 1 via node 2) saw [9,10,10]: sums to 29, not 30 (3 bad reads in all)",
                "bank: the final read saw [9,10,10]: sums to 29, not 30",
            ]
        );
    }

    #[test]
    fn without_a_successful_final_read_the_run_is_not_valid() {
        let failed_final = Op {
            final_read: true,
            ..op(F::Read, Json::Null, Stage::Fail, Json::Null)
        };
        let r = run(&[setup(), read(json!([10, 10, 10])), failed_final]);
        assert!(!r.valid());
        assert_eq!(
            r.problems(),
            vec!["bank: no final read succeeded after the heal (the cluster did not recover)"]
        );
    }

    #[test]
    fn failed_reads_say_nothing() {
        let failed = op(F::Read, Json::Null, Stage::Fail, Json::Null);
        let r = run(&[setup(), failed, final_read(json!([10, 10, 10]))]);
        assert!(r.valid());
        assert_eq!(r.reads, 1);
    }

    #[test]
    fn a_history_without_its_setup_or_with_misshapen_reads_is_malformed() {
        let ops = [read(json!([10, 10, 10]))];
        let err = check(&ops.iter().collect::<Vec<_>>()).unwrap_err();
        assert!(err.contains("no successful setup record"), "{err}");
        let ops = [setup(), read(json!([10, 10]))];
        let err = check(&ops.iter().collect::<Vec<_>>()).unwrap_err();
        assert!(err.contains("not 3 balances"), "{err}");
    }
}
