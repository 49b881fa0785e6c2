//! The decide phase: the policy's plan for one request, asked once (`policy::Plan`: the
//! decision, the token rules, the listing filter). A denial ends the request here, with the
//! explanation when `--explain-denials` asks for it.

use super::{Filter, admit::Connection, refusal::Refusal, request::ValidRequest};
use crate::policy::{Action, Asked, Plan, Versioned};

pub fn decide<'p>(
    filter: &Filter,
    policy: &'p Versioned,
    connection: &'p Connection,
    valid: &ValidRequest,
) -> Result<Plan<'p>, Refusal<'p>> {
    let path = valid.canonical_path();
    let asked = Asked {
        method: valid.method.as_str(),
        path: &path,
        recursive: valid.is_recursive(),
    };
    let plan = policy.plan(&connection.admission, &connection.identity, asked);
    if plan.decision.action != Action::Deny {
        return Ok(plan);
    }
    let explanation = filter
        .settings
        .explain_denials
        .then(|| plan.explanation(asked));
    Err(Refusal::Denied {
        policy: plan.decision.policy,
        rule: plan.decision.rule,
        explanation,
    })
}
