#include "ehrgate/json.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace ehrgate::json {
namespace {

// ---- Helpers ---------------------------------------------------------------------------------

// A heap copy of exactly `bytes.size()` bytes, so that AddressSanitizer reports any read past the
// end (a std::string would hide it behind its capacity and terminating NUL).
class ExactBuffer {
  public:
    explicit ExactBuffer(std::string_view bytes)
        : data_(new char[bytes.empty() ? 1 : bytes.size()]), size_(bytes.size()) {
        std::copy(bytes.begin(), bytes.end(), data_.get());
    }
    std::string_view view() const { return {data_.get(), size_}; }

  private:
    std::unique_ptr<char[]> data_;
    size_t size_;
};

Value ok(std::string_view text, const Limits &limits = {}) {
    ParseError error;
    const ExactBuffer buffer(text);
    std::optional<Value> value = parse(buffer.view(), &error, limits);
    EXPECT_TRUE(value.has_value())
        << "text: " << text << "\nerror at " << error.offset << ": " << error.message;
    EXPECT_EQ(error.code, ParseErrorCode::None);
    return value ? std::move(*value) : Value();
}

ParseError bad(std::string_view text, const Limits &limits = {}) {
    ParseError error;
    const ExactBuffer buffer(text);
    const std::optional<Value> value = parse(buffer.view(), &error, limits);
    EXPECT_FALSE(value.has_value()) << "accepted: " << text;
    EXPECT_NE(error.code, ParseErrorCode::None) << text;
    EXPECT_FALSE(error.message.empty()) << text;
    EXPECT_LE(error.offset, text.size()) << text;
    return error;
}

void expect_error(std::string_view text, ParseErrorCode code, size_t offset,
                  std::string_view message_part) {
    SCOPED_TRACE(std::string("text: ") + std::string(text));
    const ParseError error = bad(text);
    EXPECT_EQ(parse_error_code_name(error.code), parse_error_code_name(code));
    EXPECT_EQ(error.offset, offset);
    EXPECT_NE(error.message.find(message_part), std::string::npos)
        << "message: " << error.message << "\nexpected to contain: " << message_part;
}

// Canonical serialization, used to check that whatever the parser accepts survives a round trip.
void serialize(const Value &value, std::string &out) {
    switch (value.type()) {
        case Value::Type::Null:
            out += "null";
            return;
        case Value::Type::Bool:
            out += *value.as_bool() ? "true" : "false";
            return;
        case Value::Type::Int:
            out += std::to_string(*value.as_int());
            return;
        case Value::Type::Double: {
            char buffer[64];
            std::snprintf(buffer, sizeof buffer, "%.17g", *value.as_double());
            std::string text = buffer;
            // %.17g can print an integral double without '.' or 'e'; keep it a double.
            if (text.find_first_of(".e") == std::string::npos) {
                text += ".0";
            }
            out += text;
            return;
        }
        case Value::Type::String: {
            out.push_back('"');
            for (const char ch : *value.as_string()) {
                const auto byte = static_cast<unsigned char>(ch);
                if (ch == '"' || ch == '\\') {
                    out.push_back('\\');
                    out.push_back(ch);
                } else if (byte < 0x20) {
                    char buffer[8];
                    std::snprintf(buffer, sizeof buffer, "\\u%04x", byte);
                    out += buffer;
                } else {
                    out.push_back(ch);
                }
            }
            out.push_back('"');
            return;
        }
        case Value::Type::Array: {
            out.push_back('[');
            bool first = true;
            for (const Value &item : *value.as_array()) {
                if (!first) {
                    out.push_back(',');
                }
                first = false;
                serialize(item, out);
            }
            out.push_back(']');
            return;
        }
        case Value::Type::Object: {
            out.push_back('{');
            bool first = true;
            for (const auto &[key, item] : *value.as_object()) {
                if (!first) {
                    out.push_back(',');
                }
                first = false;
                serialize(Value::from_string(key), out);
                out.push_back(':');
                serialize(item, out);
            }
            out.push_back('}');
            return;
        }
    }
}

std::string serialize(const Value &value) {
    std::string out;
    serialize(value, out);
    return out;
}

// ---- Accepted documents ----------------------------------------------------------------------

TEST(JsonParse, Scalars) {
    EXPECT_TRUE(ok("null").is_null());
    EXPECT_EQ(ok("true").as_bool(), true);
    EXPECT_EQ(ok(" false ").as_bool(), false);
    EXPECT_EQ(ok("0").as_int(), 0);
    EXPECT_EQ(ok("-0").as_int(), 0);
    EXPECT_EQ(ok("42").as_int(), 42);
    EXPECT_EQ(ok("-17").as_int(), -17);
    EXPECT_EQ(*ok("\"hi\"").as_string(), "hi");
    EXPECT_EQ(*ok("\t\r\n \"x\" \n").as_string(), "x");
}

TEST(JsonParse, IntegersStayExactUntilTheyDoNotFit) {
    const Value max = ok("9223372036854775807");
    EXPECT_TRUE(max.is_int());
    EXPECT_EQ(max.as_int(), std::numeric_limits<int64_t>::max());
    const Value min = ok("-9223372036854775808");
    EXPECT_TRUE(min.is_int());
    EXPECT_EQ(min.as_int(), std::numeric_limits<int64_t>::min());

    const Value above = ok("9223372036854775808");
    EXPECT_EQ(above.type(), Value::Type::Double);
    EXPECT_EQ(above.as_int(), std::nullopt);  // 2^63 does not fit
    EXPECT_DOUBLE_EQ(*above.as_double(), 9223372036854775808.0);
    EXPECT_EQ(ok("-9223372036854775809").type(), Value::Type::Double);
    EXPECT_EQ(ok("123456789012345678901234567890").type(), Value::Type::Double);
}

TEST(JsonParse, DoublesAndIntegralDoubles) {
    const Value half = ok("0.5");
    EXPECT_EQ(half.type(), Value::Type::Double);
    EXPECT_TRUE(half.is_number());
    EXPECT_FALSE(half.is_int());
    EXPECT_EQ(half.as_int(), std::nullopt);
    EXPECT_DOUBLE_EQ(*half.as_double(), 0.5);

    const Value thousand = ok("1e3");
    EXPECT_EQ(thousand.type(), Value::Type::Double);
    EXPECT_EQ(thousand.as_int(), 1000);
    EXPECT_EQ(ok("1.0").as_int(), 1);
    EXPECT_EQ(ok("-2.5E+2").as_double(), -250.0);
    EXPECT_EQ(ok("1E-2").as_double(), 0.01);
    EXPECT_EQ(ok("1.7976931348623157e308").as_double(), std::numeric_limits<double>::max());
    EXPECT_EQ(ok("5e-324").as_double(), std::numeric_limits<double>::denorm_min());
    EXPECT_EQ(ok("17").as_double(), 17.0);
    EXPECT_EQ(ok("\"1\"").as_double(), std::nullopt);
}

TEST(JsonParse, StringEscapesAndUnicode) {
    EXPECT_EQ(*ok(R"("a\"b\\c\/d\b\f\n\r\t")").as_string(), "a\"b\\c/d\b\f\n\r\t");
    EXPECT_EQ(*ok(R"("\u0041\u00e9\u20AC")").as_string(), "A\xc3\xa9\xe2\x82\xac");
    // U+1F600 as a surrogate pair, and the same character in raw UTF-8.
    EXPECT_EQ(*ok(R"("\ud83d\ude00")").as_string(), "\xf0\x9f\x98\x80");
    EXPECT_EQ(*ok("\"\xf0\x9f\x98\x80\"").as_string(), "\xf0\x9f\x98\x80");
    // Boundary code points of every UTF-8 length.
    EXPECT_EQ(
        *ok("\"\x7f\xc2\x80\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf\xf0\x90\x80\x80\xf4\x8f\xbf\xbf\"")
             .as_string(),
        "\x7f\xc2\x80\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf\xf0\x90\x80\x80\xf4\x8f\xbf\xbf");
    // Just below and above the surrogate block.
    EXPECT_EQ(*ok("\"\xed\x9f\xbf\xee\x80\x80\"").as_string(), "\xed\x9f\xbf\xee\x80\x80");
    const Value nul = ok(R"("a\u0000b")");
    EXPECT_EQ(*nul.as_string(), std::string("a\0b", 3));
}

TEST(JsonParse, ObjectsKeepDocumentOrderAndFind) {
    const Value doc = ok(R"({"z":1,"a":[true,null,{"k":"v"}],"m":{}})");
    ASSERT_TRUE(doc.is_object());
    const Value::Object &members = *doc.as_object();
    ASSERT_EQ(members.size(), 3u);
    EXPECT_EQ(members[0].first, "z");
    EXPECT_EQ(members[1].first, "a");
    EXPECT_EQ(members[2].first, "m");
    EXPECT_EQ(doc.find("z")->as_int(), 1);
    EXPECT_EQ(doc.find("missing"), nullptr);
    const Value::Array &array = *doc.find("a")->as_array();
    ASSERT_EQ(array.size(), 3u);
    EXPECT_EQ(array[0].as_bool(), true);
    EXPECT_TRUE(array[1].is_null());
    EXPECT_EQ(*array[2].find("k")->as_string(), "v");
    EXPECT_TRUE(doc.find("m")->is_object());
    EXPECT_TRUE(doc.find("m")->as_object()->empty());
    // find on a non-object, and typed accessors on the wrong type.
    EXPECT_EQ(array[0].find("k"), nullptr);
    EXPECT_EQ(array[0].as_string(), nullptr);
    EXPECT_EQ(array[0].as_array(), nullptr);
    EXPECT_EQ(doc.as_array(), nullptr);
    EXPECT_EQ(doc.as_bool(), std::nullopt);
    EXPECT_TRUE(ok("[]").as_array()->empty());
    EXPECT_TRUE(ok(" [ ] ").is_array());
    EXPECT_TRUE(ok(" { } ").is_object());
}

TEST(JsonParse, SameKeyInDifferentObjectsIsFine) {
    const Value doc = ok(R"({"a":{"a":1},"b":[{"a":2},{"a":3}]})");
    EXPECT_EQ(doc.find("a")->find("a")->as_int(), 1);
}

TEST(JsonParse, DepthLimitIsInclusive) {
    const std::string at_limit = std::string(32, '[') + std::string(32, ']');
    EXPECT_TRUE(ok(at_limit).is_array());
    const std::string objects = [] {
        std::string text;
        for (int i = 0; i < 32; ++i) {
            text += "{\"k\":";
        }
        text += "1";
        text += std::string(32, '}');
        return text;
    }();
    EXPECT_TRUE(ok(objects).is_object());
    EXPECT_TRUE(ok("[[1]]", Limits{.max_bytes = 100, .max_depth = 2}).is_array());
    EXPECT_TRUE(ok("7", Limits{.max_bytes = 100, .max_depth = 0}).is_int());
}

TEST(JsonParse, SizeLimitIsInclusive) {
    EXPECT_TRUE(ok("[1, 2]", Limits{.max_bytes = 6, .max_depth = 32}).is_array());
}

TEST(JsonParse, NullErrorPointerIsAllowed) {
    EXPECT_TRUE(parse("[1]", nullptr).has_value());
    EXPECT_FALSE(parse("[1", nullptr).has_value());
}

// ---- Rejections ------------------------------------------------------------------------------

TEST(JsonReject, TrailingData) {
    expect_error("{} x", ParseErrorCode::TrailingData, 3, "trailing data");
    expect_error("{}{}", ParseErrorCode::TrailingData, 2, "'{'");
    expect_error("1 2", ParseErrorCode::TrailingData, 2, "trailing data");
    expect_error("\"a\"\"b\"", ParseErrorCode::TrailingData, 3, "trailing data");
    expect_error(std::string("null\0", 5), ParseErrorCode::TrailingData, 4, "byte 0x00");
    expect_error("[]]", ParseErrorCode::TrailingData, 2, "']'");
}

TEST(JsonReject, DuplicateKeys) {
    expect_error(R"({"a":1,"a":2})", ParseErrorCode::DuplicateKey, 7, "duplicate object key \"a\"");
    // Compared after unescaping: "al\u0067" is "alg".
    expect_error(R"({"alg":"RS256","al\u0067":"none"})", ParseErrorCode::DuplicateKey, 15,
                 "duplicate object key \"alg\"");
    expect_error(R"({"x":{"k":1,"k":1}})", ParseErrorCode::DuplicateKey, 12, "\"k\"");
    expect_error(R"([{"":1,"":2}])", ParseErrorCode::DuplicateKey, 7, "\"\"");
    // Keys with unprintable bytes are quoted safely in the message.
    expect_error("{\"\\n\":1,\"\\n\":2}", ParseErrorCode::DuplicateKey, 8, "\"\\x0A\"");
}

TEST(JsonReject, DuplicateKeysInLargeObjects) {
    // Past the linear-check size, duplicates are found by sorting when the object closes; the
    // reported offset is still that of the first repeated key.
    std::string text = "{";
    std::vector<size_t> offsets;
    for (int i = 0; i < 40; ++i) {
        if (i > 0) {
            text += ",";
        }
        offsets.push_back(text.size());
        text += "\"k" + std::to_string(i) + "\":" + std::to_string(i);
    }
    const std::string unique = text + "}";
    EXPECT_EQ(ok(unique).as_object()->size(), 40u);

    std::string dup = text;
    const size_t first_dup = dup.size() + 1;
    dup += ",\"k3\":0,\"k5\":0}";
    expect_error(dup, ParseErrorCode::DuplicateKey, first_dup, "\"k3\"");

    // A duplicate of a late key early on is also caught.
    std::string late = "{";
    for (int i = 0; i < 30; ++i) {
        late += "\"k" + std::to_string(i) + "\":0,";
    }
    const size_t repeat = late.size();
    late += "\"k20\":1}";
    expect_error(late, ParseErrorCode::DuplicateKey, repeat, "\"k20\"");
}

TEST(JsonReject, InvalidUtf8) {
    const struct {
        std::string text;
        size_t offset;
        std::string message;
    } cases[] = {
        {"\"\x80\"", 1, "invalid UTF-8 start byte 0x80"},
        {"\"\xbf\"", 1, "invalid UTF-8 start byte 0xBF"},
        {"\"\xc0\xaf\"", 1, "overlong UTF-8 encoding 0xC0"},
        {"\"\xc1\xbf\"", 1, "overlong UTF-8 encoding 0xC1"},
        {"\"\xe0\x80\xaf\"", 2, "overlong UTF-8 encoding 0x80"},
        {"\"\xe0\x9f\xbf\"", 2, "overlong UTF-8 encoding 0x9F"},
        {"\"\xf0\x80\x80\xaf\"", 2, "overlong UTF-8 encoding 0x80"},
        {"\"\xf0\x8f\xbf\xbf\"", 2, "overlong UTF-8 encoding 0x8F"},
        {"\"\xed\xa0\x80\"", 2, "UTF-8 encoded surrogate 0xA0"},
        {"\"\xed\xbf\xbf\"", 2, "UTF-8 encoded surrogate 0xBF"},
        {"\"\xf4\x90\x80\x80\"", 2, "beyond U+10FFFF 0x90"},
        {"\"\xf5\x80\x80\x80\"", 1, "UTF-8 byte beyond U+10FFFF 0xF5"},
        {"\"\xff\"", 1, "UTF-8 byte beyond U+10FFFF 0xFF"},
        {"\"\xc3\"", 2, "invalid UTF-8 continuation byte 0x22"},
        {"\"\xc3\x28\"", 2, "invalid UTF-8 continuation byte 0x28"},
        {"\"\xe2\x82\"", 3, "invalid UTF-8 continuation byte 0x22"},
        {"\"\xe2\x82", 1, "truncated UTF-8 sequence"},
        {"\"\xf0\x9f\x98", 1, "truncated UTF-8 sequence"},
        {"\"ok\xe2\x28\xa1\"", 4, "invalid UTF-8 continuation byte 0x28"},
    };
    for (const auto &c : cases) {
        expect_error(c.text, ParseErrorCode::InvalidUtf8, c.offset, c.message);
    }
    // Outside strings nothing but ASCII is valid either (a BOM included).
    expect_error("\xef\xbb\xbf{}", ParseErrorCode::UnexpectedCharacter, 0, "byte 0xEF");
    expect_error("{\"a\":1}\xc2\xa0", ParseErrorCode::TrailingData, 7, "byte 0xC2");
}

TEST(JsonReject, LoneSurrogateEscapes) {
    expect_error(R"("\ud800")", ParseErrorCode::LoneSurrogate, 1, "not followed by a low");
    expect_error(R"("\uDBFF x")", ParseErrorCode::LoneSurrogate, 1, "not followed by a low");
    expect_error(R"("\ud800\u0041")", ParseErrorCode::LoneSurrogate, 1, "not followed by a low");
    expect_error(R"("\ud800\ud800")", ParseErrorCode::LoneSurrogate, 1, "not followed by a low");
    expect_error(R"("\udc00")", ParseErrorCode::LoneSurrogate, 1, "lone low surrogate");
    expect_error(R"("ab\uDFFF")", ParseErrorCode::LoneSurrogate, 3, "lone low surrogate");
    expect_error(R"("\ude00\ud83d")", ParseErrorCode::LoneSurrogate, 1, "lone low surrogate");
    expect_error(R"("\ud83d\n")", ParseErrorCode::LoneSurrogate, 1, "not followed by a low");
    expect_error(R"("\ud83d\u12")", ParseErrorCode::InvalidEscape, 9, "four hexadecimal");
}

TEST(JsonReject, ControlCharactersInStrings) {
    expect_error("\"a\nb\"", ParseErrorCode::ControlCharacter, 2, "control character 0x0A");
    expect_error("\"\t\"", ParseErrorCode::ControlCharacter, 1, "0x09");
    expect_error(std::string("\"\0\"", 3), ParseErrorCode::ControlCharacter, 1, "0x00");
    expect_error("\"\x1f\"", ParseErrorCode::ControlCharacter, 1, "0x1F");
    expect_error("{\"k\r\":1}", ParseErrorCode::ControlCharacter, 3, "0x0D");
    // DEL is not a control character for JSON.
    EXPECT_EQ(*ok("\"\x7f\"").as_string(), "\x7f");
}

TEST(JsonReject, InvalidEscapes) {
    expect_error(R"("\x41")", ParseErrorCode::InvalidEscape, 1, "invalid escape \\'x'");
    expect_error(R"("\'")", ParseErrorCode::InvalidEscape, 1, "invalid escape");
    expect_error(R"("\U0041")", ParseErrorCode::InvalidEscape, 1, "invalid escape");
    expect_error(R"("\u12")", ParseErrorCode::InvalidEscape, 3, "four hexadecimal digits");
    expect_error(R"("\u12G4")", ParseErrorCode::InvalidEscape, 5, "got 'G'");
    expect_error("\"\\u12", ParseErrorCode::InvalidEscape, 3, "four hexadecimal digits");
    expect_error("\"\\", ParseErrorCode::UnexpectedEnd, 2, "string escape");
}

TEST(JsonReject, Numbers) {
    expect_error("01", ParseErrorCode::InvalidNumber, 0, "leading zeros");
    expect_error("-01", ParseErrorCode::InvalidNumber, 1, "leading zeros");
    expect_error("[00]", ParseErrorCode::InvalidNumber, 1, "leading zeros");
    expect_error("1.", ParseErrorCode::InvalidNumber, 2, "after the decimal point");
    expect_error("1.e5", ParseErrorCode::InvalidNumber, 2, "after the decimal point");
    expect_error(".5", ParseErrorCode::UnexpectedCharacter, 0, "'.'");
    expect_error("+1", ParseErrorCode::UnexpectedCharacter, 0, "'+'");
    expect_error("1e", ParseErrorCode::InvalidNumber, 2, "exponent");
    expect_error("1e+", ParseErrorCode::InvalidNumber, 3, "exponent");
    expect_error("-", ParseErrorCode::InvalidNumber, 1, "expected a digit");
    expect_error("- 1", ParseErrorCode::InvalidNumber, 1, "expected a digit");
    expect_error("0x10", ParseErrorCode::TrailingData, 1, "'x'");
    expect_error("1_000", ParseErrorCode::TrailingData, 1, "'_'");
    expect_error("NaN", ParseErrorCode::InvalidNumber, 0, "NaN and Infinity");
    expect_error("Infinity", ParseErrorCode::InvalidNumber, 0, "NaN and Infinity");
    expect_error("-Infinity", ParseErrorCode::InvalidNumber, 0, "NaN and Infinity");
    expect_error("[nan]", ParseErrorCode::UnexpectedCharacter, 1, "'n'");
    expect_error("1e400", ParseErrorCode::NumberOutOfRange, 0, "number 1e400 is out of range");
    expect_error("-1e400", ParseErrorCode::NumberOutOfRange, 0, "out of range");
    expect_error("[1, 2e-400]", ParseErrorCode::NumberOutOfRange, 4, "out of range");
    expect_error(std::string(400, '9'), ParseErrorCode::NumberOutOfRange, 0, "out of range");
}

TEST(JsonReject, StructureAndLiterals) {
    expect_error("", ParseErrorCode::UnexpectedEnd, 0, "expected a value");
    expect_error("   ", ParseErrorCode::UnexpectedEnd, 3, "expected a value");
    expect_error("[1,", ParseErrorCode::UnexpectedEnd, 3, "expected a value");
    expect_error("[1", ParseErrorCode::UnexpectedEnd, 2, "',' or ']'");
    expect_error("[1,]", ParseErrorCode::UnexpectedCharacter, 3, "']', expected a value");
    expect_error("[1 2]", ParseErrorCode::UnexpectedCharacter, 3, "',' or ']'");
    expect_error("{\"a\"", ParseErrorCode::UnexpectedEnd, 4, "':'");
    expect_error("{\"a\" 1}", ParseErrorCode::UnexpectedCharacter, 5, "':' after object key");
    expect_error("{\"a\":1,}", ParseErrorCode::UnexpectedCharacter, 7, "string object key");
    expect_error("{\"a\":1 \"b\":2}", ParseErrorCode::UnexpectedCharacter, 7, "',' or '}'");
    expect_error("{a:1}", ParseErrorCode::UnexpectedCharacter, 1, "string object key");
    expect_error("{1:1}", ParseErrorCode::UnexpectedCharacter, 1, "string object key");
    expect_error("{'a':1}", ParseErrorCode::UnexpectedCharacter, 1, "'''");
    expect_error("{\"a\":}", ParseErrorCode::UnexpectedCharacter, 5, "expected a value");
    expect_error("\"abc", ParseErrorCode::UnexpectedEnd, 0, "unterminated string");
    expect_error("tru", ParseErrorCode::UnexpectedCharacter, 0, "'t'");
    expect_error("True", ParseErrorCode::UnexpectedCharacter, 0, "'T'");
    expect_error("nul", ParseErrorCode::UnexpectedCharacter, 0, "'n'");
    expect_error("nulls", ParseErrorCode::TrailingData, 4, "'s'");
    expect_error("[1] // comment", ParseErrorCode::TrailingData, 4, "'/'");
    expect_error("/* c */ 1", ParseErrorCode::UnexpectedCharacter, 0, "'/'");
    expect_error("\f1", ParseErrorCode::UnexpectedCharacter, 0, "byte 0x0C");
    expect_error(
        "\xc2\xa0"
        "1",
        ParseErrorCode::UnexpectedCharacter, 0, "byte 0xC2");
}

TEST(JsonReject, TooDeep) {
    expect_error(std::string(33, '[') + std::string(33, ']'), ParseErrorCode::TooDeep, 32,
                 "nesting deeper than 32 levels");
    const ParseError error = bad("[[[1]]]", Limits{.max_bytes = 100, .max_depth = 2});
    EXPECT_EQ(error.code, ParseErrorCode::TooDeep);
    EXPECT_EQ(error.offset, 2u);
    EXPECT_EQ(bad("[]", Limits{.max_bytes = 100, .max_depth = 0}).code, ParseErrorCode::TooDeep);
    // A huge caller limit is capped, so deep input cannot exhaust the stack.
    const std::string deep(200000, '[');
    const ParseError capped = bad(deep, Limits{.max_bytes = deep.size(), .max_depth = 1u << 30});
    EXPECT_EQ(capped.code, ParseErrorCode::TooDeep);
    EXPECT_EQ(capped.offset, kHardMaxDepth);
}

TEST(JsonReject, TooLarge) {
    const ParseError error = bad("[1, 2]", Limits{.max_bytes = 5, .max_depth = 32});
    EXPECT_EQ(error.code, ParseErrorCode::TooLarge);
    EXPECT_EQ(error.message, "document is 6 bytes, the limit is 5");
    EXPECT_EQ(error.offset, 5u);
}

TEST(JsonReject, ErrorCodeNamesAreStableAndDistinct) {
    std::vector<std::string_view> names;
    for (int code = 0; code <= static_cast<int>(ParseErrorCode::OutOfMemory); ++code) {
        names.push_back(parse_error_code_name(static_cast<ParseErrorCode>(code)));
    }
    EXPECT_EQ(parse_error_code_name(ParseErrorCode::DuplicateKey), "duplicate-key");
    EXPECT_EQ(parse_error_code_name(ParseErrorCode::InvalidUtf8), "invalid-utf8");
    std::sort(names.begin(), names.end());
    EXPECT_EQ(std::adjacent_find(names.begin(), names.end()), names.end());
    EXPECT_EQ(std::find(names.begin(), names.end(), "unknown"), names.end());
}

TEST(JsonReject, ErrorIsResetOnSuccess) {
    ParseError error;
    EXPECT_FALSE(parse("[", &error).has_value());
    EXPECT_NE(error.code, ParseErrorCode::None);
    EXPECT_TRUE(parse("[]", &error).has_value());
    EXPECT_EQ(error.code, ParseErrorCode::None);
    EXPECT_TRUE(error.message.empty());
}

// ---- Round trip and mutation fuzzing ---------------------------------------------------------

const char *const kSeedDocuments[] = {
    R"({"alg":"RS256","kid":"2011-04-29","typ":"JWT"})",
    R"({"iss":"https://idp.example","sub":"user-1","aud":["a","b"],"exp":1700000300,)"
    R"("nbf":1699999990.5,"scope":"patient/*.read launch","cnf":{"x5t#S256":"bwcK0"},)"
    R"("fhirUser":"Practitioner/7","purpose_of_use":["TREAT"],"n":-0.0,"big":1e308})",
    R"({"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",)"
    R"("y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","use":"enc","kid":"1"},)"
    R"({"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtV","e":"AQAB"}]})",
    R"([null,true,false,0,-1,3.25,"\u00e9\ud83d\ude00\n\t\"\\",{},[],[[[{"a":{"b":[1]}}]]]])",
    "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"",
    R"({"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"i":9,"j":10,"k":11,"l":12,"m":13,)"
    R"("n":14,"o":15,"p":16,"q":17,"r":18,"s":19,"t":20})",
};

// Fragments that steer mutations towards the interesting corners of the grammar.
const char *const kFragments[] = {
    "\\u",
    "\\ud800",
    "\\udc00",
    "\\ud83d\\ude00",
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"a\":1,",
    "1e999",
    "-0",
    "00",
    "1.",
    "NaN",
    "\xed\xa0\x80",
    "\xc0\xaf",
    "\xf4\x90\x80\x80",
    "\xe2\x82",
    "\x00",
    "\n",
    "true",
    "nul",
    "\"alg\":\"none\"",
    "1e-999",
    "9223372036854775808",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
};

std::string mutate(std::string text, std::mt19937 &rng) {
    const auto pick = [&rng](size_t n) {
        return std::uniform_int_distribution<size_t>(0, n == 0 ? 0 : n - 1)(rng);
    };
    const int rounds = 1 + static_cast<int>(pick(4));
    for (int round = 0; round < rounds; ++round) {
        const size_t pos = pick(text.size() + 1);
        switch (pick(7)) {
            case 0:  // flip bits
                if (!text.empty()) {
                    text[pick(text.size())] ^= static_cast<char>(1u << pick(8));
                }
                break;
            case 1:  // random byte in
                text.insert(text.begin() + static_cast<std::ptrdiff_t>(pos),
                            static_cast<char>(pick(256)));
                break;
            case 2:  // delete a span
                if (!text.empty()) {
                    const size_t at = pick(text.size());
                    text.erase(at, 1 + pick(std::min<size_t>(8, text.size() - at)));
                }
                break;
            case 3: {  // duplicate a span
                if (!text.empty()) {
                    const size_t at = pick(text.size());
                    const std::string span = text.substr(at, 1 + pick(16));
                    text.insert(pick(text.size() + 1), span);
                }
                break;
            }
            case 4: {  // grammar fragment
                const std::string_view fragment = kFragments[pick(std::size(kFragments))];
                text.insert(pos, fragment == "\x00" ? std::string(1, '\0') : std::string(fragment));
                break;
            }
            case 5:  // truncate
                text.resize(pick(text.size() + 1));
                break;
            default:  // replace a byte with a structural character
                if (!text.empty()) {
                    text[pick(text.size())] = "{}[]\":,\\ 0-e."[pick(14)];
                }
                break;
        }
    }
    return text;
}

TEST(JsonFuzz, SeedsRoundTrip) {
    for (const char *seed : kSeedDocuments) {
        const Value value = ok(seed);
        const std::string once = serialize(value);
        const Value again = ok(once);
        EXPECT_EQ(serialize(again), once) << seed;
    }
}

TEST(JsonFuzz, SeededMutationsNeverCrashAndAcceptedOnesRoundTrip) {
    std::mt19937 rng(20240611);
    size_t accepted = 0;
    size_t rejected = 0;
    constexpr int kIterations = 6000;
    for (int i = 0; i < kIterations; ++i) {
        const std::string seed = kSeedDocuments[static_cast<size_t>(i) % std::size(kSeedDocuments)];
        const std::string text = mutate(seed, rng);
        const ExactBuffer buffer(text);
        ParseError error;
        const std::optional<Value> value = parse(buffer.view(), &error);
        if (!value) {
            ++rejected;
            ASSERT_NE(error.code, ParseErrorCode::None) << "iteration " << i;
            ASSERT_FALSE(error.message.empty()) << "iteration " << i;
            ASSERT_LE(error.offset, text.size()) << "iteration " << i;
            continue;
        }
        ++accepted;
        // Whatever is accepted must mean the same thing when written back out canonically.
        const std::string once = serialize(*value);
        ParseError again_error;
        const std::optional<Value> again = parse(once, &again_error);
        ASSERT_TRUE(again.has_value())
            << "iteration " << i << ": " << again_error.message << "\nserialized: " << once;
        ASSERT_EQ(serialize(*again), once) << "iteration " << i;
    }
    // The mutator must exercise both outcomes to be worth anything.
    EXPECT_GT(accepted, 100u);
    EXPECT_GT(rejected, 1000u);
    std::printf("mutations: %zu accepted, %zu rejected\n", accepted, rejected);
}

TEST(JsonFuzz, RandomBytesNeverCrash) {
    constexpr std::string_view kAlphabet = "{}[]\":,\\ 0123456789-+.eEtrufalsn";
    std::mt19937 rng(7);
    for (int i = 0; i < 2000; ++i) {
        std::string text(std::uniform_int_distribution<size_t>(0, 64)(rng), '\0');
        for (char &ch : text) {
            // Mostly JSON-ish bytes, some arbitrary.
            ch = rng() % 4 == 0 ? static_cast<char>(rng()) : kAlphabet[rng() % kAlphabet.size()];
        }
        const ExactBuffer buffer(text);
        ParseError error;
        const std::optional<Value> value = parse(buffer.view(), &error);
        ASSERT_TRUE(value.has_value() || error.code != ParseErrorCode::None);
    }
}

}  // namespace
}  // namespace ehrgate::json
