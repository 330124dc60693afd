// Minimal JSON text helpers for the few documents we build by hand (OperationOutcome bodies,
// admin replies, JWT claims). Building them directly keeps the nginx worker free of a JSON DOM.
#pragma once

#include <string>
#include <string_view>

namespace ehrgate::json {

// Appends `value` as a quoted JSON string, escaping quotes, backslashes and control characters.
// Bytes >= 0x80 are copied as they are; callers pass UTF-8.
void append_string(std::string &out, std::string_view value);

std::string quote(std::string_view value);

}  // namespace ehrgate::json
