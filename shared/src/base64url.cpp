#include "ehrgate/base64url.hpp"

#include <array>
#include <cstdint>

namespace ehrgate::base64url {

namespace {

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

constexpr std::array<int8_t, 256> make_decode_table() {
    std::array<int8_t, 256> table{};
    for (auto &entry : table) {
        entry = -1;
    }
    for (int i = 0; i < 64; ++i) {
        table[static_cast<unsigned char>(kAlphabet[i])] = static_cast<int8_t>(i);
    }
    return table;
}

constexpr std::array<int8_t, 256> kDecode = make_decode_table();

}  // namespace

std::string encode(std::string_view bytes) {
    std::string out;
    out.reserve((bytes.size() * 4 + 2) / 3);
    size_t i = 0;
    for (; i + 3 <= bytes.size(); i += 3) {
        const uint32_t v = (uint32_t{static_cast<uint8_t>(bytes[i])} << 16) |
                           (uint32_t{static_cast<uint8_t>(bytes[i + 1])} << 8) |
                           uint32_t{static_cast<uint8_t>(bytes[i + 2])};
        out.push_back(kAlphabet[(v >> 18) & 63]);
        out.push_back(kAlphabet[(v >> 12) & 63]);
        out.push_back(kAlphabet[(v >> 6) & 63]);
        out.push_back(kAlphabet[v & 63]);
    }
    const size_t rest = bytes.size() - i;
    if (rest > 0) {
        uint32_t v = uint32_t{static_cast<uint8_t>(bytes[i])} << 16;
        if (rest == 2) {
            v |= uint32_t{static_cast<uint8_t>(bytes[i + 1])} << 8;
        }
        out.push_back(kAlphabet[(v >> 18) & 63]);
        out.push_back(kAlphabet[(v >> 12) & 63]);
        if (rest == 2) {
            out.push_back(kAlphabet[(v >> 6) & 63]);
        }
    }
    return out;
}

std::optional<std::string> decode(std::string_view text) {
    if (text.size() % 4 == 1) {
        return std::nullopt;
    }
    // Sized once and written in place: this runs for every segment of every bearer token.
    const size_t tail = text.size() % 4;
    std::string out(text.size() / 4 * 3 + (tail == 0 ? 0 : tail - 1), '\0');
    char *o = out.data();
    const auto *in = reinterpret_cast<const unsigned char *>(text.data());
    size_t i = 0;
    for (; i + 4 <= text.size(); i += 4) {
        const int32_t a = kDecode[in[i]];
        const int32_t b = kDecode[in[i + 1]];
        const int32_t c = kDecode[in[i + 2]];
        const int32_t d = kDecode[in[i + 3]];
        if ((a | b | c | d) < 0) {
            return std::nullopt;
        }
        const uint32_t v =
            (uint32_t(a) << 18) | (uint32_t(b) << 12) | (uint32_t(c) << 6) | uint32_t(d);
        *o++ = static_cast<char>(v >> 16);
        *o++ = static_cast<char>(v >> 8);
        *o++ = static_cast<char>(v);
    }
    if (tail >= 2) {
        const int32_t a = kDecode[in[i]];
        const int32_t b = kDecode[in[i + 1]];
        const int32_t c = tail == 3 ? kDecode[in[i + 2]] : 0;
        if ((a | b | c) < 0) {
            return std::nullopt;
        }
        const uint32_t v = (uint32_t(a) << 18) | (uint32_t(b) << 12) | (uint32_t(c) << 6);
        // Leftover bits must be zero: otherwise two spellings would decode to the same bytes.
        if ((tail == 2 && (v & 0xffff) != 0) || (tail == 3 && (v & 0xff) != 0)) {
            return std::nullopt;
        }
        *o++ = static_cast<char>(v >> 16);
        if (tail == 3) {
            *o++ = static_cast<char>(v >> 8);
        }
    }
    return out;
}

}  // namespace ehrgate::base64url
