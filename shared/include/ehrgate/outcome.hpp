// FHIR OperationOutcome bodies for every error the gateway itself produces.
//
// The caller gets a machine-readable issue code, a fixed human-readable text chosen by us (never
// request data, which may carry PHI), and the correlation id that ties the response to the audit
// record and the logs.
#pragma once

#include <string>
#include <string_view>

namespace ehrgate::outcome {

// FHIR IssueType code for an HTTP status we answer with (e.g. 403 -> "forbidden").
std::string_view issue_code_for_status(unsigned status);

// {"resourceType":"OperationOutcome","id":<correlation>,"issue":[{...}]}. `reason` is our
// machine-readable reason (e.g. "policy-unavailable"), carried in issue.details.coding.
std::string render(unsigned http_status, std::string_view reason, std::string_view message,
                   std::string_view correlation_id);

}  // namespace ehrgate::outcome
