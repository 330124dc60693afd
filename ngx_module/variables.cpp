// nginx variables for access_log and proxy_set_header.
#include <exception>
#include <string>

#include "module.hpp"

namespace ehrgate::ngx {

namespace {

enum class Field : uintptr_t {
    CorrelationId,
    PolicyVersion,
    Decision,
    DecisionReason,
    WorkerPolicyVersion,
    Client,
    User,
    Patient,
    AuthStatus,
    LimitStatus,
    // Consent (issue 5)
    PurposeOfUse,
    Consent,
    Obligations,
    BreakGlass,
    DecisionCache,
    DecisionId,
    ConsentToken,
};

void set_value(ngx_http_variable_value_t *v, const ngx_str_t &value) {
    if (value.len == 0) {
        v->not_found = 1;
        return;
    }
    v->data = value.data;
    v->len = static_cast<unsigned>(value.len);
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
}

ngx_int_t get_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
                       uintptr_t data) noexcept {
    v->not_found = 1;
    try {
        const auto field = static_cast<Field>(data);
        if (field == Field::WorkerPolicyVersion) {
            const SidecarClient *client = worker_client();
            if (client != nullptr && client->snapshot() != nullptr) {
                const policy::Snapshot *snapshot = client->snapshot();
                const std::string text =
                    snapshot->bundle.version + "#" + std::to_string(snapshot->serial);
                set_value(v, pool_copy(r->pool, text));
                v->no_cacheable = 1;  // a reload may change it within the request
            }
            return NGX_OK;
        }
        // The correlation id exists for every request that asks for it, protected or not, so
        // access logs and upstream headers always carry one.
        RequestCtx *ctx =
            field == Field::CorrelationId
                ? request_ctx(r)
                : static_cast<RequestCtx *>(ngx_http_get_module_ctx(r, ngx_http_ehrgate_module));
        if (ctx == nullptr) {
            return NGX_OK;
        }
        switch (field) {
            case Field::CorrelationId:
                set_value(v, ctx->correlation_id);
                break;
            case Field::PolicyVersion:
                set_value(v, ctx->policy_version);
                break;
            case Field::DecisionReason:
                set_value(v, ctx->reason);
                break;
            case Field::Client:
                set_value(v, ctx->client_id);
                break;
            case Field::User:
                set_value(v, ctx->user);
                break;
            case Field::Patient:
                set_value(v, ctx->patient);
                break;
            case Field::AuthStatus:
                set_value(v, ctx->auth_status);
                break;
            case Field::LimitStatus:
                set_value(v, ctx->limit_status);
                break;
            case Field::Decision: {
                static ngx_str_t permit = ngx_string("permit");
                static ngx_str_t deny = ngx_string("deny");
                static ngx_str_t error = ngx_string("error");
                if (ctx->state == DecisionState::Decided) {
                    set_value(v, ctx->permit ? permit : deny);
                } else if (ctx->state == DecisionState::Failed) {
                    set_value(v, error);
                }
                break;
            }
            case Field::WorkerPolicyVersion:
                break;
            case Field::PurposeOfUse:
                set_value(v, ctx->purpose_of_use);
                break;
            case Field::Consent:
                set_value(v, ctx->consent_ids);
                break;
            case Field::Obligations:
                set_value(v, ctx->obligations);
                break;
            case Field::BreakGlass: {
                static ngx_str_t yes = ngx_string("1");
                if (ctx->break_glass) {
                    set_value(v, yes);
                }
                break;
            }
            case Field::DecisionId:
                set_value(v, ctx->decision_id);
                break;
            case Field::DecisionCache: {
                static ngx_str_t hit = ngx_string("hit");
                static ngx_str_t miss = ngx_string("miss");
                static ngx_str_t bypass = ngx_string("bypass");
                if (ctx->state == DecisionState::Decided || ctx->state == DecisionState::Failed) {
                    set_value(v, ctx->decision_cache == DecisionCacheUse::Hit    ? hit
                                 : ctx->decision_cache == DecisionCacheUse::Miss ? miss
                                                                                 : bypass);
                }
                break;
            }
            case Field::ConsentToken:
                set_value(v, ctx->consent_token);
                break;
        }
    } catch (const std::exception &) {
        return NGX_ERROR;
    }
    return NGX_OK;
}

struct VariableSpec {
    ngx_str_t name;
    Field field;
};

VariableSpec g_variables[] = {
    {ngx_string("ehrgate_correlation_id"), Field::CorrelationId},
    {ngx_string("ehrgate_policy_version"), Field::PolicyVersion},
    {ngx_string("ehrgate_decision"), Field::Decision},
    {ngx_string("ehrgate_decision_reason"), Field::DecisionReason},
    {ngx_string("ehrgate_worker_policy_version"), Field::WorkerPolicyVersion},
    {ngx_string("ehrgate_client"), Field::Client},
    {ngx_string("ehrgate_user"), Field::User},
    {ngx_string("ehrgate_patient"), Field::Patient},
    {ngx_string("ehrgate_auth_status"), Field::AuthStatus},
    {ngx_string("ehrgate_limit_status"), Field::LimitStatus},
    // Consent (issue 5)
    {ngx_string("ehrgate_purpose_of_use"), Field::PurposeOfUse},
    {ngx_string("ehrgate_consent"), Field::Consent},
    {ngx_string("ehrgate_obligations"), Field::Obligations},
    {ngx_string("ehrgate_break_glass"), Field::BreakGlass},
    {ngx_string("ehrgate_decision_cache"), Field::DecisionCache},
    {ngx_string("ehrgate_decision_id"), Field::DecisionId},
    {ngx_string("ehrgate_consent_token"), Field::ConsentToken},
};

}  // namespace

ngx_int_t add_variables(ngx_conf_t *cf) noexcept {
    for (VariableSpec &spec : g_variables) {
        ngx_http_variable_t *var = ngx_http_add_variable(cf, &spec.name, NGX_HTTP_VAR_NOCACHEABLE);
        if (var == nullptr) {
            return NGX_ERROR;
        }
        var->get_handler = get_variable;
        var->data = static_cast<uintptr_t>(spec.field);
    }
    return NGX_OK;
}

}  // namespace ehrgate::ngx
