// base64url without padding (RFC 4648 section 5), as JOSE uses it.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace ehrgate::base64url {

std::string encode(std::string_view bytes);

// Strict: rejects padding, characters outside the alphabet, impossible lengths and non-zero
// trailing bits, so one token has exactly one accepted spelling.
std::optional<std::string> decode(std::string_view text);

}  // namespace ehrgate::base64url
