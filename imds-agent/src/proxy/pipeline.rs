//! One request, phase after phase: limits, validation, the cloud's request rules, decide (the
//! policy's plan, asked once), session tokens, shield and forward, shape or view, audit. Each phase either passes the
//! request on or ends it with a typed refusal, which `refusal` turns into the answer.

use std::time::Instant;

use http::{Request, Response, header};
use hyper::body::Incoming;

use super::{
    Body, Filter,
    admit::Connection,
    audit::{self, Exchange, Outcome},
    decide,
    refusal::Refusal,
    request, shape, shield, tokens,
    view::{self, ViewFailure},
};

pub async fn handle(
    filter: &Filter,
    connection: &Connection,
    request: Request<Incoming>,
) -> Response<Body> {
    let mut exchange = Exchange {
        filter,
        connection,
        method: request.method().as_str(),
        target: request.uri().path(),
        user_agent: request
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
        request_id: audit::next_request_id(),
        started: Instant::now(),
        tokenless: false,
    };
    let _permit = match filter
        .callers
        .limits
        .admit(connection.identity.key(), exchange.started)
    {
        Ok(permit) => permit,
        Err(refusal) => return refuse(&exchange, &Refusal::Limit(refusal)),
    };
    let mut valid = match request::validate(&request) {
        Ok(valid) => valid,
        Err(rejection) => return refuse(&exchange, &Refusal::Invalid(rejection)),
    };
    if let Err(refusal) = filter
        .provider
        .check_request(&valid.path, &valid.headers)
        .and_then(|()| {
            filter
                .provider
                .check_query(connection.original, &valid.params)
        })
    {
        return refuse(&exchange, &Refusal::Protocol(refusal));
    }
    let session = filter.provider.session_tokens();
    let token_request = session.is_some_and(|s| s.is_token_request(&valid.method, &valid.path));
    let carries_token = session.is_some_and(|s| valid.headers.contains_key(s.token_header));
    exchange.tokenless = session.is_some() && !token_request && !carries_token;

    let policy = filter.policy.current();
    let plan = match decide::decide(filter, &policy, connection, &valid) {
        Ok(plan) => plan,
        Err(refusal) => return refuse(&exchange, &refusal),
    };
    let decision = plan.decision;

    let mut would_deny = decision.would_deny;
    let mut requested_ttl = None;
    // Whether the answer may be one shared with other callers (see `shield`).
    let mut shareable = true;
    if let Some(session) = &session {
        if token_request {
            if let Some((max, _)) = plan.tokens.max_ttl {
                tokens::cap_token_ttl(session, &mut valid.headers, max);
            }
            requested_ttl = session.ttl(&valid.headers);
        }
        let bindings = filter
            .settings
            .token_binding
            .then_some(&*filter.callers.tokens);
        let caller = connection.identity.key();
        let mut refused = tokens::token_refusal(session, bindings, caller, &valid, &plan.tokens);
        if matches!(refused, Some((_, tokens::NOT_ISSUED)))
            && filter.callers.tokens.awaiting()
            && filter.callers.tokens.settled(tokens::HANDOVER_WAIT).await
        {
            // An upgrade: the token may be the predecessor's, whose bindings just arrived.
            refused = tokens::token_refusal(session, bindings, caller, &valid, &plan.tokens);
        }
        if let Some((policy, rule)) = refused {
            if !plan.dry_run {
                return refuse(&exchange, &Refusal::Token { policy, rule });
            }
            would_deny = would_deny.or(Some((policy, rule)));
        }
        // Only a token handed out to this caller and still valid vouches for a shared answer.
        shareable = bindings.is_some() && refused.is_none() && carries_token;
    }

    // The headers move into the upstream request; nothing reads them after this.
    let headers = std::mem::take(&mut valid.headers);
    let (mut response, served) = filter
        .shield
        .fetch(filter, connection, &valid, headers, shareable)
        .await;
    if let Some(session) = &session
        && token_request
        && filter.settings.token_binding
        && let Ok(upstream) = response
    {
        let caller = connection.identity.key();
        response = tokens::bind_token(
            &filter.callers.tokens,
            session,
            caller,
            requested_ttl,
            upstream,
        )
        .await;
    }
    let mut view_summary = String::new();
    if let Ok(upstream) = &response
        && shape::is_listing(&valid, upstream)
    {
        let upstream = response.expect("checked above");
        response = shape::filter_listing(upstream, |entry| {
            plan.listing_entry_visible(&valid.path, entry)
        })
        .await;
    } else if let Some(cut) = decision.view.filter(|_| !plan.dry_run)
        && let Ok(upstream) = response
    {
        // A dry run changes no answer: views apply only when enforcing.
        let path = valid.canonical_path();
        response = match view::apply(cut, &valid.method, &path, upstream).await {
            Ok((viewed, summary)) => {
                view_summary = summary;
                Ok(viewed)
            }
            Err(ViewFailure::Upstream(error)) => Err(error),
            Err(ViewFailure::Unservable(reason)) => {
                let refusal = Refusal::Unviewable {
                    policy: decision.policy,
                    rule: decision.rule,
                    reason,
                    explain: filter.settings.explain_denials,
                };
                return refuse(&exchange, &refusal);
            }
        };
    }

    // An audit-mode policy that would have denied is named in the audit line.
    let (verdict, policy_name, rule_name) = match would_deny {
        Some((policy, rule)) => ("would-deny", policy, rule),
        None => ("allow", decision.policy, decision.rule),
    };
    let (response, upstream_status, detail) = match response {
        Ok(response) => {
            // An answer from memory had no upstream status of its own.
            let status = (served != shield::Served::Cache).then_some(response.status());
            let detail = [served.note(), view_summary]
                .into_iter()
                .filter(|note| !note.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            (response, status, detail)
        }
        Err(error) => {
            let refusal = Refusal::Upstream(error);
            let answer = refusal
                .answer(filter.provider, &exchange.request_id)
                .into_response();
            (answer, None, refusal.detail())
        }
    };
    audit::record(
        &exchange,
        &Outcome {
            decision: verdict,
            policy: policy_name,
            rule: rule_name,
            status: response.status(),
            upstream_status,
            detail: &detail,
        },
    );
    response
}

/// Audits a refusal, then answers it.
fn refuse(exchange: &Exchange<'_>, refusal: &Refusal<'_>) -> Response<Body> {
    record_refusal(exchange, refusal);
    refusal
        .answer(exchange.filter.provider, &exchange.request_id)
        .into_response()
}

/// The audit of a refusal that no policy allowed past (limits, malformed requests, denials).
pub fn record_refusal(exchange: &Exchange<'_>, refusal: &Refusal<'_>) {
    let (policy, rule) = refusal.policy_and_rule();
    audit::record(
        exchange,
        &Outcome {
            decision: refusal.decision(),
            policy,
            rule,
            status: refusal.status(),
            upstream_status: None,
            detail: &refusal.detail(),
        },
    );
}
