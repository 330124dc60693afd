#include "ehrgate/outcome.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "ehrgate/base64url.hpp"
#include "ehrgate/json_text.hpp"

namespace ehrgate {
namespace {

// ---- A strict little JSON parser, as an independent judge of what we render -----------------

struct Json {
    enum class Kind { Null, Bool, Number, String, Array, Object };
    Kind kind = Kind::Null;
    bool boolean = false;
    std::string text;  // the string value, or the number's spelling
    std::vector<Json> items;
    std::map<std::string, Json> members;

    const Json &operator[](const std::string &key) const {
        static const Json kMissing;
        const auto it = members.find(key);
        return it == members.end() ? kMissing : it->second;
    }
    const Json &operator[](size_t i) const {
        static const Json kMissing;
        return i < items.size() ? items[i] : kMissing;
    }
};

// RFC 8259 grammar, without leniency: no trailing commas, no raw control characters in strings,
// no duplicate object keys, nothing after the top-level value.
class JsonParser {
  public:
    explicit JsonParser(std::string_view text) : text_(text) {}

    std::optional<Json> parse_document() {
        std::optional<Json> value = parse_value(0);
        skip_space();
        if (!value || pos_ != text_.size()) {
            return std::nullopt;
        }
        return value;
    }

  private:
    static constexpr int kMaxDepth = 64;

    void skip_space() {
        while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                       text_[pos_] == '\n' || text_[pos_] == '\r')) {
            ++pos_;
        }
    }

    bool eat(char c) {
        skip_space();
        if (pos_ < text_.size() && text_[pos_] == c) {
            ++pos_;
            return true;
        }
        return false;
    }

    bool literal(std::string_view word) {
        if (text_.substr(pos_, word.size()) != word) {
            return false;
        }
        pos_ += word.size();
        return true;
    }

    std::optional<Json> parse_value(int depth) {
        if (depth > kMaxDepth) {
            return std::nullopt;
        }
        skip_space();
        if (pos_ >= text_.size()) {
            return std::nullopt;
        }
        Json v;
        const char c = text_[pos_];
        if (c == '{') {
            ++pos_;
            v.kind = Json::Kind::Object;
            if (eat('}')) {
                return v;
            }
            do {
                skip_space();
                std::optional<std::string> key = parse_string();
                if (!key || !eat(':')) {
                    return std::nullopt;
                }
                std::optional<Json> member = parse_value(depth + 1);
                if (!member || !v.members.emplace(std::move(*key), std::move(*member)).second) {
                    return std::nullopt;
                }
            } while (eat(','));
            return eat('}') ? std::optional<Json>(std::move(v)) : std::nullopt;
        }
        if (c == '[') {
            ++pos_;
            v.kind = Json::Kind::Array;
            if (eat(']')) {
                return v;
            }
            do {
                std::optional<Json> item = parse_value(depth + 1);
                if (!item) {
                    return std::nullopt;
                }
                v.items.push_back(std::move(*item));
            } while (eat(','));
            return eat(']') ? std::optional<Json>(std::move(v)) : std::nullopt;
        }
        if (c == '"') {
            std::optional<std::string> s = parse_string();
            if (!s) {
                return std::nullopt;
            }
            v.kind = Json::Kind::String;
            v.text = std::move(*s);
            return v;
        }
        if (literal("true") || literal("false")) {
            v.kind = Json::Kind::Bool;
            v.boolean = text_[pos_ - 1] == 'e' && text_[pos_ - 4] == 't';
            return v;
        }
        if (literal("null")) {
            return v;
        }
        return parse_number();
    }

    std::optional<Json> parse_number() {
        const size_t start = pos_;
        auto digits = [&] {
            const size_t from = pos_;
            while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
                ++pos_;
            }
            return pos_ - from;
        };
        if (pos_ < text_.size() && text_[pos_] == '-') {
            ++pos_;
        }
        if (pos_ < text_.size() && text_[pos_] == '0') {
            ++pos_;
        } else if (digits() == 0) {
            return std::nullopt;
        }
        if (pos_ < text_.size() && text_[pos_] == '.') {
            ++pos_;
            if (digits() == 0) {
                return std::nullopt;
            }
        }
        if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
            ++pos_;
            if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) {
                ++pos_;
            }
            if (digits() == 0) {
                return std::nullopt;
            }
        }
        Json v;
        v.kind = Json::Kind::Number;
        v.text = std::string(text_.substr(start, pos_ - start));
        return v;
    }

    std::optional<int> hex4() {
        if (text_.size() - pos_ < 4) {
            return std::nullopt;
        }
        int v = 0;
        for (int i = 0; i < 4; ++i) {
            const char c = text_[pos_++];
            v <<= 4;
            if (c >= '0' && c <= '9') {
                v |= c - '0';
            } else if (c >= 'a' && c <= 'f') {
                v |= c - 'a' + 10;
            } else if (c >= 'A' && c <= 'F') {
                v |= c - 'A' + 10;
            } else {
                return std::nullopt;
            }
        }
        return v;
    }

    static void append_utf8(std::string &out, uint32_t cp) {
        if (cp < 0x80) {
            out.push_back(static_cast<char>(cp));
        } else if (cp < 0x800) {
            out.push_back(static_cast<char>(0xc0 | cp >> 6));
            out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
        } else if (cp < 0x10000) {
            out.push_back(static_cast<char>(0xe0 | cp >> 12));
            out.push_back(static_cast<char>(0x80 | (cp >> 6 & 0x3f)));
            out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
        } else {
            out.push_back(static_cast<char>(0xf0 | cp >> 18));
            out.push_back(static_cast<char>(0x80 | (cp >> 12 & 0x3f)));
            out.push_back(static_cast<char>(0x80 | (cp >> 6 & 0x3f)));
            out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
        }
    }

    std::optional<std::string> parse_string() {
        if (pos_ >= text_.size() || text_[pos_] != '"') {
            return std::nullopt;
        }
        ++pos_;
        std::string out;
        while (pos_ < text_.size()) {
            const auto c = static_cast<unsigned char>(text_[pos_++]);
            if (c == '"') {
                return out;
            }
            if (c < 0x20) {
                return std::nullopt;  // control characters must be escaped
            }
            if (c != '\\') {
                out.push_back(static_cast<char>(c));
                continue;
            }
            if (pos_ >= text_.size()) {
                return std::nullopt;
            }
            switch (text_[pos_++]) {
                case '"':
                    out.push_back('"');
                    break;
                case '\\':
                    out.push_back('\\');
                    break;
                case '/':
                    out.push_back('/');
                    break;
                case 'b':
                    out.push_back('\b');
                    break;
                case 'f':
                    out.push_back('\f');
                    break;
                case 'n':
                    out.push_back('\n');
                    break;
                case 'r':
                    out.push_back('\r');
                    break;
                case 't':
                    out.push_back('\t');
                    break;
                case 'u': {
                    const std::optional<int> unit = hex4();
                    if (!unit) {
                        return std::nullopt;
                    }
                    uint32_t cp = static_cast<uint32_t>(*unit);
                    if (cp >= 0xd800 && cp <= 0xdbff) {
                        if (!literal("\\u")) {
                            return std::nullopt;
                        }
                        const std::optional<int> low = hex4();
                        if (!low || *low < 0xdc00 || *low > 0xdfff) {
                            return std::nullopt;
                        }
                        cp = 0x10000 + ((cp - 0xd800) << 10) +
                             (static_cast<uint32_t>(*low) - 0xdc00);
                    } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                        return std::nullopt;
                    }
                    append_utf8(out, cp);
                    break;
                }
                default:
                    return std::nullopt;
            }
        }
        return std::nullopt;
    }

    std::string_view text_;
    size_t pos_ = 0;
};

std::optional<Json> parse_json(std::string_view text) {
    return JsonParser(text).parse_document();
}

TEST(JsonJudge, AcceptsAndRejects) {
    // The judge must itself be right, or the tests below prove nothing.
    for (const char *good : {"{}", "[]", "\"\"", "0", "-1.5e+3", "true", "null",
                             R"({"a":[1,{"b":"\u00e9\ud83d\ude00"}],"c":false})", " [ 1 , 2 ] "}) {
        EXPECT_TRUE(parse_json(good).has_value()) << good;
    }
    for (const char *bad :
         {"", "{", "[1,]", R"({"a":1,})", R"({"a":1,"a":2})", "\"\x01\"", "\"\\x\"", "01", "1.",
          "tru", "{} {}", R"("\ud83d")", "'a'", R"({a:1})", "\"abc"}) {
        EXPECT_FALSE(parse_json(bad).has_value()) << bad;
    }
    EXPECT_EQ(parse_json(R"("\u00e9")")->text, "\xc3\xa9");
    EXPECT_EQ(parse_json(R"("\ud83d\ude00")")->text, "\xf0\x9f\x98\x80");
}

// ---- json::append_string ---------------------------------------------------------------------

TEST(JsonText, EscapesQuotesBackslashesAndControlCharacters) {
    EXPECT_EQ(json::quote(""), R"("")");
    EXPECT_EQ(json::quote("plain text"), R"("plain text")");
    EXPECT_EQ(json::quote(R"(say "hi")"), R"("say \"hi\"")");
    EXPECT_EQ(json::quote(R"(C:\dir\)"), R"("C:\\dir\\")");
    EXPECT_EQ(json::quote("a\nb\rc\td"), R"("a\nb\rc\td")");
    EXPECT_EQ(json::quote(std::string("\0\x01\x08\x0c\x1f", 5)),
              R"("\u0000\u0001\u0008\u000c\u001f")");
    EXPECT_EQ(json::quote("</script>"), R"("</script>")");  // '/' needs no escape
    EXPECT_EQ(json::quote("\x7f"), "\"\x7f\"");             // DEL is not a control char in JSON
    EXPECT_EQ(json::quote("caf\xc3\xa9 \xf0\x9f\x98\x80"), "\"caf\xc3\xa9 \xf0\x9f\x98\x80\"");
}

TEST(JsonText, AppendsToTheCallersBuffer) {
    std::string out = "{\"k\":";
    json::append_string(out, "v\"");
    EXPECT_EQ(out, R"({"k":"v\"")");
}

TEST(JsonText, EveryByteRoundTripsThroughAStrictParser) {
    for (int b = 0; b < 0x80; ++b) {
        const std::string value = std::string("x") + static_cast<char>(b) + "y";
        const std::string quoted = json::quote(value);
        const std::optional<Json> parsed = parse_json(quoted);
        ASSERT_TRUE(parsed.has_value()) << "byte " << b << ": " << quoted;
        EXPECT_EQ(parsed->text, value) << "byte " << b;
    }
    std::string all;
    for (int b = 0; b < 0x80; ++b) {
        all.push_back(static_cast<char>(b));
    }
    const std::optional<Json> parsed = parse_json(json::quote(all));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(parsed->text, all);
}

// ---- OperationOutcome ------------------------------------------------------------------------

TEST(Outcome, IssueCodeForStatus) {
    const std::pair<unsigned, const char *> cases[] = {
        {400, "invalid"},       {401, "login"},      {403, "forbidden"},  {404, "not-found"},
        {405, "not-supported"}, {409, "conflict"},   {413, "too-long"},   {429, "throttled"},
        {500, "exception"},     {502, "exception"},  {503, "transient"},  {504, "timeout"},
        {599, "exception"},     {418, "processing"}, {422, "processing"},
    };
    for (const auto &[status, code] : cases) {
        EXPECT_EQ(outcome::issue_code_for_status(status), code) << status;
    }
}

TEST(Outcome, ExactRendering) {
    EXPECT_EQ(outcome::render(403, "resource-type-not-permitted", "Not permitted", "corr-1"),
              R"({"resourceType":"OperationOutcome","id":"corr-1","issue":[{"severity":"error",)"
              R"("code":"forbidden","details":{"coding":[{"system":)"
              R"("https://ehrgate.dev/fhir/CodeSystem/gateway-reason",)"
              R"("code":"resource-type-not-permitted"}],"text":"Not permitted"},)"
              R"("diagnostics":"correlation-id: corr-1"}]})");
}

TEST(Outcome, EveryStatusRendersValidJsonWithTheRightFields) {
    const std::pair<unsigned, const char *> cases[] = {
        {400, "invalid"},   {401, "login"},         {403, "forbidden"},
        {404, "not-found"}, {405, "not-supported"}, {429, "throttled"},
        {503, "transient"}, {504, "timeout"},       {500, "exception"},
    };
    for (const auto &[status, code] : cases) {
        SCOPED_TRACE(status);
        const std::string body =
            outcome::render(status, "some-reason", "A fixed message.", "01HZX3J5QKABCDEF");
        const std::optional<Json> doc = parse_json(body);
        ASSERT_TRUE(doc.has_value()) << body;
        EXPECT_EQ((*doc)["resourceType"].text, "OperationOutcome");
        EXPECT_EQ((*doc)["id"].text, "01HZX3J5QKABCDEF");
        ASSERT_EQ((*doc)["issue"].items.size(), 1u);
        const Json &issue = (*doc)["issue"][0];
        EXPECT_EQ(issue["severity"].text, "error");
        EXPECT_EQ(issue["code"].text, code);
        EXPECT_EQ(issue["details"]["text"].text, "A fixed message.");
        ASSERT_EQ(issue["details"]["coding"].items.size(), 1u);
        EXPECT_EQ(issue["details"]["coding"][0]["code"].text, "some-reason");
        EXPECT_EQ(issue["details"]["coding"][0]["system"].text,
                  "https://ehrgate.dev/fhir/CodeSystem/gateway-reason");
        EXPECT_EQ(issue["diagnostics"].text, "correlation-id: 01HZX3J5QKABCDEF");
    }
}

TEST(Outcome, HostileInputsStayInsideTheirStrings) {
    // None of these come from the request in production, but a broken caller must not be able to
    // produce invalid JSON or inject members.
    static constexpr char kNasty[] =
        "\",\"injected\":true,\"x\":\"\\\n\r\t\x01\0\x1f\xc3\xa9</script>";
    const std::string nasty(kNasty, sizeof(kNasty) - 1);
    ASSERT_EQ(nasty.size(), 41u);
    const std::string body = outcome::render(429, nasty, nasty, nasty);
    const std::optional<Json> doc = parse_json(body);
    ASSERT_TRUE(doc.has_value()) << body;
    EXPECT_EQ(doc->members.size(), 3u);  // resourceType, id, issue
    EXPECT_EQ((*doc)["id"].text, nasty);
    const Json &issue = (*doc)["issue"][0];
    EXPECT_EQ(issue.members.size(), 4u);  // severity, code, details, diagnostics
    EXPECT_EQ(issue["code"].text, "throttled");
    EXPECT_EQ(issue["details"]["text"].text, nasty);
    EXPECT_EQ(issue["details"]["coding"][0]["code"].text, nasty);
    EXPECT_EQ(issue["diagnostics"].text, "correlation-id: " + nasty);
}

TEST(Outcome, EmptyFields) {
    const std::optional<Json> doc = parse_json(outcome::render(500, "", "", ""));
    ASSERT_TRUE(doc.has_value());
    EXPECT_EQ((*doc)["id"].kind, Json::Kind::String);
    EXPECT_EQ((*doc)["id"].text, "");
    EXPECT_EQ((*doc)["issue"][0]["code"].text, "exception");
}

// ---- base64url -------------------------------------------------------------------------------

TEST(Base64Url, Rfc4648Vectors) {
    // RFC 4648 section 10, without the padding.
    const std::pair<const char *, const char *> cases[] = {
        {"", ""},           {"f", "Zg"},          {"fo", "Zm8"},          {"foo", "Zm9v"},
        {"foob", "Zm9vYg"}, {"fooba", "Zm9vYmE"}, {"foobar", "Zm9vYmFy"},
    };
    for (const auto &[plain, encoded] : cases) {
        EXPECT_EQ(base64url::encode(plain), encoded);
        EXPECT_EQ(base64url::decode(encoded), plain);
    }
}

TEST(Base64Url, UsesTheUrlAlphabet) {
    EXPECT_EQ(base64url::encode("\xfb\xff"), "-_8");
    EXPECT_EQ(base64url::encode("\xff\xff\xff"), "____");
    EXPECT_EQ(base64url::encode("\xfb\xef\xbe"), "----");
    EXPECT_EQ(base64url::decode("-_8"), "\xfb\xff");
    EXPECT_EQ(base64url::decode("____"), "\xff\xff\xff");
}

TEST(Base64Url, RoundTripsEveryLengthUpTo64) {
    std::mt19937 rng(64);
    for (size_t n = 0; n <= 64; ++n) {
        for (const int fill : {-1, 0x00, 0xff}) {
            std::string bytes(n, '\0');
            for (char &c : bytes) {
                c = static_cast<char>(fill < 0 ? static_cast<int>(rng() & 0xff) : fill);
            }
            const std::string text = base64url::encode(bytes);
            SCOPED_TRACE(text);
            EXPECT_EQ(text.size(), (n * 4 + 2) / 3);  // unpadded length
            EXPECT_EQ(text.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                             "0123456789-_"),
                      std::string::npos);
            EXPECT_EQ(base64url::decode(text), bytes);
        }
    }
}

TEST(Base64Url, StrictRejection) {
    for (const char *bad : {
             "Zg==",       // padding
             "Zg=",        // partial padding
             "Zm9v====",   // padding after a full group
             "=",          //
             "+w",         // standard alphabet
             "/w",         //
             "ab+/",       //
             "Z",          // length % 4 == 1
             "Zm9vY",      //
             "Zm9vYmFyZ",  //
             "QR",         // non-zero trailing bits: "QQ" is the one spelling of "A"
             "Zh",         // "Zg" is the one spelling of "f"
             "Zm9",        // "Zm8" is the one spelling of "fo"
             "Zm 9",       // whitespace
             "Zm9\n",      //
             "Zm.v",       //
         }) {
        EXPECT_EQ(base64url::decode(bad), std::nullopt) << bad;
    }
    EXPECT_EQ(base64url::decode("QQ"), "A");
    EXPECT_EQ(base64url::decode(std::string("Zm\0v", 4)), std::nullopt);
    for (int b = 0x80; b <= 0xff; ++b) {
        EXPECT_EQ(base64url::decode(std::string("Zm9") + static_cast<char>(b)), std::nullopt) << b;
    }
}

TEST(Base64Url, EveryShortSpellingIsCanonical) {
    // Exhaustive over 2- and 3-character inputs: decoding accepts exactly the strings the encoder
    // produces, so each byte string has one accepted spelling.
    const std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    int accepted2 = 0;
    int accepted3 = 0;
    for (const char a : alphabet) {
        for (const char b : alphabet) {
            const std::string two{a, b};
            if (const std::optional<std::string> bytes = base64url::decode(two)) {
                ++accepted2;
                EXPECT_EQ(base64url::encode(*bytes), two);
            }
            for (const char c : alphabet) {
                const std::string three{a, b, c};
                if (const std::optional<std::string> bytes = base64url::decode(three)) {
                    ++accepted3;
                    ASSERT_EQ(base64url::encode(*bytes), three);
                }
            }
        }
    }
    EXPECT_EQ(accepted2, 256);    // one spelling per byte
    EXPECT_EQ(accepted3, 65536);  // one spelling per pair of bytes
}

}  // namespace
}  // namespace ehrgate
