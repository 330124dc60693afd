#include "ehrgate/json.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <new>
#include <system_error>

namespace ehrgate::json {

namespace {

// Objects up to this size are checked for duplicate keys as each key arrives (exact offset, no
// extra memory); larger ones are sorted once when they close, so a document of many keys stays
// O(n log n) instead of quadratic.
constexpr size_t kLinearDuplicateCheck = 16;

constexpr size_t kInitialMembers = 8;

// Error messages quote at most this much of a key.
constexpr size_t kMaxQuotedKey = 64;

std::string hex_byte(unsigned char byte) {
    static constexpr char kHex[] = "0123456789ABCDEF";
    std::string out = "0x";
    out.push_back(kHex[byte >> 4]);
    out.push_back(kHex[byte & 0xf]);
    return out;
}

// Printable rendering of a key for an error message: keys come from untrusted documents and end
// up in logs.
std::string printable_key(std::string_view key) {
    std::string out = "\"";
    for (size_t i = 0; i < key.size() && i < kMaxQuotedKey; ++i) {
        const auto byte = static_cast<unsigned char>(key[i]);
        if (byte >= 0x20 && byte < 0x7f && byte != '"' && byte != '\\') {
            out.push_back(static_cast<char>(byte));
        } else {
            out += "\\x";
            out += hex_byte(byte).substr(2);
        }
    }
    out += key.size() > kMaxQuotedKey ? "\"..." : "\"";
    return out;
}

std::string describe_char(char ch) {
    const auto byte = static_cast<unsigned char>(ch);
    if (byte > 0x20 && byte < 0x7f) {
        return std::string("'") + ch + "'";
    }
    return "byte " + hex_byte(byte);
}

void append_utf8(std::string &out, uint32_t cp) {
    if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xc0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
        out.push_back(static_cast<char>(0xe0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else {
        out.push_back(static_cast<char>(0xf0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    }
}

int hex_value(char ch) {
    if (ch >= '0' && ch <= '9') {
        return ch - '0';
    }
    if (ch >= 'a' && ch <= 'f') {
        return ch - 'a' + 10;
    }
    if (ch >= 'A' && ch <= 'F') {
        return ch - 'A' + 10;
    }
    return -1;
}

bool is_digit(char ch) {
    return ch >= '0' && ch <= '9';
}

// Bytes a string can contain as they are: printable ASCII except the quote and the backslash.
constexpr std::array<bool, 256> kPlainStringByte = [] {
    std::array<bool, 256> table{};
    for (int byte = 0x20; byte < 0x80; ++byte) {
        table[byte] = byte != '"' && byte != '\\';
    }
    return table;
}();

class Parser {
  public:
    Parser(std::string_view text, size_t max_depth) : text_(text), max_depth_(max_depth) {}

    std::optional<Value> run() {
        skip_whitespace();
        std::optional<Value> value = parse_value(0);
        if (!value) {
            return std::nullopt;
        }
        skip_whitespace();
        if (pos_ != text_.size()) {
            return fail(ParseErrorCode::TrailingData, pos_,
                        "trailing data after the JSON value: " + describe_char(text_[pos_]));
        }
        return value;
    }

    ParseError take_error() { return std::move(error_); }

  private:
    std::nullopt_t fail(ParseErrorCode code, size_t offset, std::string message) {
        error_.code = code;
        error_.offset = offset;
        error_.message = std::move(message);
        return std::nullopt;
    }

    std::nullopt_t fail_unexpected(std::string_view expected) {
        if (pos_ >= text_.size()) {
            return fail(ParseErrorCode::UnexpectedEnd, pos_,
                        "unexpected end of input, expected " + std::string(expected));
        }
        return fail(
            ParseErrorCode::UnexpectedCharacter, pos_,
            "unexpected " + describe_char(text_[pos_]) + ", expected " + std::string(expected));
    }

    void skip_whitespace() {
        while (pos_ < text_.size()) {
            const char ch = text_[pos_];
            if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r') {
                return;
            }
            ++pos_;
        }
    }

    bool consume_literal(std::string_view literal) {
        if (text_.substr(pos_, literal.size()) != literal) {
            return false;
        }
        pos_ += literal.size();
        return true;
    }

    std::optional<Value> parse_value(size_t depth) {
        if (pos_ >= text_.size()) {
            return fail_unexpected("a value");
        }
        switch (text_[pos_]) {
            case '{':
                return parse_object(depth + 1);
            case '[':
                return parse_array(depth + 1);
            case '"': {
                std::optional<std::string> s = parse_string();
                if (!s) {
                    return std::nullopt;
                }
                return Value::from_string(std::move(*s));
            }
            case 't':
                if (consume_literal("true")) {
                    return Value::from_bool(true);
                }
                break;
            case 'f':
                if (consume_literal("false")) {
                    return Value::from_bool(false);
                }
                break;
            case 'n':
                if (consume_literal("null")) {
                    return Value();
                }
                break;
            case 'N':
            case 'I':
                return fail(ParseErrorCode::InvalidNumber, pos_, "NaN and Infinity are not JSON");
            default:
                if (text_[pos_] == '-' || is_digit(text_[pos_])) {
                    return parse_number();
                }
                break;
        }
        return fail_unexpected("a value");
    }

    std::optional<Value> parse_array(size_t depth) {
        if (depth > max_depth_) {
            return fail(ParseErrorCode::TooDeep, pos_,
                        "nesting deeper than " + std::to_string(max_depth_) + " levels");
        }
        ++pos_;  // '['
        Value::Array items;
        skip_whitespace();
        if (pos_ < text_.size() && text_[pos_] == ']') {
            ++pos_;
            return Value::from_array(std::move(items));
        }
        for (;;) {
            skip_whitespace();
            std::optional<Value> item = parse_value(depth);
            if (!item) {
                return std::nullopt;
            }
            items.push_back(std::move(*item));
            skip_whitespace();
            if (pos_ < text_.size() && text_[pos_] == ',') {
                ++pos_;
                continue;
            }
            if (pos_ < text_.size() && text_[pos_] == ']') {
                ++pos_;
                return Value::from_array(std::move(items));
            }
            return fail_unexpected("',' or ']' in array");
        }
    }

    std::optional<Value> parse_object(size_t depth) {
        if (depth > max_depth_) {
            return fail(ParseErrorCode::TooDeep, pos_,
                        "nesting deeper than " + std::to_string(max_depth_) + " levels");
        }
        ++pos_;  // '{'
        Value::Object members;
        // Key offsets are only needed to report a duplicate found by the sort below; the first
        // kLinearDuplicateCheck live on the stack.
        size_t first_key_offsets[kLinearDuplicateCheck];
        std::vector<size_t> more_key_offsets;
        skip_whitespace();
        if (pos_ < text_.size() && text_[pos_] == '}') {
            ++pos_;
            return Value::from_object(std::move(members));
        }
        // A JWT header or claim set has a handful to a dozen members: one allocation up front
        // instead of four regrowths. Only for the outermost object, so a document of many tiny
        // objects cannot multiply its size by the reservation.
        if (depth == 1) {
            members.reserve(kInitialMembers);
        }
        for (;;) {
            skip_whitespace();
            if (pos_ >= text_.size() || text_[pos_] != '"') {
                return fail_unexpected("a string object key");
            }
            const size_t key_offset = pos_;
            std::optional<std::string> key = parse_string();
            if (!key) {
                return std::nullopt;
            }
            if (members.size() < kLinearDuplicateCheck) {
                for (const auto &member : members) {
                    if (member.first == *key) {
                        return duplicate(key_offset, *key);
                    }
                }
            }
            skip_whitespace();
            if (pos_ >= text_.size() || text_[pos_] != ':') {
                return fail_unexpected("':' after object key");
            }
            ++pos_;
            skip_whitespace();
            std::optional<Value> value = parse_value(depth);
            if (!value) {
                return std::nullopt;
            }
            if (members.size() < kLinearDuplicateCheck) {
                first_key_offsets[members.size()] = key_offset;
            } else {
                more_key_offsets.push_back(key_offset);
            }
            members.emplace_back(std::move(*key), std::move(*value));
            skip_whitespace();
            if (pos_ < text_.size() && text_[pos_] == ',') {
                ++pos_;
                continue;
            }
            if (pos_ < text_.size() && text_[pos_] == '}') {
                ++pos_;
                break;
            }
            return fail_unexpected("',' or '}' in object");
        }
        if (members.size() > kLinearDuplicateCheck) {
            std::vector<size_t> order(members.size());
            for (size_t i = 0; i < order.size(); ++i) {
                order[i] = i;
            }
            std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
                const int c = members[a].first.compare(members[b].first);
                return c < 0 || (c == 0 && a < b);
            });
            // Report the earliest second occurrence, as the linear check would have.
            size_t worst = members.size();
            for (size_t i = 1; i < order.size(); ++i) {
                if (members[order[i]].first == members[order[i - 1]].first) {
                    worst = std::min(worst, order[i]);
                }
            }
            if (worst != members.size()) {
                const size_t offset = worst < kLinearDuplicateCheck
                                          ? first_key_offsets[worst]
                                          : more_key_offsets[worst - kLinearDuplicateCheck];
                return duplicate(offset, members[worst].first);
            }
        }
        return Value::from_object(std::move(members));
    }

    std::nullopt_t duplicate(size_t offset, const std::string &key) {
        return fail(ParseErrorCode::DuplicateKey, offset,
                    "duplicate object key " + printable_key(key));
    }

    std::optional<uint32_t> parse_hex4() {
        if (text_.size() - pos_ < 4) {
            return fail(ParseErrorCode::InvalidEscape, pos_,
                        "\\u escape needs four hexadecimal digits");
        }
        uint32_t value = 0;
        for (size_t i = 0; i < 4; ++i) {
            const int digit = hex_value(text_[pos_ + i]);
            if (digit < 0) {
                return fail(ParseErrorCode::InvalidEscape, pos_ + i,
                            "\\u escape needs four hexadecimal digits, got " +
                                describe_char(text_[pos_ + i]));
            }
            value = (value << 4) | static_cast<uint32_t>(digit);
        }
        pos_ += 4;
        return value;
    }

    // Validates one UTF-8 sequence starting at pos_ (first byte >= 0x80) and appends it.
    bool copy_utf8_sequence(std::string &out) {
        const size_t start = pos_;
        const auto lead = static_cast<unsigned char>(text_[pos_]);
        size_t length = 0;
        unsigned char min_second = 0x80;
        unsigned char max_second = 0xbf;
        if (lead >= 0xc2 && lead <= 0xdf) {
            length = 2;
        } else if (lead >= 0xe0 && lead <= 0xef) {
            length = 3;
            if (lead == 0xe0) {
                min_second = 0xa0;  // below: overlong
            } else if (lead == 0xed) {
                max_second = 0x9f;  // above: UTF-16 surrogates
            }
        } else if (lead >= 0xf0 && lead <= 0xf4) {
            length = 4;
            if (lead == 0xf0) {
                min_second = 0x90;  // below: overlong
            } else if (lead == 0xf4) {
                max_second = 0x8f;  // above: beyond U+10FFFF
            }
        } else {
            std::string why = lead == 0xc0 || lead == 0xc1 ? "overlong UTF-8 encoding"
                              : lead >= 0xf5               ? "UTF-8 byte beyond U+10FFFF"
                                                           : "invalid UTF-8 start byte";
            fail(ParseErrorCode::InvalidUtf8, start, why + " " + hex_byte(lead) + " in string");
            return false;
        }
        if (text_.size() - start < length) {
            fail(ParseErrorCode::InvalidUtf8, start, "truncated UTF-8 sequence in string");
            return false;
        }
        for (size_t i = 1; i < length; ++i) {
            const auto byte = static_cast<unsigned char>(text_[start + i]);
            const unsigned char lo = i == 1 ? min_second : 0x80;
            const unsigned char hi = i == 1 ? max_second : 0xbf;
            if (byte < lo || byte > hi) {
                std::string why = "invalid UTF-8 continuation byte";
                if (i == 1 && byte >= 0x80 && byte <= 0xbf) {
                    why = lead == 0xed   ? "UTF-8 encoded surrogate"
                          : lead == 0xf4 ? "UTF-8 code point beyond U+10FFFF"
                                         : "overlong UTF-8 encoding";
                }
                fail(ParseErrorCode::InvalidUtf8, start + i,
                     why + " " + hex_byte(byte) + " in string");
                return false;
            }
        }
        out.append(text_.data() + start, length);
        pos_ = start + length;
        return true;
    }

    bool parse_escape(std::string &out) {
        const size_t start = pos_;  // at the backslash
        ++pos_;
        if (pos_ >= text_.size()) {
            fail(ParseErrorCode::UnexpectedEnd, pos_, "unexpected end of input in string escape");
            return false;
        }
        const char ch = text_[pos_++];
        switch (ch) {
            case '"':
            case '\\':
            case '/':
                out.push_back(ch);
                return true;
            case 'b':
                out.push_back('\b');
                return true;
            case 'f':
                out.push_back('\f');
                return true;
            case 'n':
                out.push_back('\n');
                return true;
            case 'r':
                out.push_back('\r');
                return true;
            case 't':
                out.push_back('\t');
                return true;
            case 'u':
                break;
            default:
                fail(ParseErrorCode::InvalidEscape, start,
                     "invalid escape \\" + describe_char(ch) + " in string");
                return false;
        }
        std::optional<uint32_t> unit = parse_hex4();
        if (!unit) {
            return false;
        }
        uint32_t cp = *unit;
        if (cp >= 0xdc00 && cp <= 0xdfff) {
            fail(ParseErrorCode::LoneSurrogate, start, "lone low surrogate escape in string");
            return false;
        }
        if (cp >= 0xd800 && cp <= 0xdbff) {
            if (text_.substr(pos_, 2) != "\\u") {
                fail(ParseErrorCode::LoneSurrogate, start,
                     "high surrogate escape not followed by a low surrogate escape");
                return false;
            }
            pos_ += 2;
            std::optional<uint32_t> low = parse_hex4();
            if (!low) {
                return false;
            }
            if (*low < 0xdc00 || *low > 0xdfff) {
                fail(ParseErrorCode::LoneSurrogate, start,
                     "high surrogate escape not followed by a low surrogate escape");
                return false;
            }
            cp = 0x10000 + ((cp - 0xd800) << 10) + (*low - 0xdc00);
        }
        append_utf8(out, cp);
        return true;
    }

    std::optional<std::string> parse_string() {
        const size_t start = pos_;
        ++pos_;  // opening quote
        std::string out;
        for (;;) {
            // Copy the run of plain ASCII at once.
            const size_t run_start = pos_;
            while (pos_ < text_.size() &&
                   kPlainStringByte[static_cast<unsigned char>(text_[pos_])]) {
                ++pos_;
            }
            out.append(text_.data() + run_start, pos_ - run_start);
            if (pos_ >= text_.size()) {
                return fail(ParseErrorCode::UnexpectedEnd, start, "unterminated string");
            }
            const auto byte = static_cast<unsigned char>(text_[pos_]);
            if (byte == '"') {
                ++pos_;
                return out;
            }
            if (byte == '\\') {
                if (!parse_escape(out)) {
                    return std::nullopt;
                }
            } else if (byte < 0x20) {
                return fail(ParseErrorCode::ControlCharacter, pos_,
                            "unescaped control character " + hex_byte(byte) + " in string");
            } else if (!copy_utf8_sequence(out)) {
                return std::nullopt;
            }
        }
    }

    std::optional<Value> parse_number() {
        const size_t start = pos_;
        if (text_[pos_] == '-') {
            ++pos_;
            if (pos_ < text_.size() && (text_[pos_] == 'I' || text_[pos_] == 'N')) {
                return fail(ParseErrorCode::InvalidNumber, start, "NaN and Infinity are not JSON");
            }
        }
        if (pos_ >= text_.size() || !is_digit(text_[pos_])) {
            return fail(ParseErrorCode::InvalidNumber, pos_, "expected a digit in number");
        }
        if (text_[pos_] == '0' && pos_ + 1 < text_.size() && is_digit(text_[pos_ + 1])) {
            return fail(ParseErrorCode::InvalidNumber, pos_, "leading zeros are not allowed");
        }
        while (pos_ < text_.size() && is_digit(text_[pos_])) {
            ++pos_;
        }
        bool integral = true;
        if (pos_ < text_.size() && text_[pos_] == '.') {
            integral = false;
            ++pos_;
            if (pos_ >= text_.size() || !is_digit(text_[pos_])) {
                return fail(ParseErrorCode::InvalidNumber, pos_,
                            "expected a digit after the decimal point");
            }
            while (pos_ < text_.size() && is_digit(text_[pos_])) {
                ++pos_;
            }
        }
        if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
            integral = false;
            ++pos_;
            if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) {
                ++pos_;
            }
            if (pos_ >= text_.size() || !is_digit(text_[pos_])) {
                return fail(ParseErrorCode::InvalidNumber, pos_, "expected a digit in exponent");
            }
            while (pos_ < text_.size() && is_digit(text_[pos_])) {
                ++pos_;
            }
        }
        const char *first = text_.data() + start;
        const char *last = text_.data() + pos_;
        if (integral) {
            int64_t value = 0;
            const auto [ptr, ec] = std::from_chars(first, last, value);
            if (ec == std::errc() && ptr == last) {
                return Value::from_int(value);
            }
        }
        double value = 0;
        const auto [ptr, ec] = std::from_chars(first, last, value);
        // result_out_of_range covers both overflow and underflow: a number that silently became
        // infinity or zero would be read differently by another parser.
        if (ec != std::errc() || ptr != last || !std::isfinite(value)) {
            return fail(ParseErrorCode::NumberOutOfRange, start,
                        "number " + std::string(first, std::min<size_t>(last - first, 40)) +
                            " is out of range");
        }
        return Value::from_double(value);
    }

    std::string_view text_;
    size_t max_depth_;
    size_t pos_ = 0;
    ParseError error_;
};

}  // namespace

std::string_view parse_error_code_name(ParseErrorCode code) {
    switch (code) {
        case ParseErrorCode::None:
            return "none";
        case ParseErrorCode::TooLarge:
            return "too-large";
        case ParseErrorCode::TooDeep:
            return "too-deep";
        case ParseErrorCode::UnexpectedEnd:
            return "unexpected-end";
        case ParseErrorCode::UnexpectedCharacter:
            return "unexpected-character";
        case ParseErrorCode::TrailingData:
            return "trailing-data";
        case ParseErrorCode::InvalidUtf8:
            return "invalid-utf8";
        case ParseErrorCode::ControlCharacter:
            return "control-character";
        case ParseErrorCode::InvalidEscape:
            return "invalid-escape";
        case ParseErrorCode::LoneSurrogate:
            return "lone-surrogate";
        case ParseErrorCode::InvalidNumber:
            return "invalid-number";
        case ParseErrorCode::NumberOutOfRange:
            return "number-out-of-range";
        case ParseErrorCode::DuplicateKey:
            return "duplicate-key";
        case ParseErrorCode::OutOfMemory:
            return "out-of-memory";
    }
    return "unknown";
}

std::optional<bool> Value::as_bool() const {
    if (const bool *b = std::get_if<1>(&storage_)) {
        return *b;
    }
    return std::nullopt;
}

std::optional<int64_t> Value::as_int() const {
    if (const int64_t *i = std::get_if<2>(&storage_)) {
        return *i;
    }
    if (const double *d = std::get_if<3>(&storage_)) {
        // 2^63 is exactly representable as a double; anything below it and integral converts
        // without loss.
        constexpr double kTwo63 = 9223372036854775808.0;
        if (std::trunc(*d) == *d && *d >= -kTwo63 && *d < kTwo63) {
            return static_cast<int64_t>(*d);
        }
    }
    return std::nullopt;
}

std::optional<double> Value::as_double() const {
    if (const int64_t *i = std::get_if<2>(&storage_)) {
        return static_cast<double>(*i);
    }
    if (const double *d = std::get_if<3>(&storage_)) {
        return *d;
    }
    return std::nullopt;
}

const Value *Value::find(std::string_view key) const {
    const Object *object = as_object();
    if (object == nullptr) {
        return nullptr;
    }
    for (const auto &member : *object) {
        if (member.first == key) {
            return &member.second;
        }
    }
    return nullptr;
}

std::optional<Value> parse(std::string_view text, ParseError *error, const Limits &limits) {
    ParseError local;
    ParseError &err = error != nullptr ? *error : local;
    err.code = ParseErrorCode::None;
    err.offset = 0;
    err.message.clear();
    try {
        if (text.size() > limits.max_bytes) {
            err.code = ParseErrorCode::TooLarge;
            err.offset = limits.max_bytes;
            err.message = "document is " + std::to_string(text.size()) + " bytes, the limit is " +
                          std::to_string(limits.max_bytes);
            return std::nullopt;
        }
        Parser parser(text, std::min(limits.max_depth, kHardMaxDepth));
        std::optional<Value> value = parser.run();
        if (!value) {
            err = parser.take_error();
        }
        return value;
    } catch (const std::bad_alloc &) {
        err.code = ParseErrorCode::OutOfMemory;
        err.offset = 0;
        err.message.clear();  // building a message could fail again; the code says it all
        return std::nullopt;
    }
}

}  // namespace ehrgate::json
