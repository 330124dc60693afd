#include "ehrgate/outcome.hpp"

#include "ehrgate/json_text.hpp"

namespace ehrgate::outcome {

std::string_view issue_code_for_status(unsigned status) {
    switch (status) {
        case 400:
            return "invalid";
        case 401:
            return "login";
        case 403:
            return "forbidden";
        case 404:
            return "not-found";
        case 405:
            return "not-supported";
        case 409:
            return "conflict";
        case 413:
            return "too-long";
        case 429:
            return "throttled";
        case 503:
            return "transient";
        case 504:
            return "timeout";
        default:
            return status >= 500 ? "exception" : "processing";
    }
}

std::string render(unsigned http_status, std::string_view reason, std::string_view message,
                   std::string_view correlation_id) {
    std::string out;
    out.reserve(320 + message.size());
    out.append(R"({"resourceType":"OperationOutcome","id":)");
    json::append_string(out, correlation_id);
    out.append(R"(,"issue":[{"severity":"error","code":)");
    json::append_string(out, issue_code_for_status(http_status));
    out.append(
        R"(,"details":{"coding":[{"system":"https://ehrgate.dev/fhir/CodeSystem/gateway-reason","code":)");
    json::append_string(out, reason);
    out.append(R"(}],"text":)");
    json::append_string(out, message);
    out.append(R"(},"diagnostics":)");
    json::append_string(out, std::string("correlation-id: ").append(correlation_id));
    out.append("}]}");
    return out;
}

}  // namespace ehrgate::outcome
